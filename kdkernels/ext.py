"""C++/CUDA extension backend (impl="ext"): loads csrc/'s libraries on first use (built by
kdkernels/ext_build.py: kdkernels_cpu with the op schemas and CPU kernels, kdkernels_cuda
with the CUDA kernels for GPUs of compute capability >= 8.0) and registers its ops' fake
and autograd kernels. The CUDA library is built when torch has CUDA, nvcc is found and
KDKERNELS_SKIP_CUDA_BUILD is unset, and loaded when a CUDA tensor needs it.

Ops (torch.ops.kdkernels.*; fake and autograd registrations below):

    kd_forward(s, t, labels, <spec>) -> (row losses (N,), stats (N, NSTAT))
    kd_partial(s, t, labels, <spec>, offset) -> stats (N, NSTAT) of a column range
    kd_mix_partial(s, t, stats, <spec>, offset) -> a two-pass kind's pass-2 sums (N, 4)
    kd_backward(grad_loss, s, t, labels, stats, <spec>, offset, need_teacher)
        -> (grad_s, grad_t) of a column range
    kd_backward_out(grad_loss, s, t, labels, stats, <spec>, offset, grad_s!, grad_t!?)
        -> () the same, written into given buffers
    kd_fused_(s!, t, labels, <spec>, need_teacher) -> (row losses, grad_t)  [s <- grad_s]
    kl_div / kl_div_sum / kl_div_backward, softmax / softmax_backward
    kd_sparse_partial(s, labels, <spec>, offset) -> the student's stats (N, NSTAT) of a range
    kd_sparse_grads(s, labels, stats, coef, ids, w, <spec>, offset) -> grad_s of a range
        (sparse teachers: csrc/kd_sparse_cpu.cpp, csrc/kd_sparse_cuda.cuh; s may be a
        row-strided column slice)

<spec> is the LossSpec as primitives (LossSpec.as_args()): kind, mix, coef_p, coef_q, inv_ts,
inv_tt, kd_scale, ce_weight, ignore_index. stats is the table of kdkernels/_stats.py (columns
Col, mirrored in csrc/kd_layout.h); partial / mix_partial / grads below are this backend's
side of its interface. A build failure makes is_available() return (False, message) and
warns once; impl="auto" then falls back to the PyTorch path.

CLI: python -m kdkernels.ext [--cuda] [--check-spills] (kdkernels/ext_build.py).
"""

from __future__ import annotations

import os
import sys
import threading
import warnings

import torch

from ._common import first_order_only, scale_rows_, strided_rows, take_inplace_grads
from ._spec import LossSpec
from ._stats import NCOL
from .ext_build import MIN_CAPABILITY, build

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NSTAT = NCOL  # columns of the ops' stats (csrc/kd_layout.h: enum Stat)

_lock = threading.RLock()
_status: dict[str, tuple[bool, str] | None] = {"cpu": None, "cuda": None}
_warned = False
_registered = False


# --------------------------------------------------------------------------------------
# availability
# --------------------------------------------------------------------------------------


