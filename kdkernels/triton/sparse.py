# Sparse (top-k) teachers: the two things the sparse loss (kdkernels/sparse.py) needs from
# the (N, V) student logits, over a range of columns [offset, offset + Vr) of each row.
#
#   sparse_partial  the student's columns of the row-statistics table (_stats.py): MS, LS
#                   at Ts, M1, L1 at T = 1 (copies when Ts = 1), LABEL = s[label]; the
#                   teacher's pair is the empty range's (MT = LT = -inf), the sums 0. It is
#                   the dense forward pass with the teacher taken out, so it shares that
#                   kernel's pieces (kd.py: _row_range, the online (max, sum) update with raw
#                   maxima, _store_row and its NaN restoration, the split-row merge kernel).
#   sparse_grads    given the GLOBAL merged table and the row scalars the torch side derived
#                   from its N x K math (coef = (c_q, c_1), w per gathered slot):
#                       gs_j = c_q q_j + c_1 (q1_j - [j = label]) + sum_k [ids_k = j] w_k
#                   q = exp((s - MS) / Ts - LS), q1 = exp((s - M1) - L1) (q1 = q at Ts = 1).
#
# sparse_grads writes each element once. The row is written tile by tile without the K
# scatter terms (comparing every column with K ids would cost K operations per element);
# then, after a barrier, the same program rewrites the few columns of its range that a slot
# names, with the whole value recomputed from s and the slot's weight added in float32: so
# every element is rounded to s's dtype once (never gs + w rounded twice), and the extra
# traffic is O(K) per row. Ids are duplicate-free per row, so no two slots write the same
# column; -1 and ids outside the range are masked.
#
# s may be a row-strided view (stride(1) == 1, stride(0) >= Vr: s_full[:, :vocab]): the
# kernels take the row stride, nothing is copied. gs is contiguous (N, Vr).
#
# Rows whose label is ignore_index read nothing: their table row is the empty range's (as
# the dense partial) and their gradient exactly 0 whatever their logits.
#
# Memory traffic per element (b = bytes of s): sparse_partial reads s once (b), sparse_grads
# reads s once and writes gs once (2b): 3b = 6 B in bf16, plus O(N K).

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _stats
from .._spec import Divergence, LossSpec
from .._stats import NCOL
from ._common import AotKernel, device_guard
from .kd import (
    C_L1,
    C_LS,
    C_M1,
    C_MS,
    C_NCOL,
    MIXTURE,
    _config_for,
    _kd_merge_kernel,
    _no_labels,
    _ref,
    _row_range,
    _shift,
    _sig,
    _store_row,
    launch_config,
)

# gathered slots a program handles at once (a block of K; masked lanes cost nothing)
BLOCK_K = 128


