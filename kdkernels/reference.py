"""Pure-PyTorch implementation (`impl="torch"`): the CPU fallback and the test oracle.

Rows are processed `chunk_rows` at a time, so besides the gradient the extra memory is
O(chunk_rows x V). Forward saves the inputs and a few floats per row; backward recomputes
each chunk's log-probabilities from the saved logsumexps. Math runs in float32 (float64 for
float64 logits). No host synchronization: loops run over Python chunk offsets only.

Math for one row (q = softmax(zs) student, p = softmax(zt) teacher; lq, lp their logs):

  forward_kl  D = sum p (lp - lq)                  dD/dzs = q - p
                                                   dD/dzt = p (lp - lq - D)
  reverse_kl  D = sum q (lq - lp)                  dD/dzs = q (lq - lp - D)
                                                   dD/dzt = p - q
  mixture     m = a p + (1-a) q,  lm = logaddexp(log a + lp, log(1-a) + lq)
              A = sum p (lp - lm),  B = sum q (lq - lm),  D = cp A + cq B
              u = (cp p + cq q) / m,  Uq = sum q u,  Up = sum p u
              dD/dzs = cq q (lq - lm - B) - (1-a) q (u - Uq)
              dD/dzt = cp p (lp - lm - A) -   a   p (u - Up)

Derivation of the mixture gradient: with dq_i/dzs_k = q_i (d_ik - q_k) and
dm_i/dzs_k = (1-a) q_i (d_ik - q_k),
  dA/dzs_k = -sum_i (p_i/m_i) dm_i/dzs_k = -(1-a) (q_k p_k/m_k - q_k sum_i q_i p_i/m_i)
  dB/dzs_k = q_k (lq_k - lm_k - B) - (1-a) (q_k q_k/m_k - q_k sum_i q_i q_i/m_i)
and cp dA + cq dB gives the line above (symmetrically for zt with a in place of 1-a).
For jsd (cp = a, cq = 1-a) u = 1 and the second term vanishes, leaving DESIGN.md's formula.
q u and p u are formed as exp of log-space sums, so they never overflow or give 0 * inf.

Entries that are -inf in both logits (vocab padding) have p = q = 0 and contribute 0.
Chain rule: d/ds = dD/dzs / Ts, d/dt = dD/dzt / Tt.
Cross-entropy (T = 1): CE = logsumexp(s) - s[label], dCE/ds = softmax(s) - onehot(label).
"""

from __future__ import annotations

import math

import torch

from ._spec import LossSpec

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Elements per chunk: 2**22 float32 = 16 MiB for each of the ~8 temporaries of a chunk.
CHUNK_ELEMENTS = 1 << 22


