"""Distillation from a sparse (top-k) teacher: the teacher gives K token ids per row and their
log-probabilities, not its N x V logits.

    loss = kd_weight * D(p || q) * (Ts**2 if temperature_scale) + ce_weight * CE(s at T=1)

Per row: S = the row's valid ids (slots holding -1 are empty), lp_i the teacher's
log-probabilities of them (normalized over the teacher's full vocabulary), s the student's
(V,) logits, Ts the temperature, q = softmax(s / Ts) over all V columns. `tail` says what
the teacher's mass outside S becomes:

  renormalize  p_i = softmax_S(lp_i / Tt);  q^_i = q_i / sum_S q_j = softmax_S(s_i / Ts);
               D over the |S| categories (forward_kl, reverse_kl, jsd). Only the K gathered
               student logits enter: no pass over the N x V logits without cross-entropy.
  bucket       K + 1 categories: S and one "tail" for every other token.
               p_i = exp(lp_i), p_tail = max(0, 1 - sum_S p_i);
               q_i = softmax(s / Ts)_i over all V, q_tail = 1 - sum_S q_i;
               D over the K + 1 categories. A row whose S covers all V has no tail.
               q_tail is 1 - sum_S q_i from the row's statistics where that difference is
               resolved; a row whose student holds nearly all its mass in S gets its tail
               summed over the columns outside S instead (`_exact_tails`).
  none         forward_kl only: sum_S p_i (lp_i - log q_i), p_i = exp(lp_i) unrenormalized.

How the work splits. The student side needs, per row, its log-sum over all V (for q_i and
q_tail), the cross-entropy pieces when ce_weight != 0, and the K gathered logits. These come
from the backend's two kernels (`sparse_partial`, `sparse_grads`; the statistics layout of
_stats.py) through `SparseStudent`, an autograd.Function with differentiable outputs

    LS     the log-sum: log q_i = (s_i - MS) / Ts - LS; the maximum MS is a non-differentiable
           output, so d(LS)/ds_j stands for the derivative of the full logsumexp(s / Ts),
           q_j / Ts
    CE     (M1 - s[label]) + L1, the cross-entropy at T = 1: dCE/ds_j = q1_j - [j = label]
    G      (N, K) the student logits at the teacher's ids (raw, 0 at empty slots):
           dG_k/ds_j = [j = id_k]

so its backward, given the upstream gradients (dLS, dCE, dG), is one call of

    gs_j = c_q q_j + c_1 (q1_j - [j = label]) + sum_k [id_k = j] w_k,
    c_q = dLS / Ts,  c_1 = dCE,  w = dG        (backend.sparse_grads)

With tail="bucket" a fifth output LT = log sum_{j not in S} exp((s_j - MS) / Ts) is the
tail's own log-sum on the rows where 1 - sum_S q_i would not resolve q_tail (0 elsewhere):
those rows are copied with -inf at S and passed through the same two kernels, so
dLT/ds_j = qt_j / Ts with qt the softmax of the row outside S, added to their gradient.

Everything else (the tail modes, the divergences, temperature scaling, cross-entropy mixing,
the teacher's gradient, reductions) is plain torch on N x K tensors with autograd, written
once for every backend (`_row_losses`).

Non-finite logits follow the statistics (_stats.py): a row whose student maximum is NaN or
+inf gets a NaN loss wherever the N x V pass runs; renormalize without cross-entropy reads
only the K gathered logits, so only those can make its loss NaN. renormalize gives NaN, too,
where one side has no finite value on S (no distribution to renormalize).

Vocab-parallel (process_group): each rank holds a contiguous vocabulary shard of the student
logits; teacher ids, log-probabilities and labels are the same on every rank (GLOBAL ids).
The statistics tables of the ranks are all-gathered and merged exactly (_stats.merge_all, as
distributed.py does for the dense loss); each rank gathers the logits of the ids in its
shard (0 elsewhere) and one all_reduce SUM gives every rank all K. Backward has no
collective: each rank's sparse_grads adds the terms of its own columns.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from . import _dispatch, _stats
from ._common import acc_dtype, first_order_only
from ._spec import REDUCTIONS, Divergence, LossSpec
from ._stats import Col

__all__ = ["sparse_kd_loss", "topk_logprobs", "TAILS", "SPARSE_DIVERGENCES"]

TAILS = ("renormalize", "bucket", "none")
SPARSE_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
# teacher log-probabilities are <= 0; a value above this is not a rounding of one
_LOGPROB_SLACK = 1e-4


# --------------------------------------------------------------------------------------
# the student side: the backend's kernels behind one autograd.Function
# --------------------------------------------------------------------------------------


def _local_slots(ids, offset: int, width: int):
    """(column of each slot's id in the range [offset, offset + width), 0 where it is not
    there; whether it is there). Empty slots (-1) are nowhere."""
    local = ids - offset
    inside = (ids >= 0) & (local >= 0) & (local < width)
    return torch.where(inside, local, 0), inside


def _gather_local(s, ids, offset: int, dt):
    """s[r, id - offset] for the ids that fall in the columns [offset, offset + Vr), 0 for
    the others and for empty slots. # read N x K"""
    if s.shape[1] == 0:
        return torch.zeros(ids.shape, device=s.device, dtype=dt)
    col, inside = _local_slots(ids, offset, s.shape[1])
    return torch.where(inside, s.gather(1, col).to(dt), 0.0)