@triton.jit
def _sparse_stats_kernel(
    s_ptr,  # (N, Vr) student logits, fp16 / bf16 / fp32, rows row_stride apart
    labels_ptr,  # (N,) int64 GLOBAL labels (read only when HAS_LABELS)
    out_ptr,  # (N, n_split, NCOL) fp32 out: the table of each program's columns
    V,  # columns of this range (Vr)
    row_stride,  # elements between rows of s (>= V)
    chunk,  # columns per program (a multiple of BLOCK_V)
    n_split,  # programs per row
    offset,  # global vocabulary id of column 0 (labels are rebased by it)
    inv_ts,  # 1 / student temperature
    ignore_index,  # label of rows that read nothing
    HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr,  # ce_weight != 0 (needs labels)
    CE_SHARED: tl.constexpr,  # Ts == 1: the CE pair is the student's
    BLOCK_V: tl.constexpr,
):
    # The student's half of kd.py's _kd_fwd_kernel: the same online update, the same table.
    row, lo, hi, label, valid = _row_range(labels_ptr, V, chunk, offset, ignore_index,
                                           HAS_LABELS)
    if HAS_LABELS:
        hi = tl.where(valid, hi, lo)  # ignored rows read nothing: the empty range
    s_row = s_ptr + row * row_stride
    offs = tl.arange(0, BLOCK_V)
    ms = -float("inf")
    m1 = -float("inf")
    ls = 0.0
    l1 = 0.0
    for start in range(lo, hi, BLOCK_V):
        cols = start + offs
        xs = tl.load(s_row + cols, mask=cols < hi, other=-float("inf")).to(tl.float32)
        ms_new = tl.maximum(ms, tl.max(xs, 0))
        rs = _ref(ms_new)
        if HAS_CE:
            if not CE_SHARED:
                l1 = l1 * tl.exp(_shift(ms, ms_new)) + tl.sum(tl.exp(xs - rs), 0)
        ls = ls * tl.exp(_shift(ms, ms_new) * inv_ts) + tl.sum(tl.exp((xs - rs) * inv_ts), 0)
        ms = ms_new
    if HAS_CE and not CE_SHARED:
        m1 = ms
    else:
        # as the dense partial: the student's pair at Ts = 1, else the empty range's
        m1 = tl.where(inv_ts == 1.0, ms, m1)
        l1 = tl.where(inv_ts == 1.0, ls, l1)
    target = 0.0
    if HAS_LABELS:
        target = tl.load(s_row + label, mask=(label >= lo) & (label < hi),
                         other=0.0).to(tl.float32)
    # the teacher's pair of an empty range (max -inf, sum 0 -> log-sum -inf); no divergence
    # sums (KIND = MIXTURE leaves ACC 0, FINISH = False leaves DIV, B, UQ, UP 0)
    _store_row(out_ptr + (row * n_split + tl.program_id(1)) * C_NCOL, out_ptr, row, valid,
               ms, ls, -float("inf"), 0.0, m1, l1, target, 0.0, 0.0, 0.0,
               2, HAS_LABELS, HAS_CE, False)


@triton.jit
def _sparse_grad_value(xs, cols, label, ms, ls, m1, l1, c_q, c_1, inv_ts,
                       HAS_CE: tl.constexpr, CE_SHARED: tl.constexpr):
    # c_q q + c_1 (q1 - onehot(label)) of raw logits xs at columns cols, in float32
    q = tl.exp((xs - ms) * inv_ts - ls)
    g = c_q * q
    if HAS_CE:
        if CE_SHARED:
            q1 = q
        else:
            q1 = tl.exp((xs - m1) - l1)
        g += c_1 * (q1 - tl.where(cols == label, 1.0, 0.0))
    return g


