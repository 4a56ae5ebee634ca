# Knowledge-distillation row losses of (N, V) logits: Triton kernels, launchers, torch ops.
#
# One row = one token. zs = s / Ts, zt = t / Tt, q = softmax(zs) (student), p = softmax(zt)
# (teacher), lq = log q, lp = log p. A row's loss is
#     loss = kd_scale * D + ce_weight * CE,      CE = lse(s) - s[label]   (student at T = 1)
# and 0 on rows whose label is ignore_index. D is one of the three kinds of _spec.py:
#
#   forward_kl  D = sum p (lp - lq)      dD/dzs = q - p              dD/dzt = p (lp - lq - D)
#   reverse_kl  D = sum q (lq - lp)      dD/dzs = q (lq - lp - D)    dD/dzt = p - q
#   mixture     lm = logaddexp(log a + lp, log(1-a) + lq)           (m = a p + (1-a) q)
#               A = sum p (lp - lm), B = sum q (lq - lm), D = cp A + cq B
#               u = (cp p + cq q) / m,  Uq = sum q u,  Up = sum p u
#               dD/dzs = cq q (lq - lm - B) - (1-a) q (u - Uq)
#               dD/dzt = cp p (lp - lm - A) -   a   p (u - Up)
# (reference.py derives the mixture gradient.) When cp = a and cq = 1 - a (jsd) u = 1
# exactly, so Uq = Up = 1 and the u terms vanish: HAS_U = False drops them. q u and p u are
# exps of log-space sums (exp(lq + lp - lm), exp(2 lq - lm), ...) whose exponents are bounded
# above by -log a or -log(1-a), so they never overflow; m itself is never formed.
# Chain rule: d/ds = dD/dzs / Ts, d/dt = dD/dzt / Tt; dCE/ds = softmax(s) - onehot(label).
#
# Forward, forward/reverse KL (+ CE): ONE pass over the row with online (max, sum) pairs for
# zs and zt, as in flash-attention: after a tile, m' = max(m, max_tile), l' = l e^(m - m')
# + sum_tile e^(z - m'). The value comes from the same pass through a third running sum; for
# forward KL (reverse: swap s <-> t)
#     acc = sum_j e^(zt_j - mt) ((zt_j - mt) - (zs_j - ms))
#     D   = sum p (zt - zs) - lse_t + lse_s = acc / lt - log lt + log ls
# (zt - zs = (zt - mt) - (zs - ms) + mt - ms, and lse = m + log l.) The SHIFTED difference is
# accumulated, so logits of +-1e4 never cancel against lse: only entries near the maxima have
# weight, and there the shifted values are small. When the maxima move to (mt', ms'):
#     acc' = e^(mt - mt') (acc + lt ((mt - mt') - (ms - ms')))         (_rebase)
# The same rule merges the partial (m, l, acc) triples of a split row exactly. At T = 1 the
# CE logsumexp is the student's (CE_SHARED); otherwise a third (max, sum) pair runs on s.
# Entries masked or -inf in both inputs have weight 0 and are dropped with a where (never
# 0 * inf); q = 0 where p > 0 gives +inf, the true value.
#
# Forward, mixture: pass 1 is the same kernel with KIND = MIXTURE (stats only); pass 2
# (_kd_mix_kernel) re-reads the row and sums A, B, Uq, Up from the saved logsumexps.
# Saved per row (stats, (NSTAT, N) float32): each logsumexp as its pair (m, r = log l) for
# zs, zt and s at T = 1 (CE), then D (KL kinds) or A, B, Uq, Up (mixture): O(rows) floats,
# never an N x V tensor. The pair is never summed: lq = (zs - m) - r is exact near the max,
# where the mass is, while zs - (m + r) would carry the rounding of m + r, an ulp of |z|
# (~1e-3 at |z| ~ 1e4), into every q = exp(lq) as a relative error.
#
# Backward: ONE pass re-reading s and t, recomputing lq, lp from the saved pairs and writing
# d s (and d t) in the input dtype, already multiplied by grad_output, kd_scale / T, the
# ce_weight term and the ignore mask. It is elementwise given the row scalars, so a split
# row needs no merge. With inplace_backward the forward runs it for an upstream gradient of
# 1 per row and writes d s over s (each program reads a tile before writing the same tile).
#
# Vocab split (few rows for the GPU): the grid is (N, n_split); program (row, c) covers
# columns [c * chunk, (c + 1) * chunk), writes a partial (m, l, acc) row of `part`, and
# _kd_merge_kernel (or _kd_mix_merge_kernel: plain sums) finishes the row.
#
# Memory traffic per element (b = bytes of the logits), one read of each input per pass:
#   forward/reverse KL: forward 2b, backward 2b + b (d s) [+ b (d t)]   -> 5b = 10 B bf16
#   mixture:            forward 4b, backward 3b                         -> 7b = 14 B bf16

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._spec import LossSpec
from ._common import AotKernel

# Kinds (the KIND constexpr).
FORWARD_KL, REVERSE_KL, MIXTURE = 0, 1, 2
_KIND_IDS = {"forward_kl": FORWARD_KL, "reverse_kl": REVERSE_KL, "mixture": MIXTURE}

# Fields of a partial row of the first pass when split: (max, sum) for zs, zt, s at T = 1
# and the running KL sum; then the mixture pass's partial sums A, B, Uq, Up.
NPART = 8
NPART_MIX = 4

# Widest vocab tile: 4096 values of each input over 8 warps is 16 per thread and input
# (no spills on sm_80 / sm_90 for any kernel here, see aot.py).
MAX_BLOCK_V = 4096
# A row's vocabulary is split over programs when there are fewer than this many rows per SM.
SPLIT_ROWS_PER_SM = 2

# Test knobs (None = automatic): the vocab tile width and the number of vocab chunks per
# row. The interpreter runs on CPU, where nothing is split automatically; tests force both
# so the tile loop, masking and the merge kernels are exercised at small V.
FORCE_BLOCK_V: int | None = None
FORCE_SPLIT: int | None = None


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _ref(m):
    # the value to subtract from z: 0 while every entry so far is -inf (-inf - -inf = nan)
    return tl.where(m == -float("inf"), 0.0, m)


