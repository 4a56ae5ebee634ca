"""Row statistics: the one layout every backend writes, their exact merge, and the row values.

Every loss here is a function of a few per-row statistics that combine exactly over disjoint
column ranges of a row. A backend (torch, triton, ext) implements, in these terms:

    partial(s, t, labels, spec, offset) -> (N, NCOL) table
        s, t: (N, Vr) logits, the columns [offset, offset + Vr) of rows of width V;
        labels: (N,) GLOBAL vocabulary ids or None. Fills every column below except DIV, B,
        UQ, UP (0). Pass 1 of every kind.
    mix_partial(s, t, spec, stats, offset) -> (N, 4) table (A, B, Uq, Up)
        the mixture's pass-2 sums over the range, given the GLOBAL (merged) statistics
        (tvd's and alpha_beta's likewise, in the same columns: see below).
    grads(s, t, labels, spec, stats, offset, grad_rows, need_teacher) -> (gs, gt)
        the gradient of the range's columns given the GLOBAL statistics (finished: DIV set),
        times grad_rows (N,); rows whose label is ignore_index get exactly 0. A label outside
        the range contributes through the statistics only; gt is None unless need_teacher.

Labels are always GLOBAL ids and `offset` rebases them inside the backend: a row is ignored
when its label is ignore_index, and its label's column is label - offset when that falls in
[0, Vr).

and this module, once for all of them:

    merge(a, b, spec)       the table of the union of two disjoint ranges, exact;
    merge_all(parts, spec)  a left fold of merge over the first dim (R, N, NCOL);
    finish(stats, labels, spec, mix_sums=None) -> (row losses, finished stats).
(mix_partial and mix_sums serve every two-pass kind of _spec.py: mixture, tvd, alpha_beta.)

So a whole row is one partial; the vocab-parallel path (distributed.py) is a partial per
rank, an all_gather of the tables and merge_all; the mixture then all-reduces mix_partial.

Columns (float32, float64 for float64 logits). A side's maximum m of its RAW logits x and
log-sum l of its scaled, shifted logits (the pair, never one rounded logsumexp):

    MS, LS   student: m = max s over the range (-inf when none is finite; NaN when the
             range holds a NaN, else +inf when it holds a +inf, as torch.amax),
             l = log sum exp((s - m) / Ts) (-inf for an empty range)
    MT, LT   teacher, the same with t and Tt
    M1, L1   the student at T = 1 for cross-entropy: max s and log sum exp(s - m)
             (copies of MS, LS when inv_ts == 1)

The maxima are raw so that every shifted logit is formed as (x - m) / T, exact near the
maximum whatever T: log p = (x - m) / T - l keeps full precision at |x| ~ 1e4, where
x / T - m / T would carry a rounding of |x / T| into every probability.
    LABEL    s[label] (raw logit) when the label falls in the range, else 0
    DIV      KL kinds: D, the row's divergence (set by finish); mixture: A = sum p (lp - lm)
    B, UQ, UP  mixture: sum q (lq - lm), sum q u, sum p u (see _spec.py)
    ACC      KL kinds: acc = sum e^(zw') (zw' - zo') over the range, z' = (x - m) / T against
             the range's own maxima; w is the weighting side (teacher for forward KL, student
             for reverse), o the other. D = acc / e^lw - lw + lo.

The other kinds use the same columns:
    soft_cross_entropy  ACC = sum e^(zt') (-zs'), the teacher-weighted sum of the student's
             shifted logits (forward KL's accumulator without its zt' term):
             CE = -sum p lq = acc / e^lt + ls (no lt: the teacher's entropy is not taken off).
             DIV = CE when finished.
    forward_reverse_kl  ACC = forward KL's accumulator, B = reverse KL's (student-weighted,
             sum e^(zs') (zs' - zt')); finished: DIV = KL(p||q), B = KL(q||p),
             D = coef_p DIV + coef_q B.
    tvd      pass 2 (mix_partial's 4 sums): DIV = sum |p - q|, B = 0, UQ = sum sgn(q - p) q,
             UP = sum sgn(q - p) p (sgn 0 = 0); D = DIV / 2.
    alpha_beta  pass 2: DIV = D = sum of the element terms
             -1/(a b) (p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b)) (each >= 0, so the sum
             does not cancel), B = 0, UQ = sum (p^a q^b - q^(a+b)), UP = sum (p^a q^b - p^(a+b))
             (the gradient's row constants, also summed without cancelling; see reference.py).

The merge of two ranges moves each to the larger maxima M: l' = logaddexp over the pair with
shifts dm = (m - M) / T (0 when m == M, -inf for an empty side), and the accumulator
    acc' = e^(dw) (acc + e^(lw) (dw - do))
(soft_cross_entropy's acc' = e^(dt) (acc - e^(lt) ds): it holds -zs' only; the reverse
accumulator B of forward_reverse_kl moves by the reverse rule, w = student)
(every shifted difference (z - m) becomes (z - M) - dm). A range whose weighting mass is 0, or
whose factor e^(dw) underflows, contributes 0 (as its probabilities underflow to 0 in the
unsplit reference), even when its acc is +inf: never 0 * inf. NaN stays NaN.

Non-finite inputs (the policy of every backend, csrc/kd_math.h): the maxima carry a row's
state through partials and merges (torch.maximum keeps NaN and +inf), and finish gives NaN
to a row whose merged student or teacher maximum is not finite: a NaN or a +inf logit, or no
finite logit at all (no softmax). -inf entries of a row with finite ones are exact (padding
adds 0; forward KL is +inf where q = 0 < p). Ignored rows are 0 whatever their logits.
"""