@triton.jit
def _sparse_grad_kernel(
    s_ptr,  # (N, Vr) student logits, rows row_stride apart
    labels_ptr,  # (N,) int64 GLOBAL labels (read only when HAS_LABELS)
    stats_ptr,  # (N, NCOL) fp32: the rows' GLOBAL merged table (MS, LS, M1, L1 read)
    coef_ptr,  # (N, 2) fp32: c_q, c_1 of each row
    ids_ptr,  # (N, K) int64: GLOBAL ids of the gathered slots, -1 = empty
    w_ptr,  # (N, K) fp32: weight of each slot's column
    gs_ptr,  # (N, Vr) out, s's dtype, contiguous
    V,  # columns of this range (Vr)
    row_stride,  # elements between rows of s (>= V)
    K,  # slots per row
    chunk,  # columns per program
    offset,  # global vocabulary id of column 0
    inv_ts,  # 1 / student temperature
    ignore_index,  # label of rows whose gradient is 0
    HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr,  # the c_1 term (labels given, ce_weight != 0)
    CE_SHARED: tl.constexpr,  # Ts == 1: q1 = q
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row, lo, hi, label, valid = _row_range(labels_ptr, V, chunk, offset, ignore_index,
                                           HAS_LABELS)
    s_row = s_ptr + row * row_stride
    gs_row = gs_ptr + row * V
    st = stats_ptr + row * C_NCOL
    ms = tl.load(st + C_MS)
    ls = tl.load(st + C_LS)
    m1 = tl.load(st + C_M1)
    l1 = tl.load(st + C_L1)
    c_q = tl.load(coef_ptr + row * 2)
    c_1 = 0.0
    if HAS_CE:
        c_1 = tl.load(coef_ptr + row * 2 + 1)
    offs = tl.arange(0, BLOCK_V)
    for start in range(lo, hi, BLOCK_V):
        cols = start + offs
        inside = cols < hi
        xs = tl.load(s_row + cols, mask=inside & valid, other=-float("inf")).to(tl.float32)
        g = _sparse_grad_value(xs, cols, label, ms, ls, m1, l1, c_q, c_1, inv_ts, HAS_CE,
                               CE_SHARED)
        g = tl.where(valid, g, 0.0)
        tl.store(gs_row + cols, g.to(gs_ptr.dtype.element_ty), mask=inside)
    # the slots' columns again, whole values plus their weights: after every thread of the
    # program has stored its tiles, so these stores are the last to those addresses
    tl.debug_barrier()
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        kmask = kk < K
        col = tl.load(ids_ptr + row * K + kk, mask=kmask, other=-1) - offset
        # -1 slots rebase to -1 - offset < 0 (offset >= 0): outside like foreign ids
        mine = kmask & (col >= lo) & (col < hi) & valid
        xs = tl.load(s_row + col, mask=mine, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + row * K + kk, mask=mine, other=0.0)
        g = _sparse_grad_value(xs, col, label, ms, ls, m1, l1, c_q, c_1, inv_ts, HAS_CE,
                               CE_SHARED) + w
        tl.store(gs_row + col, g.to(gs_ptr.dtype.element_ty), mask=mine)


# --------------------------------------------------------------------------------------
# launchers: the backend interface (kdkernels/triton/__init__.py)
# --------------------------------------------------------------------------------------


def _check_logits(s) -> None:
    from . import SUPPORTED_DTYPES

    if s.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"s must have a dtype in {SUPPORTED_DTYPES}, got {s.dtype}")
    if s.dim() != 2 or (s.shape[1] > 1 and s.stride(1) != 1) or s.stride(0) < s.shape[1]:
        raise ValueError(f"s must be an (N, Vr) tensor with unit column stride and a row "
                         f"stride >= Vr, got shape {tuple(s.shape)}, strides {s.stride()}")


def _check_labels(labels, s) -> None:
    if labels is not None and (labels.dtype != torch.int64 or labels.shape != s.shape[:1]
                               or labels.device != s.device):
        raise ValueError(f"labels must be int64 of shape ({s.shape[0]},) on {s.device}, "
                         f"got {labels.dtype} {tuple(labels.shape)} on {labels.device}")


def _check_rows(name, x, shape, dtype, device) -> None:
    if tuple(x.shape) != tuple(shape) or x.dtype != dtype or x.device != device:
        raise ValueError(f"{name} must be {dtype} of shape {tuple(shape)} on {device}, got "
                         f"{x.dtype} {tuple(x.shape)} on {x.device}")


def _row_stride(s) -> int:
    return s.stride(0) if s.shape[0] > 1 else s.shape[1]


def _flags(labels, spec: LossSpec) -> tuple[bool, bool, bool]:
    """(HAS_LABELS, HAS_CE, CE_SHARED)."""
    has_labels = labels is not None
    has_ce = has_labels and spec.ce_weight != 0.0
    return has_labels, has_ce, has_ce and spec.inv_ts == 1.0