# Where 1 - sum_S q_i is below this many eps of the statistics' dtype, the tail is summed
# over its own columns (_exact_tails). Above it, the difference's absolute error (a few eps,
# from the rounding of LS) is at most ~1% of q_tail.
TAIL_RESOLUTION = 2.0**10


def _top_mass(ms, ls, g, valid, inv_ts):
    """sum_S q_i in float64, q_i = exp((s_i - MS) / Ts - LS) from the gathered logits and
    the row's (max, log-sum) pair."""
    lq = (g.double() - ms.double()[:, None]) * inv_ts - ls.double()[:, None]
    return torch.where(valid, torch.where(valid, lq, -math.inf).exp(), 0.0).sum(-1)


def _tail_rows(s, ids, rows, offset: int):
    """Copies of s's rows `rows` with -inf at the columns of their teacher ids (those in
    the range [offset, offset + Vr)): the student's tail, the columns outside S.
    # read, write len(rows) x Vr"""
    x = s.index_select(0, rows)
    col, inside = _local_slots(ids.index_select(0, rows), offset, s.shape[1])
    r = torch.arange(len(rows), device=s.device)[:, None].expand_as(col)
    x[r[inside], col[inside]] = -math.inf
    return x


def _exact_tails(s, labels, ids, spec: LossSpec, backend, group, offset: int, stats, g):
    """The rows whose q_tail = 1 - sum_S q_i the statistics do not resolve, the merged
    statistics of their tails (the student's columns outside S) and which of them have a
    finite tail logit (has_tail), or None when no row needs it. Such a row's tail is below
    TAIL_RESOLUTION eps (a student sure of the teacher's ids): the difference would lose it
    (to 0 below eps: the loss of a confident student understated, no gradient through its
    tail). Selecting the rows reads the device (one host sync on CUDA); every rank selects
    the same rows (merged statistics, reduced G). Rows with no finite tail logit (has_tail
    false) keep the difference (their q_tail rounds to its floor). Under torch.compile the
    selection (a data-dependent shape) is skipped: every row keeps the difference."""
    from . import distributed as kdd

    if torch.compiler.is_compiling():
        return None
    eps = torch.finfo(stats.dtype).eps
    q_sum = _top_mass(stats[:, Col.MS], stats[:, Col.LS], g, ids >= 0, spec.inv_ts)
    need = (1.0 - q_sum < TAIL_RESOLUTION * eps) & stats[:, Col.MS].isfinite()
    if labels is not None:
        need &= labels != spec.ignore_index
    rows = need.nonzero()[:, 0]
    if rows.numel() == 0:
        return None
    tail_spec = dataclasses.replace(spec, ce_weight=0.0)
    tail = backend.sparse_partial(_tail_rows(s, ids, rows, offset), None, tail_spec, offset)
    if group is not None:
        tail = _stats.merge_all(kdd._all_gather(tail, group), tail_spec)
    return rows, tail, tail[:, Col.MS].isfinite()


