"""Vocab-parallel losses: logits sharded over the vocabulary across the ranks of a group.

Layout (Megatron tensor parallelism). Rank r of `process_group` (world size W) holds the
contiguous columns [o_r, o_r + V_r) of every row, in rank order: o_0 = 0, o_{r+1} = o_r + V_r,
V = sum_r V_r. Shards may be uneven (V not divisible by W) or even empty (DTensor's split of
a small V; functional.py must then let an empty last dimension through). Student and teacher
have the same width on each rank; labels hold GLOBAL vocabulary ids (the same on every rank,
as in Megatron where the batch is replicated across the tensor-parallel group). Padding the
last shard with -inf in both logits is exact: those entries have p = q = 0 and contribute 0.

A shard is a column range of the row-statistics interface (_stats.py), so the per-shard work
is the resolved backend's own kernels (`impl=`: the reference, Triton or the extension):

  header   every rank all-gathers a small fixed-size description of its call: rows, dtypes,
           the loss's parameters, whether labels are given, the range of its labels and its
           shard widths. Ranks that disagree (another row count, an empty batch on one rank,
           labels or ce_weight on one rank only, another divergence or dtype), widths that do
           not add up to the same V for student and teacher, and labels outside [0, V) on any
           rank make EVERY rank raise the same ValueError here, before any collective whose
           size depends on the call: no rank aborts inside the backend or waits for the
           others. The header also gives each rank its column offset. This is one small host
           read per call (free on CPU; one synchronization on CUDA).
  pass 1   backend.partial on this rank's (N, V_r) columns with its offset: each side's (max,
           log-sum) pair, the KL accumulator, the T = 1 pair and s[label] for cross-entropy.
           ONE all_gather brings every rank the (W, N, NCOL) tables, and every rank folds
           them with _stats.merge_all in rank order, so the merged statistics (and the loss)
           are bitwise identical on every rank. The pairs are never collapsed into one rounded
           logsumexp, so logits of +-1e4 keep the unsharded precision.
  pass 2   the mixture only: its sums need the merged statistics (backend.mix_partial), ONE
           all_reduce SUM of (N, 4).
  finish   _stats.finish: row values, identical on every rank.
  backward backend.grads given the saved global statistics, with labels rebased by this
           rank's offset: exactly this rank's slice of the unsharded gradient (DESIGN.md §1:
           d/dzs = q - p etc. are elementwise given the row scalars). No collective.

Collectives (W = world size, N = rows, H = 22 header fields in float64, NCOL = 12 statistics
columns in the accumulation dtype: float32, or float64 for float64 logits):

    kd_rows  forward_kl / reverse_kl (+ CE)  forward: 2 all_gathers (H,) and (N, NCOL) backward: 0
             soft_cross_entropy, forward_reverse_kl likewise (one pass)
    kd_rows  jsd / skew_* (+ CE)             forward: the same + 1 all_reduce (N, 4)    backward: 0
             tvd, alpha_beta likewise (two passes)
    softmax / log_softmax                    forward: 2 all_gathers (H,) and (N, 2)
                                             backward: 1 all_reduce (N,)  (sum g y, or sum g)

None is of N x V size and logits are never gathered. An empty batch (N = 0 on every rank)
stops after the header.

DTensor. Logits that are DTensors placed Shard(-1) on a 1-D DeviceMesh take this path with
the mesh's group: see unwrap_dtensor / unwrap_dtensor_input.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import _stats, reference
from ._common import acc_dtype, chunk_rows, first_order_only
from ._spec import KINDS, TWO_PASS_KINDS, LossSpec
from .reference import softmax_grad, softmax_grad_sums

__all__ = [
    "CollectiveRecord",
    "count_collectives",
    "vocab_size",
    "kd_rows",
    "softmax",
    "unwrap_dtensor",
    "unwrap_dtensor_input",
]


# --------------------------------------------------------------------------------------
# Collectives: the only calls into torch.distributed, counted for the benchmark and tests
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CollectiveRecord:
    op: str  # "all_gather" or "all_reduce"
    payload_bytes: int  # bytes of this rank's input tensor
    world: int

    @property
    def wire_bytes(self) -> int:
        """Bytes each rank sends with a ring algorithm: all_gather (W-1) x payload,
        all_reduce 2 (W-1)/W x payload (reduce-scatter then all_gather)."""
        if self.op == "all_gather":
            return (self.world - 1) * self.payload_bytes
        return 2 * (self.world - 1) * self.payload_bytes // self.world


_RECORDERS: list[list[CollectiveRecord]] = []


@contextlib.contextmanager
def count_collectives():
    """Record every collective kdkernels.distributed issues inside the block.

        with count_collectives() as calls:
            loss.backward()
        sum(c.wire_bytes for c in calls)
    """
    calls: list[CollectiveRecord] = []
    _RECORDERS.append(calls)
    try:
        yield calls
    finally:
        _RECORDERS.remove(calls)


def _record(op: str, x: torch.Tensor, world: int) -> None:
    for calls in _RECORDERS:
        calls.append(CollectiveRecord(op, x.numel() * x.element_size(), world))


_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """(W, *x.shape): every rank's x, in rank order."""
    world = dist.get_world_size(group)
    x = x.contiguous()
    # the concatenated form (W * x.shape[0], ...) is the one every backend accepts
    out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _record("all_gather", x, world)
    _all_gather_single(out, x, group=group)
    return out.view(world, *x.shape)


