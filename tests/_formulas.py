"""Direct formulas of DESIGN.md §1 and §3, the ground truth of the tests, and the error model.

Written from the design document only, independent of kdkernels/reference.py: softmaxes are
formed with an explicit max shift, divergences are written out elementwise, mixtures are
formed as m = beta p + (1 - beta) q in probability space (fine in float64 for the logit
ranges the tests use), and gradients come from autograd of these formulas. Run them on
float64 tensors to get the truth, or on low-precision tensors to get "plain PyTorch at that
dtype" (the baseline of the error model below).
"""

from __future__ import annotations

import math

import pytest
import torch

# --------------------------------------------------------------------------------------
# one row = one token: the divergences of DESIGN.md §1
# --------------------------------------------------------------------------------------


def log_softmax(z: torch.Tensor) -> torch.Tensor:
    """log softmax over the last dim with an explicit max shift; -inf entries stay -inf."""
    m = z.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    return z - m - torch.log(torch.exp(z - m).sum(-1, keepdim=True))


def _plogratio(p: torch.Tensor, lp: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """p * (lp - lr) summed over the vocabulary; entries with p = 0 contribute 0.

    The masked entries are replaced before the product, so that autograd never multiplies a
    zero gradient by inf/nan (the classic `where` trap: -inf - -inf = nan at padding)."""
    keep = p > 0
    diff = torch.where(keep, lp, torch.zeros_like(lp)) - torch.where(
        keep, lr, torch.zeros_like(lr)
    )
    return torch.where(keep, p * diff, torch.zeros_like(p)).sum(-1)


def kl(p, lp, lr) -> torch.Tensor:
    """KL(p || r) per row from p, log p and log r. r = 0 where p > 0 gives +inf (true value)."""
    return _plogratio(p, lp, lr)


def _log_mixture(m: torch.Tensor) -> torch.Tensor:
    """log m, with the zeros of m (both p and q underflowed) at -inf and a zero gradient
    there: log's backward at 0 would be 0 * (1/0) = nan even where the term is masked."""
    pos = m > 0
    return torch.where(pos, torch.log(torch.where(pos, m, torch.ones_like(m))), -math.inf)


def row_divergence(lq: torch.Tensor, lp: torch.Tensor, name: str, beta: float, skew: float,
                   alpha: float = 0.5, ab_alpha: float = 0.5, ab_beta: float = 0.5):
    """Per-row divergence D(p || q) of DESIGN.md §1's table from the log-probabilities.

    q = student, p = teacher. Mixtures are formed directly in probability space."""
    q, p = lq.exp(), lp.exp()
    if name == "soft_cross_entropy":
        # -sum p log q, p = 0 entries masked (q = 0 < p: +inf)
        return kl(p, torch.zeros_like(lp), lq)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "forward_reverse_kl":
        return alpha * kl(p, lp, lq) + (1.0 - alpha) * kl(q, lq, lp)
    if name == "alpha_beta":
        # Cichocki-Cruces-Amari's AB-divergence (ABKD's form), written in probability space
        a, b = ab_alpha, ab_beta
        if (a, b) == (1.0, 0.0):  # the limits b -> 0 at a = 1, a -> 0 at b = 1
            return kl(p, lp, lq)
        if (a, b) == (0.0, 1.0):
            return kl(q, lq, lp)
        # p^a = exp(a log p): the same numbers, and a finite gradient where p underflows to 0
        # (d p^a / dp = a p^(a-1) is inf there)
        terms = (torch.exp(a * lp + b * lq) - a / (a + b) * torch.exp((a + b) * lp)
                 - b / (a + b) * torch.exp((a + b) * lq))
        return -terms.sum(-1) / (a * b)
    if name == "forward_kl" or (name == "jsd" and beta == 0.0):
        return kl(p, lp, lq)  # GKD convention: jsd(0) is forward KL exactly
    if name == "reverse_kl" or (name == "jsd" and beta == 1.0):
        return kl(q, lq, lp)
    if name == "jsd":
        m = beta * p + (1.0 - beta) * q
        lm = _log_mixture(m)
        return beta * kl(p, lp, lm) + (1.0 - beta) * kl(q, lq, lm)
    if name == "skew_forward_kl":
        m = skew * p + (1.0 - skew) * q
        return kl(p, lp, _log_mixture(m))
    if name == "skew_reverse_kl":
        m = skew * q + (1.0 - skew) * p
        return kl(q, lq, _log_mixture(m))
    raise ValueError(name)


def cross_entropy(s: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """CE of the student at temperature 1, per row; ignored rows give 0."""
    valid = labels != ignore_index
    ls = log_softmax(s)
    picked = ls.gather(-1, torch.where(valid, labels, 0)[..., None])[..., 0]
    return torch.where(valid, -picked, torch.zeros_like(picked))


def kd_loss(
    s: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    alpha: float = 0.5,
    ab_alpha: float = 0.5,
    ab_beta: float = 0.5,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    temperature_scale: bool = True,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "token_mean",
) -> torch.Tensor:
    """kd.kd_loss written from DESIGN.md §1/§3, computed in the dtype of s and t."""
    ts = temperature
    tt = temperature if teacher_temperature is None else teacher_temperature
    lq = log_softmax(s / ts)
    lp = log_softmax(t / tt)
    row = row_divergence(lq, lp, divergence, beta, skew, alpha, ab_alpha, ab_beta) * kd_weight
    if temperature_scale:
        row = row * (ts * ts)
    if labels is not None:
        if ce_weight:
            row = row + ce_weight * cross_entropy(s, labels, ignore_index)
        row = torch.where(labels != ignore_index, row, torch.zeros_like(row))
    return reduce(row, reduction, s, labels, ignore_index)


def reduce(row, reduction, s, labels, ignore_index):
    """The reductions of DESIGN.md §3 applied to row losses of shape s.shape[:-1]."""
    if reduction == "none":
        return row
    total = row.sum()
    if reduction == "sum":
        return total
    if reduction == "token_mean":
        count = row.numel() if labels is None else int((labels != ignore_index).sum())
        return total / max(count, 1)  # 0, not nan, when every row is ignored
    if reduction == "batchmean":
        return total / s.shape[0] if s.shape[0] else total
    if reduction == "mean":
        return total / s.numel() if s.numel() else total
    raise ValueError(reduction)


# --------------------------------------------------------------------------------------
# error model
# --------------------------------------------------------------------------------------

# A result's error against the float64 truth may be at most 2x the error that plain PyTorch
# makes on the same inputs at the same dtype (the baseline), plus a floor:
#     max|out - truth| <= 2 * max|baseline - truth| + atol + rtol * max|truth|
# The factor 2 leaves room for a different (but no worse) order of floating-point
# operations. The floor covers inputs on which the baseline happens to be nearly exact
# (e.g. a loss that is 0 to the last bit): atol is a few units in the last place of the
# output dtype near 1 (float32 results: 2**-23 ~ 1.2e-7, so ~1e-6 allows ~8 ulps; bfloat16
# gradients are stored with 8 mantissa bits, so one rounding of an O(1e-1) gradient entry is
# ~1e-3), rtol the same in relative terms for large values such as T**2-scaled losses.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-6, rtol=2e-6),
    torch.bfloat16: dict(atol=2e-3, rtol=8e-3),
    torch.float16: dict(atol=2e-4, rtol=1e-3),
}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64, treating equal infinities as exact and nan as infinite error."""
    a, b = a.detach().double(), b.detach().double()
    if a.numel() == 0:
        return 0.0
    same = (a == b) | (torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b)))
    d = torch.where(same, torch.zeros_like(a), (a - b).abs())
    d = torch.nan_to_num(d, nan=math.inf)
    return float(d.max())


def assert_error_model(
    out, truth, baseline, dtype: torch.dtype, what: str = "value", extra: float = 0.0
) -> None:
    """out against the float64 truth, with the bound above; baseline is plain PyTorch.

    extra: an additional absolute allowance for an error source the caller names."""
    assert out.shape == truth.shape, f"{what}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    tol = TOLERANCES[dtype]
    err = max_err(out, truth)
    base = max_err(baseline, truth) if baseline is not None else 0.0
    # a baseline that blew up would make any result pass: the model needs a finite one
    assert math.isfinite(base), f"{what}: plain PyTorch baseline is not finite ({dtype})"
    finite = truth.detach().double()
    finite = finite[torch.isfinite(finite)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    bound = 2.0 * base + tol["atol"] + tol["rtol"] * scale + extra
    assert err <= bound, (
        f"{what} ({dtype}): max error {err:.3e} > bound {bound:.3e} "
        f"(plain PyTorch error {base:.3e}, scale {scale:.3e})"
    )


# --------------------------------------------------------------------------------------
# harness: backends' dtypes, one kd.kd_loss call checked against the truth, values and gradients
# --------------------------------------------------------------------------------------


def skip_unsupported(impl: str, *dtypes: torch.dtype) -> None:
    """pytest.skip (with the reason) when the backend does not declare one of `dtypes`."""
    from kdkernels import _dispatch

    supported = _dispatch._BACKENDS[impl].SUPPORTED_DTYPES
    for dtype in dtypes:
        if dtype not in supported:
            pytest.skip(f"impl={impl!r} does not support {dtype} (SUPPORTED_DTYPES)")


def upstream_grad(out: torch.Tensor) -> torch.Tensor:
    """A non-unit upstream gradient: randn for a tensor, a scalar != 1 for a reduction."""
    if out.dim() == 0:
        return torch.tensor(0.7, dtype=out.dtype, device=out.device)
    return torch.randn_like(out)


def check_kd_loss(impl, s, t, labels=None, *, teacher_grad=True, **kwargs):
    """Run kd.kd_loss(s, t, labels, impl=impl, **kwargs) forward and backward and compare
    the loss, d/ds and (when teacher_grad) d/dt with the float64 formula of this module,
    under the error model (baseline: the same formula evaluated at the inputs' dtype).

    s, t are the logits already in the dtype under test (their values are the inputs)."""
    import kdkernels as kd

    dtype = s.dtype
    s = s.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_(teacher_grad)
    out = kd.kd_loss(s, t, labels, impl=impl, **kwargs)
    want_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == want_dtype, f"loss dtype {out.dtype}, expected {want_dtype}"
    g = upstream_grad(out)
    out.backward(g)

    results = {}
    for name, dt in (("truth", torch.float64), ("baseline", dtype)):
        s_, t_ = (x.detach().to(dt).requires_grad_() for x in (s, t))
        ref = kd_loss(s_, t_, labels, **kwargs)
        ref.backward(g.to(ref.dtype))
        results[name] = (ref, s_.grad, t_.grad)
    (ref, gs, gt), (base, bgs, bgt) = results["truth"], results["baseline"]
    if dtype == torch.float64:  # the baseline is the truth itself: keep only the floor
        base, bgs, bgt = ref, gs, gt
    assert_error_model(out, ref, base, dtype, "loss")
    assert s.grad is not None and s.grad.dtype == dtype and s.grad.shape == s.shape
    assert_error_model(s.grad, gs, bgs, dtype, "student gradient")
    if teacher_grad:
        assert t.grad is not None and t.grad.dtype == dtype
        assert_error_model(t.grad, gt, bgt, dtype, "teacher gradient")
    else:
        assert t.grad is None
    return out, s.grad, t.grad


# --------------------------------------------------------------------------------------
# sparse (top-k) teachers: kd.sparse_kd_loss from its definition, row by row
# --------------------------------------------------------------------------------------


def sparse_row_divergence(lp: torch.Tensor, lq: torch.Tensor, divergence: str, beta: float):
    """D(p || q) over a few categories given their log-probabilities (p = 0 entries may be
    -inf: they contribute 0 to the p-weighted sums)."""
    return row_divergence(lq, lp, divergence, beta, 0.0)


def sparse_kd_loss(
    s: torch.Tensor,
    ids: torch.Tensor,
    lp: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    tail: str = "renormalize",
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    temperature_scale: bool = True,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "token_mean",
    vocab_size: int | None = None,
    tail_from_complement: bool = True,
    q_tail_shift: float = 0.0,
) -> torch.Tensor:
    """kd.sparse_kd_loss written from its definition, in the dtype of s and lp.

    Per row, S = the ids that are not -1, q = softmax(s / Ts) over the whole vocabulary:
      renormalize  p = softmax_S(lp / Tt), q^ = softmax_S(s / Ts), D(p || q^)
      bucket       categories S + tail: p_i = exp(lp_i), p_tail = max(0, 1 - sum_S p);
                   q_i, q_tail = sum of q over the columns NOT in S (summed directly over
                   the complement, not as 1 - sum_S q); no tail when S is the whole row
      none         sum_S exp(lp_i) (lp_i - log q_i)
    A row with no valid id has D = 0.

    tail_from_complement=False forms q_tail as 1 - sum_S q_i instead (what an eager
    implementation writes, and all that a kernel holding the row's log-sum and K logits can
    do): at a low precision it carries the absolute rounding error of sum_S q_i, which is the
    baseline of the error model for the bucket tail. q_tail_shift: added to q_tail, to
    measure the effect of that absolute error on the loss and gradients."""
    if vocab_size is not None:
        s = s[..., :vocab_size]
    v = s.shape[-1]
    lead = s.shape[:-1]
    s2, ids2, lp2 = s.reshape(-1, v), ids.reshape(-1, ids.shape[-1]), lp.reshape(-1, lp.shape[-1])
    lq_full = log_softmax(s2 / temperature)
    rows = []
    for r in range(s2.shape[0]):
        keep = ids2[r] >= 0
        sel = ids2[r][keep]
        lpr = lp2[r][keep]
        if sel.numel() == 0:
            rows.append(s2[r].sum() * 0.0 + lp2[r].sum() * 0.0)
            continue
        if tail == "renormalize":
            lq = log_softmax(s2[r, sel] / temperature)
            lpn = log_softmax(lpr / teacher_temperature)
            rows.append(sparse_row_divergence(lpn, lq, divergence, beta))
            continue
        lq = lq_full[r, sel]
        if tail == "none":
            rows.append((lpr.exp() * (lpr - lq)).sum())
            continue
        outside = torch.ones(v, dtype=torch.bool, device=s.device)
        outside[sel] = False
        if bool(outside.any()):
            p_tail = (1.0 - lpr.exp().sum()).clamp(min=0.0)
            if tail_from_complement:
                q_tail = lq_full[r][outside].exp().sum() + q_tail_shift
            else:
                q_tail = (1.0 - lq.exp().sum()).clamp(min=torch.finfo(s.dtype).tiny)
            lp_all = torch.cat([lpr, torch.log(p_tail)[None]])
            lq_all = torch.cat([lq, torch.log(q_tail)[None]])
        else:
            lp_all, lq_all = lpr, lq
        rows.append(sparse_row_divergence(lp_all, lq_all, divergence, beta))
    row = torch.stack(rows).reshape(lead) * kd_weight
    if temperature_scale:
        row = row * (temperature * temperature)
    if labels is not None:
        if ce_weight:
            row = row + ce_weight * cross_entropy(s, labels, ignore_index)
        row = torch.where(labels != ignore_index, row, torch.zeros_like(row))
    return reduce(row, reduction, s, labels, ignore_index)