from __future__ import annotations

from enum import IntEnum

import torch

from ._spec import TWO_PASS_KINDS, LossSpec


class Col(IntEnum):
    MS = 0
    LS = 1
    MT = 2
    LT = 3
    M1 = 4
    L1 = 5
    LABEL = 6
    DIV = 7
    B = 8
    UQ = 9
    UP = 10
    ACC = 11


NCOL = len(Col)
# the mixture's pass-2 sums (mix_partial's (N, 4) table), in this order
MIX_COLS = (Col.DIV, Col.B, Col.UQ, Col.UP)
# the (max, log-sum) pairs
PAIRS = ((Col.MS, Col.LS), (Col.MT, Col.LT), (Col.M1, Col.L1))
# columns that add over ranges
SUMS = (Col.LABEL, *MIX_COLS)


def empty(n: int, device, dtype) -> torch.Tensor:
    """The table of an empty range: maxima and log-sums -inf, sums 0 (merge's identity)."""
    t = torch.zeros(n, NCOL, device=device, dtype=dtype)
    for m, l in PAIRS:
        t[:, m] = -torch.inf
        t[:, l] = -torch.inf
    return t


def _shift(m: torch.Tensor, big: torch.Tensor) -> torch.Tensor:
    """m - big with 0 where equal (-inf == -inf included: never -inf - -inf)."""
    return torch.where(m == big, 0.0, m - big)


def _rebase(acc, lw, dw, do):
    """acc against maxima moved by (dw, do): e^dw (acc + e^lw (dw - do)); see the header."""
    alpha = torch.exp(dw)
    keep = ((lw > -torch.inf) & (alpha > 0)) | acc.isnan()
    moved = alpha * (acc + torch.exp(lw) * (dw - do))
    return torch.where(keep, moved, 0.0)