@triton.jit
def _rebase(acc, l_w, mw_old, mw_new, mo_old, mo_new):
    # acc = sum e^(w - mw_old) ((w - mw_old) - (o - mo_old)) re-expressed against the new
    # maxima: e^(mw_old - mw_new) (acc + l_w ((mw_old - mw_new) - (mo_old - mo_new))).
    # l_w = 0 means no weight yet (acc = 0); an underflowed factor drops the old terms, as
    # their probabilities underflow in the reference too. Equal maxima (-inf included)
    # shift by 0; mo_old = -inf < mo_new only happens when acc is already +inf.
    dw = tl.where(mw_old == mw_new, 0.0, mw_old - mw_new)
    do = tl.where(mo_old == mo_new, 0.0, mo_old - mo_new)
    alpha = tl.exp(dw)
    keep = (l_w > 0) & (alpha > 0)
    return tl.where(keep, (acc + tl.where(keep, l_w, 0.0) * (dw - do)) * alpha, 0.0)


@triton.jit
def _logaddexp(x, y):
    mx = tl.maximum(x, y)
    mn = tl.minimum(x, y)
    # both -inf (padding): -inf, not -inf - -inf = nan
    return tl.where(mx == -float("inf"), mx, mx + tl.log(1.0 + tl.exp(mn - mx)))


@triton.jit
def _mix_u(lq, lp, lm, coef_p, coef_q, HAS_CP: tl.constexpr, HAS_CQ: tl.constexpr):
    # q u and p u, u = (cp p + cq q) / m, as exps of log-space sums (no overflow, no 0 * inf)
    qu = tl.zeros_like(lq)
    pu = tl.zeros_like(lp)
    if HAS_CP:
        qu += coef_p * tl.exp(lq + lp - lm)
        pu += coef_p * tl.exp(2.0 * lp - lm)
    if HAS_CQ:
        qu += coef_q * tl.exp(2.0 * lq - lm)
        pu += coef_q * tl.exp(lp + lq - lm)
    # padded entries (lm = -inf) give nan above; they carry no mass
    qu = tl.where(lq > -float("inf"), qu, 0.0)
    pu = tl.where(lp > -float("inf"), pu, 0.0)
    return qu, pu


@triton.jit
def _ce(s_row, label, valid, m1, r1):
    # lse(s) - s[label] = (m1 - s[label]) + r1, exact near the max; the label is read only
    # on valid rows (ignore_index may be < 0)
    target = tl.load(s_row + label, mask=valid, other=0.0).to(tl.float32)
    return (m1 - target) + r1


@triton.jit
def _finish_stats(
    row, N, valid, s_row, label, loss_ptr, stats_ptr,
    ms, ls, mt, lt, acc, m1, l1, kd_scale, ce_weight,
    KIND: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr,
    CE_SHARED: tl.constexpr,
):
    # From a row's final (max, sum) pairs and KL sum: saved stats and (KL kinds) the loss.
    # each logsumexp is saved as (m, r = log l), never summed (see the top of the file)
    ms = _ref(ms)
    mt = _ref(mt)
    rs = tl.log(ls)
    rt = tl.log(lt)
    m1 = _ref(m1)
    r1 = tl.log(l1)
    if CE_SHARED or not HAS_CE:  # Ts = 1: the CE logsumexp is the student's
        m1 = ms
        r1 = rs
    if KIND != 2:
        if KIND == 0:
            d = acc / lt - rt + rs
        else:
            d = acc / ls - rs + rt
    if HAS_LABELS:  # ignored rows read nothing: store clean zeros, not 0/0
        ms = tl.where(valid, ms, 0.0)
        rs = tl.where(valid, rs, 0.0)
        mt = tl.where(valid, mt, 0.0)
        rt = tl.where(valid, rt, 0.0)
        m1 = tl.where(valid, m1, 0.0)
        r1 = tl.where(valid, r1, 0.0)
    tl.store(stats_ptr + row, ms)
    tl.store(stats_ptr + N + row, rs)
    tl.store(stats_ptr + 2 * N + row, mt)
    tl.store(stats_ptr + 3 * N + row, rt)
    tl.store(stats_ptr + 4 * N + row, m1)
    tl.store(stats_ptr + 5 * N + row, r1)
    if KIND != 2:
        loss = kd_scale * d
        if HAS_CE:
            loss += ce_weight * _ce(s_row, label, valid, m1, r1)
        if HAS_LABELS:
            d = tl.where(valid, d, 0.0)
            loss = tl.where(valid, loss, 0.0)
        tl.store(stats_ptr + 6 * N + row, d)
        tl.store(loss_ptr + row, loss)