class SparseStudent(torch.autograd.Function):
    """(MS, LS, CE, G, LT) of (N, Vr) student logits (see the module docstring). With
    need_stats=False only G is computed (MS, LS, CE are zeros): renormalize without
    cross-entropy reads the K gathered logits and nothing else. LT (the tail's log-sum,
    exact_tail) is 0 on rows where q_tail is resolved by the statistics; `exact` marks the
    others."""

    @staticmethod
    def forward(ctx, s, labels, ids, spec: LossSpec, backend, group, offset: int,
                need_stats: bool, exact_tail: bool):
        from . import distributed as kdd

        n = s.shape[0]
        dt = acc_dtype(s.dtype)
        zeros = torch.zeros(n, device=s.device, dtype=dt)
        ms, ls, ce, stats = zeros, zeros.clone(), zeros.clone(), None
        if need_stats:
            stats = backend.sparse_partial(s, labels, spec, offset)
            if group is not None and n:
                stats = _stats.merge_all(kdd._all_gather(stats, group), spec)
            ms, ls = stats[:, Col.MS].clone(), stats[:, Col.LS].clone()
            if spec.ce_weight:
                # (m1 - s[label]) + l1: the difference first, exact at |s| ~ 1e4
                ce = (stats[:, Col.M1] - stats[:, Col.LABEL]) + stats[:, Col.L1]
        g = _gather_local(s, ids, offset, dt)
        if group is not None and n:
            g = kdd._all_reduce_sum(g, group)
        lt, exact = zeros.clone(), torch.zeros(n, device=s.device, dtype=torch.bool)
        tails = _exact_tails(s, labels, ids, spec, backend, group, offset, stats, g) \
            if exact_tail and n else None
        rows, tail, has_tail = tails if tails is not None else (None, None, None)
        if tails is not None:
            # log sum_{j not in S} exp((s_j - MS) / Ts), from the tail's own (max, log-sum)
            lt[rows] = torch.where(has_tail, (tail[:, Col.MS] - stats[rows, Col.MS]) * spec.inv_ts
                                   + tail[:, Col.LS], 0.0)
            exact[rows] = has_tail
        ctx.mark_non_differentiable(ms, exact)
        ctx.spec, ctx.backend, ctx.offset, ctx.need_stats = spec, backend, offset, need_stats
        ctx.save_for_backward(s, labels, ids, stats, rows, tail, has_tail)
        return ms, ls, ce, g, lt, exact

    @staticmethod
    @first_order_only
    def backward(ctx, _dms, dls, dce, dg, dlt, _dexact):
        s, labels, ids, stats, rows, tail, has_tail = ctx.saved_tensors
        spec, offset = ctx.spec, ctx.offset
        dt = acc_dtype(s.dtype)
        w = torch.where(ids >= 0, dg.to(dt), 0.0)
        if labels is not None:
            keep = (labels != spec.ignore_index)[:, None]
            w = torch.where(keep, w, 0.0)
        if not ctx.need_stats:
            # only the K gathered columns: a scatter into zeros
            gs = torch.zeros_like(s, memory_format=torch.contiguous_format)
            if s.shape[1]:
                col, inside = _local_slots(ids, offset, s.shape[1])
                gs.scatter_add_(1, col, torch.where(inside, w, 0.0).to(s.dtype))
            return gs, None, None, None, None, None, None, None, None
        c_q = dls.to(dt) * spec.inv_ts  # dLS/ds_j = q_j / Ts
        c_1 = dce.to(dt) if spec.ce_weight else torch.zeros_like(c_q)
        coef = torch.stack([c_q, c_1], 1)
        if labels is not None:
            coef = torch.where((labels != spec.ignore_index)[:, None], coef, 0.0)
        gs = ctx.backend.sparse_grads(s, labels, spec, stats, coef, ids, w, offset)
        if rows is not None and dlt is not None:
            # dLT/ds_j = qt_j / Ts on the tail's columns (0 at S: -inf in the copies)
            c_t = dlt[rows].to(dt) * spec.inv_ts
            no_ids = torch.full((len(rows), 1), -1, device=s.device, dtype=torch.int64)
            gt = ctx.backend.sparse_grads(
                _tail_rows(s, ids, rows, offset), None, dataclasses.replace(spec, ce_weight=0.0),
                tail, torch.stack([c_t, torch.zeros_like(c_t)], 1), no_ids,
                torch.zeros(no_ids.shape, device=s.device, dtype=dt), offset)
            # rows without a tail logit (has_tail false) are not exact: their dLT is 0, and their
            # all -inf copies may give NaN in a backend; they add nothing
            gs.index_add_(0, rows, torch.where(has_tail[:, None], gt, 0.0))
        return gs, None, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------
