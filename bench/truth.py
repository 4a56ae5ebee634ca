"""The float64 ground truth every provider's loss and gradient are compared with.

The loss is evaluated over all rows (in row chunks); the gradient by float64 autograd on a
sample of rows (every k-th row, at most `grad_rows`): rows are independent, so a row's
gradient does not depend on the others. Both come from DESIGN.md §1's formulas written out
with logsumexp, not from any provider's code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .providers import AB, FR_ALPHA, Config, canonical, log_or_minus_inf

# Elements per chunk of the float64 ground truth: 2**22 float64 = 32 MiB per temporary.
F64_CHUNK_ELEMENTS = 1 << 22


def rows_float64(s, t, divergence: str, cfg: Config):
    """Row losses (divergence * T**2) in float64, written from DESIGN.md §1 directly."""
    T = cfg.temperature
    kind, a = canonical(divergence, cfg.beta, cfg.skew)
    # in place on a fresh copy (copy=True even for float64 input): one less temporary
    zs = s.to(torch.float64, copy=True).div_(T)
    zt = t.to(torch.float64, copy=True).div_(T)
    if torch.is_grad_enabled():
        lq = zs - torch.logsumexp(zs, -1, keepdim=True)
        lp = zt - torch.logsumexp(zt, -1, keepdim=True)
    else:  # the same values in place: two fewer N x V float64 temporaries per chunk
        lq = zs.sub_(torch.logsumexp(zs, -1, keepdim=True))
        lp = zt.sub_(torch.logsumexp(zt, -1, keepdim=True))
    if kind == "forward_kl":
        return (lp.exp() * (lp - lq)).sum(-1) * (T * T)
    if kind == "reverse_kl":
        return (lq.exp() * (lq - lp)).sum(-1) * (T * T)
    q, p = lq.exp(), lp.exp()
    if kind == "soft_cross_entropy":
        return -(p * lq).sum(-1) * (T * T)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1) * (T * T)
    if kind == "forward_reverse_kl":
        d = FR_ALPHA * (p * (lp - lq)).sum(-1) + (1 - FR_ALPHA) * (q * (lq - lp)).sum(-1)
        return d * (T * T)
    if kind == "alpha_beta":
        a, b = AB
        d = -(torch.exp(a * lp + b * lq) - a / (a + b) * torch.exp((a + b) * lp)
              - b / (a + b) * torch.exp((a + b) * lq)).sum(-1) / (a * b)
        return d * (T * T)
    if kind == "jsd":
        lm = torch.logaddexp(lp + log_or_minus_inf(a), lq + log_or_minus_inf(1.0 - a))
        d = a * (p * (lp - lm)).sum(-1) + (1.0 - a) * (q * (lq - lm)).sum(-1)
    elif kind == "skew_forward_kl":
        lm = torch.logaddexp(lp + log_or_minus_inf(a), lq + log_or_minus_inf(1.0 - a))
        d = (p * (lp - lm)).sum(-1)
    elif kind == "skew_reverse_kl":
        lm = torch.logaddexp(lq + log_or_minus_inf(a), lp + log_or_minus_inf(1.0 - a))
        d = (q * (lq - lm)).sum(-1)
    else:
        raise NotImplementedError(f"no float64 formula for {divergence!r} in bench")
    return d * (T * T)


@dataclass
class Truth:
    loss: float  # float64 batchmean loss over all rows
    rows: torch.Tensor  # (R,) indices of the rows whose gradient is checked
    grad: torch.Tensor | None  # (R, V) float64 d loss / d s on those rows


def ground_truth(s, t, divergence: str, cfg: Config, grad_rows: int, need_grad: bool) -> Truth:
    n, v = s.shape
    step = max(1, F64_CHUNK_ELEMENTS // v)
    with torch.no_grad():
        total = sum(
            float(rows_float64(s[i:i + step], t[i:i + step], divergence, cfg).sum())
            for i in range(0, n, step)
        )
    r = min(n, grad_rows)
    rows = torch.linspace(0, n - 1, r).round().long().unique() if r < n else torch.arange(n)
    rows = rows.to(s.device)
    grad = None
    if need_grad:
        parts = []
        for i in range(0, rows.numel(), step):
            idx = rows[i:i + step]
            x = s.detach()[idx].double().requires_grad_()
            # batchmean: each row's term is divided by the full N
            (rows_float64(x, t[idx], divergence, cfg).sum() / n).backward()
            parts.append(x.grad)
        grad = torch.cat(parts)
    return Truth(total / n, rows, grad)