@torch.no_grad()
def _sparse_partial(s, labels, spec: LossSpec, offset: int = 0) -> torch.Tensor:
    """The student's statistics (N, NCOL) float32 of the columns [offset, offset + Vr) that
    s (N, Vr) holds: MS, LS, M1, L1, LABEL as `partial` fills them, MT = LT = -inf, the
    rest 0. labels (N,) GLOBAL ids or None. Ignored rows are the empty range.
    # read s once; write N x NCOL"""
    _check_logits(s)
    labels = labels.contiguous() if labels is not None else None
    _check_labels(labels, s)
    n, v = s.shape
    if n == 0 or v == 0:
        return _stats.empty(n, s.device, torch.float32)
    has_labels, has_ce, ce_shared = _flags(labels, spec)
    cfg = _config_for(s)
    stats = torch.empty((n, NCOL), device=s.device, dtype=torch.float32)
    part = stats
    if cfg.n_split > 1:
        part = torch.empty((n, cfg.n_split, NCOL), device=s.device, dtype=torch.float32)
    lab = labels if has_labels else _no_labels(s)
    with device_guard(s):
        _sparse_stats_kernel[(n, cfg.n_split)](
            s, lab, part, v, _row_stride(s), cfg.chunk, cfg.n_split, int(offset),
            spec.inv_ts, spec.ignore_index, HAS_LABELS=has_labels, HAS_CE=has_ce,
            CE_SHARED=ce_shared, BLOCK_V=cfg.block_v, num_warps=cfg.num_warps,
        )
        if cfg.n_split > 1:
            # the dense merge of a row's chunks: the teacher's empty pairs stay empty
            _kd_merge_kernel[(n,)](
                lab, stats, stats, part, cfg.n_split, spec.inv_ts, 1.0, 0.0, 0.0,
                spec.ignore_index, KIND=MIXTURE, HAS_LABELS=has_labels, HAS_CE=has_ce,
                FINISH=False, SPLIT_BLOCK=cfg.split_block, num_warps=1,
            )
    return stats


@torch.no_grad()
def _sparse_grads(s, labels, spec: LossSpec, stats, coef, ids, w, offset: int = 0):
    """gs (N, Vr) in s's dtype, contiguous: c_q q + c_1 (q1 - onehot(label)) + the slots'
    weights w at the columns their GLOBAL ids name in [offset, offset + Vr), given the
    GLOBAL merged table `stats`; see the top of the file. Rows whose label is ignore_index
    get 0. # read s once (+ O(K) per row); write gs once"""
    _check_logits(s)
    labels = labels.contiguous() if labels is not None else None
    _check_labels(labels, s)
    n, v = s.shape
    _check_rows("stats", stats, (n, NCOL), torch.float32, s.device)
    _check_rows("coef", coef, (n, 2), torch.float32, s.device)
    if ids.dim() != 2 or ids.shape[0] != n:
        raise ValueError(f"ids must be (N={n}, K), got {tuple(ids.shape)}")
    k = ids.shape[1]
    _check_rows("ids", ids, (n, k), torch.int64, s.device)
    _check_rows("w", w, (n, k), torch.float32, s.device)
    gs = torch.empty((n, v), device=s.device, dtype=s.dtype)
    if n == 0 or v == 0:
        return gs
    has_labels, has_ce, ce_shared = _flags(labels, spec)
    cfg = _config_for(s)
    lab = labels if has_labels else _no_labels(s)
    with device_guard(s):
        _sparse_grad_kernel[(n, cfg.n_split)](
            s, lab, stats.contiguous(), coef.contiguous(), ids.contiguous(), w.contiguous(),
            gs, v, _row_stride(s), k, cfg.chunk, int(offset), spec.inv_ts, spec.ignore_index,
            HAS_LABELS=has_labels, HAS_CE=has_ce, CE_SHARED=ce_shared, BLOCK_V=cfg.block_v,
            BLOCK_K=BLOCK_K, num_warps=cfg.num_warps,
        )
    return gs


# --------------------------------------------------------------------------------------
# torch.library ops (as kd.py's): torch.compile sees two opaque ops with fake kernels, not
# the launchers' Python (which it cannot trace under the interpreter). The student's half
# of the spec travels as primitives: inv_ts, ce_weight, ignore_index.
# --------------------------------------------------------------------------------------


def _student_spec(inv_ts: float, ce_weight: float, ignore_index: int) -> LossSpec:
    return LossSpec(div=Divergence("forward_kl"), inv_ts=inv_ts, inv_tt=1.0, kd_scale=1.0,
                    ce_weight=ce_weight, ignore_index=ignore_index)


