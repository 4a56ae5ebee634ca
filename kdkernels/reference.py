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

  soft_cross_entropy  D = -sum p lq                dD/dzs = q - p
                                                   dD/dzt = p (-lq - D)
  forward_reverse_kl  F = sum p (lp - lq), R = sum q (lq - lp), D = cp F + cq R
                      dD/dzs = cp (q - p) + cq q (lq - lp - R)
                      dD/dzt = cp p (lp - lq - F) + cq (p - q)
  tvd         D = 1/2 sum |p - q|,  g = sgn(q - p) (0 where p = q, Liger's sub-gradient)
              Sq = sum g q,  Sp = sum g p
              dD/dzs = 1/2 q (g - Sq)              dD/dzt = -1/2 p (g - Sp)
  alpha_beta  (a, b = cp, cq > 0)  x = p^a q^b,  yp = p^(a+b),  yq = q^(a+b)
              D = -1/(a b) sum (x - a/(a+b) yp - b/(a+b) yq)
              Gq = sum (x - yq),  Gp = sum (x - yp)
              dD/dzs = -1/a (x - yq - q Gq)        dD/dzt = -1/b (x - yp - p Gp)
              (from dx/dzs_k = b x_k - b q_k x summed: d sum x / dzs_k = b (x_k - q_k sum x),
              d sum yq / dzs_k = (a+b) (yq_k - q_k sum yq); the teacher's likewise.) The
              powers are exps of a lp + b lq etc.: bounded by 1 for a, b > 0, and 0 (not NaN)
              for padding.

Derivation of the mixture gradient: with dq_i/dzs_k = q_i (d_ik - q_k) and
dm_i/dzs_k = (1-a) q_i (d_ik - q_k),
  dA/dzs_k = -sum_i (p_i/m_i) dm_i/dzs_k = -(1-a) (q_k p_k/m_k - q_k sum_i q_i p_i/m_i)
  dB/dzs_k = q_k (lq_k - lm_k - B) - (1-a) (q_k q_k/m_k - q_k sum_i q_i q_i/m_i)
and cp dA + cq dB gives the line above (symmetrically for zt with a in place of 1-a).
For jsd (cp = a, cq = 1-a) u = 1 and the second term vanishes, leaving DESIGN.md's formula.
u = cp e^(lp - lm) + cq e^(lq - lm) <= cp / a + cq / (1-a): q u, p u never overflow.

Entries that are -inf in both logits (vocab padding) have p = q = 0 and contribute 0.

Non-finite inputs (the policy of every impl; csrc/kd_math.h states it for the kernels), as
PyTorch's log_softmax behaves:
  - a NaN or a +inf logit in a row (student or teacher) makes the row's loss NaN;
  - a row whose student or teacher logits are all -inf has no softmax: its loss is NaN;
  - -inf entries of a row that has finite ones are exact: padding (-inf in both) adds 0,
    q = 0 where p > 0 makes forward KL +inf (the true value), mixtures stay finite;
  - an ignored row (label == ignore_index) gives 0 and a gradient of exactly 0, whatever
    its logits;
  - softmax / log_softmax of a row with a NaN, a +inf or nothing but -inf is NaN.
The element masks below (where(w > 0, ...), the lean KL path's nan_to_num) exist for padding
and may drop a NaN element; the row's loss is decided once per row instead, by _stats.finish
from the row maxima (amax keeps NaN and +inf; -inf means nothing finite).
Chain rule: d/ds = dD/dzs / Ts, d/dt = dD/dzt / Tt.
Cross-entropy (T = 1): CE = logsumexp(s) - s[label], dCE/ds = softmax(s) - onehot(label).
"""

from __future__ import annotations

import math

import torch

from . import _common, _stats
from ._common import (
    acc_dtype,
    chunk_rows,
    first_order_only,
    row_chunks,
    scale_rows_,
    take_inplace_grads,
)
from ._spec import ONE_PASS_KINDS, TWO_PASS_KINDS, LossSpec
from ._stats import Col

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_available(device: torch.device) -> tuple[bool, str]:
    return True, ""


def _xlogy_masked(w: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """w * diff where w > 0, else 0 (so 0 * inf and 0 * nan of padded entries vanish)."""
    return torch.where(w > 0, w * diff, 0.0)


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


# --------------------------------------------------------------------------------------
# Divergence math on one chunk: lq, lp are (rows, V) log-probabilities in acc dtype.
# --------------------------------------------------------------------------------------


def mixture_terms(lq, lp, div, ws):
    """(q, p, lp - lm, lq - lm, u) of a chunk, in place in the workspace ws (lq, lp are
    ws[0], ws[1] and become q, p); a log-ratio whose coefficient is 0 is None, and u is None
    for jsd, where u = (a p + (1-a) q) / m = 1.

    log m = logaddexp(x, y) with x = log a + lp, y = log(1-a) + lq, formed in log space
    (never m itself: m underflows where p and q do, and 0 log 0 would be NaN) as
        lm = max(x, y) + log(1 + e^-|x - y|),
    the log of a number in [1, 2] (torch's log1p and logaddexp are several times slower than
    exp and log on CPU; log(1 + e) is exact to 1 ulp of 1 where log1p would be exact to 1 ulp
    of e, an absolute 6e-8 on lm). Then
        lp - lm <= -log a,   lq - lm <= -log(1-a),   u = (cp p + cq q) / m <= cp/a + cq/(1-a),
    so every term is finite where its weight (p or q) is positive. Where the weight is 0
    the log-ratio is -inf (lp = -inf) or NaN (padding: -inf in both, lm = NaN); it is set
    to 0 there, exact because it is only ever multiplied by that weight, and u's NaN at
    padding likewise. After that every sum and gradient is a plain product: no masks.
    A side with coefficient 0 is never formed: at a = 1 (m = p) lq - lm is +inf where
    p = 0 < q, although its weight in D and in the gradient is 0 (and symmetrically at a = 0).
    # read 2 x rows x V, 13 to 17 in-place passes over the (rows, V) workspace"""
    a = div.mix
    x = torch.add(lp, _log(a), out=ws[2])
    y = torch.add(lq, _log(1.0 - a), out=ws[3])
    d = torch.sub(x, y, out=ws[4])  # log(a p / ((1-a) q)), the log-odds of m's two parts
    top = torch.maximum(x, y, out=x)
    u = None
    if not (div.coef_p == a and div.coef_q == 1.0 - a):
        # u = cp p/m + cq q/m with p/m = sigmoid(d) / a and q/m = sigmoid(-d) / (1-a):
        # u = kp sigmoid(d) + kq sigmoid(-d), kp = cp / a, kq = cq / (1-a), from one sigmoid
        # and bounded (sigmoid(+-inf) is 1 or 0 exactly where q = 0 or p = 0); NaN at
        # padding only
        kp = div.coef_p / a if div.coef_p else 0.0
        kq = div.coef_q / (1.0 - a) if div.coef_q else 0.0
        if kq == 0.0:
            u = torch.sigmoid(d, out=ws[3]).mul_(kp)
        elif kp == 0.0:
            u = torch.neg(d, out=ws[3]).sigmoid_().mul_(kq)
        else:
            u = torch.sigmoid(d, out=ws[3]).mul_(kp - kq).add_(kq)
        u.nan_to_num_(nan=0.0)
    lm = top.add_(d.abs_().neg_().exp_().add_(1.0).log_())
    lp_lm = torch.sub(lp, lm, out=ws[4]) if div.coef_p else None
    lq_lm = torch.sub(lq, lm, out=ws[2]) if div.coef_q else None  # lm is not needed after
    for r in (lp_lm, lq_lm):
        if r is not None:
            r.nan_to_num_(nan=0.0, neginf=0.0, posinf=math.inf)
    return lq.exp_(), lp.exp_(), lp_lm, lq_lm, u


def mixture_sums(lq, lp, div, ws):
    """The mixture's row sums (A, B, Uq, Up) of a chunk, what its value and gradient need
    (the KL kinds take the lean path below); lq, lp are ws[0], ws[1] (overwritten).
    # read 2 x rows x V, write 4 x rows (and the workspace)"""
    q, p, lp_lm, lq_lm, u = mixture_terms(lq, lp, div, ws)
    zero = lq.new_zeros(lq.shape[0])
    # products in place in the log-ratios' buffers, each summed once it is formed
    a = lp_lm.mul_(p).sum(-1) if lp_lm is not None else zero
    b = lq_lm.mul_(q).sum(-1) if lq_lm is not None else zero
    if u is None:  # jsd: u = 1, so Uq, Up are the chunk's sums of q and p (1 over whole rows)
        uq, up = q.sum(-1), p.sum(-1)
    else:
        uq, up = torch.mul(q, u, out=ws[2]).sum(-1), u.mul_(p).sum(-1)
    # at a = 1 the student's u term of the gradient has weight 1 - a = 0 (a = 0: the
    # teacher's): its sum is never used
    return a, b, uq if div.mix < 1 else zero, up if div.mix > 0 else zero


def _ab_powers(lq, lp, div):
    """(x, yp, yq) = (p^a q^b, p^(a+b), q^(a+b)) of alpha_beta, as exps of log-space sums."""
    a, b = div.coef_p, div.coef_q
    return torch.exp(a * lp + b * lq), torch.exp((a + b) * lp), torch.exp((a + b) * lq)


def pointwise_sums(lq, lp, div):
    """The pass-2 row sums (DIV, B, UQ, UP) of tvd and alpha_beta (see _stats.py)."""
    zero = lq.new_zeros(lq.shape[0])
    q, p = lq.exp(), lp.exp()
    if div.kind == "tvd":
        g = torch.sign(q - p)
        return (p - q).abs().sum(-1), zero, (g * q).sum(-1), (g * p).sum(-1)
    a, b = div.coef_p, div.coef_q
    x, yp, yq = _ab_powers(lq, lp, div)
    terms = (x - (a / (a + b)) * yp - (b / (a + b)) * yq) * (-1.0 / (a * b))
    return terms.sum(-1), zero, (x - yq).sum(-1), (x - yp).sum(-1)


def _pointwise_grads(lq, lp, div, saved, need_teacher):
    q, p = lq.exp(), lp.exp()
    _, _, uq, up = (x[:, None] for x in saved)
    dt = None
    if div.kind == "tvd":
        g = torch.sign(q - p)
        ds = 0.5 * q * (g - uq)
        if need_teacher:
            dt = -0.5 * p * (g - up)
        return ds, dt
    a, b = div.coef_p, div.coef_q
    x, yp, yq = _ab_powers(lq, lp, div)
    ds = (x - yq - q * uq) * (-1.0 / a)
    if need_teacher:
        dt = (x - yp - p * up) * (-1.0 / b)
    return ds, dt


def _mixture_side_grad(w, l_lm, c, k_sum, u, u_sum, k, u_last):
    """w (c (l - lm - K) - k (u - U)) in place in l - lm's buffer: one side's gradient of
    the mixture (w = q, k = 1 - a, c = cq for the student; w = p, k = a, c = cp for the
    teacher), with the row sums K (B or A) and U (Uq or Up). A side with c = 0 is the u term
    alone, in place over u when u_last; 0 when u = 1 too (then k = c = 0: skew at lambda 1)."""
    if l_lm is None and u is None:
        return torch.zeros_like(w)
    if l_lm is not None:
        g = l_lm.sub_(k_sum).mul_(c)
        if u is not None and k:
            g.sub_(u, alpha=k).add_(k * u_sum)
    else:
        g = (u if u_last else u.clone()).sub_(u_sum).mul_(-k)
    return g.mul_(w)


def _mixture_grads(lq, lp, div, saved, need_teacher: bool, ws):
    """(dD/dzs, dD/dzt or None) of the mixture (DESIGN.md; derived in the module header):
        dD/dzs = q (cq (lq - lm - B) - (1-a) (u - Uq)),
        dD/dzt = p (cp (lp - lm - A) -   a   (u - Up)).
    # read 2 x rows x V (the workspace), write 1 or 2 x rows x V"""
    a, b, uq, up = (x[:, None] for x in saved)
    q, p, lp_lm, lq_lm, u = mixture_terms(lq, lp, div, ws)
    dt = None
    if need_teacher:  # first: the student's may then take u's buffer
        dt = _mixture_side_grad(p, lp_lm, div.coef_p, a, u, up, div.mix, False)
    ds = _mixture_side_grad(q, lq_lm, div.coef_q, b, u, uq, 1.0 - div.mix, True)
    return ds, dt


def divergence_grads(lq, lp, div, saved, need_teacher: bool, ws=None):
    """dD/dzs and dD/dzt (None unless need_teacher) of one chunk, from the saved scalars;
    the mixture's are formed in the workspace ws (lq, lp are ws[0], ws[1])."""
    if div.kind == "mixture":
        return _mixture_grads(lq, lp, div, saved, need_teacher, ws)
    if div.kind in ("tvd", "alpha_beta"):
        return _pointwise_grads(lq, lp, div, saved, need_teacher)
    q, p = lq.exp(), lp.exp()
    dt = None
    if div.kind == "soft_cross_entropy":
        (d,) = saved
        ds = q - p
        if need_teacher:
            dt = _xlogy_masked(p, -lq - d[:, None])
        return ds, dt
    if div.kind == "forward_reverse_kl":
        fwd, rev = (x[:, None] for x in saved)
        ds = div.coef_p * (q - p) + div.coef_q * _xlogy_masked(q, lq - lp - rev)
        if need_teacher:
            dt = div.coef_p * _xlogy_masked(p, lp - lq - fwd) + div.coef_q * (p - q)
        return ds, dt
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


# --------------------------------------------------------------------------------------
# The row-statistics interface (_stats.py) on chunks of rows
# --------------------------------------------------------------------------------------


def _shift(x, inv_t, out=None):
    """((x - m) / T, m) of a chunk: the logits shifted by their row maximum m (raw units,
    the statistics table's maxima) and scaled.

    The difference is formed before the scaling, (x - max x) / T: exact near the maximum,
    where the probability mass is, so log-probs (z - m) - log sum e^(z - m) keep full
    precision at |x| ~ 1e4 for any T (x / T - max x / T would carry a rounding of |x / T|).
    A row with nothing finite gets m = -inf and is shifted by 0 (never -inf - -inf).
    """
    m = x.amax(-1).to(acc_dtype(x.dtype))
    z = torch.sub(x, torch.where(m > -math.inf, m, 0.0)[:, None], out=out).mul_(inv_t)
    return z, m


def log_probs(x, inv_t, m, r, out=None):
    """Log-probabilities (x - m) / T - r of a chunk given a (max, log-sum) pair (m in raw
    units); the pair is subtracted in two steps, never as one rounded logsumexp."""
    z = x.to(m.dtype, copy=True) if out is None else out.copy_(x)
    return z.sub_(torch.where(m > -math.inf, m, 0.0)[:, None]).mul_(inv_t).sub_(r[:, None])


def _local_labels(labels, spec, offset: int, width: int):
    """(column of each row's label in the range [offset, offset + width), 0 where it is
    not there; whether it is there). Ignored rows have no label anywhere."""
    local = labels - offset
    inside = (labels != spec.ignore_index) & (local >= 0) & (local < width)
    return torch.where(inside, local, 0), inside


def _label_logits(s, labels, spec, offset):
    """s[label - offset] where the label falls in this chunk's columns, else 0."""
    if s.shape[1] == 0:
        return torch.zeros(s.shape[0], device=s.device, dtype=acc_dtype(s.dtype))
    col, inside = _local_labels(labels, spec, offset, s.shape[1])
    picked = s.gather(1, col[:, None])[:, 0]
    return torch.where(inside, picked.to(acc_dtype(s.dtype)), 0.0)


# Forward / reverse KL take a lean path: a few in-place passes over preallocated chunk
# buffers (`ws`, three (chunk, V) float32 tensors reused by every chunk: a fresh 16 MiB
# buffer per op costs page faults on CPU). With the shifted logits z of _shift (w: the
# weighting side, the teacher for forward KL; o: the other; l = sum_j e^(z_j)):
#     acc = sum_j e^(zw_j) (zw_j - zo_j),    D = acc / lw - log lw + log lo
# (log-probs are z - log l, and sum e^(zw) / lw = 1). Padding (-inf in both) gives 0 * nan
# there, zeroed; zo = -inf where zw is finite gives +inf, the true value.


def _finite_sum(x):
    """Row sums of element terms whose NaNs are 0 * inf of padding (zeroed); infs kept."""
    return torch.nan_to_num_(x, nan=0.0, posinf=math.inf, neginf=-math.inf).sum(-1)


def _kl_pair_partial_chunk(s, t, spec, ws):
    """((acc, acc_b), pairs) of soft_cross_entropy (acc_b None) and forward_reverse_kl:
    the teacher-weighted accumulator (sum e^zt (-zs), or forward KL's), and for
    forward_reverse_kl reverse KL's (sum e^zs (zs - zt))."""
    zs, ms = _shift(s, spec.inv_ts, out=ws[0])
    zt, mt = _shift(t, spec.inv_tt, out=ws[1])
    e = torch.exp(zs, out=ws[2])
    ls = e.sum(-1).log_()
    acc_b = None
    if spec.div.kind == "forward_reverse_kl":
        d = zs - zt
        acc_b = _finite_sum(d * e)
        torch.exp(zt, out=e)
        acc = _finite_sum(d.neg_().mul_(e))
    else:
        torch.exp(zt, out=e)
        acc = _finite_sum(zs.neg_().mul_(e))
    lt = e.sum(-1).log_()
    return (acc, acc_b), (ms, ls, mt, lt)


def _kl_partial_chunk(s, t, spec, ws):
    """(acc, (ms, ls, mt, lt)) of one chunk, the KL columns of the statistics table."""
    zs, ms = _shift(s, spec.inv_ts, out=ws[0])
    zt, mt = _shift(t, spec.inv_tt, out=ws[1])
    forward = spec.div.kind == "forward_kl"
    zw, zo = (zt, zs) if forward else (zs, zt)
    e = torch.exp(zo, out=ws[2])
    lo = e.sum(-1).log_()
    torch.exp(zw, out=e)
    lw = e.sum(-1).log_()
    acc = torch.nan_to_num_(zw.sub_(zo).mul_(e), nan=0.0, posinf=math.inf, neginf=-math.inf)
    ls, lt = (lo, lw) if forward else (lw, lo)
    return acc.sum(-1), (ms, ls, mt, lt)


def lse_pair(x, inv_t, out=None):
    """(m, log sum e^(z - m)) of a chunk, z = x / T (z formed in `out` when given)."""
    z, m = _shift(x, inv_t, out=out)
    return m, z.exp_().sum(-1).log_()


def _workspace(s, n_rows, count=3):
    return [torch.empty(n_rows, s.shape[1], device=s.device, dtype=acc_dtype(s.dtype))
            for _ in range(count)]


# The mixture's workspace: lq, lp (then q, p), lm (then lq - lm), lp - lm, u. Its chunks are
# MIX_CHUNK_SHRINK times fewer rows than the KL kinds' (1 MiB buffers for the default
# chunk): the mixture makes ~20 in-place passes over them per chunk, which then run from
# cache instead of memory (measured: a third less time at V = 128256).
MIX_BUFFERS = 5
MIX_CHUNK_SHRINK = 16


def _mix_rows(n: int, v: int) -> int:
    return max(1, chunk_rows(n, v) // MIX_CHUNK_SHRINK)


def _mix_chunks(n: int, v: int):
    step = _mix_rows(n, v)
    for i in range(0, n, step):
        yield i, min(i + step, n)


def partial(s, t, labels, spec: LossSpec, offset: int = 0):
    """Pass-1 statistics (_stats.Col) of the columns [offset, offset + Vr) of each row.
    # read 2 x N x Vr (3 with a separate cross-entropy pair), write N x NCOL"""
    n, v = s.shape
    out = _stats.empty(n, s.device, acc_dtype(s.dtype))
    if n == 0 or v == 0:
        return out
    kl = spec.div.kind in ONE_PASS_KINDS
    pair = spec.div.kind in ("soft_cross_entropy", "forward_reverse_kl")
    ws = _workspace(s, chunk_rows(n, v))
    for i, j in row_chunks(n, v):
        sc, tc, o = s[i:j], t[i:j], out[i:j]
        w = [x[: j - i] for x in ws]
        if pair:
            (o[:, Col.ACC], acc_b), pairs = _kl_pair_partial_chunk(sc, tc, spec, w)
            if acc_b is not None:
                o[:, Col.B] = acc_b
        elif kl:
            o[:, Col.ACC], pairs = _kl_partial_chunk(sc, tc, spec, w)
        else:
            pairs = (*lse_pair(sc, spec.inv_ts, w[0]), *lse_pair(tc, spec.inv_tt, w[1]))
        o[:, Col.MS], o[:, Col.LS], o[:, Col.MT], o[:, Col.LT] = pairs
        if spec.ce_weight:
            if spec.ce_shares_student:
                o[:, Col.M1], o[:, Col.L1] = pairs[0], pairs[1]
            else:
                o[:, Col.M1], o[:, Col.L1] = lse_pair(sc, 1.0)
            o[:, Col.LABEL] = _label_logits(sc, labels[i:j], spec, offset)
    return out


def _chunk_logs(s, t, spec, stats, ws=None):
    """(lq, lp) of a chunk from its rows of a (global) statistics table."""
    lq = log_probs(s, spec.inv_ts, stats[:, Col.MS], stats[:, Col.LS],
               None if ws is None else ws[0])
    lp = log_probs(t, spec.inv_tt, stats[:, Col.MT], stats[:, Col.LT],
               None if ws is None else ws[1])
    return lq, lp


def mix_partial(s, t, spec: LossSpec, stats, offset: int = 0):
    """The pass-2 sums of a two-pass kind (the mixture's A, B, Uq, Up; tvd's and
    alpha_beta's of _stats.py) of the columns [offset, offset + Vr), given the GLOBAL
    statistics: (N, 4). # read 2 x N x Vr, write 4 x N"""
    n, v = s.shape
    out = torch.zeros(n, 4, device=s.device, dtype=acc_dtype(s.dtype))
    ws = _workspace(s, _mix_rows(n, v), MIX_BUFFERS) if n and v else None
    for i, j in _mix_chunks(n, v) if v else ():
        w = [x[: j - i] for x in ws]
        lq, lp = _chunk_logs(s[i:j], t[i:j], spec, stats[i:j], w)
        if spec.div.kind == "mixture":
            sums = mixture_sums(lq, lp, spec.div, w)
        else:
            sums = pointwise_sums(lq, lp, spec.div)
        out[i:j] = torch.stack(sums, 1)
    return out


def _ce_grad_chunk(s, labels, spec, stats, offset):
    """softmax(s) - onehot(label - offset) of a chunk (CE at T = 1, global statistics)."""
    g = log_probs(s, 1.0, stats[:, Col.M1], stats[:, Col.L1]).exp_()
    if s.shape[1]:
        col, inside = _local_labels(labels, spec, offset, s.shape[1])
        g.scatter_add_(1, col[:, None], -inside.to(g.dtype)[:, None])
    return g


def _kl_grad_chunk(s, t, spec, stats, ws):
    """dD/dzs of forward KL (q - p) or reverse KL (q (lq - lp - D)), in ws[0]."""
    lq, lp = _chunk_logs(s, t, spec, stats, ws)
    if spec.div.kind in ("forward_kl", "soft_cross_entropy"):
        return lq.exp_().sub_(lp.exp_())
    diff = torch.sub(lq, lp, out=ws[2]).sub_(stats[:, Col.DIV, None])
    return torch.nan_to_num_(lq.exp_().mul_(diff), nan=0.0, posinf=math.inf,
                             neginf=-math.inf)


def _saved_scalars(stats, div):
    if div.kind in TWO_PASS_KINDS:
        return tuple(stats[:, c] for c in _stats.MIX_COLS)
    if div.kind == "forward_reverse_kl":
        return stats[:, Col.DIV], stats[:, Col.B]
    return (stats[:, Col.DIV],)


def _grads_chunk(s, t, labels, spec, stats, offset, g, need_teacher, ws):
    """(d loss_rows / d s, d / d t) of one chunk, times the upstream row gradient g (0 on
    ignored rows). The student gradient may live in the workspace: copy it out before the
    next chunk."""
    if ws is not None and spec.div.kind != "mixture":
        ds, dt = _kl_grad_chunk(s, t, spec, stats, ws), None
    else:
        lq, lp = _chunk_logs(s, t, spec, stats, ws)
        ds, dt = divergence_grads(lq, lp, spec.div, _saved_scalars(stats, spec.div),
                                  need_teacher, ws)
    gk = g * spec.kd_scale
    ds.mul_((gk * spec.inv_ts)[:, None])
    if spec.ce_weight:
        ds += _ce_grad_chunk(s, labels, spec, stats, offset) * (g * spec.ce_weight)[:, None]
    if dt is not None:
        dt.mul_((gk * spec.inv_tt)[:, None])
    if labels is not None:
        # exactly 0 on ignored rows, whatever their logits: a 0 upstream gradient times a
        # non-finite element gradient would be nan
        ignored = (labels == spec.ignore_index)[:, None]
        ds.masked_fill_(ignored, 0.0)
        if dt is not None:
            dt.masked_fill_(ignored, 0.0)
    return ds, dt


def grads(s, t, labels, spec: LossSpec, stats, offset: int, grad_rows, need_teacher: bool,
          out=None, out_t=None):
    """(grad_s, grad_t or None) of the columns [offset, offset + Vr) given the GLOBAL
    finished statistics, times grad_rows; ignored rows get exactly 0. out, out_t: (N, Vr)
    buffers (any row stride) for grad_s and grad_t (out may be the logits themselves for
    the in-place gradient: each chunk is read before it is written).
    # read 2 x N x Vr, write (1 or 2) x N x Vr"""
    n, v = s.shape
    g = grad_rows if labels is None else torch.where(labels != spec.ignore_index, grad_rows, 0.0)
    grad_s = torch.empty_like(s) if out is None else out
    grad_t = (torch.empty_like(t) if out_t is None else out_t) if need_teacher else None
    mix = spec.div.kind == "mixture"
    lean = spec.div.kind in ("forward_kl", "reverse_kl", "soft_cross_entropy") and not need_teacher
    ws = None
    if (lean or mix) and n and v:
        ws = (_workspace(s, _mix_rows(n, v), MIX_BUFFERS) if mix
              else _workspace(s, chunk_rows(n, v)))
    for i, j in (_mix_chunks(n, v) if mix else row_chunks(n, v)) if v else ():
        lab = None if labels is None else labels[i:j]
        w = None if ws is None else [x[: j - i] for x in ws]
        ds, dt = _grads_chunk(s[i:j], t[i:j], lab, spec, stats[i:j], offset, g[i:j],
                              need_teacher, w)
        grad_s[i:j] = ds
        if grad_t is not None:
            grad_t[i:j] = dt
    return grad_s, grad_t


def forward_stats(s, t, labels, spec: LossSpec):
    """(row losses, finished statistics) of whole rows: partial, the mixture's second pass
    given the row's own statistics, finish."""
    stats = partial(s, t, labels, spec)
    mix = mix_partial(s, t, spec, stats) if spec.div.kind in TWO_PASS_KINDS else None
    return _stats.finish(stats, labels, spec, mix)


class KDRows(torch.autograd.Function):
    """Row losses of (N, V) logits; saves the inputs and the (N, NCOL) statistics table,
    recomputes each chunk's log-probabilities in backward."""

    @staticmethod
    def forward(ctx, s, t, labels, spec: LossSpec, inplace_backward: bool):
        need_teacher = ctx.needs_input_grad[1]
        loss, stats = forward_stats(s, t, labels, spec)
        if inplace_backward:
            # Gradient for an upstream gradient of 1 per row, written over the logits (they
            # are consumed); backward only rescales it by the row gradients. Writing under
            # forward's no-grad mode bumps s's version counter, so any other autograd use of
            # the logits fails loudly instead of reading gradients.
            ones = torch.ones_like(loss)
            ctx.inplace = True
            ctx.grads = grads(s, t, labels, spec, stats, 0, ones, need_teacher, out=s)
            return loss
        ctx.inplace = False
        ctx.spec = spec
        ctx.save_for_backward(s, t, labels, stats)
        return loss

    @staticmethod
    @first_order_only
    def backward(ctx, grad_loss):
        if ctx.inplace:
            grad_s, grad_t = scale_rows_(grad_loss, *take_inplace_grads(ctx))
            return grad_s, grad_t, None, None, None
        s, t, labels, stats = ctx.saved_tensors
        grad_s, grad_t = grads(s, t, labels, ctx.spec, stats, 0, grad_loss,
                               ctx.needs_input_grad[1])
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
        for i in range(0, x.numel(), _common.CHUNK_ELEMENTS):
            j = i + _common.CHUNK_ELEMENTS
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
        for i in range(0, x.numel(), _common.CHUNK_ELEMENTS):
            j = i + _common.CHUNK_ELEMENTS
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
    for i in range(0, x.numel(), _common.CHUNK_ELEMENTS):
        j = i + _common.CHUNK_ELEMENTS
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


# --------------------------------------------------------------------------------------
# Sparse (top-k) teachers: the student's full-row statistics and the gradient they imply
# (kdkernels/sparse.py does the per-row math on the K gathered columns)
# --------------------------------------------------------------------------------------


def sparse_partial(s, labels, spec: LossSpec, offset: int = 0):
    """The student columns of the statistics table (_stats.Col) of the columns
    [offset, offset + Vr) of each row, as `partial` fills them:
        MS, LS   max s and log sum exp((s - MS) / Ts)
        M1, L1   the same at T = 1 for cross-entropy (copies when Ts = 1), LABEL = s[label]
    The teacher pair stays (-inf, -inf), merge's identity, and the sums 0. s may be a column
    slice of wider rows (s.stride(0) > Vr): chunks are read in place.
    # read N x Vr (2 x N x Vr with a separate cross-entropy pair), write N x NCOL"""
    n, v = s.shape
    out = _stats.empty(n, s.device, acc_dtype(s.dtype))
    if n == 0 or v == 0:
        return out
    for i, j in row_chunks(n, v):
        sc, o = s[i:j], out[i:j]
        o[:, Col.MS], o[:, Col.LS] = lse_pair(sc, spec.inv_ts)
        if spec.ce_weight:
            if spec.ce_shares_student:
                o[:, Col.M1], o[:, Col.L1] = o[:, Col.MS], o[:, Col.LS]
            else:
                o[:, Col.M1], o[:, Col.L1] = lse_pair(sc, 1.0)
            o[:, Col.LABEL] = _label_logits(sc, labels[i:j], spec, offset)
    return out


def sparse_grads(s, labels, spec: LossSpec, stats, coef, ids, w, offset: int = 0):
    """The student gradient of the columns [offset, offset + Vr) given the GLOBAL statistics:

        gs[r, j] = c_q[r] q[r, j]                                  q = softmax(s / Ts)
                 + c_1[r] (q1[r, j] - [j + offset == label[r]])    q1 = softmax(s), labels given
                 + sum_k [ids[r, k] == j + offset] w[r, k]

    coef = (c_q, c_1) (N, 2) and w (N, K) carry the upstream gradient (zero on ignored rows);
    ids (N, K) are GLOBAL, -1 for an empty slot, no id twice in a row; ids outside the range
    are skipped. Accumulated in the acc dtype, returned contiguous in s.dtype.
    # read N x Vr (+ N x Vr for cross-entropy at Ts != 1), write N x Vr"""
    n, v = s.shape
    gs = torch.empty((n, v), device=s.device, dtype=s.dtype)
    if n == 0 or v == 0:
        return gs
    c_q, c_1 = coef[:, 0], coef[:, 1]
    ce = labels is not None and spec.ce_weight != 0.0
    local = ids - offset
    inside = (ids >= 0) & (local >= 0) & (local < v)
    local = torch.where(inside, local, 0)
    w = torch.where(inside, w.to(acc_dtype(s.dtype)), 0.0)
    # in the acc dtype the chunks are computed in place in the output
    direct = s.dtype == acc_dtype(s.dtype)
    for i, j in row_chunks(n, v):
        sc, st = s[i:j], stats[i:j]
        g = log_probs(sc, spec.inv_ts, st[:, Col.MS], st[:, Col.LS],
                      gs[i:j] if direct else None).exp_()
        g.mul_(c_q[i:j, None])
        if ce:
            g += _ce_grad_chunk(sc, labels[i:j], spec, st, offset) * c_1[i:j, None]
        # the K teacher columns: distinct ids per row, so a scatter-add adds each once
        g.scatter_add_(1, local[i:j], w[i:j])
        if labels is not None:
            # exactly 0 on ignored rows, whatever their logits (0 * NaN would be NaN)
            g.masked_fill_((labels[i:j] == spec.ignore_index)[:, None], 0.0)
        if not direct:
            gs[i:j] = g
    return gs
