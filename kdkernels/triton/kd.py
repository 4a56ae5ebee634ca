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
# s and t, as in flash-attention. The maxima are of the RAW logits (the table's units), and
# every shifted logit is formed as (x - m) / T: exact near the maximum, where the mass is,
# for any T (x / T - m / T would carry a rounding of |x / T| into every probability). After
# a tile, m' = max(m, max_tile), l' = l e^((m - m') / T) + sum_tile e^((x - m') / T). The
# value comes from the same pass through a third running sum; for forward KL (reverse:
# swap s <-> t), with ys = (s - ms) / Ts = zs - ms / Ts and yt likewise,
#     acc = sum_j e^(yt_j) (yt_j - ys_j)
#     D   = sum p (zt - zs) - lse_t + lse_s = acc / lt - log lt + log ls
# (zt - zs = yt - ys + mt / Tt - ms / Ts, and lse = m / T + log l.) The SHIFTED difference
# is accumulated, so logits of +-1e4 never cancel against lse: only entries near the maxima
# have weight, and there the shifted values are small. When the maxima move to (mt', ms'),
# with the scaled shifts dt = (mt - mt') / Tt, ds = (ms - ms') / Ts:
#     acc' = e^dt (acc + lt (dt - ds))                                    (_rebase)
# The same rule merges the partial (m, l, acc) triples of a split row exactly (_stats.merge).
# At T = 1 the CE logsumexp is the student's (CE_SHARED); otherwise a third sum runs on s
# at T = 1, sharing the student's raw maximum. Entries masked or -inf in both inputs have
# weight 0 and are dropped with a where (never 0 * inf); q = 0 where p > 0 gives +inf, the
# true value.
#
# Forward, mixture: pass 1 is the same kernel with KIND = MIXTURE (stats only); pass 2
# (_kd_mix_kernel) re-reads the row and sums A, B, Uq, Up from the saved logsumexps.
#
# Saved per row: the (N, NCOL) float32 table of kdkernels/_stats.py, indexed by its `Col`
# (the C_* constexprs below): MS, LS, MT, LT, M1, L1 = each logsumexp as its pair (raw max
# m, log l) for s at Ts, t at Tt and s at T = 1 (copies of the student's at Ts = 1; without
# a CE term and at Ts != 1 the empty range's); LABEL = s[label]; ACC = the accumulator
# above; DIV = D (KL kinds) or DIV, B, UQ, UP = A, B, Uq, Up (mixture; at u = 1,
# Uq = sum q and Up = sum p, which the backward does not read).
# O(rows) floats, never an N x V tensor. The pair is never summed: lq = (s - m) / Ts - log l
# is exact near the max, where the mass is, while zs - (m / Ts + log l) would carry the
# rounding of the logsumexp, an ulp of |z| (~1e-3 at |z| ~ 1e4), into every q = exp(lq) as
# a relative error.
# An ignored row reads nothing: its pairs are the empty range's (-inf, -inf), its D, A, B,
# Uq, Up and loss 0.
#
# Non-finite logits, one policy for every divergence (as PyTorch's log_softmax):
#   - a NaN or a +inf logit (inf - inf) in a row, student or teacher, makes its loss NaN;
#   - a row whose student or teacher logits are all -inf has no softmax: its loss is NaN;
#   - -inf entries of a row that has finite ones are exact: padding (-inf in both) adds 0,
#     q = 0 where p > 0 makes forward KL +inf (the true value), mixtures stay finite;
#   - an ignored row (label == ignore_index) is 0, with a gradient of exactly 0, whatever its
#     logits (it reads nothing; the backward writes a where, never a product).
# The masks of the sums (weight > 0: never 0 * inf for padding) would drop a NaN, so it is
# not left to propagate through them: a per-row flag from the whole row's sums decides. A
# side's sum l is >= 1 when its maximum is finite (the maximum adds e^0), 0 when nothing is
# finite and NaN after a NaN or a +inf (a +inf maximum gives inf - inf), so "no softmax" is
# not (l > 0), i.e. not (log l > -inf) on the table. Where a row is finished (_store_row,
# the mixture's pass 2) D, or A, B, Uq, Up, are NaN on such rows. The flag costs a scalar
# per row, nothing per element; the gradient of such a row may be NaN too. The table's
# maxima carry the row's state for _stats.finish as torch.amax: NaN after a NaN (restored
# from the sum where the GPU's max dropped it), +inf after a +inf, -inf when nothing is
# finite.
#
# The same kernels serve the row-statistics interface of _stats.py over a range of columns
# [offset, offset + Vr) (partial, mix_partial, grads at the bottom): labels stay GLOBAL ids
# and the kernels rebase them by `offset`. FINISH = False leaves the table unfinished (ACC
# raw, DIV 0) for _stats.merge_all and _stats.finish.
#
# Backward: ONE pass re-reading s and t, recomputing lq = (s - ms) / Ts - log ls and lp
# likewise from the saved pairs (raw maxima, as everywhere the table is read) and writing
# d s (and d t) in the input dtype, already multiplied by grad_output, kd_scale / T, the
# ce_weight term and the ignore mask. It is elementwise given the row scalars, so a split
# row needs no merge. With inplace_backward the forward runs it for an upstream gradient of
# 1 per row and writes d s over s (each program reads a tile before writing the same tile).
#
# Vocab split (few rows for the GPU): the grid is (N, n_split); program (row, c) covers
# columns [c * chunk, (c + 1) * chunk) and writes its partial table row (the same layout,
# unfinished); _kd_merge_kernel merges a row's n_split partials at once with _stats.merge's
# rule (raw shifts scaled by 1 / T) and finishes the row (_kd_mix_merge_kernel: plain
# sums). It stays in a kernel rather than partials + _stats.merge_all, whose Python fold
# would launch ~30 small torch ops per chunk (n_split reaches hundreds for a handful of
# rows).
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

from .. import _stats
from .._common import first_order_only, strided_rows
from .._spec import TWO_PASS_KINDS, Divergence, LossSpec
from .._stats import NCOL, Col
from ._common import AotKernel, device_guard

# Kinds (the KIND constexpr).
FORWARD_KL, REVERSE_KL, MIXTURE = 0, 1, 2
# The kinds below are finished by _stats.finish (torch ops on (N,) columns) rather than in a
# kernel: soft_cross_entropy and forward_reverse_kl in one pass (the KL pass with their
# accumulators, ACC and B), tvd and alpha_beta in two (pass 1 as the mixture's, pass 2
# _kd_pw_kernel).
SOFT_CE, FR_KL, TVD, ALPHA_BETA = 3, 4, 5, 6
_KIND_IDS = {"forward_kl": FORWARD_KL, "reverse_kl": REVERSE_KL, "mixture": MIXTURE,
             "soft_cross_entropy": SOFT_CE, "forward_reverse_kl": FR_KL, "tvd": TVD,
             "alpha_beta": ALPHA_BETA}

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

# Columns of the row-statistics table (_stats.Col), as constexprs the kernels index with.
C_MS: tl.constexpr = tl.constexpr(int(Col.MS))
C_LS: tl.constexpr = tl.constexpr(int(Col.LS))
C_MT: tl.constexpr = tl.constexpr(int(Col.MT))
C_LT: tl.constexpr = tl.constexpr(int(Col.LT))
C_M1: tl.constexpr = tl.constexpr(int(Col.M1))
C_L1: tl.constexpr = tl.constexpr(int(Col.L1))
C_LABEL: tl.constexpr = tl.constexpr(int(Col.LABEL))
C_DIV: tl.constexpr = tl.constexpr(int(Col.DIV))
C_B: tl.constexpr = tl.constexpr(int(Col.B))
C_UQ: tl.constexpr = tl.constexpr(int(Col.UQ))
C_UP: tl.constexpr = tl.constexpr(int(Col.UP))
C_ACC: tl.constexpr = tl.constexpr(int(Col.ACC))
C_NCOL: tl.constexpr = tl.constexpr(NCOL)