@torch.library.custom_op("kdkernels_triton::sparse_partial", mutates_args=())
def sparse_partial_op(
    s: torch.Tensor, labels: torch.Tensor | None, inv_ts: float, ce_weight: float,
    ignore_index: int, offset: int,
) -> torch.Tensor:
    return _sparse_partial(s, labels, _student_spec(inv_ts, ce_weight, ignore_index), offset)


@sparse_partial_op.register_fake
def _sparse_partial_fake(s, labels, inv_ts, ce_weight, ignore_index, offset):
    return s.new_empty((s.shape[0], NCOL), dtype=torch.float32)


@torch.library.custom_op("kdkernels_triton::sparse_grads", mutates_args=())
def sparse_grads_op(
    s: torch.Tensor, labels: torch.Tensor | None, inv_ts: float, ce_weight: float,
    ignore_index: int, stats: torch.Tensor, coef: torch.Tensor, ids: torch.Tensor,
    w: torch.Tensor, offset: int,
) -> torch.Tensor:
    return _sparse_grads(s, labels, _student_spec(inv_ts, ce_weight, ignore_index), stats,
                         coef, ids, w, offset)


@sparse_grads_op.register_fake
def _sparse_grads_fake(s, labels, inv_ts, ce_weight, ignore_index, stats, coef, ids, w,
                       offset):
    return s.new_empty(s.shape)


def sparse_partial(s, labels, spec: LossSpec, offset: int = 0) -> torch.Tensor:
    """The backend's sparse_partial (see _sparse_partial) through its op."""
    return sparse_partial_op(s, labels, float(spec.inv_ts), float(spec.ce_weight),
                             int(spec.ignore_index), int(offset))


def sparse_grads(s, labels, spec: LossSpec, stats, coef, ids, w, offset: int = 0):
    """The backend's sparse_grads (see _sparse_grads) through its op."""
    return sparse_grads_op(s, labels, float(spec.inv_ts), float(spec.ce_weight),
                           int(spec.ignore_index), stats, coef, ids, w, int(offset))


# --------------------------------------------------------------------------------------
# ahead-of-time compilation (aot.py)
# --------------------------------------------------------------------------------------

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
# (HAS_LABELS, HAS_CE, CE_SHARED) reachable combinations
_LABEL_MODES = ((False, False, False), (True, False, False), (True, True, False),
                (True, True, True))


def aot_kernels(V: int, dtype: torch.dtype) -> list[AotKernel]:
    """Every (kernel, constexprs, num_warps) the launchers above can pick for rows of width
    V in `dtype` (the split-row merge is kd.py's, listed there)."""
    x, f32, i64 = _PTR[dtype], "*fp32", "*i64"
    ints = ("V", "row_stride", "K", "chunk", "n_split", "offset", "ignore_index")
    floats = ("inv_ts",)
    cfg = launch_config(V, 1 << 30, None)
    stats_sig = _sig(_sparse_stats_kernel, dict(s_ptr=x, labels_ptr=i64, out_ptr=f32), ints,
                     floats)
    grad_sig = _sig(_sparse_grad_kernel, dict(s_ptr=x, labels_ptr=i64, stats_ptr=f32,
                                              coef_ptr=f32, ids_ptr=i64, w_ptr=f32, gs_ptr=x),
                    ints, floats)
    out = []
    for has_labels, has_ce, ce_shared in _LABEL_MODES:
        lab = dict(HAS_LABELS=has_labels, HAS_CE=has_ce, CE_SHARED=ce_shared)
        tag = "labels" if has_labels else "nolabels"
        tag += ("+ce_shared" if ce_shared else "+ce") if has_ce else ""
        out.append(AotKernel(f"sparse_stats[{tag}]", _sparse_stats_kernel, stats_sig,
                             dict(BLOCK_V=cfg.block_v, **lab), cfg.num_warps))
        out.append(AotKernel(f"sparse_grad[{tag}]", _sparse_grad_kernel, grad_sig,
                             dict(BLOCK_V=cfg.block_v, BLOCK_K=BLOCK_K, **lab),
                             cfg.num_warps))
    return out