def _all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    _record("all_reduce", x, dist.get_world_size(group))
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


# --------------------------------------------------------------------------------------
# Group checks: the call header every rank exchanges first
# --------------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KINDS = KINDS  # the header carries a divergence as its index here
# Fields of the call header, in order: what every rank must agree on (all but the widths),
# then the widths, which must add up to the same V for student and teacher.
_HEADER = ("rows", "student dtype", "teacher dtype", "divergence", "mix", "coef_p", "coef_q",
           "1/temperature", "1/teacher_temperature", "kd_scale", "ce_weight", "ignore_index",
           "labels given", "log", "teacher ids per row", "teacher ids", "lowest label",
           "its row", "highest label", "its row", "student width", "teacher width")
# the fields before the labels' range and the widths
_AGREED = _HEADER.index("teacher ids") + 1
_LO, _HI, _WS, _WT = _HEADER.index("lowest label"), _HEADER.index("highest label"), -2, -1


def _check_group(group) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "process_group needs torch.distributed to be initialized (init_process_group)"
        )
    if dist.get_rank(group) < 0:
        raise ValueError("process_group: this process is not a member of the group")


def _ids_fingerprint(ids: torch.Tensor) -> torch.Tensor:
    """A number that ranks holding the same ids agree on exactly and that changes when any
    one entry does: with x = ids + 1 (ids in [-1, 2^32 - 1)) split in 16-bit halves lo, hi
    and weights w_i = i mod 65521 + 1 < 2^16, the sums S = sum_i w_i lo_i and
    H = sum_i w_i hi_i are exact in int64 (terms below 2^32, up to 2^31 of them), and
    (S + 3 H) mod 2^52 is exact in the header's float64."""
    x = ids.reshape(-1) + 1
    w = torch.remainder(torch.arange(x.numel(), device=ids.device), 65521) + 1
    lo = (torch.bitwise_and(x, 0xFFFF) * w).sum()
    hi = (torch.bitwise_and(torch.bitwise_right_shift(x, 16), 0xFFFF) * w).sum()
    return torch.remainder(torch.remainder(lo, 2**52) + 3 * torch.remainder(hi, 2**52),
                           2**52).double()