# the row math on N x K tensors (autograd does the rest), shared by every backend
# --------------------------------------------------------------------------------------


def _safe_log(x):
    """log x with log 0 = -inf and a zero (not nan) gradient there."""
    pos = x > 0
    return torch.where(pos, torch.log(torch.where(pos, x, 1.0)), -math.inf)


def _masked_log_softmax(z, mask):
    """log_softmax over the entries where mask holds; other entries are garbage (finite)
    and must be masked by the caller. A row with no entry gets finite garbage, no nan
    gradient (its sum is replaced by 1 before the log)."""
    m = torch.where(mask, z, -math.inf).amax(-1, keepdim=True)
    m = torch.where(m > -math.inf, m, 0.0).detach()
    zc = torch.where(mask, z - m, 0.0)
    e = torch.where(mask, zc.exp(), 0.0).sum(-1, keepdim=True)
    return zc - torch.where(e > 0, e, 1.0).log()


def _masked_logsumexp(z, mask):
    """logsumexp over the entries where mask holds; -inf (and a zero gradient, not nan) for
    a row with no entry or only -inf entries."""
    m = torch.where(mask, z, -math.inf).amax(-1, keepdim=True)
    m = torch.where(m > -math.inf, m, 0.0).detach()
    e = torch.where(mask, (torch.where(mask, z, 0.0) - m).exp(), 0.0).sum(-1)
    return torch.where(e > 0, m[:, 0] + torch.where(e > 0, e, 1.0).log(), -math.inf)


def _kl(a, la, lb, mask):
    """sum a (la - lb) over the entries where mask holds and a != 0. Masked entries are
    replaced before the product, so a 0 gradient never meets an inf or nan there. A NaN
    weight is kept (a > 0 would drop it): a NaN input makes the row's loss NaN."""
    keep = mask & (a != 0)
    la, lb = torch.where(keep, la, 0.0), torch.where(keep, lb, 0.0)
    return torch.where(keep, a * (la - lb), 0.0).sum(-1)


def _divergence(lp, lq, mask, divergence: str, beta: float):
    """D(p || q) of two distributions over the categories where mask holds, from their
    log-probabilities: forward_kl KL(p || q), reverse_kl KL(q || p), jsd beta KL(p || m) +
    (1 - beta) KL(q || m), m = beta p + (1 - beta) q formed in log space (beta = 0 and 1 are
    forward and reverse KL exactly, as kd_loss's jsd)."""
    lp, lq = torch.where(mask, lp, 0.0), torch.where(mask, lq, 0.0)
    p, q = torch.where(mask, lp.exp(), 0.0), torch.where(mask, lq.exp(), 0.0)
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    if divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    if divergence == "forward_kl":
        return _kl(p, lp, lq, mask)
    if divergence == "reverse_kl":
        return _kl(q, lq, lp, mask)
    lm = torch.logaddexp(lp + math.log(beta), lq + math.log(1.0 - beta))
    return beta * _kl(p, lp, lm, mask) + (1.0 - beta) * _kl(q, lq, lm, mask)


def _bucket_tail(ms, ls, g, valid, inv_ts, eps):
    """log q_tail = log(1 - sum_S q_i) for each row, in float64, from the statistics.

    q_i = exp((s_i - MS) / Ts - LS) from the gathered logit and the row's (max, log-sum)
    pair, summed in float64, so the subtraction 1 - Q adds no error of its own; what is
    left is the rounding of LS (float32 for 16/32-bit logits): |error of q_tail| <~ a few
    eps_acc * Q (eps_acc = 1.2e-7 in float32). Rows whose tail is below TAIL_RESOLUTION
    eps_acc take the tail's own log-sum instead (`_exact_tails`); here a value that rounds
    to <= 0 is clamped to eps_acc, so log q_tail stays finite (its gradient through the
    clamped tail is 0)."""
    return torch.log((1.0 - _top_mass(ms, ls, g, valid, inv_ts)).clamp(min=eps))