def _device_supported(device: torch.device) -> tuple[bool, str]:
    """Whether the CUDA library has code this GPU runs (machine code or PTX it can JIT)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device is available"
    idx = device.index if device.index is not None else torch.cuda.current_device()
    cap = torch.cuda.get_device_capability(idx)
    if cap < MIN_CAPABILITY:
        return False, (f"the kdkernels CUDA library needs a GPU of compute capability >= "
                       f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}, cuda:{idx} "
                       f"({torch.cuda.get_device_name(idx)}) is {cap[0]}.{cap[1]}")
    return True, ""


def _ensure(kind: str) -> tuple[bool, str]:
    """Build/load library `kind` once per process; (ok, why not)."""
    with _lock:
        if _status[kind] is None:
            if kind == "cuda":
                ok, why = _ensure("cpu")  # the schemas live in the CPU library
                if not ok:
                    _status[kind] = (False, why)
                    return _status[kind]
                if os.environ.get("KDKERNELS_SKIP_CUDA_BUILD"):
                    _status[kind] = (False, "the CUDA library is not built "
                                            "(KDKERNELS_SKIP_CUDA_BUILD is set)")
                    return _status[kind]
            try:
                build(kind)
                if kind == "cpu":
                    register()
                _status[kind] = (True, "")
            except Exception as e:  # compiler missing, build or load error
                msg = str(e).strip()
                if len(msg) > 4000:
                    msg = msg[:2000] + "\n...\n" + msg[-2000:]
                _status[kind] = (False, f"the kdkernels {kind.upper()} extension could not be "
                                        f"built or loaded: {msg}")
        return _status[kind]


def is_available(device: torch.device) -> tuple[bool, str]:
    global _warned
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return False, f"the extension has kernels for cpu and cuda, not {device.type}"
    if device.type == "cuda":
        ok, why = _device_supported(device)
        if ok:
            ok, why = _ensure("cuda")
    else:
        ok, why = _ensure("cpu")
    if not ok and not _warned:
        _warned = True
        warnings.warn(f"kdkernels: {why}\nimpl='auto' falls back to another implementation.",
                      RuntimeWarning, stacklevel=3)
    return ok, why


def _require(device: torch.device) -> None:
    if torch.compiler.is_compiling():  # availability was settled when the impl was resolved
        return
    ok, why = is_available(device)
    if not ok:
        raise RuntimeError(why)


def supported_dtypes(device: torch.device) -> tuple:
    """The CUDA kernels compute in float32, so float64 is a CPU-only dtype here: float64
    CUDA logits get a clear error with impl="ext" (impl="auto" sends them to "torch")."""
    if device.type == "cuda":
        return tuple(d for d in SUPPORTED_DTYPES if d != torch.float64)
    return SUPPORTED_DTYPES


# --------------------------------------------------------------------------------------
# fake (meta) kernels and autograd
# --------------------------------------------------------------------------------------


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kd_forward_fake(s, t, labels, *spec):
    n = s.shape[0]
    acc = _acc(s.dtype)
    return s.new_empty((n,), dtype=acc), s.new_empty((n, NSTAT), dtype=acc)


def _kd_partial_fake(s, t, labels, *spec_and_offset):
    return s.new_empty((s.shape[0], NSTAT), dtype=_acc(s.dtype))


def _kd_mix_partial_fake(s, t, stats, *spec_and_offset):
    return s.new_empty((s.shape[0], 4), dtype=_acc(s.dtype))


def _kd_backward_fake(grad_loss, s, t, labels, stats, *spec_and_need):
    need_teacher = spec_and_need[-1]
    return torch.empty_like(s), (torch.empty_like(t) if need_teacher else t.new_empty((0,)))


def _kd_backward_out_fake(grad_loss, s, t, labels, stats, *spec_offset_and_outs):
    return None


def _kd_fused_fake(s, t, labels, *spec_and_need):
    need_teacher = spec_and_need[-1]
    loss = s.new_empty((s.shape[0],), dtype=_acc(s.dtype))
    return loss, (torch.empty_like(t) if need_teacher else t.new_empty((0,)))


def _kd_setup(ctx, inputs, output):
    s, t, labels, *spec = inputs
    ctx.spec = spec
    ctx.save_for_backward(s, t, labels, output[1])


@first_order_only
def _kd_backward(ctx, grad_loss, grad_stats):
    s, t, labels, stats = ctx.saved_tensors
    need_t = ctx.needs_input_grad[1]
    if grad_loss is None:
        grad_loss = stats.new_zeros((s.shape[0],))
    gs, gt = torch.ops.kdkernels.kd_backward(grad_loss, s, t, labels, stats, *ctx.spec, 0,
                                             need_t)
    return (gs, gt if need_t else None, None) + (None,) * len(ctx.spec)


def _kd_sparse_partial_fake(s, labels, *spec_and_offset):
    return s.new_empty((s.shape[0], NSTAT), dtype=_acc(s.dtype))


def _kd_sparse_grads_fake(s, labels, stats, coef, ids, w, *spec_and_offset):
    return s.new_empty(s.shape)


def _kl_div_fake(x, y, log_target):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, y.dtype))


def _kl_div_sum_fake(x, y, log_target):
    return x.new_empty((), dtype=_acc(torch.promote_types(x.dtype, y.dtype)))


def _kl_div_backward_fake(grad, x, y, log_target, need_x, need_y):
    return (torch.empty_like(x) if need_x else x.new_empty((0,)),
            torch.empty_like(y) if need_y else y.new_empty((0,)))


def _kl_setup(ctx, inputs, output):
    x, y, log_target = inputs
    ctx.log_target = log_target
    ctx.save_for_backward(x, y)


@first_order_only
def _kl_backward(ctx, grad):
    x, y = ctx.saved_tensors
    need_x, need_y = ctx.needs_input_grad[:2]
    gx, gy = torch.ops.kdkernels.kl_div_backward(grad, x, y, ctx.log_target, need_x, need_y)
    return (gx if need_x else None), (gy if need_y else None), None


def _softmax_fake(x, inv_t, log):
    return torch.empty_like(x)


def _softmax_backward_fake(grad, y, inv_t, log):
    return torch.empty_like(y)


def _softmax_setup(ctx, inputs, output):
    _, ctx.inv_t, ctx.log = inputs
    ctx.save_for_backward(output)


@first_order_only
def _softmax_bwd(ctx, grad):
    (y,) = ctx.saved_tensors
    return torch.ops.kdkernels.softmax_backward(grad, y, ctx.inv_t, ctx.log), None, None


def register() -> None:
    """The ops' fake (meta) and autograd kernels, once (after the CPU library defined them)."""
    global _registered
    if _registered:
        return
    lib = torch.library
    lib.register_fake("kdkernels::kd_forward", _kd_forward_fake)
    lib.register_fake("kdkernels::kd_partial", _kd_partial_fake)
    lib.register_fake("kdkernels::kd_mix_partial", _kd_mix_partial_fake)
    lib.register_fake("kdkernels::kd_backward", _kd_backward_fake)
    lib.register_fake("kdkernels::kd_backward_out", _kd_backward_out_fake)
    lib.register_fake("kdkernels::kd_fused_", _kd_fused_fake)
    lib.register_fake("kdkernels::kd_sparse_partial", _kd_sparse_partial_fake)
    lib.register_fake("kdkernels::kd_sparse_grads", _kd_sparse_grads_fake)
    lib.register_fake("kdkernels::kl_div", _kl_div_fake)
    lib.register_fake("kdkernels::kl_div_sum", _kl_div_sum_fake)
    lib.register_fake("kdkernels::kl_div_backward", _kl_div_backward_fake)
    lib.register_fake("kdkernels::softmax", _softmax_fake)
    lib.register_fake("kdkernels::softmax_backward", _softmax_backward_fake)
    lib.register_autograd("kdkernels::kd_forward", _kd_backward, setup_context=_kd_setup)
    lib.register_autograd("kdkernels::kl_div", _kl_backward, setup_context=_kl_setup)
    lib.register_autograd("kdkernels::kl_div_sum", _kl_backward, setup_context=_kl_setup)
    lib.register_autograd("kdkernels::softmax", _softmax_bwd, setup_context=_softmax_setup)
    _registered = True