def _exchange_header(s, t, spec: LossSpec | None, labels, group, log=False,
                     teacher_ids=None) -> list[list]:
    """All-gather a small fixed-size description of this call (rows, dtypes, the loss, a
    sparse teacher's ids, the widths) and check it: ranks that disagree (a different row
    count, an empty batch on one rank, labels or ce_weight on one rank only, another
    divergence or dtype, other teacher ids) all raise the same ValueError here, before any
    collective whose size depends on the call, so none aborts inside the backend or waits for
    the others; labels outside [0, V) on any rank make every rank raise the same ValueError
    too. Returns the (W, fields) header. One small host read per call."""
    d = spec.div if spec is not None else None
    fields = [s.shape[0], _DTYPES.index(s.dtype), _DTYPES.index(t.dtype)]
    if spec is None:  # softmax: no loss; t is s
        fields += [-1, 0, 0, 0, 0, 0, 0, 0, 0]
    else:
        fields += [_KINDS.index(d.kind), d.mix, d.coef_p, d.coef_q, spec.inv_ts, spec.inv_tt,
                   spec.kd_scale, spec.ce_weight, spec.ignore_index]
    k = teacher_ids.shape[-1] if teacher_ids is not None else 0
    fields += [labels is not None, log, k, 0, s.shape[1], t.shape[1]]
    mine = torch.tensor([float(x) for x in fields], dtype=torch.float64, device=s.device)
    assert mine.numel() + 4 == len(_HEADER)
    if teacher_ids is not None and teacher_ids.numel():
        mine[_HEADER.index("teacher ids")] = _ids_fingerprint(teacher_ids)
    # the labels' range, on the device (one host read below serves every check)
    span = torch.zeros(4, dtype=torch.float64, device=s.device)
    if labels is not None and labels.numel():
        valid = labels != spec.ignore_index
        lo = torch.where(valid, labels, torch.iinfo(labels.dtype).max)
        hi = torch.where(valid, labels, -1)
        some = valid.any()  # a rank whose rows are all ignored holds no label: (0, 0)
        span = torch.stack([torch.where(some, lo.min(), 0), lo.argmin(),
                            torch.where(some, hi.max(), 0), hi.argmax()]).double()
    mine = torch.cat([mine[:-2], span, mine[-2:]])
    header = _all_gather(mine, group).tolist()
    for i, name in enumerate(_HEADER[:_AGREED]):
        values = [row[i] for row in header]
        if any(v != values[0] for v in values):
            if name.endswith("dtype"):
                values = [str(_DTYPES[int(v)]) for v in values]
            elif name == "divergence":
                values = [_KINDS[int(v)] for v in values]
            elif name in ("rows", "ignore_index", "labels given", "teacher ids per row"):
                values = [int(v) for v in values]
            elif name == "teacher ids":  # fingerprints, meaningless to the reader
                raise ValueError(
                    "every rank of the process_group must make the same call: teacher_ids "
                    "differ across ranks (they are global ids, the same on every rank)"
                )
            raise ValueError(
                f"every rank of the process_group must make the same call: {name} differs "
                f"across ranks (per rank: {values})"
            )
    _check_layout([int(row[_WS]) for row in header], [int(row[_WT]) for row in header])
    vocab = sum(int(row[_WS]) for row in header)
    for r, row in enumerate(header):  # the first offending rank, so every rank says the same
        for value, at in ((row[_LO], row[_LO + 1]), (row[_HI], row[_HI + 1])):
            if labels is not None and s.shape[0] and not 0 <= value < vocab:
                raise ValueError(
                    f"labels must be in [0, {vocab}) (the global vocabulary of the "
                    f"process_group) or equal ignore_index={spec.ignore_index}; row {int(at)} "
                    f"holds {int(value)} (on rank {r})"
                )
    return header


def _check_layout(student: list[int], teacher: list[int]) -> None:
    """Every rank's student / teacher shard widths, from the call header."""
    if sum(student) == 0 and sum(teacher) == 0:
        raise ValueError("the vocabulary is empty: every rank holds 0 columns")
    if sum(student) != sum(teacher):
        raise ValueError(
            f"student_logits shards add up to V={sum(student)} but teacher_logits shards to "
            f"V={sum(teacher)} over the process_group (widths per rank: student {student}, "
            f"teacher {teacher})"
        )
    if student != teacher:
        r = next(i for i, (a, b) in enumerate(zip(student, teacher, strict=True)) if a != b)
        raise ValueError(
            f"student_logits and teacher_logits must have the same shard width on every rank: "
            f"rank {r} holds {student[r]} student and {teacher[r]} teacher columns (widths per "
            f"rank: student {student}, teacher {teacher})"
        )


def vocab_size(s: torch.Tensor, process_group) -> torch.Tensor:
    """Global V of the (..., V_r) shards s: a 0-d int64 tensor (one all_reduce of one int)."""
    _check_group(process_group)
    v = torch.tensor(s.shape[-1], dtype=torch.int64, device=s.device)
    return _all_reduce_sum(v, process_group)


# --------------------------------------------------------------------------------------
# kd_rows: per-rank statistics through the backend, one gather, the exact merge
# --------------------------------------------------------------------------------------

class ShardedKDRows(torch.autograd.Function):
    """Row losses of vocabulary-sharded (N, V_r) logits; collectives happen in forward only
    (inside autograd.Function, so they are never differentiated)."""

    @staticmethod
    def forward(ctx, s, t, labels, spec: LossSpec, group, backend):
        n, v = s.shape
        dt = acc_dtype(s.dtype)
        rank = dist.get_rank(group)
        ctx.spec, ctx.backend = spec, backend
        ctx.need_teacher = ctx.needs_input_grad[1]
        header = _exchange_header(s, t, spec, labels, group)
        if n == 0:  # the header proved N = 0 on every rank: all of them stop here
            ctx.offset = 0
            ctx.save_for_backward(s, t, labels, _stats.empty(0, s.device, dt))
            return torch.zeros(0, device=s.device, dtype=dt)
        widths = [int(row[_WS]) for row in header]
        offset = sum(widths[:rank])

        # pass 1: this rank's statistics -> one all_gather -> the exact merge
        table = _all_gather(backend.partial(s, t, labels, spec, offset), group)  # (W, n, NCOL)
        stats = _stats.merge_all(table, spec)

        # pass 2 (mixture, tvd, alpha_beta): its sums need the merged statistics -> one
        # all_reduce
        mix_sums = None
        if spec.div.kind in TWO_PASS_KINDS:
            mix_sums = _all_reduce_sum(backend.mix_partial(s, t, spec, stats, offset), group)
        loss, stats = _stats.finish(stats, labels, spec, mix_sums)
        ctx.offset = offset
        ctx.save_for_backward(s, t, labels, stats)
        return loss

    @staticmethod
    @first_order_only
    def backward(ctx, grad_loss):
        s, t, labels, stats = ctx.saved_tensors
        grad_s, grad_t = ctx.backend.grads(s, t, labels, ctx.spec, stats, ctx.offset,
                                           grad_loss, ctx.need_teacher)
        return grad_s, grad_t, None, None, None, None