def is_available(device: torch.device) -> tuple[bool, str]:
    return True, ""


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_rows(n_rows: int, n_cols: int) -> int:
    return max(1, min(n_rows, CHUNK_ELEMENTS // max(n_cols, 1)))


def _xlogy_masked(w: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """w * diff where w > 0, else 0 (so 0 * inf and 0 * nan of padded entries vanish)."""
    return torch.where(w > 0, w * diff, 0.0)


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


# --------------------------------------------------------------------------------------
# Divergence math on one chunk: lq, lp are (rows, V) log-probabilities in acc dtype.
# --------------------------------------------------------------------------------------


def _mixture_logs(lq, lp, div):
    """log m = logaddexp(log a + lp, log(1-a) + lq), formed in log space (never m itself)."""
    return torch.logaddexp(lp + _log(div.mix), lq + _log(1.0 - div.mix))


def _mixture_u(lq, lp, lm, div):
    """(q u, p u) with u = (cp p + cq q) / m, as exps of log-space sums."""
    qu = torch.zeros_like(lq)
    pu = torch.zeros_like(lp)
    if div.coef_p:
        qu += div.coef_p * torch.exp(lq + lp - lm)
        pu += div.coef_p * torch.exp(2 * lp - lm)
    if div.coef_q:
        qu += div.coef_q * torch.exp(2 * lq - lm)
        pu += div.coef_q * torch.exp(lp + lq - lm)
    # padded entries (lm = -inf) give nan above; they carry no mass
    qu = torch.where(lq > -math.inf, qu, 0.0)
    pu = torch.where(lp > -math.inf, pu, 0.0)
    return qu, pu


def divergence_rows(lq, lp, div):
    """Per-row divergence and the row scalars its gradient needs.

    Returns (D, saved) where saved is a tuple of (rows,) tensors for `divergence_grads`.
    # read 2 x rows x V, write rows
    """
    q, p = lq.exp(), lp.exp()
    if div.kind == "forward_kl":
        d = _xlogy_masked(p, lp - lq).sum(-1)
        return d, (d,)
    if div.kind == "reverse_kl":
        d = _xlogy_masked(q, lq - lp).sum(-1)
        return d, (d,)
    # Terms with a zero weight are skipped, not multiplied by 0: at mix = 1 (m = p) an entry
    # with p = 0 < q has lm = -inf, so KL(q || m) and u are infinite there although their
    # weight in D and in the gradient is 0 (and symmetrically at mix = 0).
    lm = _mixture_logs(lq, lp, div)
    zero = lq.new_zeros(lq.shape[0])
    a = _xlogy_masked(p, lp - lm).sum(-1) if div.coef_p else zero
    b = _xlogy_masked(q, lq - lm).sum(-1) if div.coef_q else zero
    qu, pu = _mixture_u(lq, lp, lm, div)
    uq = qu.sum(-1) if div.mix < 1 else zero
    up = pu.sum(-1) if div.mix > 0 else zero
    return div.coef_p * a + div.coef_q * b, (a, b, uq, up)


def divergence_grads(lq, lp, div, saved, need_teacher: bool):
    """dD/dzs and dD/dzt (None unless need_teacher) of one chunk, from the saved scalars."""
    q, p = lq.exp(), lp.exp()
    dt = None
    if div.kind == "forward_kl":
        (d,) = saved
        ds = q - p
        if need_teacher:
            dt = _xlogy_masked(p, lp - lq - d[:, None])
        return ds, dt
    if div.kind == "reverse_kl":
        (d,) = saved
        ds = _xlogy_masked(q, lq - lp - d[:, None])
        if need_teacher:
            dt = p - q
        return ds, dt
    a, b, uq, up = (x[:, None] for x in saved)
    lm = _mixture_logs(lq, lp, div)
    qu, pu = _mixture_u(lq, lp, lm, div)
    ds = -(1.0 - div.mix) * (qu - q * uq) if div.mix < 1 else torch.zeros_like(q)
    if div.coef_q:
        ds += div.coef_q * _xlogy_masked(q, lq - lm - b)
    if need_teacher:
        dt = -div.mix * (pu - p * up) if div.mix > 0 else torch.zeros_like(p)
        if div.coef_p:
            dt += div.coef_p * _xlogy_masked(p, lp - lm - a)
    return ds, dt


# --------------------------------------------------------------------------------------
# kd_rows: autograd function over (N, V) logits
# --------------------------------------------------------------------------------------


def _row_mask(labels, spec, n, device, dtype):
    if labels is None:
        return torch.ones(n, device=device, dtype=dtype)
    return (labels != spec.ignore_index).to(dtype)


def _shift(x, inv_t, m=None, out=None):
    """z = (x - m) * inv_t in acc dtype, m = max x per row (computed when not given).

    Logits enter as their difference from the row maximum: exact near the maximum, where
    the probability mass is, so log-probs (z - log sum e^z) keep full precision even at
    |x| ~ 1e4, where m + log sum e^z would round by ~1e-3. Rows are never summed into a
    single logsumexp; stats are kept as the pair (m, r = log sum e^z).
    """
    if m is None:
        m = x.amax(-1).to(acc_dtype(x.dtype))
        m = torch.where(m > -math.inf, m, 0.0)  # a row of -inf would give -inf - -inf
    z = torch.sub(x, m[:, None], out=out)
    return z.mul_(inv_t), m


def _log_probs(x, inv_t, stats=None):
    """(log softmax(x * inv_t), (m, r)) of a chunk; see _shift."""
    z, m = _shift(x, inv_t, None if stats is None else stats[0])
    r = torch.exp(z).sum(-1).log_() if stats is None else stats[1]
    return z.sub_(r[:, None]), (m, r)


def _chunk_logs(s, t, spec, stats=None):
    """(lq, lp, (m_s, r_s, m_t, r_t)) of one chunk; stats are computed when not given."""
    lq, st_s = _log_probs(s, spec.inv_ts, None if stats is None else stats[:2])
    lp, st_t = _log_probs(t, spec.inv_tt, None if stats is None else stats[2:])
    return lq, lp, (*st_s, *st_t)


def _ce_chunk(s, labels, spec):
    """Cross-entropy at T = 1 of one chunk: (loss (rows,), (m1, r1)). Ignored rows -> 0.

    CE = -log softmax(s)[label], read off the shifted log-probabilities (see _shift).
    """
    ls, st = _log_probs(s, 1.0)
    valid = labels != spec.ignore_index
    target = ls.gather(1, torch.where(valid, labels, 0)[:, None])[:, 0]
    return torch.where(valid, -target, 0.0), st


def _ce_grad_chunk(s, labels, spec, stats):
    g, _ = _log_probs(s, 1.0, stats)
    g.exp_()
    valid = labels != spec.ignore_index
    g.scatter_add_(1, torch.where(valid, labels, 0)[:, None], -valid.to(g.dtype)[:, None])
    return g


# Row statistics saved by forward, in order: m_s, r_s, m_t, r_t (student / teacher
# logsumexp as max and log-sum, see _shift), m1, r1 (student at T = 1, for CE), then the
# divergence's scalars from divergence_rows.
_N_LSE = 6


# Forward / reverse KL with only the student's gradient, the common case, take a lean path:
# a few in-place passes over preallocated chunk buffers (`ws`, three (chunk, V) float32
# tensors reused by every chunk: a fresh 16 MiB buffer per op costs page faults on CPU).
# The value uses the shifted logits z = (x - m) / T of _shift (w: the weighting side, the
# teacher for forward KL; o: the other):
#     D = sum_j e^(zw_j) (zw_j - zo_j) / lw - log lw + log lo,    l = sum_j e^(z_j)
# (log-probs are z - log l and sum e^(zw) / lw = 1). Padding (-inf in both) gives
# 0 * nan there, zeroed; zo = -inf where zw is finite gives +inf, the true value.


def _lean(spec, need_teacher: bool) -> bool:
    """The lean path serves KL kinds: always in forward, in backward without d/dt."""
    return spec.div.kind in ("forward_kl", "reverse_kl") and not need_teacher


def _kl_forward_chunk(s, t, spec, ws):
    zs, m_s = _shift(s, spec.inv_ts, out=ws[0])
    zt, m_t = _shift(t, spec.inv_tt, out=ws[1])
    forward = spec.div.kind == "forward_kl"
    zw, zo = (zt, zs) if forward else (zs, zt)
    e = torch.exp(zo, out=ws[2])
    log_lo = e.sum(-1).log_()
    torch.exp(zw, out=e)
    lw = e.sum(-1)
    acc = torch.nan_to_num_(zw.sub_(zo).mul_(e), nan=0.0, posinf=math.inf, neginf=-math.inf)
    d = acc.sum(-1) / lw - lw.log() + log_lo
    r_s, r_t = (log_lo, lw.log()) if forward else (lw.log(), log_lo)
    return d, (m_s, r_s, m_t, r_t)


def _kl_backward_chunk(s, t, spec, stats, ws):
    """dD/dzs of forward KL (q - p) or reverse KL (q (lq - lp - D)), in ws[0]."""
    m_s, r_s, m_t, r_t = stats[:4]
    lq = _shift(s, spec.inv_ts, m_s, out=ws[0])[0].sub_(r_s[:, None])
    lp = _shift(t, spec.inv_tt, m_t, out=ws[1])[0].sub_(r_t[:, None])
    if spec.div.kind == "forward_kl":
        return lq.exp_().sub_(lp.exp_())
    (d,) = stats[_N_LSE:]
    diff = torch.sub(lq, lp, out=ws[2]).sub_(d[:, None])
    return torch.nan_to_num_(lq.exp_().mul_(diff), nan=0.0, posinf=math.inf,
                             neginf=-math.inf)


def _workspace(s, step, lean: bool):
    if not lean:
        return None
    return [torch.empty(step, s.shape[1], device=s.device, dtype=acc_dtype(s.dtype))
            for _ in range(3)]


def _forward_chunk(s, t, labels, spec, ws=None):
    """Row losses of one chunk and the per-row tensors backward needs."""
    if ws is not None:
        rows = s.shape[0]
        d, st = _kl_forward_chunk(s, t, spec, [w[:rows] for w in ws])
        saved = (d,)
    else:
        lq, lp, st = _chunk_logs(s, t, spec)
        d, saved = divergence_rows(lq, lp, spec.div)
    loss = spec.kd_scale * d
    st1 = st[:2]  # placeholder when CE is off; never read then
    if spec.ce_weight:
        ce, st1 = _ce_chunk(s, labels, spec)
        loss = loss + spec.ce_weight * ce
    if labels is not None:
        loss = torch.where(labels != spec.ignore_index, loss, 0.0)
    return loss, (*st, *st1, *saved)


def _backward_chunk(s, t, labels, spec, stats, g, need_teacher, ws=None):
    """(d loss_rows / d s, d / d t) of one chunk, times the upstream row gradient g.
    The student gradient may live in the workspace: copy it out before the next chunk."""
    if ws is not None:
        ds, dt = _kl_backward_chunk(s, t, spec, stats, [w[: s.shape[0]] for w in ws]), None
    else:
        lq, lp, _ = _chunk_logs(s, t, spec, stats[:4])
        ds, dt = divergence_grads(lq, lp, spec.div, stats[_N_LSE:], need_teacher)
    gk = g * spec.kd_scale
    ds.mul_((gk * spec.inv_ts)[:, None])
    if spec.ce_weight:
        ds += _ce_grad_chunk(s, labels, spec, stats[4:6]) * (g * spec.ce_weight)[:, None]
    if dt is not None:
        dt.mul_((gk * spec.inv_tt)[:, None])
    return ds, dt


def scale_rows_(grad_rows, *grads):
    """Multiply gradients computed for an upstream gradient of 1 per row (inplace_backward)
    by the real row gradients, in place; None entries pass through."""
    g = grad_rows[:, None]
    return tuple(None if x is None else x.mul_(g.to(x.dtype)) for x in grads)


class KDRows(torch.autograd.Function):
    """Row losses of (N, V) logits; saves inputs + O(N) stats, recomputes in backward."""

    @staticmethod
    def forward(ctx, s, t, labels, spec: LossSpec, inplace_backward: bool):
        n, v = s.shape
        dt = acc_dtype(s.dtype)
        step = chunk_rows(n, v)
        need_teacher = ctx.needs_input_grad[1]
        loss = torch.empty(n, device=s.device, dtype=dt)
        stats = None
        ws = _workspace(s, step, _lean(spec, False))
        for i in range(0, n, step):
            j = min(i + step, n)
            lab = None if labels is None else labels[i:j]
            loss[i:j], st = _forward_chunk(s[i:j], t[i:j], lab, spec, ws)
            if stats is None:
                stats = [torch.empty(n, device=s.device, dtype=dt) for _ in st]
            for buf, x in zip(stats, st, strict=True):
                buf[i:j] = x
        if stats is None:  # empty batch
            stats = [torch.empty(0, device=s.device, dtype=dt)] * _N_LSE
        if inplace_backward:
            # Gradient for an upstream gradient of 1 per row, written over the logits (they
            # are consumed); backward only rescales it by the row gradients. Writing under
            # forward's no-grad mode bumps s's version counter, so any other autograd use of
            # the logits fails loudly instead of reading gradients.
            ones = _row_mask(labels, spec, n, s.device, dt)
            grad_t = torch.empty_like(t) if need_teacher else None
            ws = ws if _lean(spec, need_teacher) else None
            for i in range(0, n, step):
                j = min(i + step, n)
                lab = None if labels is None else labels[i:j]
                st = [x[i:j] for x in stats]
                ds, dtc = _backward_chunk(s[i:j], t[i:j], lab, spec, st, ones[i:j],
                                          need_teacher, ws)
                s[i:j] = ds
                if grad_t is not None:
                    grad_t[i:j] = dtc
            ctx.inplace = True
            ctx.grads = (s, grad_t)
            return loss
        ctx.inplace = False
        ctx.spec = spec
        ctx.save_for_backward(s, t, labels, *stats)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.inplace:
            grad_s, grad_t = scale_rows_(grad_loss, *ctx.grads)
            del ctx.grads
            return grad_s, grad_t, None, None, None
        s, t, labels, *stats = ctx.saved_tensors
        spec = ctx.spec
        n, v = s.shape
        need_teacher = ctx.needs_input_grad[1]
        g = grad_loss * _row_mask(labels, spec, n, s.device, grad_loss.dtype)
        grad_s = torch.empty_like(s)
        grad_t = torch.empty_like(t) if need_teacher else None
        step = chunk_rows(n, v)
        ws = _workspace(s, step, _lean(spec, need_teacher))
        for i in range(0, n, step):
            j = min(i + step, n)
            lab = None if labels is None else labels[i:j]
            st = [x[i:j] for x in stats]
            ds, dt = _backward_chunk(s[i:j], t[i:j], lab, spec, st, g[i:j], need_teacher, ws)
            grad_s[i:j] = ds
            if grad_t is not None:
                grad_t[i:j] = dt
        return grad_s, grad_t, None, None, None


def kd_rows(s, t, labels, spec: LossSpec, inplace_backward: bool = False):
    return KDRows.apply(s, t, labels, spec, inplace_backward)


# --------------------------------------------------------------------------------------
# kl_div: F.kl_div's elementwise terms, summed chunk by chunk for scalar reductions
# --------------------------------------------------------------------------------------


def kl_div_terms(x, y, log_target: bool):
    """Elementwise y * (log y - x) (or exp(y) * (y - x) for log-space y) in acc dtype."""
    if log_target:
        return torch.exp(y) * (y - x)
    return torch.xlogy(y, y) - y * x


def kl_div_grads(x, y, log_target: bool):
    """(d term/dx, d term/dy); at y = 0 (not log_target) d/dy is -inf, the true derivative."""
    if log_target:
        ey = torch.exp(y)
        return -ey, ey * (y - x + 1)
    return -y, torch.log(y) + 1 - x


class KLDivSum(torch.autograd.Function):
    """sum of F.kl_div terms over 1-D x, y without an elementwise tensor of the full size."""

    @staticmethod
    def forward(ctx, x, y, log_target: bool):
        dt = acc_dtype(torch.promote_types(x.dtype, y.dtype))
        total = torch.zeros((), device=x.device, dtype=dt)
        for i in range(0, x.numel(), CHUNK_ELEMENTS):
            j = i + CHUNK_ELEMENTS
            total += kl_div_terms(x[i:j].to(dt), y[i:j].to(dt), log_target).sum()
        ctx.log_target = log_target
        ctx.save_for_backward(x, y)
        return total

    @staticmethod
    def backward(ctx, g):
        return _kl_div_backward(ctx, g)


class KLDivTerms(torch.autograd.Function):
    """Elementwise F.kl_div terms (reduction='none'), math in acc dtype."""

    @staticmethod
    def forward(ctx, x, y, log_target: bool):
        out_dtype = torch.promote_types(x.dtype, y.dtype)
        dt = acc_dtype(out_dtype)
        out = torch.empty(x.shape, device=x.device, dtype=out_dtype)
        for i in range(0, x.numel(), CHUNK_ELEMENTS):
            j = i + CHUNK_ELEMENTS
            out[i:j] = kl_div_terms(x[i:j].to(dt), y[i:j].to(dt), log_target)
        ctx.log_target = log_target
        ctx.save_for_backward(x, y)
        return out

    @staticmethod
    def backward(ctx, g):
        return _kl_div_backward(ctx, g)


def _kl_div_backward(ctx, g):
    """Gradients of the kl_div terms for an upstream g that is a scalar (sum) or per element."""
    x, y = ctx.saved_tensors
    dt = acc_dtype(g.dtype)
    need_x, need_y = ctx.needs_input_grad[:2]
    gx = torch.empty_like(x) if need_x else None
    gy = torch.empty_like(y) if need_y else None
    for i in range(0, x.numel(), CHUNK_ELEMENTS):
        j = i + CHUNK_ELEMENTS
        dx, dy = kl_div_grads(x[i:j].to(dt), y[i:j].to(dt), ctx.log_target)
        gi = g.to(dt) if g.dim() == 0 else g[i:j].to(dt)
        if gx is not None:
            gx[i:j] = dx * gi
        if gy is not None:
            gy[i:j] = dy * gi
    return gx, gy, None


def kl_div(x, y, log_target: bool, reduce_sum: bool):
    if reduce_sum:
        return KLDivSum.apply(x, y, log_target)
    return KLDivTerms.apply(x, y, log_target)


# --------------------------------------------------------------------------------------
# softmax / log_softmax with a temperature, chunked over rows
# --------------------------------------------------------------------------------------


class TemperatureSoftmax(torch.autograd.Function):
    """y = softmax(x / T) or log_softmax(x / T) over the last dim of (N, V) x.

    Backward (z = x / T): softmax     dx = y (g - sum g y) / T
                          log_softmax dx = (g - exp(y) sum g) / T
    """

    @staticmethod
    def forward(ctx, x, inv_t: float, log: bool):
        n, v = x.shape
        dt = acc_dtype(x.dtype)
        y = torch.empty_like(x)
        fn = torch.log_softmax if log else torch.softmax
        step = chunk_rows(n, v)
        for i in range(0, n, step):
            y[i : i + step] = fn(x[i : i + step].to(dt) * inv_t, -1)
        ctx.inv_t, ctx.log = inv_t, log
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        n, v = y.shape
        dt = acc_dtype(y.dtype)
        gx = torch.empty_like(y)
        step = chunk_rows(n, v)
        for i in range(0, n, step):
            yc, gc = y[i : i + step].to(dt), g[i : i + step].to(dt)
            sums = softmax_grad_sums(yc, gc, ctx.log)
            gx[i : i + step] = softmax_grad(yc, gc, sums, ctx.log, ctx.inv_t)
        return gx, None, None


def softmax_grad_sums(y, g, log: bool):
    """Row sums the temperature-softmax backward needs: sum g (log_softmax), sum g y
    (softmax). Over a sharded vocabulary these are all-reduced before softmax_grad."""
    return g.sum(-1) if log else (g * y).sum(-1)


def softmax_grad(y, g, sums, log: bool, inv_t: float):
    """dx of y = (log_)softmax(x / T) for upstream g, given the row sums above."""
    dx = g - y.exp() * sums[:, None] if log else y * (g - sums[:, None])
    return dx * inv_t


def softmax(x, inv_temperature: float, log: bool):
    return TemperatureSoftmax.apply(x, inv_temperature, log)