# --------------------------------------------------------------------------------------
# backend interface (see kdkernels/_dispatch.py)
# --------------------------------------------------------------------------------------


class _FusedRows(torch.autograd.Function):
    """inplace_backward: the gradient (upstream gradient 1) is computed in the forward and
    written over s; backward only rescales it by the row gradients."""

    @staticmethod
    def forward(ctx, s, t, labels, args):
        need_t = ctx.needs_input_grad[1]
        loss, gt = torch.ops.kdkernels.kd_fused_(s, t, labels, *args, need_t)
        ctx.grads = (s, gt if need_t else None)
        return loss

    @staticmethod
    @first_order_only
    def backward(ctx, grad_loss):
        grad_s, grad_t = scale_rows_(grad_loss, *take_inplace_grads(ctx))
        return grad_s, grad_t, None, None


def kd_rows(s, t, labels, spec: LossSpec, inplace_backward: bool = False):
    _require(s.device)
    args = spec.as_args()
    if inplace_backward:
        return _FusedRows.apply(s, t, labels, args)
    loss, _ = torch.ops.kdkernels.kd_forward(s, t, labels, *args)
    return loss


def partial(s, t, labels, spec: LossSpec, offset: int = 0) -> torch.Tensor:
    """Statistics (N, NSTAT) of the columns [offset, offset + Vr) of rows: s, t (N, Vr),
    labels (N,) GLOBAL ids or None (kdkernels/_stats.py)."""
    _require(s.device)
    return torch.ops.kdkernels.kd_partial(_rows(s), _rows(t), _labels(labels), *spec.as_args(),
                                          int(offset))