def kd_rows(s, t, labels, spec: LossSpec, process_group, backend=reference):
    """(N,) row losses of this rank's (N, V_r) shards s, t (see the module docstring).

    labels: (N,) int64 GLOBAL vocabulary ids or None. Returns the unsharded row losses,
    identical on every rank; autograd gives this rank's shard gradients. `backend` is the
    resolved impl module: its partial / mix_partial / grads kernels do the per-shard work.
    A student/teacher width mismatch is not checked here: the header of the first collective
    carries it, so that every rank raises, not only the one that holds the bad shard.
    """
    _check_group(process_group)
    if s.dim() != 2 or t.dim() != 2 or s.shape[0] != t.shape[0]:
        raise ValueError(
            "student_logits and teacher_logits must have the same leading dimensions, got "
            f"(rows, shard width) {tuple(s.shape)} and {tuple(t.shape)}"
        )
    if labels is not None and labels.shape != (s.shape[0],):
        raise ValueError(f"labels must have {s.shape[0]} rows, got shape {tuple(labels.shape)}")
    return ShardedKDRows.apply(s, t, labels, spec, process_group, backend)


# --------------------------------------------------------------------------------------
# softmax / log_softmax over the sharded vocabulary
# --------------------------------------------------------------------------------------


class ShardedSoftmax(torch.autograd.Function):
    """y = softmax(x / T) (or log_softmax) of (N, V_r) shards over the global vocabulary.

    Forward: local (max, log-sum) pairs, one all_gather, the pairs merged over ranks.
    Backward (z = x / T): softmax     dx = y (g - S) / T,        S = sum_V g y
                          log_softmax dx = (g - exp(y) S) / T,   S = sum_V g
    S is a sum over the whole vocabulary: one all_reduce of the (N,) local sums.
    """

    @staticmethod
    def forward(ctx, x, inv_t: float, log: bool, group):
        n, v = x.shape
        dt = acc_dtype(x.dtype)
        step = chunk_rows(n, v)
        ctx.inv_t, ctx.log, ctx.group = inv_t, log, group
        y = torch.empty_like(x)
        _exchange_header(x, x, None, None, group, log)
        if n:
            # each rank's (max, log-sum) pair of z = x / T, merged exactly (never one
            # rounded logsumexp: log-probs keep full precision at |x| ~ 1e4)
            local = torch.full((n, 2), -math.inf, device=x.device, dtype=dt)
            for i in range(0, n if v else 0, step):
                local[i : i + step, 0], local[i : i + step, 1] = reference.lse_pair(
                    x[i : i + step], inv_t)
            pairs = _all_gather(local, group)  # (W, n, 2)
            m = pairs[:, :, 0].amax(0)
            shift = torch.where(pairs[:, :, 0] == m, 0.0, pairs[:, :, 0] - m) * inv_t
            lse_rest = torch.logsumexp(pairs[:, :, 1] + shift, 0)
            for i in range(0, n if v else 0, step):
                z = reference.log_probs(x[i : i + step], inv_t, m[i : i + step],
                                    lse_rest[i : i + step])
                y[i : i + step] = z if log else torch.exp(z)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        n, v = y.shape
        dt = acc_dtype(y.dtype)
        gx = torch.empty_like(y)
        if n == 0:
            return gx, None, None, None
        step = chunk_rows(n, v)
        sums = torch.empty(n, device=y.device, dtype=dt)
        for i in range(0, n, step):
            yc, gc = y[i : i + step].to(dt), g[i : i + step].to(dt)
            sums[i : i + step] = softmax_grad_sums(yc, gc, ctx.log)
        sums = _all_reduce_sum(sums, ctx.group)
        for i in range(0, n, step):
            yc, gc = y[i : i + step].to(dt), g[i : i + step].to(dt)
            gx[i : i + step] = softmax_grad(yc, gc, sums[i : i + step], ctx.log, ctx.inv_t)
        return gx, None, None, None