@triton.jit
def _kd_fwd_kernel(
    s_ptr,  # (N, V) student logits, fp16 / bf16 / fp32, row-major contiguous
    t_ptr,  # (N, V) teacher logits, fp16 / bf16 / fp32, row-major contiguous
    labels_ptr,  # (N,) int64 labels (read only when HAS_LABELS)
    loss_ptr,  # (N,) fp32 out: row losses (KL kinds, not SPLIT)
    stats_ptr,  # (NSTAT, N) fp32 out: m_s, r_s, m_t, r_t, m1, r1, D (not SPLIT)
    part_ptr,  # (N, n_split, NPART) fp32 out when SPLIT: ms, ls, mt, lt, acc, m1, l1, -
    N,  # rows
    V,  # vocabulary (row width)
    chunk,  # columns per program (a multiple of BLOCK_V; V when not SPLIT)
    n_split,  # programs per row
    inv_ts,  # 1 / student temperature
    inv_tt,  # 1 / teacher temperature
    kd_scale,  # weight of D
    ce_weight,  # weight of CE
    ignore_index,  # label of rows that contribute 0
    KIND: tl.constexpr,  # FORWARD_KL / REVERSE_KL (value too) / MIXTURE (stats only)
    HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr,  # ce_weight != 0
    CE_SHARED: tl.constexpr,  # Ts == 1: the CE logsumexp is the student's
    SPLIT: tl.constexpr,  # write partials for _kd_merge_kernel instead of the row results
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * V passes 2**31 at real sizes
    c = tl.program_id(1)
    s_row = s_ptr + row * V
    t_row = t_ptr + row * V
    lo = c * chunk
    hi = tl.minimum(lo + chunk, V)
    label = 0
    valid = True
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        valid = label != ignore_index
        hi = tl.where(valid, hi, lo)  # ignored rows read nothing
    offs = tl.arange(0, BLOCK_V)
    ms = -float("inf")
    mt = -float("inf")
    m1 = -float("inf")
    ls = 0.0
    lt = 0.0
    l1 = 0.0
    acc = 0.0
    for start in range(lo, hi, BLOCK_V):
        cols = start + offs
        mask = cols < hi
        xs = tl.load(s_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
        xt = tl.load(t_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
        zs = xs * inv_ts
        zt = xt * inv_tt
        ms_new = tl.maximum(ms, tl.max(zs, 0))
        mt_new = tl.maximum(mt, tl.max(zt, 0))
        rs = _ref(ms_new)
        rt = _ref(mt_new)
        es = tl.exp(zs - rs)
        et = tl.exp(zt - rt)
        if KIND == 0:
            # sum e^(zt - mt) ((zt - mt) - (zs - ms)) over entries of nonzero weight
            acc = _rebase(acc, lt, mt, mt_new, ms, ms_new)
            acc += tl.sum(tl.where(et > 0, et * ((zt - rt) - (zs - rs)), 0.0), 0)
        if KIND == 1:
            acc = _rebase(acc, ls, ms, ms_new, mt, mt_new)
            acc += tl.sum(tl.where(es > 0, es * ((zs - rs) - (zt - rt)), 0.0), 0)
        ls = ls * tl.exp(ms - rs) + tl.sum(es, 0)
        lt = lt * tl.exp(mt - rt) + tl.sum(et, 0)
        ms = ms_new
        mt = mt_new
        if HAS_CE:
            if not CE_SHARED:
                m1_new = tl.maximum(m1, tl.max(xs, 0))
                r1 = _ref(m1_new)
                l1 = l1 * tl.exp(m1 - r1) + tl.sum(tl.exp(xs - r1), 0)
                m1 = m1_new
    if SPLIT:
        p = part_ptr + (row * n_split + c) * 8
        tl.store(p + 0, ms)
        tl.store(p + 1, ls)
        tl.store(p + 2, mt)
        tl.store(p + 3, lt)
        tl.store(p + 4, acc)
        tl.store(p + 5, m1)
        tl.store(p + 6, l1)
    else:
        _finish_stats(row, N, valid, s_row, label, loss_ptr, stats_ptr,
                      ms, ls, mt, lt, acc, m1, l1, kd_scale, ce_weight,
                      KIND, HAS_LABELS, HAS_CE, CE_SHARED)


@triton.jit
def _kd_merge_kernel(
    s_ptr,  # (N, V) student logits (the CE target is read from here)
    labels_ptr,  # (N,) int64 labels (read only when HAS_LABELS)
    loss_ptr,  # (N,) fp32 out: row losses (KL kinds)
    stats_ptr,  # (NSTAT, N) fp32 out: m_s, r_s, m_t, r_t, m1, r1, D
    part_ptr,  # (N, n_split, NPART) fp32: the partials of _kd_fwd_kernel
    N,  # rows
    V,  # vocabulary
    n_split,  # partials per row
    kd_scale,  # weight of D
    ce_weight,  # weight of CE
    ignore_index,  # label of rows that contribute 0
    KIND: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr,
    CE_SHARED: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,  # power of two >= n_split
):
    # Exact merge of the chunks' (max, sum, acc): the online update applied to whole chunks.
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * V
    label = 0
    valid = True
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        valid = label != ignore_index
    k = tl.arange(0, SPLIT_BLOCK)
    km = k < n_split
    p = part_ptr + (row * n_split + k) * 8
    ms_k = tl.load(p + 0, mask=km, other=-float("inf"))
    ls_k = tl.load(p + 1, mask=km, other=0.0)
    mt_k = tl.load(p + 2, mask=km, other=-float("inf"))
    lt_k = tl.load(p + 3, mask=km, other=0.0)
    acc_k = tl.load(p + 4, mask=km, other=0.0)
    ms = tl.max(ms_k, 0)
    mt = tl.max(mt_k, 0)
    ls = tl.sum(ls_k * tl.exp(ms_k - _ref(ms)), 0)
    lt = tl.sum(lt_k * tl.exp(mt_k - _ref(mt)), 0)
    acc = 0.0
    if KIND == 0:
        acc = tl.sum(_rebase(acc_k, lt_k, mt_k, mt, ms_k, ms), 0)
    if KIND == 1:
        acc = tl.sum(_rebase(acc_k, ls_k, ms_k, ms, mt_k, mt), 0)
    m1 = ms
    l1 = ls
    if HAS_CE:
        if not CE_SHARED:
            m1_k = tl.load(p + 5, mask=km, other=-float("inf"))
            l1_k = tl.load(p + 6, mask=km, other=0.0)
            m1 = tl.max(m1_k, 0)
            l1 = tl.sum(l1_k * tl.exp(m1_k - _ref(m1)), 0)
    _finish_stats(row, N, valid, s_row, label, loss_ptr, stats_ptr,
                  ms, ls, mt, lt, acc, m1, l1, kd_scale, ce_weight,
                  KIND, HAS_LABELS, HAS_CE, CE_SHARED)


@triton.jit
def _finish_mix(
    row, N, valid, s_row, label, loss_ptr, stats_ptr,
    a_sum, b_sum, uq, up, coef_p, coef_q, kd_scale, ce_weight,
    HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr, HAS_CP: tl.constexpr,
    HAS_CQ: tl.constexpr, HAS_U: tl.constexpr,
):
    d = 0.0
    if HAS_CP:
        d += coef_p * a_sum
    if HAS_CQ:
        d += coef_q * b_sum
    if not HAS_U:  # cp = a, cq = 1 - a: u = 1 exactly
        uq = 1.0
        up = 1.0
    loss = kd_scale * d
    if HAS_CE:
        loss += ce_weight * _ce(s_row, label, valid, tl.load(stats_ptr + 4 * N + row),
                                tl.load(stats_ptr + 5 * N + row))
    if HAS_LABELS:
        loss = tl.where(valid, loss, 0.0)
        a_sum = tl.where(valid, a_sum, 0.0)
        b_sum = tl.where(valid, b_sum, 0.0)
    tl.store(stats_ptr + 6 * N + row, a_sum)
    tl.store(stats_ptr + 7 * N + row, b_sum)
    tl.store(stats_ptr + 8 * N + row, uq)
    tl.store(stats_ptr + 9 * N + row, up)
    tl.store(loss_ptr + row, loss)


@triton.jit
def _kd_mix_kernel(
    s_ptr,  # (N, V) student logits
    t_ptr,  # (N, V) teacher logits
    labels_ptr,  # (N,) int64 labels (read only when HAS_LABELS)
    loss_ptr,  # (N,) fp32 out: row losses (not SPLIT)
    stats_ptr,  # (NSTAT, N) fp32: m_s, r_s, m_t, r_t, m1, r1 in; A, B, Uq, Up out (not SPLIT)
    part_ptr,  # (N, n_split, NPART_MIX) fp32 out when SPLIT: partial A, B, Uq, Up
    N,  # rows
    V,  # vocabulary
    chunk,  # columns per program
    n_split,  # programs per row
    inv_ts,  # 1 / student temperature
    inv_tt,  # 1 / teacher temperature
    log_a,  # log a, a = weight of p in m (may be -inf)
    log_1ma,  # log(1 - a) (may be -inf)
    coef_p,  # cp, weight of KL(p || m)
    coef_q,  # cq, weight of KL(q || m)
    kd_scale,  # weight of D
    ce_weight,  # weight of CE
    ignore_index,  # label of rows that contribute 0
    HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr,
    HAS_CP: tl.constexpr,  # cp != 0
    HAS_CQ: tl.constexpr,  # cq != 0
    HAS_U: tl.constexpr,  # u != 1 (not jsd)
    SPLIT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # Pass 2 of the mixture kind: A, B, Uq, Up from the logsumexps of pass 1.
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    s_row = s_ptr + row * V
    t_row = t_ptr + row * V
    lo = c * chunk
    hi = tl.minimum(lo + chunk, V)
    label = 0
    valid = True
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        valid = label != ignore_index
        hi = tl.where(valid, hi, lo)
    ms = tl.load(stats_ptr + row)
    rs = tl.load(stats_ptr + N + row)
    mt = tl.load(stats_ptr + 2 * N + row)
    rt = tl.load(stats_ptr + 3 * N + row)
    offs = tl.arange(0, BLOCK_V)
    a_sum = 0.0
    b_sum = 0.0
    uq = 0.0
    up = 0.0
    for start in range(lo, hi, BLOCK_V):
        cols = start + offs
        mask = cols < hi
        zs = tl.load(s_row + cols, mask=mask, other=-float("inf")).to(tl.float32) * inv_ts
        zt = tl.load(t_row + cols, mask=mask, other=-float("inf")).to(tl.float32) * inv_tt
        lq = (zs - ms) - rs
        lp = (zt - mt) - rt
        lm = _logaddexp(lp + log_a, lq + log_1ma)
        if HAS_CP:
            p = tl.exp(lp)
            a_sum += tl.sum(tl.where(p > 0, p * (lp - lm), 0.0), 0)
        if HAS_CQ:
            q = tl.exp(lq)
            b_sum += tl.sum(tl.where(q > 0, q * (lq - lm), 0.0), 0)
        if HAS_U:
            qu, pu = _mix_u(lq, lp, lm, coef_p, coef_q, HAS_CP, HAS_CQ)
            uq += tl.sum(qu, 0)
            up += tl.sum(pu, 0)
    if HAS_LABELS:
        # the same predicate (lo < V for every program), re-derived from the loop bounds:
        # kept live through the loop, ptxas spilled it (4 bytes of stack) on sm_80
        valid = hi > lo
    if SPLIT:
        p_out = part_ptr + (row * n_split + c) * 4
        tl.store(p_out + 0, a_sum)
        tl.store(p_out + 1, b_sum)
        tl.store(p_out + 2, uq)
        tl.store(p_out + 3, up)
    else:
        _finish_mix(row, N, valid, s_row, label, loss_ptr, stats_ptr,
                    a_sum, b_sum, uq, up, coef_p, coef_q, kd_scale, ce_weight,
                    HAS_LABELS, HAS_CE, HAS_CP, HAS_CQ, HAS_U)


@triton.jit
def _kd_mix_merge_kernel(
    s_ptr,  # (N, V) student logits (the CE target is read from here)
    labels_ptr,  # (N,) int64 labels (read only when HAS_LABELS)
    loss_ptr,  # (N,) fp32 out: row losses
    stats_ptr,  # (NSTAT, N) fp32: m1, r1 in; A, B, Uq, Up out
    part_ptr,  # (N, n_split, NPART_MIX) fp32: partial A, B, Uq, Up of _kd_mix_kernel
    N,  # rows
    V,  # vocabulary
    n_split,  # partials per row
    coef_p,  # cp
    coef_q,  # cq
    kd_scale,  # weight of D
    ce_weight,  # weight of CE
    ignore_index,  # label of rows that contribute 0
    HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr,
    HAS_CP: tl.constexpr,
    HAS_CQ: tl.constexpr,
    HAS_U: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,  # power of two >= n_split
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * V
    label = 0
    valid = True
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        valid = label != ignore_index
    k = tl.arange(0, SPLIT_BLOCK)
    km = k < n_split
    p = part_ptr + (row * n_split + k) * 4
    a_sum = tl.sum(tl.load(p + 0, mask=km, other=0.0), 0)
    b_sum = tl.sum(tl.load(p + 1, mask=km, other=0.0), 0)
    uq = tl.sum(tl.load(p + 2, mask=km, other=0.0), 0)
    up = tl.sum(tl.load(p + 3, mask=km, other=0.0), 0)
    _finish_mix(row, N, valid, s_row, label, loss_ptr, stats_ptr,
                a_sum, b_sum, uq, up, coef_p, coef_q, kd_scale, ce_weight,
                HAS_LABELS, HAS_CE, HAS_CP, HAS_CQ, HAS_U)


@triton.jit
def _kd_bwd_kernel(
    s_ptr,  # (N, V) student logits
    t_ptr,  # (N, V) teacher logits
    labels_ptr,  # (N,) int64 labels (read only when HAS_LABELS)
    stats_ptr,  # (NSTAT, N) fp32: m_s, r_s, m_t, r_t, m1, r1, then D | A, B, Uq, Up
    grad_ptr,  # (N,) fp32: upstream gradient of each row loss
    ds_ptr,  # (N, V) out, s's dtype: d loss / d s (may be s_ptr itself: in-place)
    dt_ptr,  # (N, V) out, t's dtype: d loss / d t (written only when TEACHER_GRAD)
    N,  # rows
    V,  # vocabulary
    chunk,  # columns per program (V when the row is not split)
    inv_ts,  # 1 / student temperature
    inv_tt,  # 1 / teacher temperature
    log_a,  # log a (mixture)
    log_1ma,  # log(1 - a) (mixture)
    mix,  # a (mixture)
    coef_p,  # cp (mixture)
    coef_q,  # cq (mixture)
    kd_scale,  # weight of D
    ce_weight,  # weight of CE
    ignore_index,  # label of rows that contribute 0
    KIND: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr,
    CE_SHARED: tl.constexpr,
    HAS_CP: tl.constexpr,
    HAS_CQ: tl.constexpr,
    HAS_U: tl.constexpr,
    TEACHER_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    lo = c * chunk
    hi = tl.minimum(lo + chunk, V)
    s_row = s_ptr + row * V
    t_row = t_ptr + row * V
    ds_row = ds_ptr + row * V
    dt_row = dt_ptr + row * V
    label = 0
    valid = True
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        valid = label != ignore_index
    g = tl.load(grad_ptr + row)
    cs = g * kd_scale * inv_ts  # d loss / d zs -> d / d s
    ct = g * kd_scale * inv_tt
    cce = g * ce_weight
    ms = tl.load(stats_ptr + row)
    rs = tl.load(stats_ptr + N + row)
    mt = tl.load(stats_ptr + 2 * N + row)
    rt = tl.load(stats_ptr + 3 * N + row)
    m1 = tl.load(stats_ptr + 4 * N + row)
    r1 = tl.load(stats_ptr + 5 * N + row)
    r6 = tl.load(stats_ptr + 6 * N + row)  # D, or A for the mixture
    b_sum = 0.0
    uq = 0.0
    up = 0.0
    if KIND == 2:
        b_sum = tl.load(stats_ptr + 7 * N + row)
        uq = tl.load(stats_ptr + 8 * N + row)
        up = tl.load(stats_ptr + 9 * N + row)
    offs = tl.arange(0, BLOCK_V)
    for start in range(lo, hi, BLOCK_V):
        cols = start + offs
        inside = cols < hi
        mask = inside & valid  # ignored rows read nothing and get zeros
        xs = tl.load(s_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
        xt = tl.load(t_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
        lq = (xs * inv_ts - ms) - rs
        lp = (xt * inv_tt - mt) - rt
        q = tl.exp(lq)
        p = tl.exp(lp)
        if KIND == 0:
            gs = q - p
            if TEACHER_GRAD:
                gt = tl.where(p > 0, p * (lp - lq - r6), 0.0)
        elif KIND == 1:
            gs = tl.where(q > 0, q * (lq - lp - r6), 0.0)
            if TEACHER_GRAD:
                gt = p - q
        else:
            lm = _logaddexp(lp + log_a, lq + log_1ma)
            gs = tl.zeros_like(lq)
            gt = tl.zeros_like(lp)
            if HAS_U:
                qu, pu = _mix_u(lq, lp, lm, coef_p, coef_q, HAS_CP, HAS_CQ)
                gs = -(1.0 - mix) * (qu - q * uq)
                if TEACHER_GRAD:
                    gt = -mix * (pu - p * up)
            if HAS_CQ:
                gs += coef_q * tl.where(q > 0, q * (lq - lm - b_sum), 0.0)
            if TEACHER_GRAD:
                if HAS_CP:
                    gt += coef_p * tl.where(p > 0, p * (lp - lm - r6), 0.0)
        ds = cs * gs
        if HAS_CE:
            if CE_SHARED:
                q1 = q
            else:
                q1 = tl.exp((xs - m1) - r1)
            ds += cce * (q1 - tl.where(cols == label, 1.0, 0.0))
        ds = tl.where(valid, ds, 0.0)
        tl.store(ds_row + cols, ds.to(ds_ptr.dtype.element_ty), mask=inside)
        if TEACHER_GRAD:
            dt = tl.where(valid, ct * gt, 0.0)
            tl.store(dt_row + cols, dt.to(dt_ptr.dtype.element_ty), mask=inside)


# --------------------------------------------------------------------------------------
# launch configuration: one function, shared by the launchers and aot_kernels
# --------------------------------------------------------------------------------------


class LaunchConfig(NamedTuple):
    block_v: int  # vocab tile width (power of two)
    num_warps: int  # for the row kernels (fwd, mix, bwd)
    n_split: int  # programs per row
    chunk: int  # columns per program, a multiple of block_v
    split_block: int  # power of two >= any n_split chosen for this V (merge kernels)


def launch_config(
    V: int, n_rows: int, n_sm: int | None, block_v: int | None = None, split: int | None = None
) -> LaunchConfig:
    """The launch of rows of width V. n_sm: multiprocessors of the GPU (None on CPU: no
    automatic split). block_v / split override the automatic choice (tests)."""
    if block_v is None:
        block_v = min(MAX_BLOCK_V, triton.next_power_of_2(V))
    # 16 values of each input per thread at the widest tile, fewer warps for narrow tiles
    num_warps = max(1, min(8, block_v // 512))
    n_tiles = triton.cdiv(V, block_v)
    if split is None:
        split = 1
        if n_sm is not None and n_rows < SPLIT_ROWS_PER_SM * n_sm:
            split = triton.cdiv(SPLIT_ROWS_PER_SM * n_sm, max(n_rows, 1))
    split = max(1, min(split, n_tiles))
    chunk = triton.cdiv(n_tiles, split) * block_v
    n_split = triton.cdiv(V, chunk)
    return LaunchConfig(block_v, num_warps, n_split, chunk, triton.next_power_of_2(n_tiles))


_SM_COUNT: dict[int, int] = {}


def _config_for(s: torch.Tensor) -> LaunchConfig:
    n, v = s.shape
    n_sm = None
    if s.device.type == "cuda":
        idx = s.device.index if s.device.index is not None else torch.cuda.current_device()
        if idx not in _SM_COUNT:
            _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        n_sm = _SM_COUNT[idx]
    return launch_config(v, n, n_sm, FORCE_BLOCK_V, FORCE_SPLIT)


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------


class _Flags(NamedTuple):
    kind: int
    has_labels: bool
    has_ce: bool
    ce_shared: bool
    has_cp: bool
    has_cq: bool
    has_u: bool
    log_a: float
    log_1ma: float


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def _flags(kind: str, mix: float, coef_p: float, coef_q: float, has_labels: bool,
           ce_weight: float, inv_ts: float) -> _Flags:
    if kind not in _KIND_IDS:
        raise ValueError(f"kind must be one of {tuple(_KIND_IDS)}, got {kind!r}")
    k = _KIND_IDS[kind]
    has_ce = has_labels and ce_weight != 0.0
    mixture = k == MIXTURE
    return _Flags(
        kind=k,
        has_labels=has_labels,
        has_ce=has_ce,
        ce_shared=has_ce and inv_ts == 1.0,
        has_cp=mixture and coef_p != 0.0,
        has_cq=mixture and coef_q != 0.0,
        has_u=mixture and not (coef_p == mix and coef_q == 1.0 - mix),
        log_a=_log(mix) if mixture else 0.0,
        log_1ma=_log(1.0 - mix) if mixture else 0.0,
    )


def _nstat(kind: str) -> int:
    return 10 if kind == "mixture" else 7


def _check_inputs(s, t, labels) -> None:
    from . import SUPPORTED_DTYPES

    for name, x in (("s", s), ("t", t)):
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must have a dtype in {SUPPORTED_DTYPES}, got {x.dtype}")
        if x.dim() != 2 or not x.is_contiguous():
            raise ValueError(f"{name} must be a contiguous (N, V) tensor, got {tuple(x.shape)}")
    if s.shape != t.shape:
        raise ValueError(f"s and t must have the same shape, got {tuple(s.shape)}, "
                         f"{tuple(t.shape)}")
    if labels is not None and (labels.dtype != torch.int64 or labels.shape != s.shape[:1]):
        raise ValueError(f"labels must be int64 of shape ({s.shape[0]},), got "
                         f"{labels.dtype} {tuple(labels.shape)}")


def _forward(s, t, labels, kind, mix, coef_p, coef_q, inv_ts, inv_tt, kd_scale, ce_weight,
             ignore_index):
    """Row losses (N,) and saved stats (NSTAT, N) float32.
    # read s, t once (KL kinds) or twice (mixture); write O(N)"""
    _check_inputs(s, t, labels)
    n, v = s.shape
    loss = torch.empty(n, device=s.device, dtype=torch.float32)
    stats = torch.empty((_nstat(kind), n), device=s.device, dtype=torch.float32)
    if n == 0:
        return loss, stats
    f = _flags(kind, mix, coef_p, coef_q, labels is not None, ce_weight, inv_ts)
    cfg = _config_for(s)
    lab = labels if labels is not None else torch.empty(0, device=s.device, dtype=torch.int64)
    split = cfg.n_split > 1
    part = stats
    if split:
        part = torch.empty((n, cfg.n_split, NPART), device=s.device, dtype=torch.float32)
    _kd_fwd_kernel[(n, cfg.n_split)](
        s, t, lab, loss, stats, part, n, v, cfg.chunk, cfg.n_split,
        inv_ts, inv_tt, kd_scale, ce_weight, ignore_index,
        KIND=f.kind, HAS_LABELS=f.has_labels, HAS_CE=f.has_ce, CE_SHARED=f.ce_shared,
        SPLIT=split, BLOCK_V=cfg.block_v, num_warps=cfg.num_warps,
    )
    if split:
        _kd_merge_kernel[(n,)](
            s, lab, loss, stats, part, n, v, cfg.n_split, kd_scale, ce_weight, ignore_index,
            KIND=f.kind, HAS_LABELS=f.has_labels, HAS_CE=f.has_ce, CE_SHARED=f.ce_shared,
            SPLIT_BLOCK=cfg.split_block, num_warps=1,
        )
    if f.kind != MIXTURE:
        return loss, stats
    part = stats
    if split:
        part = torch.empty((n, cfg.n_split, NPART_MIX), device=s.device, dtype=torch.float32)
    _kd_mix_kernel[(n, cfg.n_split)](
        s, t, lab, loss, stats, part, n, v, cfg.chunk, cfg.n_split, inv_ts, inv_tt,
        f.log_a, f.log_1ma, coef_p, coef_q, kd_scale, ce_weight, ignore_index,
        HAS_LABELS=f.has_labels, HAS_CE=f.has_ce, HAS_CP=f.has_cp, HAS_CQ=f.has_cq,
        HAS_U=f.has_u, SPLIT=split, BLOCK_V=cfg.block_v, num_warps=cfg.num_warps,
    )
    if split:
        _kd_mix_merge_kernel[(n,)](
            s, lab, loss, stats, part, n, v, cfg.n_split, coef_p, coef_q, kd_scale, ce_weight,
            ignore_index, HAS_LABELS=f.has_labels, HAS_CE=f.has_ce, HAS_CP=f.has_cp,
            HAS_CQ=f.has_cq, HAS_U=f.has_u, SPLIT_BLOCK=cfg.split_block, num_warps=1,
        )
    return loss, stats


def _backward(grad, s, t, labels, stats, ds, dt, kind, mix, coef_p, coef_q, inv_ts, inv_tt,
              kd_scale, ce_weight, ignore_index):
    """Write d loss / d s into ds (may be s itself) and, when dt is not None, d / d t.
    # read s, t once; write ds (and dt)"""
    n, v = s.shape
    if n == 0:
        return
    f = _flags(kind, mix, coef_p, coef_q, labels is not None, ce_weight, inv_ts)
    cfg = _config_for(s)
    lab = labels if labels is not None else torch.empty(0, device=s.device, dtype=torch.int64)
    _kd_bwd_kernel[(n, cfg.n_split)](
        s, t, lab, stats, grad, ds, ds if dt is None else dt, n, v, cfg.chunk,
        inv_ts, inv_tt, f.log_a, f.log_1ma, mix, coef_p, coef_q, kd_scale, ce_weight,
        ignore_index,
        KIND=f.kind, HAS_LABELS=f.has_labels, HAS_CE=f.has_ce, CE_SHARED=f.ce_shared,
        HAS_CP=f.has_cp, HAS_CQ=f.has_cq, HAS_U=f.has_u, TEACHER_GRAD=dt is not None,
        BLOCK_V=cfg.block_v, num_warps=cfg.num_warps,
    )


# --------------------------------------------------------------------------------------
# torch.library ops: the LossSpec travels as primitive arguments
# --------------------------------------------------------------------------------------

# (kind, mix, coef_p, coef_q, inv_ts, inv_tt, kd_scale, ce_weight, ignore_index)
def _spec_args(spec: LossSpec) -> tuple:
    d = spec.div
    return (d.kind, float(d.mix), float(d.coef_p), float(d.coef_q), float(spec.inv_ts),
            float(spec.inv_tt), float(spec.kd_scale), float(spec.ce_weight),
            int(spec.ignore_index))


@torch.library.custom_op("kdkernels_triton::kd_fwd", mutates_args=())
def kd_fwd(
    s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, kind: str, mix: float,
    coef_p: float, coef_q: float, inv_ts: float, inv_tt: float, kd_scale: float,
    ce_weight: float, ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row losses (N,), saved stats (NSTAT, N)), both float32."""
    return _forward(s, t, labels, kind, mix, coef_p, coef_q, inv_ts, inv_tt, kd_scale,
                    ce_weight, ignore_index)


@kd_fwd.register_fake
def _kd_fwd_fake(s, t, labels, kind, *args):
    n = s.shape[0]
    return (s.new_empty((n,), dtype=torch.float32),
            s.new_empty((_nstat(kind), n), dtype=torch.float32))


@torch.library.custom_op("kdkernels_triton::kd_bwd", mutates_args=())
def kd_bwd(
    grad: torch.Tensor, s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
    stats: torch.Tensor, teacher_grad: bool, kind: str, mix: float, coef_p: float,
    coef_q: float, inv_ts: float, inv_tt: float, kd_scale: float, ce_weight: float,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d s, d t) for the upstream row gradient `grad`; d t is empty unless teacher_grad."""
    ds = torch.empty_like(s)
    dt = torch.empty_like(t) if teacher_grad else t.new_empty((0,))
    _backward(grad.float().contiguous(), s, t, labels, stats, ds,
              dt if teacher_grad else None, kind, mix, coef_p, coef_q, inv_ts, inv_tt,
              kd_scale, ce_weight, ignore_index)
    return ds, dt


@kd_bwd.register_fake
def _kd_bwd_fake(grad, s, t, labels, stats, teacher_grad, *args):
    return torch.empty_like(s), (torch.empty_like(t) if teacher_grad else t.new_empty((0,)))


def _kd_fwd_setup(ctx, inputs, output):
    s, t, labels, *spec = inputs
    _, stats = output
    ctx.spec = tuple(spec)
    ctx.save_for_backward(s, t, labels, stats)


def _kd_fwd_backward(ctx, grad_loss, _grad_stats):
    s, t, labels, stats = ctx.saved_tensors
    teacher_grad = ctx.needs_input_grad[1]
    ds, dt = kd_bwd(grad_loss, s, t, labels, stats, teacher_grad, *ctx.spec)
    return (ds, dt if teacher_grad else None, None) + (None,) * len(ctx.spec)


torch.library.register_autograd(
    "kdkernels_triton::kd_fwd", _kd_fwd_backward, setup_context=_kd_fwd_setup
)


@torch.library.custom_op("kdkernels_triton::kd_fwd_inplace", mutates_args=("s",))
def kd_fwd_inplace(
    s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, teacher_grad: bool,
    kind: str, mix: float, coef_p: float, coef_q: float, inv_ts: float, inv_tt: float,
    kd_scale: float, ce_weight: float, ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row losses, and the gradients for an upstream gradient of 1 per row: d s is written
    over s (the logits are consumed), d t returned (empty unless teacher_grad)."""
    spec = (kind, mix, coef_p, coef_q, inv_ts, inv_tt, kd_scale, ce_weight, ignore_index)
    loss, stats = _forward(s, t, labels, *spec)
    dt = torch.empty_like(t) if teacher_grad else t.new_empty((0,))
    ones = torch.ones(s.shape[0], device=s.device, dtype=torch.float32)
    _backward(ones, s, t, labels, stats, s, dt if teacher_grad else None, *spec)
    return loss, dt


@kd_fwd_inplace.register_fake
def _kd_fwd_inplace_fake(s, t, labels, teacher_grad, *args):
    return (s.new_empty((s.shape[0],), dtype=torch.float32),
            torch.empty_like(t) if teacher_grad else t.new_empty((0,)))


class _KDRowsInplace(torch.autograd.Function):
    """inplace_backward=True: the gradients are computed in the forward (d s over the
    student logits' buffer); backward only rescales them by the upstream row gradients.
    The op bumps s's version counter, so another autograd use of s fails loudly."""

    @staticmethod
    def forward(ctx, s, t, labels, *spec):
        teacher_grad = ctx.needs_input_grad[1]
        loss, dt = kd_fwd_inplace(s, t, labels, teacher_grad, *spec)
        # saved after the op wrote into s: its version is the one backward will find, and a
        # second backward (retain_graph) fails on the version check instead of rescaling twice
        ctx.save_for_backward(s, dt)
        ctx.teacher_grad = teacher_grad
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_s, grad_t = ctx.saved_tensors
        g = grad_loss.float()[:, None]  # one rounding: the product is formed in float32
        grad_s.mul_(g)
        if not ctx.teacher_grad:
            return (grad_s, None, None) + (None,) * 9
        grad_t.mul_(g)
        return (grad_s, grad_t, None) + (None,) * 9


def kd_rows(s, t, labels, spec: LossSpec, inplace_backward: bool = False):
    """Row losses (N,) float32 of (N, V) logits; see kdkernels/_dispatch.py."""
    args = _spec_args(spec)
    if labels is not None:
        labels = labels.contiguous()
    if inplace_backward:
        return _KDRowsInplace.apply(s, t, labels, *args)
    loss, _ = kd_fwd(s, t, labels, *args)
    return loss


# --------------------------------------------------------------------------------------
# ahead-of-time compilation: every configuration the launchers can choose
# --------------------------------------------------------------------------------------

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}

# (HAS_LABELS, HAS_CE, CE_SHARED) reachable combinations
_LABEL_MODES = ((False, False, False), (True, False, False), (True, True, False),
                (True, True, True))
# (HAS_CP, HAS_CQ, HAS_U) reachable for the mixture kinds of _spec.py: jsd (both, u = 1);
# skew forward / reverse (one side, u != 1; u = 1 at skew = 1)
_MIX_MODES = ((True, True, False), (True, False, True), (False, True, True),
              (True, False, False), (False, True, False))


def _sig(fn, ptrs: dict, ints: tuple, floats: tuple) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in ptrs:
            sig[name] = ptrs[name]
        elif name in ints:
            sig[name] = "i32"
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "constexpr"
    return sig


def aot_kernels(V: int, dtype: torch.dtype) -> list[AotKernel]:
    """Every (kernel, constexprs, num_warps) the launchers can pick for rows of width V with
    s and t in `dtype`, for every kind / flag combination (see aot.py)."""
    x = _PTR[dtype]
    f32, i64 = "*fp32", "*i64"
    ints = ("N", "V", "chunk", "n_split", "ignore_index")
    floats = ("inv_ts", "inv_tt", "kd_scale", "ce_weight", "log_a", "log_1ma", "mix",
              "coef_p", "coef_q")
    # the tile width and warps depend on V only; whether a row is split depends on N
    cfg = launch_config(V, 1 << 30, None)
    w = cfg.num_warps
    fwd_sig = _sig(_kd_fwd_kernel, dict(s_ptr=x, t_ptr=x, labels_ptr=i64, loss_ptr=f32,
                                        stats_ptr=f32, part_ptr=f32), ints, floats)
    merge_sig = _sig(_kd_merge_kernel, dict(s_ptr=x, labels_ptr=i64, loss_ptr=f32,
                                            stats_ptr=f32, part_ptr=f32), ints, floats)
    mix_sig = _sig(_kd_mix_kernel, dict(s_ptr=x, t_ptr=x, labels_ptr=i64, loss_ptr=f32,
                                        stats_ptr=f32, part_ptr=f32), ints, floats)
    mmerge_sig = _sig(_kd_mix_merge_kernel, dict(s_ptr=x, labels_ptr=i64, loss_ptr=f32,
                                                 stats_ptr=f32, part_ptr=f32), ints, floats)
    bwd_sig = _sig(_kd_bwd_kernel, dict(s_ptr=x, t_ptr=x, labels_ptr=i64, stats_ptr=f32,
                                        grad_ptr=f32, ds_ptr=x, dt_ptr=x), ints, floats)
    kinds = {FORWARD_KL: "forward_kl", REVERSE_KL: "reverse_kl", MIXTURE: "mixture"}
    out = []
    for has_labels, has_ce, ce_shared in _LABEL_MODES:
        lab = dict(HAS_LABELS=has_labels, HAS_CE=has_ce, CE_SHARED=ce_shared)
        tag = "labels" if has_labels else "nolabels"
        tag += ("+ce_shared" if ce_shared else "+ce") if has_ce else ""
        for kind, kname in kinds.items():
            for split in (False, True):
                out.append(AotKernel(
                    f"kd_fwd[{kname},{tag}{',split' if split else ''}]", _kd_fwd_kernel,
                    fwd_sig, dict(KIND=kind, SPLIT=split, BLOCK_V=cfg.block_v, **lab), w))
            out.append(AotKernel(
                f"kd_merge[{kname},{tag}]", _kd_merge_kernel, merge_sig,
                dict(KIND=kind, SPLIT_BLOCK=cfg.split_block, **lab), 1))
        bwd_modes = [(FORWARD_KL, (False, False, False)), (REVERSE_KL, (False, False, False))]
        bwd_modes += [(MIXTURE, m) for m in _MIX_MODES]
        for kind, (has_cp, has_cq, has_u) in bwd_modes:
            mix_flags = dict(HAS_CP=has_cp, HAS_CQ=has_cq, HAS_U=has_u)
            mtag = f"{kinds[kind]},{tag}"
            if kind == MIXTURE:
                mtag += f",cp={int(has_cp)},cq={int(has_cq)},u={int(has_u)}"
                mlab = dict(HAS_LABELS=has_labels, HAS_CE=has_ce)
                for split in (False, True):
                    out.append(AotKernel(
                        f"kd_mix[{mtag}{',split' if split else ''}]", _kd_mix_kernel,
                        mix_sig, dict(SPLIT=split, BLOCK_V=cfg.block_v, **mlab, **mix_flags),
                        w))
                out.append(AotKernel(
                    f"kd_mix_merge[{mtag}]", _kd_mix_merge_kernel, mmerge_sig,
                    dict(SPLIT_BLOCK=cfg.split_block, **mlab, **mix_flags), 1))
            for teacher_grad in (False, True):
                out.append(AotKernel(
                    f"kd_bwd[{mtag}{',teacher_grad' if teacher_grad else ''}]",
                    _kd_bwd_kernel, bwd_sig,
                    dict(KIND=kind, TEACHER_GRAD=teacher_grad, BLOCK_V=cfg.block_v, **lab,
                         **mix_flags), w))
    return out