def mix_partial(s, t, spec: LossSpec, stats, offset: int = 0) -> torch.Tensor:
    """The pass-2 sums (N, 4) of a two-pass kind over the columns [offset, offset + Vr),
    given the rows' GLOBAL (merged) statistics: the mixture's (A, B, Uq, Up), tvd's and
    alpha_beta's (_stats.py). For jsd (u = 1) Uq and Up are the range's sums of q and p, so
    the ranges of a row add up to 1."""
    _require(s.device)
    return torch.ops.kdkernels.kd_mix_partial(_rows(s), _rows(t), stats.contiguous(),
                                              *spec.as_args(), int(offset))


def grads(s, t, labels, spec: LossSpec, stats, offset: int, grad_rows, need_teacher: bool,
          out=None, out_t=None):
    """(grad_s, grad_t or None) of the columns [offset, offset + Vr) given the rows' GLOBAL
    finished statistics (DIV set), times grad_rows (N,); ignored rows get 0. out, out_t:
    buffers to write them into (any row stride), else fresh ones."""
    _require(s.device)
    s, t = _rows(s), _rows(t)
    if out is None and out_t is None:
        gs, gt = torch.ops.kdkernels.kd_backward(grad_rows, s, t, _labels(labels),
                                                 stats.contiguous(), *spec.as_args(),
                                                 int(offset), bool(need_teacher))
        return gs, (gt if need_teacher else None)
    gs = torch.empty_like(s) if out is None else out
    gt = None
    if need_teacher:
        gt = torch.empty_like(t) if out_t is None else out_t
    torch.ops.kdkernels.kd_backward_out(grad_rows, s, t, _labels(labels), stats.contiguous(),
                                        *spec.as_args(), int(offset), gs, gt)
    return gs, gt


def _rows(x):
    """x as the kernels read it: in place when its rows have stride 1 along V (any row
    stride), else a contiguous copy."""
    return x if strided_rows(x) else x.contiguous()


def sparse_partial(s, labels, spec: LossSpec, offset: int = 0) -> torch.Tensor:
    """The student's statistics (N, NSTAT) of the columns [offset, offset + Vr) that s
    (N, Vr; row-strided allowed) holds, as `partial` fills them; the teacher's pair is the
    empty range's (-inf). labels (N,) GLOBAL ids or None."""
    _require(s.device)
    return torch.ops.kdkernels.kd_sparse_partial(s, _labels(labels), *spec.as_args(),
                                                 int(offset))


def sparse_grads(s, labels, spec: LossSpec, stats, coef, ids, w, offset: int = 0):
    """gs (N, Vr) in s's dtype: c_q q + c_1 (q1 - onehot(label)) + the weights w of the
    slots whose GLOBAL ids fall in [offset, offset + Vr), given the GLOBAL merged stats;
    ignored rows get 0 (kdkernels/sparse.py's backend contract)."""
    _require(s.device)
    return torch.ops.kdkernels.kd_sparse_grads(s, _labels(labels), stats.contiguous(),
                                               coef.contiguous(), ids.contiguous(),
                                               w.contiguous(), *spec.as_args(), int(offset))


def _labels(labels):
    return None if labels is None else labels.contiguous()


def kl_div(x, y, log_target: bool, reduce_sum: bool):
    _require(x.device)
    x, y = x.contiguous(), y.contiguous()
    if reduce_sum:
        return torch.ops.kdkernels.kl_div_sum(x, y, bool(log_target))
    return torch.ops.kdkernels.kl_div(x, y, bool(log_target))


def softmax(x, inv_temperature: float, log: bool):
    _require(x.device)
    return torch.ops.kdkernels.softmax(x.contiguous(), float(inv_temperature), bool(log))


if __name__ == "__main__":
    # the build CLI (kdkernels/ext_build.py), run as the package's module
    from kdkernels import ext_build as _ext_build

    sys.exit(_ext_build.main())