def merge(a: torch.Tensor, b: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """The statistics of the union of two disjoint column ranges, exactly."""
    out = torch.empty_like(a)
    shifts = {}
    inv_t = {Col.MS: spec.inv_ts, Col.MT: spec.inv_tt, Col.M1: 1.0}
    for m, l in PAIRS:
        big = torch.maximum(a[:, m], b[:, m])
        # shifts of the scaled logits: raw differences, then the scale
        da, db = _shift(a[:, m], big) * inv_t[m], _shift(b[:, m], big) * inv_t[m]
        out[:, m] = big
        out[:, l] = torch.logaddexp(a[:, l] + da, b[:, l] + db)
        shifts[m] = (da, db)
    for c in SUMS:
        out[:, c] = a[:, c] + b[:, c]
    kind = spec.div.kind
    if kind in TWO_PASS_KINDS:
        out[:, Col.ACC] = 0.0
        return out
    if kind == "soft_cross_entropy":
        # the accumulator holds -zs' only: e^dt (acc + e^lt (0 - ds)), the forward rule
        # with do = ds + dt
        (dta, dtb), (dsa, dsb) = shifts[Col.MT], shifts[Col.MS]
        out[:, Col.ACC] = (_rebase(a[:, Col.ACC], a[:, Col.LT], dta, dsa + dta)
                           + _rebase(b[:, Col.ACC], b[:, Col.LT], dtb, dsb + dtb))
        return out
    if kind == "forward_reverse_kl":
        # forward KL's accumulator in ACC, reverse KL's in B (not a plain sum)
        (dta, dtb), (dsa, dsb) = shifts[Col.MT], shifts[Col.MS]
        out[:, Col.ACC] = (_rebase(a[:, Col.ACC], a[:, Col.LT], dta, dsa)
                           + _rebase(b[:, Col.ACC], b[:, Col.LT], dtb, dsb))
        out[:, Col.B] = (_rebase(a[:, Col.B], a[:, Col.LS], dsa, dta)
                         + _rebase(b[:, Col.B], b[:, Col.LS], dsb, dtb))
        return out
    # the weighting side: the teacher for forward KL, the student for reverse KL
    (w, lw), o = ((Col.MT, Col.LT), Col.MS) if spec.div.kind == "forward_kl" else (
        (Col.MS, Col.LS), Col.MT)
    (dwa, dwb), (doa, dob) = shifts[w], shifts[o]
    out[:, Col.ACC] = (_rebase(a[:, Col.ACC], a[:, lw], dwa, doa)
                       + _rebase(b[:, Col.ACC], b[:, lw], dwb, dob))
    return out


def merge_all(parts: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """Left fold of merge over dim 0 of (R, N, NCOL): the same order, so the same bits, on
    every rank that folds the same gathered parts."""
    out = parts[0]
    for i in range(1, parts.shape[0]):
        out = merge(out, parts[i], spec)
    return out


def _weighted(acc, lw):
    """acc / e^lw, 0 where acc is 0 (never 0 * inf on a row with no weighting mass)."""
    return torch.where(acc == 0, 0.0, acc * torch.exp(-lw))


def finish(stats: torch.Tensor, labels, spec: LossSpec, mix_sums=None):
    """(row losses (N,), finished stats) from merged statistics; for the mixture,
    `mix_sums` is the (N, 4) merged output of mix_partial. A row whose student or teacher
    maximum is not finite (a NaN or +inf logit, or none finite) is NaN; ignored rows are 0
    (a where, so non-finite logits of an ignored row never reach the loss)."""
    stats = stats.clone()
    div = spec.div
    if div.kind == "mixture":
        stats[:, list(MIX_COLS)] = mix_sums
        d = torch.zeros_like(stats[:, 0])
        # terms of weight 0 are skipped, not multiplied: they may be inf at mix = 0 or 1
        if div.coef_p:
            d = d + div.coef_p * stats[:, Col.DIV]
        if div.coef_q:
            d = d + div.coef_q * stats[:, Col.B]
    elif div.kind in ("tvd", "alpha_beta"):
        stats[:, list(MIX_COLS)] = mix_sums
        d = stats[:, Col.DIV] * (0.5 if div.kind == "tvd" else 1.0)
    elif div.kind == "soft_cross_entropy":
        d = _weighted(stats[:, Col.ACC], stats[:, Col.LT]) + stats[:, Col.LS]
        stats[:, Col.DIV] = d
    elif div.kind == "forward_reverse_kl":
        fwd = _weighted(stats[:, Col.ACC], stats[:, Col.LT]) - stats[:, Col.LT] + stats[:, Col.LS]
        rev = _weighted(stats[:, Col.B], stats[:, Col.LS]) - stats[:, Col.LS] + stats[:, Col.LT]
        stats[:, Col.DIV] = fwd
        stats[:, Col.B] = rev
        d = div.coef_p * fwd + div.coef_q * rev
    else:
        lw, lo = (Col.LT, Col.LS) if div.kind == "forward_kl" else (Col.LS, Col.LT)
        acc = stats[:, Col.ACC]
        # acc / e^lw without forming 0 * inf when acc is 0 (a row with no weighting mass)
        d = torch.where(acc == 0, 0.0, acc * torch.exp(-stats[:, lw])) - stats[:, lw] + stats[:, lo]
        stats[:, Col.DIV] = d
    loss = spec.kd_scale * d
    if spec.ce_weight:
        # CE = lse1 - s[label] = (m1 - s[label]) + l1: m1 and s[label] are close (the label
        # is likely), so their difference is exact where m1 + l1 would round at |s| ~ 1e4
        ce = (stats[:, Col.M1] - stats[:, Col.LABEL]) + stats[:, Col.L1]
        loss = loss + spec.ce_weight * ce
    # one test per row, whatever the element masks of the backends dropped
    has_softmax = stats[:, Col.MS].isfinite() & stats[:, Col.MT].isfinite()
    loss = torch.where(has_softmax, loss, torch.nan)
    if labels is not None:
        loss = torch.where(labels != spec.ignore_index, loss, 0.0)
    return loss, stats