def _row_losses(ms, ls, ce, g, lt, exact, ids, lp, labels, *, tail, divergence, beta, inv_ts,
                inv_tt, vocab, kd_scale, ce_weight, ignore_index, eps):
    """(N,) row losses from the student's (MS, LS, CE, G, LT, exact) and the teacher's
    (ids, lp).

    Empty slots (-1) are replaced by finite placeholders and masked out of every sum; a row
    with no valid id has D = 0 (no teacher information) in every tail mode. eps: the
    resolution of the statistics' dtype (see _bucket_tail)."""
    dt = g.dtype
    valid = ids >= 0
    lp = torch.where(valid, lp.to(dt), 0.0)
    if labels is not None:
        # an ignored row's statistics may be those of an empty range (-inf), and its logits
        # or log-probabilities anything (NaN): neutral values, so that no inf or nan meets
        # the zero gradient of its masked loss (0 * nan would reach both inputs' gradients)
        keep = labels != ignore_index
        ms, ls, ce = (torch.where(keep, x, 0.0) for x in (ms, ls, ce))
        g, lp = (torch.where(keep[:, None], x, 0.0) for x in (g, lp))
    if tail == "renormalize":
        # both renormalized over S: q^ = softmax_S(s / Ts), p = softmax_S(lp / Tt)
        lq_s = _masked_log_softmax(g * inv_ts, valid)
        lp_s = _masked_log_softmax(lp * inv_tt, valid)
        d = _divergence(lp_s, lq_s, valid, divergence, beta)
        # a side with no finite value on S has no distribution there: NaN, as kd_loss's
        # all -inf side (not the 0 or inf the masked sums would give)
        no_p = torch.where(valid, lp, -math.inf).amax(-1) == -math.inf
        no_q = torch.where(valid, g, -math.inf).amax(-1) == -math.inf
        d = torch.where(valid.any(-1) & (no_p | no_q), math.nan, d)
    else:
        # the student over the full vocabulary: log q_i = (s_i - MS) / Ts - LS
        lq = (g - ms[:, None]) * inv_ts - ls[:, None]
        if tail == "none":
            d = _kl(torch.where(valid, lp.exp(), 0.0), lp, lq, valid)
        else:
            # K + 1 categories. p_tail = max(0, 1 - sum_S p_i), formed as
            # -expm1(logsumexp_S lp): a tail far below eps (a teacher sure of one id) keeps
            # the relative precision of the log-probabilities instead of rounding to 0 (an
            # infinite reverse KL); 0 when the top-K mass is >= 1. A row whose S is the whole
            # vocabulary has no tail.
            p_tail = (-torch.expm1(_masked_logsumexp(lp, valid))).clamp(min=0.0)
            lq_tail = _bucket_tail(ms, ls, g, valid, inv_ts, eps).to(dt)
            # the tail's own log-sum where the difference does not resolve it
            lq_tail = torch.where(exact, torch.where(exact, lt, 0.0) - ls, lq_tail)
            has_tail = valid.sum(-1) < vocab
            lp_all = torch.cat([lp, _safe_log(p_tail)[:, None]], 1)
            lq_all = torch.cat([lq, lq_tail[:, None]], 1)
            mask = torch.cat([valid, has_tail[:, None]], 1)
            d = _divergence(lp_all, lq_all, mask, divergence, beta)
    loss = kd_scale * d
    if ce_weight:
        loss = loss + ce_weight * ce
    if labels is not None:
        loss = torch.where(labels != ignore_index, loss, 0.0)
    return loss


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------