@triton.jit
def _ref(m):
    # the value to subtract from z: 0 while every entry so far is -inf (-inf - -inf = nan)
    return tl.where(m == -float("inf"), 0.0, m)


@triton.jit
def _shift(m, big):
    # m - big, 0 where equal (-inf == -inf included: never -inf - -inf)
    return tl.where(m == big, 0.0, m - big)


@triton.jit
def _rebase(acc, l_w, dw, do):
    # acc = sum e^(w' - mw) (w' - o') re-expressed against maxima moved by the scaled shifts
    # dw = (mw_old - mw_new) / Tw <= 0, do = (mo_old - mo_new) / To:
    # e^dw (acc + l_w (dw - do)) (_stats.merge's rule).
    # l_w = 0 means no weight yet (acc = 0); an underflowed factor drops the old terms, as
    # their probabilities underflow in the reference too. Equal maxima (-inf included)
    # shift by 0; do = -inf only happens when acc is already +inf. NaN stays.
    alpha = tl.exp(dw)
    keep = ((l_w > 0) & (alpha > 0)) | (acc != acc)
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
def _mix_grad(lq, lp, q, p, log_a, log_1ma, mix, coef_p, coef_q, a_sum, b_sum, uq, up,
              HAS_CP: tl.constexpr, HAS_CQ: tl.constexpr, HAS_U: tl.constexpr,
              TEACHER_GRAD: tl.constexpr):
    # dD/dzs = q (cq (lq - lm - B) - (1-a) (u - Uq)),  dD/dzt = p (cp (lp - lm - A) - a (u - Up))
    # from the log-odds of m's two parts, d = lp - lq + log a - log(1-a), and e = e^-|d|:
    #   lq - lm = -log(1-a) - softplus(d),   lp - lm = -log a - softplus(-d),
    #   softplus(+-d) = max(+-d, 0) + log(1 + e),
    #   u = cp p/m + cq q/m = kp sigmoid(d) + kq sigmoid(-d),  kp = cp/a, kq = cq/(1-a),
    # two exps (e, the sigmoid) and one log per element, where log m by logaddexp and u
    # from exps of log-space sums took up to five and kept more tiles live: the teacher
    # gradient's kernels needed up to 171 registers per thread on sm_90 (one 8-warp block
    # per SM), now at most 128 (two). Entries of weight 0 (q or p = 0: d = -+inf; padding:
    # d = nan) are masked by that weight; sigmoid(+-inf) is 1 or 0 exactly.
    d = lp - lq + (log_a - log_1ma)
    e = tl.exp(-tl.abs(d))
    e1 = 1.0 + e
    l1 = tl.log(e1)
    gs = tl.zeros_like(lq)
    gt = tl.zeros_like(lp)
    if HAS_U:
        u = tl.zeros_like(lq)
        if HAS_CP:
            u += (coef_p / mix) * tl.sigmoid(d)
        if HAS_CQ:
            u += (coef_q / (1.0 - mix)) * tl.sigmoid(-d)
        gs = (1.0 - mix) * (uq - u)
        if TEACHER_GRAD:
            gt = mix * (up - u)
    if HAS_CQ:
        gs += coef_q * ((-log_1ma - b_sum) - (tl.maximum(d, 0.0) + l1))
    gs = tl.where(q > 0, q * gs, 0.0)
    if TEACHER_GRAD:
        if HAS_CP:
            gt += coef_p * ((-log_a - a_sum) - (tl.maximum(-d, 0.0) + l1))
        gt = tl.where(p > 0, p * gt, 0.0)
    return gs, gt


@triton.jit
def _kl_value(ls, lt, acc, KIND: tl.constexpr):
    # D = acc / l_w - log l_w + log l_o from the sums l (not their logs); acc = 0 (no
    # weighting mass) gives 0 for the first term, never 0 / 0
    if KIND == 0:
        d = tl.where(acc == 0, 0.0, acc / lt) - tl.log(lt) + tl.log(ls)
    else:
        d = tl.where(acc == 0, 0.0, acc / ls) - tl.log(ls) + tl.log(lt)
    return d


@triton.jit
def _row_range(labels_ptr, V, chunk, offset, ignore_index, HAS_LABELS: tl.constexpr):
    # The setup of program (row, c) of every kernel here: the row in int64 (row * stride
    # passes 2**31 at real sizes; rows are `stride` elements apart, >= V when they are the
    # first columns of wider logits, read in place), its columns [lo, hi) = [c * chunk, (c + 1) * chunk) of [0, V),
    # the row's GLOBAL label rebased by offset to a column of this range (outside [0, V):
    # none here; -1 without labels) and whether the row counts (label != ignore_index).
    row = tl.program_id(0).to(tl.int64)
    lo = tl.program_id(1) * chunk
    hi = tl.minimum(lo + chunk, V)
    label = tl.full((), -1, tl.int64)
    valid = tl.full((), 1, tl.int1)
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        valid = label != ignore_index
        label -= offset
    return row, lo, hi, label, valid


@triton.jit
def _store_row(
    p, loss_ptr, row, valid, ms, ls, mt, lt, m1, l1, target, acc, kd_scale, ce_weight,
    KIND: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr,
    FINISH: tl.constexpr, acc_b=0.0,
):
    # One row of the table from the final (max, sum) pairs, sums and KL accumulator: each
    # logsumexp as its pair (m, log l), never summed (see the top of the file). FINISH (KL
    # kinds): D and the row loss too; otherwise DIV, B, UQ, UP are 0 (pass 1 of a range).
    # The maxima carry a NaN logit as torch.amax does (_stats.finish reads them): the GPU's
    # max may drop a NaN (maxnum), the sum never does, so a NaN sum under a maximum that is
    # not +inf (+inf - +inf is the other NaN) marks one.
    ms = tl.where((ls != ls) & (ms != float("inf")), float("nan"), ms)
    mt = tl.where((lt != lt) & (mt != float("inf")), float("nan"), mt)
    m1 = tl.where((l1 != l1) & (m1 != float("inf")), float("nan"), m1)
    tl.store(p + C_MS, ms)
    tl.store(p + C_LS, tl.log(ls))
    tl.store(p + C_MT, mt)
    tl.store(p + C_LT, tl.log(lt))
    tl.store(p + C_M1, m1)
    tl.store(p + C_L1, tl.log(l1))
    tl.store(p + C_LABEL, target)
    tl.store(p + C_ACC, acc)
    d = 0.0
    if FINISH:
        # the whole row's sums: l >= 1 on a side with a finite maximum (the maximum adds
        # e^0), 0 when nothing is finite, NaN after a NaN or a +inf (inf - inf): either side
        # without a softmax makes D NaN, which no mask below may drop (see the top)
        d = tl.where((ls > 0) & (lt > 0), _kl_value(ls, lt, acc, KIND), float("nan"))
        loss = kd_scale * d
        if HAS_CE:
            # lse(s) - s[label] = (m1 - s[label]) + log l1, exact near the max
            loss += ce_weight * ((m1 - target) + tl.log(l1))
        if HAS_LABELS:  # ignored rows read nothing: their 0 / 0 never reaches the outputs
            d = tl.where(valid, d, 0.0)
            loss = tl.where(valid, loss, 0.0)
        tl.store(loss_ptr + row, loss)
    tl.store(p + C_DIV, d)
    tl.store(p + C_B, acc_b)  # forward_reverse_kl's reverse accumulator, else 0
    tl.store(p + C_UQ, 0.0)
    tl.store(p + C_UP, 0.0)