def softmax(x, inv_temperature: float, log: bool, process_group, backend=None):
    """softmax(x / T) (log_softmax when log) of this rank's (N, V_r) shard over the global
    vocabulary of `process_group`; (N, V_r) in x.dtype with autograd."""
    _check_group(process_group)
    return ShardedSoftmax.apply(x, inv_temperature, log, process_group)


# --------------------------------------------------------------------------------------
# DTensor
# --------------------------------------------------------------------------------------


def _dtensor_type():
    # Only look DTensor up when the user's program imported it: a DTensor argument implies
    # torch.distributed.tensor is in sys.modules, and plain-tensor calls pay nothing.
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def is_dtensor(x) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(x, cls)


def _vocab_placement(name: str, x) -> str:
    """'shard' (Shard on the last dim), 'replicate', or 'other:<dim>' for Shard(dim != -1)."""
    mesh = x.device_mesh
    if mesh.ndim != 1:
        raise ValueError(
            f"{name} must be a DTensor on a 1-D DeviceMesh (the tensor-parallel group), got a "
            f"{mesh.ndim}-D mesh; slice the mesh (mesh['tp']) first"
        )
    (p,) = x.placements
    if p.is_replicate():
        return "replicate"
    if p.is_shard():
        return "shard" if p.dim % x.dim() == x.dim() - 1 else f"other:{p.dim % x.dim()}"
    raise ValueError(
        f"{name} must be placed Shard(-1) (vocabulary-parallel) or Replicate, got {p}"
    )


def unwrap_dtensor(student, teacher, labels, process_group=None):
    """The kd_loss hook for DTensor logits.

    Returns None when neither logits argument is a DTensor (nothing to do). Otherwise returns
    (student_local, teacher_local, labels_local, group): the local shards (differentiable:
    DTensor.to_local passes gradients back as DTensors of the same placement) and the mesh's
    process group, or group None when both are Replicate (then every rank holds full rows).
    """
    sd, td = is_dtensor(student), is_dtensor(teacher)
    if not (sd or td):
        return None
    if process_group is not None:
        raise ValueError("process_group must be None when the logits are DTensors (their "
                         "DeviceMesh gives the group)")
    if not (sd and td):
        raise TypeError(
            "student_logits and teacher_logits must both be DTensors or both plain tensors, "
            f"got {type(student).__name__} and {type(teacher).__name__}"
        )
    if student.device_mesh != teacher.device_mesh:
        raise ValueError("student_logits and teacher_logits must be on the same DeviceMesh")
    ps = _vocab_placement("student_logits", student)
    pt = _vocab_placement("teacher_logits", teacher)
    if ps != pt or ps.startswith("other"):
        raise ValueError(
            "student_logits and teacher_logits must both be placed Shard(-1) (vocabulary-"
            f"parallel) or both Replicate, got {student.placements} and {teacher.placements}"
        )
    if is_dtensor(labels):
        if _vocab_placement("labels", labels) != "replicate":
            raise ValueError(f"labels must be a Replicate DTensor, got {labels.placements}")
        labels = labels.to_local()
    group = student.device_mesh.get_group() if ps == "shard" else None
    return student.to_local(), teacher.to_local(), labels, group


def unwrap_dtensor_input(x, dim: int, process_group=None):
    """The softmax/log_softmax hook for a DTensor x.

    Returns None for a plain tensor; else (x_local, group, rewrap): the local tensor, the
    mesh's group when x is sharded along `dim` (None when the softmax dim is not sharded:
    rows are then local), and rewrap(y_local) -> DTensor with x's placement (differentiable).
    """
    if not is_dtensor(x):
        return None
    if process_group is not None:
        raise ValueError("process_group must be None when x is a DTensor")
    if not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim()}), got {dim!r}")
    kind = _vocab_placement("x", x)
    d = dim % x.dim()
    # the softmax dim is the sharded one (functional.py moves it last, on the local tensor)
    sharded = (kind == "shard" and d == x.dim() - 1) or kind == f"other:{d}"
    group = x.device_mesh.get_group() if sharded else None
    mesh, placements, shape, stride = x.device_mesh, x.placements, x.shape, x.stride()
    cls = type(x)

    def rewrap(y):
        return cls.from_local(y, mesh, placements, run_check=False, shape=shape, stride=stride)

    return x.to_local(), group, rewrap