def _host_checks(x) -> bool:
    """Value checks read the tensor on the host: on CPU only (on CUDA or while compiling
    they become device-side asserts)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def _check_ids_range(ids, vocab: int, width, vocab_size) -> None:
    """Every id in [0, vocab) or -1 (an empty slot)."""
    ok = (ids >= -1) & (ids < vocab)
    if not _host_checks(ids):
        torch._assert_async(ok.all(), "kdkernels: teacher_ids out of [-1, V)")
        return
    if bool(ok.all()):
        return
    bad = int(ids[~ok][0])
    if bad < -1:
        raise ValueError(f"teacher_ids must be in [0, {vocab}) or -1 (an empty slot), "
                         f"found {bad}")
    where = (f"the vocabulary width {width} of student_logits" if vocab_size is None else
             f"vocab_size={vocab_size} (student_logits has width {width})")
    if width is None:
        where = "the global vocabulary of the process_group"
    raise ValueError(f"teacher_ids must be < {vocab} ({where}) or -1 for an empty slot, "
                     f"found {bad}")


def _check_ids_unique(ids) -> None:
    """No id twice in a row (the divergences treat the ids as distinct categories)."""
    if ids.shape[-1] < 2:
        return
    srt = ids.sort(-1).values
    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    if not _host_checks(ids):
        torch._assert_async(~dup.any(), "kdkernels: duplicate teacher_ids in a row")
        return
    if bool(dup.any()):
        row = int(dup.any(-1).nonzero()[0])
        value = int(srt[row, 1:][dup[row]][0])
        raise ValueError(f"teacher_ids must not repeat an id within a row: row {row} holds "
                         f"{value} more than once")


def _check_logprobs(lp, ids) -> None:
    """Log-probabilities are <= 0 (up to rounding) where a slot is valid."""
    bad = (lp > _LOGPROB_SLACK) & (ids >= 0)
    if not _host_checks(lp):
        torch._assert_async(~bad.any(), "kdkernels: teacher_logprobs > 0")
        return
    if bool(bad.any()):
        raise ValueError(
            "teacher_logprobs must be log-probabilities (<= 0), found "
            f"{float(lp[bad][0]):.6g}; pass log-softmax values (kd.topk_logprobs), not logits")


def _check_choices(tail, divergence, teacher_temperature) -> None:
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    if divergence not in SPARSE_DIVERGENCES:
        raise ValueError(f"divergence must be one of {SPARSE_DIVERGENCES} for a sparse "
                         f"teacher, got {divergence!r}")
    if tail == "none" and divergence != "forward_kl":
        raise ValueError(f"tail='none' supports divergence='forward_kl' only (the teacher's "
                         f"unrenormalized top-K terms), got divergence={divergence!r}")
    if tail != "renormalize" and teacher_temperature != 1.0:
        raise ValueError(
            f"teacher_temperature={teacher_temperature} needs tail='renormalize': with "
            f"tail={tail!r} the teacher's log-probabilities are used as given (their tail "
            "mass is 1 - sum exp(lp), which a temperature would change unknowably)")


# --------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------


def sparse_kd_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
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
    impl: str = "auto",
    process_group=None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Distillation loss from a sparse teacher: its top-K ids and log-probabilities.

    student_logits (..., V); teacher_ids (..., K) int ids in [0, V), -1 for an empty slot
    (rows may hold fewer than K ids; no id twice in a row); teacher_logprobs (..., K) the
    teacher's log-probabilities of those ids, normalized over its full vocabulary (e.g. from
    kd.topk_logprobs). `tail` (renormalize | bucket | none) says what the teacher's mass
    outside its K ids becomes; see kdkernels/sparse.py and the README for the formulas.
    divergence: forward_kl | reverse_kl | jsd(beta) (tail='none': forward_kl only).
    teacher_temperature rescales the teacher's log-probabilities (tail='renormalize' only).

    The other arguments are kd_loss's: loss = kd_weight * D * (temperature**2 when
    temperature_scale) + ce_weight * CE(student at T=1, labels); rows whose label is
    ignore_index contribute 0; reduction none | sum | mean | batchmean | token_mean.
    Gradients reach student_logits and, when it requires grad, teacher_logprobs.
    process_group: student_logits is this rank's contiguous vocabulary shard; teacher_ids
    (GLOBAL ids), teacher_logprobs and labels are the same on every rank.
    vocab_size: use the first vocab_size student columns (padded embedding rows); ids must
    lie below it, and the padding columns get a zero gradient.
    """
    from . import functional as F

    sharded = process_group is not None
    F._reject_forward_ad(student_logits=student_logits, teacher_logprobs=teacher_logprobs)
    F._check_logits("student_logits", student_logits, sharded)
    if not isinstance(teacher_ids, torch.Tensor):
        raise TypeError(f"teacher_ids must be a torch.Tensor, got {type(teacher_ids).__name__}")
    if teacher_ids.is_floating_point() or teacher_ids.is_complex() or \
            teacher_ids.dtype == torch.bool:
        raise TypeError(f"teacher_ids must be an integer tensor (int64), got dtype "
                        f"{teacher_ids.dtype}")
    F._check_float_tensor("teacher_logprobs", teacher_logprobs)
    lead = student_logits.shape[:-1]
    if teacher_ids.dim() == 0 or teacher_ids.shape[:-1] != lead:
        want = ", ".join([*map(str, lead), "K"])
        raise ValueError(
            f"teacher_ids must have shape (*student_logits.shape[:-1], K) = ({want}), got "
            f"{tuple(teacher_ids.shape)} (student_logits {tuple(student_logits.shape)})")
    if teacher_logprobs.shape != teacher_ids.shape:
        raise ValueError(f"teacher_logprobs must have teacher_ids' shape "
                         f"{tuple(teacher_ids.shape)}, got {tuple(teacher_logprobs.shape)}")
    k = teacher_ids.shape[-1]
    for name, x in (("teacher_ids", teacher_ids), ("teacher_logprobs", teacher_logprobs)):
        if x.device != student_logits.device:
            raise ValueError(f"{name} must be on student_logits' device "
                             f"{student_logits.device}, got {x.device}")
    _check_choices(tail, divergence, teacher_temperature)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    beta = F._check_unit("beta", beta)
    temperature = F._check_positive("temperature", temperature)
    teacher_temperature = F._check_positive("teacher_temperature", teacher_temperature)
    kd_weight = F._check_finite("kd_weight", kd_weight)
    ce_weight = F._check_finite("ce_weight", ce_weight)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    width = student_logits.shape[-1]
    if vocab_size is not None:
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
            raise TypeError(f"vocab_size must be an int or None, got "
                            f"{type(vocab_size).__name__}")
        if sharded:
            raise ValueError("vocab_size is not supported with a process_group")
        if not 1 <= vocab_size <= width:
            raise ValueError(f"vocab_size must be in [1, {width}] (student_logits' width), "
                             f"got {vocab_size}")
        # a strided view (row stride = the full width): the kernels read it in place, and
        # autograd gives the dropped columns a zero gradient
        student_logits = student_logits[..., :vocab_size]
    v = student_logits.shape[-1]
    if k == 0 or (not sharded and k > v):
        raise ValueError(f"teacher_ids must hold 1 to {v} ids per row (K = its last dim), "
                         f"got K={k}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor (int64), got dtype {labels.dtype}")
        if labels.shape != lead:
            raise ValueError(f"labels must have shape student_logits.shape[:-1] = "
                             f"{tuple(lead)}, got {tuple(labels.shape)}")
        if labels.device != student_logits.device:
            raise ValueError(f"labels must be on the logits' device {student_logits.device}, "
                             f"got {labels.device}")
    elif ce_weight != 0.0:
        raise ValueError(f"ce_weight={ce_weight} needs labels; got labels=None")

    n = math.prod(lead)
    s = student_logits.reshape(n, v)
    if s.stride(-1) != 1 or (n > 1 and s.stride(0) < v):
        s = s.contiguous()
    ids = teacher_ids.reshape(n, k).to(torch.int64)
    lp = teacher_logprobs.reshape(n, k)
    flat_labels = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
    if not sharded:
        _check_ids_range(ids, v, width, vocab_size)
        if flat_labels is not None:
            F._check_labels_range(flat_labels, v, ignore_index)
    _check_ids_unique(ids)
    _check_logprobs(lp, ids)

    spec = LossSpec(
        div=Divergence("forward_kl"),
        inv_ts=1.0 / temperature,
        inv_tt=1.0 / teacher_temperature,
        kd_scale=kd_weight * (temperature * temperature if temperature_scale else 1.0),
        ce_weight=ce_weight,
        ignore_index=ignore_index,
    )
    backend = _dispatch.resolve(impl, s.device, (s.dtype,))
    offset, global_v = 0, v
    if sharded:
        from . import distributed as kdd

        kdd._check_group(process_group)
        # every rank checks the same header (rows, loss, teacher ids, labels' range, widths)
        # and learns its column offset; ids are then the same on every rank, so all raise
        # alike below
        header = kdd._exchange_header(s, s, spec, flat_labels, process_group,
                                      teacher_ids=ids)
        widths = [int(row[kdd._WS]) for row in header]
        offset = sum(widths[: torch.distributed.get_rank(process_group)])
        global_v = sum(widths)
        if k > global_v:
            raise ValueError(f"teacher_ids must hold 1 to {global_v} ids per row (K = its "
                             f"last dim), got K={k}")
        _check_ids_range(ids, global_v, None, None)
    need_stats = tail != "renormalize" or ce_weight != 0.0
    ms, ls, ce, g, lt, exact = SparseStudent.apply(s, flat_labels, ids, spec, backend,
                                                   process_group, offset, need_stats,
                                                   tail == "bucket")
    # the teacher's dtype joins the math when it is wider (float64 log-probabilities)
    dt = torch.promote_types(g.dtype, acc_dtype(lp.dtype))
    rows = _row_losses(ms.to(dt), ls.to(dt), ce.to(dt), g.to(dt), lt.to(dt), exact, ids, lp,
                       flat_labels, tail=tail, divergence=divergence, beta=beta, inv_ts=spec.inv_ts,
                       inv_tt=spec.inv_tt, vocab=global_v, kd_scale=spec.kd_scale,
                       ce_weight=ce_weight, ignore_index=ignore_index,
                       eps=torch.finfo(ms.dtype).eps)

    valid = None
    if reduction == "token_mean":
        if flat_labels is None:
            valid = torch.tensor(float(n), device=s.device, dtype=rows.dtype)
        else:
            valid = (flat_labels != ignore_index).sum().to(rows.dtype)
    batch = student_logits.shape[0]  # F.kl_div's batchmean, as kd_loss
    numel = n * global_v
    return F._reduce(rows, reduction, valid, batch, numel, lead)