@triton.jit
def _kd_fwd_kernel(
    s_ptr,  # (N, V) student logits, fp16 / bf16 / fp32, rows s_stride apart, stride 1 in V
    t_ptr,  # (N, V) teacher logits, fp16 / bf16 / fp32, rows t_stride apart, stride 1 in V
    labels_ptr,  # (N,) int64 GLOBAL labels (read only when HAS_LABELS)
    loss_ptr,  # (N,) fp32 out: row losses (FINISH only)
    out_ptr,  # (N, n_split, NCOL) fp32 out: the table of each program's columns
    V,  # row width (of this range of the vocabulary)
    s_stride,  # elements between rows of s (>= V)
    t_stride,  # elements between rows of t (>= V)
    chunk,  # columns per program (a multiple of BLOCK_V; V when n_split = 1)
    n_split,  # programs per row
    offset,  # global vocabulary id of column 0 (labels are rebased by it)
    inv_ts,  # 1 / student temperature
    inv_tt,  # 1 / teacher temperature
    kd_scale,  # weight of D
    ce_weight,  # weight of CE
    ignore_index,  # label of rows that contribute 0
    KIND: tl.constexpr,  # FORWARD_KL / REVERSE_KL / MIXTURE (ACC = 0, pass 2 follows)
    HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr,  # ce_weight != 0
    CE_SHARED: tl.constexpr,  # Ts == 1: the CE logsumexp is the student's
    FINISH: tl.constexpr,  # the whole row in one program (KL kinds): D and the loss too
    BLOCK_V: tl.constexpr,
):
    row, lo, hi, label, valid = _row_range(labels_ptr, V, chunk, offset, ignore_index,
                                           HAS_LABELS)
    if HAS_LABELS:
        hi = tl.where(valid, hi, lo)  # ignored rows read nothing: the empty range
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    offs = tl.arange(0, BLOCK_V)
    ms = -float("inf")
    mt = -float("inf")
    m1 = -float("inf")
    ls = 0.0
    lt = 0.0
    l1 = 0.0
    acc = 0.0
    acc_b = 0.0
    for start in range(lo, hi, BLOCK_V):
        cols = start + offs
        mask = cols < hi
        xs = tl.load(s_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
        xt = tl.load(t_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
        # raw maxima; every shifted logit is (x - m) / T, exact near the maximum for any T
        ms_new = tl.maximum(ms, tl.max(xs, 0))
        mt_new = tl.maximum(mt, tl.max(xt, 0))
        rs = _ref(ms_new)
        rt = _ref(mt_new)
        if HAS_CE:
            if not CE_SHARED:
                # the CE pair at T = 1 shares the raw maximum: only its sum is separate
                # (taken first, so the raw tile is dead before the divergence's tiles live)
                l1 = l1 * tl.exp(_shift(ms, ms_new)) + tl.sum(tl.exp(xs - rs), 0)
        ys = (xs - rs) * inv_ts  # zs - ms
        yt = (xt - rt) * inv_tt  # zt - mt
        es = tl.exp(ys)
        et = tl.exp(yt)
        # the previous sums' shifts to the new maxima, scaled: (m - m') / T (0 when equal,
        # -inf from the empty start)
        dms = _shift(ms, ms_new) * inv_ts
        dmt = _shift(mt, mt_new) * inv_tt
        if KIND == 0:
            # sum e^(zt - mt) ((zt - mt) - (zs - ms)) over entries of nonzero weight
            acc = _rebase(acc, lt, dmt, dms)
            acc += tl.sum(tl.where(et > 0, et * (yt - ys), 0.0), 0)
        if KIND == 1:
            acc = _rebase(acc, ls, dms, dmt)
            acc += tl.sum(tl.where(es > 0, es * (ys - yt), 0.0), 0)
        if KIND == 3:
            # soft_cross_entropy: sum e^(zt - mt) (-(zs - ms)); its shift is -ds only, the
            # forward rule with do = ds + dt
            acc = _rebase(acc, lt, dmt, dms + dmt)
            acc += tl.sum(tl.where(et > 0, -et * ys, 0.0), 0)
        if KIND == 4:
            # forward_reverse_kl: forward KL's accumulator and reverse KL's, from one
            # difference d = (zs - ms) - (zt - mt) (one tile fewer live: no spill on sm_90)
            d = ys - yt
            acc = _rebase(acc, lt, dmt, dms)
            acc -= tl.sum(tl.where(et > 0, et * d, 0.0), 0)
            acc_b = _rebase(acc_b, ls, dms, dmt)
            acc_b += tl.sum(tl.where(es > 0, es * d, 0.0), 0)
        ls = ls * tl.exp(dms) + tl.sum(es, 0)
        lt = lt * tl.exp(dmt) + tl.sum(et, 0)
        ms = ms_new
        mt = mt_new
    if HAS_CE and not CE_SHARED:
        m1 = ms
    else:
        # Ts = 1: the CE pair is the student's. Without a CE term the pair is not
        # accumulated: the student's when Ts = 1 all the same, else the empty range.
        m1 = tl.where(inv_ts == 1.0, ms, m1)
        l1 = tl.where(inv_ts == 1.0, ls, l1)
    target = 0.0
    if HAS_LABELS:  # s[label] when the label is one of this program's columns, else 0
        target = tl.load(s_row + label, mask=(label >= lo) & (label < hi),
                         other=0.0).to(tl.float32)
    _store_row(out_ptr + (row * n_split + tl.program_id(1)) * C_NCOL, loss_ptr, row, valid,
               ms, ls, mt, lt, m1, l1, target, acc, kd_scale, ce_weight,
               KIND, HAS_LABELS, HAS_CE, FINISH, acc_b)


@triton.jit
def _merge_pair(p, M: tl.constexpr, L: tl.constexpr, km, inv_t):
    # the (max, sum) of a row from its chunks' (raw max, log-sum) pairs: the online update
    # applied to whole chunks, each shifted to the common maximum by (m_k - m) / T
    m_k = tl.load(p + M, mask=km, other=-float("inf"))
    l_k = tl.load(p + L, mask=km, other=-float("inf"))
    m = tl.max(m_k, 0)
    dm = _shift(m_k, m) * inv_t
    return m, tl.sum(tl.exp(l_k + dm), 0), dm, l_k


@triton.jit
def _kd_merge_kernel(
    labels_ptr,  # (N,) int64 labels (read only when HAS_LABELS)
    loss_ptr,  # (N,) fp32 out: row losses (FINISH)
    stats_ptr,  # (N, NCOL) fp32 out: the row's table
    part_ptr,  # (N, n_split, NCOL) fp32: the tables of _kd_fwd_kernel's programs
    n_split,  # partials per row
    inv_ts,  # 1 / student temperature (the maxima are raw: shifts are scaled)
    inv_tt,  # 1 / teacher temperature
    kd_scale,  # weight of D
    ce_weight,  # weight of CE
    ignore_index,  # label of rows that contribute 0
    KIND: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr,
    FINISH: tl.constexpr,  # KL kinds: D and the row loss; else the merged partial table
    SPLIT_BLOCK: tl.constexpr,  # power of two >= n_split
):
    # The exact merge of _stats.merge, over a row's chunks at once.
    row, _, _, _, valid = _row_range(labels_ptr, 0, 0, 0, ignore_index, HAS_LABELS)
    k = tl.arange(0, SPLIT_BLOCK)
    km = k < n_split
    p = part_ptr + (row * n_split + k) * C_NCOL
    ms, ls, dms, ls_k = _merge_pair(p, C_MS, C_LS, km, inv_ts)
    mt, lt, dmt, lt_k = _merge_pair(p, C_MT, C_LT, km, inv_tt)
    m1, l1, _, _ = _merge_pair(p, C_M1, C_L1, km, 1.0)
    target = tl.sum(tl.load(p + C_LABEL, mask=km, other=0.0), 0)
    acc_k = tl.load(p + C_ACC, mask=km, other=0.0)
    acc = 0.0
    if KIND == 0:
        acc = tl.sum(_rebase(acc_k, tl.exp(lt_k), dmt, dms), 0)
    if KIND == 1:
        acc = tl.sum(_rebase(acc_k, tl.exp(ls_k), dms, dmt), 0)
    acc_b = 0.0
    if KIND == 3:
        acc = tl.sum(_rebase(acc_k, tl.exp(lt_k), dmt, dms + dmt), 0)
    if KIND == 4:
        acc = tl.sum(_rebase(acc_k, tl.exp(lt_k), dmt, dms), 0)
        b_k = tl.load(p + C_B, mask=km, other=0.0)
        acc_b = tl.sum(_rebase(b_k, tl.exp(ls_k), dms, dmt), 0)
    _store_row(stats_ptr + row * C_NCOL, loss_ptr, row, valid, ms, ls, mt, lt, m1, l1,
               target, acc, kd_scale, ce_weight, KIND, HAS_LABELS, HAS_CE, FINISH, acc_b)


@triton.jit
def _finish_mix(
    st, loss_ptr, row, valid, a_sum, b_sum, uq, up, coef_p, coef_q, kd_scale, ce_weight,
    HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr, HAS_CP: tl.constexpr,
    HAS_CQ: tl.constexpr,
):
    # A mixture row from its sums: A, B, Uq, Up into the table `st`, and the row loss
    d = 0.0
    if HAS_CP:
        d += coef_p * a_sum
    if HAS_CQ:
        d += coef_q * b_sum
    loss = kd_scale * d
    if HAS_CE:
        # lse(s) - s[label] = (m1 - s[label]) + log l1, from pass 1
        loss += ce_weight * ((tl.load(st + C_M1) - tl.load(st + C_LABEL)) + tl.load(st + C_L1))
    if HAS_LABELS:  # ignored rows read nothing: their NaN sums never reach the outputs
        loss = tl.where(valid, loss, 0.0)
        a_sum = tl.where(valid, a_sum, 0.0)
        b_sum = tl.where(valid, b_sum, 0.0)
        uq = tl.where(valid, uq, 0.0)
        up = tl.where(valid, up, 0.0)
    tl.store(st + C_DIV, a_sum)
    tl.store(st + C_B, b_sum)
    tl.store(st + C_UQ, uq)
    tl.store(st + C_UP, up)
    tl.store(loss_ptr + row, loss)


@triton.jit
def _kd_mix_kernel(
    s_ptr,  # (N, V) student logits
    t_ptr,  # (N, V) teacher logits
    labels_ptr,  # (N,) int64 labels (read only when HAS_LABELS)
    loss_ptr,  # (N,) fp32 out: row losses (FINISH)
    stats_ptr,  # (N, NCOL) fp32: the row's global MS, LS, MT, LT (+ M1, L1, LABEL for CE)
                # in; A, B, Uq, Up out in DIV, B, UQ, UP (FINISH)
    part_ptr,  # (N, n_split, 4) fp32 out unless FINISH: the range's A, B, Uq, Up
    V,  # row width (of this range)
    s_stride,  # elements between rows of s (>= V)
    t_stride,  # elements between rows of t (>= V)
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
    FINISH: tl.constexpr,  # the whole row in one program: the sums and the loss
    BLOCK_V: tl.constexpr,
):
    # Pass 2 of the mixture kind: A, B, Uq, Up from the logsumexps of pass 1.
    row, lo, hi, _, valid = _row_range(labels_ptr, V, chunk, 0, ignore_index, HAS_LABELS)
    if HAS_LABELS:
        hi = tl.where(valid, hi, lo)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    st = stats_ptr + row * C_NCOL
    ms = tl.load(st + C_MS)
    rs = tl.load(st + C_LS)
    mt = tl.load(st + C_MT)
    rt = tl.load(st + C_LT)
    offs = tl.arange(0, BLOCK_V)
    a_sum = 0.0
    b_sum = 0.0
    uq = 0.0
    up = 0.0
    for start in range(lo, hi, BLOCK_V):
        cols = start + offs
        mask = cols < hi
        xs = tl.load(s_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
        xt = tl.load(t_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
        lq = (xs - ms) * inv_ts - rs
        lp = (xt - mt) * inv_tt - rt
        lm = _logaddexp(lp + log_a, lq + log_1ma)
        p = tl.exp(lp)
        q = tl.exp(lq)
        if HAS_CP:
            a_sum += tl.sum(tl.where(p > 0, p * (lp - lm), 0.0), 0)
        if HAS_CQ:
            b_sum += tl.sum(tl.where(q > 0, q * (lq - lm), 0.0), 0)
        if HAS_U:
            qu, pu = _mix_u(lq, lp, lm, coef_p, coef_q, HAS_CP, HAS_CQ)
            uq += tl.sum(qu, 0)
            up += tl.sum(pu, 0)
        else:  # u = 1: q u = q, p u = p (the backward does not read them then)
            uq += tl.sum(q, 0)
            up += tl.sum(p, 0)
    # The global pairs give the row's softmaxes: log l >= 0 on a side with a finite maximum,
    # -inf when nothing is finite, NaN after a NaN or a +inf. Either side without one makes
    # every sum NaN, which the masks in the loop (p > 0, q > 0) would have dropped.
    has_softmax = (rs > -float("inf")) & (rt > -float("inf"))
    a_sum = tl.where(has_softmax, a_sum, float("nan"))
    b_sum = tl.where(has_softmax, b_sum, float("nan"))
    uq = tl.where(has_softmax, uq, float("nan"))
    up = tl.where(has_softmax, up, float("nan"))
    if FINISH:
        if HAS_LABELS:
            # the same predicate (lo < V for every program), re-derived from the loop
            # bounds: kept live through the loop, ptxas spilled it (4 bytes of stack) on sm_80
            valid = hi > lo
        _finish_mix(st, loss_ptr, row, valid, a_sum, b_sum, uq, up, coef_p, coef_q,
                    kd_scale, ce_weight, HAS_LABELS, HAS_CE, HAS_CP, HAS_CQ)
    else:
        p_out = part_ptr + (row * n_split + tl.program_id(1)) * 4
        tl.store(p_out + 0, a_sum)
        tl.store(p_out + 1, b_sum)
        tl.store(p_out + 2, uq)
        tl.store(p_out + 3, up)


@triton.jit
def _kd_pw_kernel(
    s_ptr,  # (N, V) student logits
    t_ptr,  # (N, V) teacher logits
    stats_ptr,  # (N, NCOL) fp32: the rows' global MS, LS, MT, LT
    part_ptr,  # (N, n_split, 4) fp32 out: the range's (D or T, 0, UQ, UP) sums
    V,  # row width (of this range)
    s_stride,  # elements between rows of s (>= V)
    t_stride,  # elements between rows of t (>= V)
    chunk,  # columns per program
    n_split,  # programs per row
    inv_ts,  # 1 / student temperature
    inv_tt,  # 1 / teacher temperature
    coef_p,  # alpha_beta's a
    coef_q,  # alpha_beta's b
    KIND: tl.constexpr,  # TVD / ALPHA_BETA
    BLOCK_V: tl.constexpr,
):
    # Pass 2 of tvd and alpha_beta (reference.py pointwise_sums). Rows are not told apart:
    # an ignored row's sums are whatever its empty statistics give, masked by _stats.finish.
    row, lo, hi, _, _ = _row_range(s_ptr, V, chunk, 0, 0, False)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    st = stats_ptr + row * C_NCOL
    ms = tl.load(st + C_MS)
    rs = tl.load(st + C_LS)
    mt = tl.load(st + C_MT)
    rt = tl.load(st + C_LT)
    offs = tl.arange(0, BLOCK_V)
    sd = 0.0
    uq = 0.0
    up = 0.0
    for start in range(lo, hi, BLOCK_V):
        cols = start + offs
        mask = cols < hi
        xs = tl.load(s_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
        xt = tl.load(t_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
        lq = (xs - ms) * inv_ts - rs
        lp = (xt - mt) * inv_tt - rt
        if KIND == 5:
            q = tl.exp(lq)
            p = tl.exp(lp)
            g = tl.where(q > p, 1.0, tl.where(q < p, -1.0, 0.0))
            sd += tl.sum(tl.abs(p - q), 0)
            uq += tl.sum(g * q, 0)
            up += tl.sum(g * p, 0)
        else:
            ab = coef_p + coef_q
            x = tl.exp(coef_p * lp + coef_q * lq)
            yp = tl.exp(ab * lp)
            yq = tl.exp(ab * lq)
            terms = x - (coef_p / ab) * yp - (coef_q / ab) * yq
            sd += tl.sum(terms, 0) * (-1.0 / (coef_p * coef_q))
            uq += tl.sum(x - yq, 0)
            up += tl.sum(x - yp, 0)
    p_out = part_ptr + (row * n_split + tl.program_id(1)) * 4
    tl.store(p_out + 0, sd)
    tl.store(p_out + 1, 0.0)
    tl.store(p_out + 2, uq)
    tl.store(p_out + 3, up)


@triton.jit
def _kd_mix_merge_kernel(
    labels_ptr,  # (N,) int64 labels (read only when HAS_LABELS)
    loss_ptr,  # (N,) fp32 out: row losses (FINISH)
    stats_ptr,  # (N, NCOL) fp32: M1, L1, LABEL in; A, B, Uq, Up out (FINISH)
    part_ptr,  # (N, n_split, 4) fp32: partial A, B, Uq, Up of _kd_mix_kernel
    out_ptr,  # (N, 4) fp32 out unless FINISH: the summed A, B, Uq, Up
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
    FINISH: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,  # power of two >= n_split
):
    row, _, _, _, valid = _row_range(labels_ptr, 0, 0, 0, ignore_index, HAS_LABELS)
    k = tl.arange(0, SPLIT_BLOCK)
    km = k < n_split
    p = part_ptr + (row * n_split + k) * 4
    a_sum = tl.sum(tl.load(p + 0, mask=km, other=0.0), 0)
    b_sum = tl.sum(tl.load(p + 1, mask=km, other=0.0), 0)
    uq = tl.sum(tl.load(p + 2, mask=km, other=0.0), 0)
    up = tl.sum(tl.load(p + 3, mask=km, other=0.0), 0)
    if FINISH:
        _finish_mix(stats_ptr + row * C_NCOL, loss_ptr, row, valid, a_sum, b_sum, uq, up,
                    coef_p, coef_q, kd_scale, ce_weight, HAS_LABELS, HAS_CE, HAS_CP, HAS_CQ)
    else:
        o = out_ptr + row * 4
        tl.store(o + 0, a_sum)
        tl.store(o + 1, b_sum)
        tl.store(o + 2, uq)
        tl.store(o + 3, up)


@triton.jit
def _kd_bwd_kernel(
    s_ptr,  # (N, V) student logits
    t_ptr,  # (N, V) teacher logits
    labels_ptr,  # (N,) int64 GLOBAL labels (read only when HAS_LABELS)
    stats_ptr,  # (N, NCOL) fp32: the rows' GLOBAL finished table (D | A, B, Uq, Up set)
    grad_ptr,  # (N,) fp32: upstream gradient of each row loss
    ds_ptr,  # (N, V) out, s's dtype: d loss / d s (may be s_ptr itself: in-place)
    dt_ptr,  # (N, V) out, t's dtype: d loss / d t (written only when TEACHER_GRAD)
    V,  # row width (of this range)
    s_stride,  # elements between rows of s (>= V), likewise of t, ds, dt
    t_stride,
    ds_stride,
    dt_stride,
    chunk,  # columns per program (V when the row is not split)
    offset,  # global vocabulary id of column 0 (labels are rebased by it)
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
    # the one-hot column of CE is `label` (none when it is outside this range)
    row, lo, hi, label, valid = _row_range(labels_ptr, V, chunk, offset, ignore_index,
                                           HAS_LABELS)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    ds_row = ds_ptr + row * ds_stride
    dt_row = dt_ptr + row * dt_stride
    g = tl.load(grad_ptr + row)
    cs = g * kd_scale * inv_ts  # d loss / d zs -> d / d s
    ct = g * kd_scale * inv_tt
    cce = g * ce_weight
    st = stats_ptr + row * C_NCOL
    ms = tl.load(st + C_MS)
    rs = tl.load(st + C_LS)
    mt = tl.load(st + C_MT)
    rt = tl.load(st + C_LT)
    m1 = tl.load(st + C_M1)
    r1 = tl.load(st + C_L1)
    div = tl.load(st + C_DIV)  # D, or A for the mixture
    b_sum = 0.0
    uq = 0.0
    up = 0.0
    if KIND >= 2:  # the mixture's B, Uq, Up; forward_reverse_kl's R; tvd's, alpha_beta's
        b_sum = tl.load(st + C_B)
        uq = tl.load(st + C_UQ)
        up = tl.load(st + C_UP)
    offs = tl.arange(0, BLOCK_V)
    for start in range(lo, hi, BLOCK_V):
        cols = start + offs
        inside = cols < hi
        mask = inside & valid  # ignored rows read nothing and get zeros
        xs = tl.load(s_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
        xt = tl.load(t_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
        lq = (xs - ms) * inv_ts - rs
        lp = (xt - mt) * inv_tt - rt
        q = tl.exp(lq)
        p = tl.exp(lp)
        if KIND == 0:
            gs = q - p
            if TEACHER_GRAD:
                gt = tl.where(p > 0, p * (lp - lq - div), 0.0)
        elif KIND == 1:
            gs = tl.where(q > 0, q * (lq - lp - div), 0.0)
            if TEACHER_GRAD:
                gt = p - q
        elif KIND == 3:  # soft_cross_entropy
            gs = q - p
            if TEACHER_GRAD:
                gt = tl.where(p > 0, p * (-lq - div), 0.0)
        elif KIND == 4:  # forward_reverse_kl: div = F, b_sum = R
            gs = coef_p * (q - p) + coef_q * tl.where(q > 0, q * (lq - lp - b_sum), 0.0)
            if TEACHER_GRAD:
                gt = coef_p * tl.where(p > 0, p * (lp - lq - div), 0.0) + coef_q * (p - q)
        elif KIND == 5:  # tvd: sgn(q - p), 0 where equal (g is the row's upstream gradient)
            sg = tl.where(q > p, 1.0, tl.where(q < p, -1.0, 0.0))
            gs = 0.5 * q * (sg - uq)
            if TEACHER_GRAD:
                gt = -0.5 * p * (sg - up)
        elif KIND == 6:  # alpha_beta
            ab = coef_p + coef_q
            x = tl.exp(coef_p * lp + coef_q * lq)
            gs = (x - tl.exp(ab * lq) - q * uq) * (-1.0 / coef_p)
            if TEACHER_GRAD:
                gt = (x - tl.exp(ab * lp) - p * up) * (-1.0 / coef_q)
        else:
            gs, gt = _mix_grad(lq, lp, q, p, log_a, log_1ma, mix, coef_p, coef_q, div, b_sum,
                               uq, up, HAS_CP, HAS_CQ, HAS_U, TEACHER_GRAD)
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


def _check_inputs(s, t, labels) -> None:
    from . import SUPPORTED_DTYPES

    for name, x in (("s", s), ("t", t)):
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must have a dtype in {SUPPORTED_DTYPES}, got {x.dtype}")
        if x.dim() != 2 or not strided_rows(x):
            raise ValueError(f"{name} must be an (N, V) tensor with stride 1 along V, got "
                             f"shape {tuple(x.shape)}, strides {x.stride()}")
    if s.shape != t.shape:
        raise ValueError(f"s and t must have the same shape, got {tuple(s.shape)}, "
                         f"{tuple(t.shape)}")
    if s.device != t.device:
        raise ValueError(f"s and t must be on the same device, got {s.device}, {t.device}")
    if labels is not None and (labels.dtype != torch.int64 or labels.shape != s.shape[:1]
                               or labels.device != s.device):
        raise ValueError(f"labels must be int64 of shape ({s.shape[0]},) on {s.device}, "
                         f"got {labels.dtype} {tuple(labels.shape)} on {labels.device}")


def _check_stats(stats, n: int, device) -> None:
    if (stats.shape != (n, NCOL) or stats.dtype != torch.float32 or not stats.is_contiguous()
            or stats.device != device):
        raise ValueError(f"stats must be a contiguous float32 ({n}, {NCOL}) table on {device}, "
                         f"got {stats.dtype} {tuple(stats.shape)} on {stats.device}")


def _no_labels(s):
    return torch.empty(0, device=s.device, dtype=torch.int64)


def _stats_pass(s, t, labels, args, offset: int, finish: bool):
    """Pass 1: (row losses (N,) or None, the (N, NCOL) table of the columns of s, t).
    finish (KL kinds, whole rows): D and the losses too; else the partial table (DIV 0).
    # read s, t once; write O(N)"""
    kind, mix, coef_p, coef_q, inv_ts, inv_tt, kd_scale, ce_weight, ignore_index = args
    n, v = s.shape
    f = _flags(kind, mix, coef_p, coef_q, labels is not None, ce_weight, inv_ts)
    finish = finish and f.kind in (FORWARD_KL, REVERSE_KL)
    stats = torch.empty((n, NCOL), device=s.device, dtype=torch.float32)
    loss = torch.empty(n, device=s.device, dtype=torch.float32) if finish else None
    if n == 0:
        return loss, stats
    if v == 0:  # no columns: the empty range (finish is never asked of one)
        return loss, _stats.empty(n, s.device, torch.float32)
    cfg = _config_for(s)
    lab = labels if labels is not None else _no_labels(s)
    split = cfg.n_split > 1
    part = stats
    if split:
        part = torch.empty((n, cfg.n_split, NCOL), device=s.device, dtype=torch.float32)
    loss_arg = loss if finish else stats  # not written unless finish
    _kd_fwd_kernel[(n, cfg.n_split)](
        s, t, lab, loss_arg, part, v, s.stride(0), t.stride(0), cfg.chunk, cfg.n_split, offset,
        inv_ts, inv_tt, kd_scale, ce_weight, ignore_index,
        KIND=f.kind, HAS_LABELS=f.has_labels, HAS_CE=f.has_ce, CE_SHARED=f.ce_shared,
        FINISH=finish and not split, BLOCK_V=cfg.block_v, num_warps=cfg.num_warps,
    )
    if split:
        _kd_merge_kernel[(n,)](
            lab, loss_arg, stats, part, cfg.n_split, inv_ts, inv_tt, kd_scale, ce_weight,
            ignore_index, KIND=f.kind, HAS_LABELS=f.has_labels, HAS_CE=f.has_ce, FINISH=finish,
            SPLIT_BLOCK=cfg.split_block, num_warps=1,
        )
    return loss, stats


def _mix_pass(s, t, labels, args, stats, loss):
    """Pass 2 of the mixture: with `loss` (whole rows), A, B, Uq, Up into stats' DIV, B,
    UQ, UP and the row losses into loss; else the range's (N, 4) sums, returned.
    # read s, t once; write O(N)"""
    kind, mix, coef_p, coef_q, inv_ts, inv_tt, kd_scale, ce_weight, ignore_index = args
    n, v = s.shape
    finish = loss is not None
    f = _flags(kind, mix, coef_p, coef_q, labels is not None, ce_weight, inv_ts)
    sums = None if finish else torch.zeros((n, 4), device=s.device, dtype=torch.float32)
    if n == 0 or v == 0:
        return sums
    cfg = _config_for(s)
    lab = labels if labels is not None else _no_labels(s)
    split = cfg.n_split > 1
    part = sums if not finish else stats  # not written when finish and not split
    if split:
        part = torch.empty((n, cfg.n_split, 4), device=s.device, dtype=torch.float32)
    loss_arg = loss if finish else stats
    _kd_mix_kernel[(n, cfg.n_split)](
        s, t, lab, loss_arg, stats, part, v, s.stride(0), t.stride(0), cfg.chunk, cfg.n_split,
        inv_ts, inv_tt, f.log_a, f.log_1ma, coef_p, coef_q, kd_scale, ce_weight, ignore_index,
        HAS_LABELS=f.has_labels, HAS_CE=f.has_ce, HAS_CP=f.has_cp, HAS_CQ=f.has_cq,
        HAS_U=f.has_u, FINISH=finish and not split, BLOCK_V=cfg.block_v,
        num_warps=cfg.num_warps,
    )
    if split:
        _kd_mix_merge_kernel[(n,)](
            lab, loss_arg, stats, part, stats if finish else sums, cfg.n_split, coef_p,
            coef_q, kd_scale, ce_weight, ignore_index, HAS_LABELS=f.has_labels,
            HAS_CE=f.has_ce, HAS_CP=f.has_cp, HAS_CQ=f.has_cq, FINISH=finish,
            SPLIT_BLOCK=cfg.split_block, num_warps=1,
        )
    return sums


def _pw_pass(s, t, args, stats):
    """Pass 2 of tvd / alpha_beta: the (N, 4) sums of the columns s, t hold, given the
    GLOBAL table `stats`. # read s, t once; write O(N)"""
    kind, mix, coef_p, coef_q, inv_ts, inv_tt = args[:6]
    n, v = s.shape
    if n == 0 or v == 0:
        return torch.zeros((n, 4), device=s.device, dtype=torch.float32)
    cfg = _config_for(s)
    part = torch.empty((n, cfg.n_split, 4), device=s.device, dtype=torch.float32)
    _kd_pw_kernel[(n, cfg.n_split)](
        s, t, stats, part, v, s.stride(0), t.stride(0), cfg.chunk, cfg.n_split, inv_ts, inv_tt, coef_p, coef_q,
        KIND=_KIND_IDS[kind], BLOCK_V=cfg.block_v, num_warps=cfg.num_warps,
    )
    return part.sum(1)


def _spec_of(args) -> LossSpec:
    kind, mix, coef_p, coef_q, inv_ts, inv_tt, kd_scale, ce_weight, ignore_index = args
    return LossSpec(Divergence(kind, mix, coef_p, coef_q), inv_ts, inv_tt, kd_scale,
                    ce_weight, ignore_index)


def _forward(s, t, labels, *args):
    """Whole rows: (row losses (N,), the finished (N, NCOL) table), both float32."""
    _check_inputs(s, t, labels)
    with device_guard(s):
        if _KIND_IDS.get(args[0], 0) > MIXTURE:
            # the newer kinds: the same passes, finished by _stats.finish
            _, stats = _stats_pass(s, t, labels, args, 0, finish=False)
            sums = _pw_pass(s, t, args, stats) if args[0] in ("tvd", "alpha_beta") else None
            loss, stats = _stats.finish(stats, labels, _spec_of(args), sums)
            if labels is not None:
                # ignored rows read nothing: their divergence columns are 0, as the kernels
                # write them for the other kinds (finish formed them from empty sums)
                cols = list(_stats.MIX_COLS)
                keep = (labels != args[-1])[:, None]
                stats[:, cols] = torch.where(keep, stats[:, cols], 0.0)
            return loss, stats
        loss, stats = _stats_pass(s, t, labels, args, 0, finish=True)
        if loss is None:  # mixture: pass 2 finishes
            loss = torch.empty(s.shape[0], device=s.device, dtype=torch.float32)
            _mix_pass(s, t, labels, args, stats, loss)
    return loss, stats


def _backward(grad, s, t, labels, stats, ds, dt, kind, mix, coef_p, coef_q, inv_ts, inv_tt,
              kd_scale, ce_weight, ignore_index, offset=0):
    """Write d loss / d s into ds (may be s itself) and, when dt is not None, d / d t,
    for the columns [offset, offset + V) of rows whose GLOBAL table is `stats`.
    # read s, t once; write ds (and dt)"""
    n, v = s.shape
    if n == 0 or v == 0:
        return
    f = _flags(kind, mix, coef_p, coef_q, labels is not None, ce_weight, inv_ts)
    cfg = _config_for(s)
    lab = labels if labels is not None else _no_labels(s)
    with device_guard(s):
        _kd_bwd_kernel[(n, cfg.n_split)](
            s, t, lab, stats, grad, ds, ds if dt is None else dt, v, s.stride(0), t.stride(0),
            ds.stride(0), ds.stride(0) if dt is None else dt.stride(0), cfg.chunk, offset,
            inv_ts, inv_tt, f.log_a, f.log_1ma, mix, coef_p, coef_q, kd_scale, ce_weight,
            ignore_index,
            KIND=f.kind, HAS_LABELS=f.has_labels, HAS_CE=f.has_ce, CE_SHARED=f.ce_shared,
            HAS_CP=f.has_cp, HAS_CQ=f.has_cq, HAS_U=f.has_u, TEACHER_GRAD=dt is not None,
            BLOCK_V=cfg.block_v, num_warps=cfg.num_warps,
        )


# --------------------------------------------------------------------------------------
# the row-statistics interface (_stats.py) over a range of columns
# --------------------------------------------------------------------------------------


def _labels(labels):
    return labels.contiguous() if labels is not None else None


# The kernels of the range functions run inside torch.library ops, so that torch.compile
# sees opaque ops, not Triton launches (kd_loss's vocab_size goes through these: _vocab.py).
# The LossSpec travels as primitive arguments (LossSpec.as_args()).

@torch.library.custom_op("kdkernels_triton::partial", mutates_args=())
def _partial_op(
    s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, kind: str, mix: float,
    coef_p: float, coef_q: float, inv_ts: float, inv_tt: float, kd_scale: float,
    ce_weight: float, ignore_index: int, offset: int,
) -> torch.Tensor:
    args = (kind, mix, coef_p, coef_q, inv_ts, inv_tt, kd_scale, ce_weight, ignore_index)
    with device_guard(s):
        return _stats_pass(s, t, labels, args, offset, finish=False)[1]


@_partial_op.register_fake
def _partial_fake(s, *args):
    return s.new_empty((s.shape[0], NCOL), dtype=torch.float32)


@torch.library.custom_op("kdkernels_triton::mix_partial", mutates_args=())
def _mix_partial_op(
    s: torch.Tensor, t: torch.Tensor, stats: torch.Tensor, kind: str, mix: float,
    coef_p: float, coef_q: float, inv_ts: float, inv_tt: float, kd_scale: float,
    ce_weight: float, ignore_index: int,
) -> torch.Tensor:
    args = (kind, mix, coef_p, coef_q, inv_ts, inv_tt, kd_scale, ce_weight, ignore_index)
    with device_guard(s):
        if kind != "mixture":
            return _pw_pass(s, t, args, stats)
        return _mix_pass(s, t, None, args, stats, None)


@_mix_partial_op.register_fake
def _mix_partial_fake(s, *args):
    return s.new_empty((s.shape[0], 4), dtype=torch.float32)


@torch.library.custom_op("kdkernels_triton::grads_out", mutates_args=("ds", "dt"))
def _grads_op(
    grad: torch.Tensor, s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
    stats: torch.Tensor, ds: torch.Tensor, dt: torch.Tensor | None, kind: str, mix: float,
    coef_p: float, coef_q: float, inv_ts: float, inv_tt: float, kd_scale: float,
    ce_weight: float, ignore_index: int, offset: int,
) -> None:
    _backward(grad, s, t, labels, stats, ds, dt, kind, mix, coef_p, coef_q, inv_ts, inv_tt,
              kd_scale, ce_weight, ignore_index, offset=offset)


@_grads_op.register_fake
def _grads_fake(*args):
    return None


@torch.no_grad()
def partial(s, t, labels, spec: LossSpec, offset: int = 0) -> torch.Tensor:
    """Pass-1 statistics (N, NCOL) of the columns [offset, offset + Vr) that s, t (N, Vr)
    hold; labels (N,) are GLOBAL ids or None. DIV, B, UQ, UP are 0. Ignored rows are the
    empty range."""
    labels = _labels(labels)
    _check_inputs(s, t, labels)
    return _partial_op(s, t, labels, *spec.as_args(), int(offset))


@torch.no_grad()
def mix_partial(s, t, spec: LossSpec, stats: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """The mixture's pass-2 sums (N, 4) = (A, B, Uq, Up) over the columns s, t hold, given
    the GLOBAL (merged) table `stats`: they add up over ranges, in the order of
    _stats.MIX_COLS. Uq, Up are the sums of q u, p u also at u = 1 (jsd), where they add up
    to 1 and the gradient does not read them. Rows are not told apart (no labels): an
    ignored row's sums are whatever its empty-range statistics give (nan), masked by
    _stats.finish and grads. offset is unused (nothing here depends on a label)."""
    del offset
    _check_inputs(s, t, None)
    _check_stats(stats, s.shape[0], s.device)
    if spec.div.kind not in TWO_PASS_KINDS:
        raise ValueError(f"mix_partial needs a two-pass divergence {TWO_PASS_KINDS}, got "
                         f"{spec.div.kind!r}")
    return _mix_partial_op(s, t, stats, *spec.as_args())


@torch.no_grad()
def grads(s, t, labels, spec: LossSpec, stats: torch.Tensor, offset: int,
          grad_rows: torch.Tensor, need_teacher: bool, out=None, out_t=None):
    """(d s, d t or None) of the columns [offset, offset + Vr) that s, t hold, given the
    GLOBAL finished table `stats` (DIV set, and B, UQ, UP for the mixture), times grad_rows
    (N,). Rows whose label is ignore_index get exactly 0; the one-hot of CE falls on
    label - offset when that is a column here. out, out_t: buffers to write them into
    (s's and t's shape and dtype, any row stride), else fresh ones."""
    labels = _labels(labels)
    _check_inputs(s, t, labels)
    _check_stats(stats, s.shape[0], s.device)
    ds = torch.empty_like(s) if out is None else out
    dt = (torch.empty_like(t) if out_t is None else out_t) if need_teacher else None
    for name, g, x in (("out", ds, s), ("out_t", dt, t)):
        if g is not None and (g.shape != x.shape or g.dtype != x.dtype
                              or g.device != x.device or not strided_rows(g)):
            raise ValueError(f"{name} must have shape {tuple(x.shape)}, dtype {x.dtype} on "
                             f"{x.device} and stride 1 along V, got {tuple(g.shape)} "
                             f"{g.dtype} on {g.device}, strides {g.stride()}")
    _grads_op(grad_rows.to(device=s.device, dtype=torch.float32).contiguous(), s, t, labels,
              stats, ds, dt, *spec.as_args(), int(offset))
    return ds, dt


# --------------------------------------------------------------------------------------
# torch.library ops: the LossSpec travels as primitive arguments
# --------------------------------------------------------------------------------------

@torch.library.custom_op("kdkernels_triton::kd_fwd", mutates_args=())
def kd_fwd(
    s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, kind: str, mix: float,
    coef_p: float, coef_q: float, inv_ts: float, inv_tt: float, kd_scale: float,
    ce_weight: float, ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row losses (N,), the finished (N, NCOL) row-statistics table), both float32."""
    return _forward(s, t, labels, kind, mix, coef_p, coef_q, inv_ts, inv_tt, kd_scale,
                    ce_weight, ignore_index)


@kd_fwd.register_fake
def _kd_fwd_fake(s, t, labels, kind, *args):
    n = s.shape[0]
    return (s.new_empty((n,), dtype=torch.float32),
            s.new_empty((n, NCOL), dtype=torch.float32))


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


@first_order_only
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
    @first_order_only
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
    args = spec.as_args()
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
    ints = ("V", "s_stride", "t_stride", "ds_stride", "dt_stride", "chunk", "n_split", "offset",
            "ignore_index")
    floats = ("inv_ts", "inv_tt", "kd_scale", "ce_weight", "log_a", "log_1ma", "mix",
              "coef_p", "coef_q")
    # the tile width and warps depend on V only; whether a row is split depends on N
    cfg = launch_config(V, 1 << 30, None)
    w = cfg.num_warps
    fwd_sig = _sig(_kd_fwd_kernel, dict(s_ptr=x, t_ptr=x, labels_ptr=i64, loss_ptr=f32,
                                        out_ptr=f32), ints, floats)
    merge_sig = _sig(_kd_merge_kernel, dict(labels_ptr=i64, loss_ptr=f32, stats_ptr=f32,
                                            part_ptr=f32), ints, floats)
    mix_sig = _sig(_kd_mix_kernel, dict(s_ptr=x, t_ptr=x, labels_ptr=i64, loss_ptr=f32,
                                        stats_ptr=f32, part_ptr=f32), ints, floats)
    mmerge_sig = _sig(_kd_mix_merge_kernel, dict(labels_ptr=i64, loss_ptr=f32, stats_ptr=f32,
                                                 part_ptr=f32, out_ptr=f32), ints, floats)
    bwd_sig = _sig(_kd_bwd_kernel, dict(s_ptr=x, t_ptr=x, labels_ptr=i64, stats_ptr=f32,
                                        grad_ptr=f32, ds_ptr=x, dt_ptr=x), ints, floats)
    pw_sig = _sig(_kd_pw_kernel, dict(s_ptr=x, t_ptr=x, stats_ptr=f32, part_ptr=f32), ints,
                  floats)
    kinds = {FORWARD_KL: "forward_kl", REVERSE_KL: "reverse_kl", MIXTURE: "mixture"}
    out = []
    for has_labels, has_ce, ce_shared in _LABEL_MODES:
        lab = dict(HAS_LABELS=has_labels, HAS_CE=has_ce, CE_SHARED=ce_shared)
        tag = "labels" if has_labels else "nolabels"
        tag += ("+ce_shared" if ce_shared else "+ce") if has_ce else ""
        for kind, kname in kinds.items():
            # FINISH: a whole KL row in one program (or its merge); else a partial table
            for finish in (False, True) if kind != MIXTURE else (False,):
                ftag = ",finish" if finish else ""
                out.append(AotKernel(
                    f"kd_fwd[{kname},{tag}{ftag}]", _kd_fwd_kernel, fwd_sig,
                    dict(KIND=kind, FINISH=finish, BLOCK_V=cfg.block_v, **lab), w))
                out.append(AotKernel(
                    f"kd_merge[{kname},{tag}{ftag}]", _kd_merge_kernel, merge_sig,
                    dict(KIND=kind, HAS_LABELS=has_labels, HAS_CE=has_ce, FINISH=finish,
                         SPLIT_BLOCK=cfg.split_block), 1))
        bwd_modes = [(FORWARD_KL, (False, False, False)), (REVERSE_KL, (False, False, False))]
        bwd_modes += [(MIXTURE, m) for m in _MIX_MODES]
        for kind, (has_cp, has_cq, has_u) in bwd_modes:
            mix_flags = dict(HAS_CP=has_cp, HAS_CQ=has_cq, HAS_U=has_u)
            mtag = f"{kinds[kind]},{tag}"
            if kind == MIXTURE:
                mtag += f",cp={int(has_cp)},cq={int(has_cq)},u={int(has_u)}"
                mlab = dict(HAS_LABELS=has_labels, HAS_CE=has_ce)
                for finish in (False, True):
                    ftag = ",finish" if finish else ""
                    out.append(AotKernel(
                        f"kd_mix[{mtag}{ftag}]", _kd_mix_kernel, mix_sig,
                        dict(FINISH=finish, BLOCK_V=cfg.block_v, **mlab, **mix_flags), w))
                # the sums alone (mix_partial, no labels) depend on none of the flags
                for finish in (True,) if has_labels else (False, True):
                    ftag = ",finish" if finish else ""
                    out.append(AotKernel(
                        f"kd_mix_merge[{mtag}{ftag}]", _kd_mix_merge_kernel, mmerge_sig,
                        dict(FINISH=finish, SPLIT_BLOCK=cfg.split_block, HAS_CP=has_cp,
                             HAS_CQ=has_cq, **mlab), 1))
            for teacher_grad in (False, True):
                out.append(AotKernel(
                    f"kd_bwd[{mtag}{',teacher_grad' if teacher_grad else ''}]",
                    _kd_bwd_kernel, bwd_sig,
                    dict(KIND=kind, TEACHER_GRAD=teacher_grad, BLOCK_V=cfg.block_v, **lab,
                         **mix_flags), w))
        out += _aot_other_kinds(cfg, lab, tag, fwd_sig, merge_sig, bwd_sig)
    out += [AotKernel(f"kd_pw[{name}]", _kd_pw_kernel, pw_sig,
                      dict(KIND=kind, BLOCK_V=cfg.block_v), w)
            for kind, name in ((TVD, "tvd"), (ALPHA_BETA, "alpha_beta"))]
    return out


def _aot_other_kinds(cfg, lab, tag, fwd_sig, merge_sig, bwd_sig) -> list[AotKernel]:
    """soft_cross_entropy, forward_reverse_kl, tvd, alpha_beta: pass 1 (never FINISH) and
    the backward, for one label mode."""
    w = cfg.num_warps
    names = {SOFT_CE: "soft_cross_entropy", FR_KL: "forward_reverse_kl", TVD: "tvd",
             ALPHA_BETA: "alpha_beta"}
    none = dict(HAS_CP=False, HAS_CQ=False, HAS_U=False)
    out = []
    for kind, kname in names.items():
        out.append(AotKernel(f"kd_fwd[{kname},{tag}]", _kd_fwd_kernel, fwd_sig,
                             dict(KIND=kind, FINISH=False, BLOCK_V=cfg.block_v, **lab), w))
        out.append(AotKernel(
            f"kd_merge[{kname},{tag}]", _kd_merge_kernel, merge_sig,
            dict(KIND=kind, HAS_LABELS=lab["HAS_LABELS"], HAS_CE=lab["HAS_CE"], FINISH=False,
                 SPLIT_BLOCK=cfg.split_block), 1))
        for teacher_grad in (False, True):
            out.append(AotKernel(
                f"kd_bwd[{kname},{tag}{',teacher_grad' if teacher_grad else ''}]",
                _kd_bwd_kernel, bwd_sig,
                dict(KIND=kind, TEACHER_GRAD=teacher_grad, BLOCK_V=cfg.block_v, **lab,
                     **none), w))
    return out