@torch.no_grad()
def topk_logprobs(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0):
    """(ids, logprobs) of the k most likely tokens of log_softmax(teacher_logits / T), each
    (..., k), ids int64, logprobs float32 (float64 for float64 logits), sorted by
    decreasing probability; what sparse_kd_loss takes as its teacher.

    Row chunks: per chunk the row maximum m, the log-sum l = log sum exp((x - m) / T) and the
    top-k of the raw logits (the top-k of x / T are those of x), then
    logprobs = (topk - m) / T - l; the N x V log-probabilities are never built.
    # read N x V, write 2 x N x k
    """
    from . import functional as F
    from ._common import row_chunks

    F._check_logits("teacher_logits", teacher_logits)
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    v = teacher_logits.shape[-1]
    if not 1 <= k <= v:
        raise ValueError(f"k must be in [1, {v}] (teacher_logits' vocabulary), got {k}")
    inv_t = 1.0 / F._check_positive("temperature", temperature)
    lead = teacher_logits.shape[:-1]
    n = math.prod(lead)
    x = teacher_logits.detach().reshape(n, v)
    dt = acc_dtype(x.dtype)
    ids = torch.empty(n, k, device=x.device, dtype=torch.int64)
    out = torch.empty(n, k, device=x.device, dtype=dt)
    for i, j in row_chunks(n, v):
        xc = x[i:j].to(dt)
        m = xc.amax(-1, keepdim=True)
        m = torch.where(m > -math.inf, m, 0.0)
        lse = ((xc - m) * inv_t).exp_().sum(-1, keepdim=True).log_()
        top, idx = xc.topk(k, -1)
        ids[i:j] = idx
        out[i:j] = (top - m) * inv_t - lse
    return ids.reshape(*lead, k), out.reshape(*lead, k)
