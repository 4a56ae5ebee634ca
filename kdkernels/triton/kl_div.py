# F.kl_div's pointwise terms over flat x (log-probabilities) and y (the target):
#
#   log_target=False   l = xlogy(y, y) - y x = y (log y - x),  0 where y = 0
#   log_target=True    l = exp(y) (y - x)
#
# Gradients of one term (fused: one kernel writes both, each only when needed):
#
#   log_target=False   dl/dx = -y         dl/dy = log y + 1 - x   (-inf at y = 0: the true
#                                                                  derivative of y log y)
#   log_target=True    dl/dx = -exp(y)    dl/dy = exp(y) (y - x + 1)
#
# times the upstream gradient g (elementwise for reduction="none", one scalar for the sum).
#
# Forward, reduce_sum=False: each program writes its tiles' terms in the promoted dtype.
# Forward, reduce_sum=True: a persistent grid of P programs (P ~ a few per SM); program p
# sums tiles p, p + P, p + 2P, ... in a float32 register vector and writes one partial sum;
# the P partials are summed by torch (a tiny, deterministic reduction). No elementwise
# tensor exists and nothing synchronizes with the host.
#
# Memory traffic per element (bx, by = bytes of x's and y's dtype, bo of the output):
#   forward none: bx + by + bo;  forward sum: bx + by
#   backward: dx only reads y (and g when elementwise), writes dx; dy also reads x, writes dy.

from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl

from .._common import first_order_only
from ._common import AotKernel, device_guard

# 2048 elements over 8 warps: 8 values per thread per tile (38-40 registers). At 4096, ptxas
# held the bf16 sum kernel to 64 registers on sm_90 and spilled 8 bytes (see aot.py).
BLOCK = 2048
NUM_WARPS = 8
PROGRAMS_PER_SM = 4  # persistent grid size on CUDA
CPU_PROGRAMS = 8  # persistent grid size under the interpreter (programs run one by one)


@triton.jit
def _kl_div_fwd_kernel(
    x_ptr,  # (n,) input: log-probabilities, contiguous, fp16 / bf16 / fp32
    y_ptr,  # (n,) target: probabilities (log-probabilities when LOG_TARGET), contiguous
    out_ptr,  # REDUCE: (programs,) fp32 partial sums; else (n,) terms in the promoted dtype
    n,  # number of elements
    LOG_TARGET: tl.constexpr,  # y holds log-probabilities
    REDUCE: tl.constexpr,  # write per-program partial sums instead of the terms
    BLOCK: tl.constexpr,  # elements per tile
):
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(pid.to(tl.int64) * BLOCK, n, step):  # int64: n may pass 2**31
        offs = start + cols
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if LOG_TARGET:
            term = tl.exp(y) * (y - x)
        else:
            # xlogy(y, y) - y x, torch's formula (so y = 0, x = -inf is nan there too);
            # xlogy(0, 0) = 0 is 0 * log(1), which also keeps log(0) out of masked lanes
            term = y * tl.log(tl.where(y == 0.0, 1.0, y)) - y * x
        if REDUCE:
            acc += tl.where(mask, term, 0.0)
        else:
            tl.store(out_ptr + offs, term, mask=mask)
    if REDUCE:
        tl.store(out_ptr + pid, tl.sum(acc, 0))


@triton.jit
def _kl_div_bwd_kernel(
    x_ptr,  # (n,) input (log-probabilities); read only when NEED_Y
    y_ptr,  # (n,) target
    g_ptr,  # upstream gradient: (n,) in the promoted dtype, or (1,) fp32 when G_SCALAR
    dx_ptr,  # (n,) out: dL/dx in x's dtype (untouched unless NEED_X)
    dy_ptr,  # (n,) out: dL/dy in y's dtype (untouched unless NEED_Y)
    n,  # number of elements
    LOG_TARGET: tl.constexpr,  # y holds log-probabilities
    G_SCALAR: tl.constexpr,  # g is the gradient of the sum: one value for every element
    NEED_X: tl.constexpr,  # write dx
    NEED_Y: tl.constexpr,  # write dy
    BLOCK: tl.constexpr,  # elements per tile
):
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    cols = tl.arange(0, BLOCK)
    if G_SCALAR:
        g_all = tl.load(g_ptr).to(tl.float32)
    for start in range(pid.to(tl.int64) * BLOCK, n, step):
        offs = start + cols
        mask = offs < n
        if G_SCALAR:
            g = g_all
        else:
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=mask, other=1.0).to(tl.float32)  # log(1): no -inf
        if LOG_TARGET:
            ey = tl.exp(y)
            if NEED_X:
                tl.store(dx_ptr + offs, -ey * g, mask=mask)
            if NEED_Y:
                x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(dy_ptr + offs, ey * (y - x + 1.0) * g, mask=mask)
        else:
            if NEED_X:
                tl.store(dx_ptr + offs, -y * g, mask=mask)
            if NEED_Y:
                x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(dy_ptr + offs, (tl.log(y) + 1.0 - x) * g, mask=mask)


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs(n: int, device: torch.device) -> int:
    tiles = triton.cdiv(n, BLOCK)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return max(1, min(tiles, PROGRAMS_PER_SM * _sm_count(index)))
    return max(1, min(tiles, CPU_PROGRAMS))


def _fwd(x: torch.Tensor, y: torch.Tensor, log_target: bool, reduce_sum: bool) -> torch.Tensor:
    n = x.numel()
    if reduce_sum:
        if n == 0:
            return torch.zeros((), device=x.device, dtype=torch.float32)
        p = _programs(n, x.device)
        partials = torch.empty(p, device=x.device, dtype=torch.float32)
        with device_guard(x):
            _kl_div_fwd_kernel[(p,)](
                x, y, partials, n, LOG_TARGET=log_target, REDUCE=True, BLOCK=BLOCK,
                num_warps=NUM_WARPS, num_stages=1,
            )
        return partials.sum()
    out = torch.empty(n, device=x.device, dtype=torch.promote_types(x.dtype, y.dtype))
    if n:
        with device_guard(x):
            _kl_div_fwd_kernel[(_programs(n, x.device),)](
                x, y, out, n, LOG_TARGET=log_target, REDUCE=False, BLOCK=BLOCK,
                num_warps=NUM_WARPS, num_stages=1,
            )
    return out


def _bwd(x, y, g, log_target: bool, need_x: bool, need_y: bool):
    n = x.numel()
    g_scalar = g.dim() == 0
    # the gradient of the sum stays a device scalar (no .item()); elementwise g is made
    # contiguous because autograd may hand an expanded one
    g = g.reshape(1).to(torch.float32) if g_scalar else g.contiguous()
    dx = torch.empty_like(x) if need_x else x.new_empty(0)
    dy = torch.empty_like(y) if need_y else y.new_empty(0)
    if n and (need_x or need_y):
        with device_guard(x):
            _kl_div_bwd_kernel[(_programs(n, x.device),)](
                x, y, g, dx, dy, n, LOG_TARGET=log_target, G_SCALAR=g_scalar, NEED_X=need_x,
                NEED_Y=need_y, BLOCK=BLOCK, num_warps=NUM_WARPS, num_stages=1,
            )
    return dx, dy


# --------------------------------------------------------------------------------------
# torch ops
# --------------------------------------------------------------------------------------


@torch.library.custom_op("kdkernels_triton::kl_div_fwd", mutates_args=())
def kl_div_fwd(x: torch.Tensor, y: torch.Tensor, log_target: bool, reduce_sum: bool) -> torch.Tensor:
    return _fwd(x, y, log_target, reduce_sum)


@kl_div_fwd.register_fake
def _(x, y, log_target, reduce_sum):
    if reduce_sum:
        return x.new_empty((), dtype=torch.float32)
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, y.dtype))


@torch.library.custom_op("kdkernels_triton::kl_div_bwd", mutates_args=())
def kl_div_bwd(
    x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor, log_target: bool, need_x: bool,
    need_y: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dy); an output that is not needed is an empty tensor."""
    return _bwd(x, y, grad, log_target, need_x, need_y)


@kl_div_bwd.register_fake
def _(x, y, grad, log_target, need_x, need_y):
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            torch.empty_like(y) if need_y else y.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, y, log_target, _ = inputs
    ctx.log_target = log_target
    ctx.save_for_backward(x, y)


@first_order_only
def _backward(ctx, grad):
    x, y = ctx.saved_tensors
    need_x, need_y = ctx.needs_input_grad[:2]
    dx, dy = kl_div_bwd(x, y, grad, ctx.log_target, need_x, need_y)
    return (dx if need_x else None), (dy if need_y else None), None, None


kl_div_fwd.register_autograd(_backward, setup_context=_setup_context)


def kl_div(x: torch.Tensor, y: torch.Tensor, log_target: bool, reduce_sum: bool) -> torch.Tensor:
    """F.kl_div terms of 1-D contiguous x, y (promoted dtype); their float32 sum if reduce_sum."""
    return kl_div_fwd(x.contiguous(), y.contiguous(), bool(log_target), bool(reduce_sum))


# --------------------------------------------------------------------------------------
# ahead-of-time compilation configs (see aot.py)
# --------------------------------------------------------------------------------------

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def aot_kernels(V: int, dtype: torch.dtype) -> list[AotKernel]:
    """The launchers' configs for x and y of `dtype` (the tile does not depend on V)."""
    del V  # flat kernels: the same tile for every size
    ptr = "*" + _TRITON_DTYPE[dtype]
    out = []
    # the JIT passes n as i32 below 2**31 elements and as i64 above
    for n_ty, log_target, reduce in itertools.product(("i32", "i64"), (False, True),
                                                      (False, True)):
        tag = "log_target" if log_target else "prob_target"
        tag += ",sum" if reduce else ",none"
        tag += ",n:i64" if n_ty == "i64" else ""
        out.append(AotKernel(
            f"kl_div_fwd[{tag}]", _kl_div_fwd_kernel,
            {"x_ptr": ptr, "y_ptr": ptr, "out_ptr": "*fp32" if reduce else ptr,
             "n": n_ty, "LOG_TARGET": "constexpr", "REDUCE": "constexpr",
             "BLOCK": "constexpr"},
            {"LOG_TARGET": log_target, "REDUCE": reduce, "BLOCK": BLOCK}, NUM_WARPS,
        ))
        # the fused backward writing both gradients is the widest variant
        out.append(AotKernel(
            f"kl_div_bwd[{tag}]", _kl_div_bwd_kernel,
            {"x_ptr": ptr, "y_ptr": ptr, "g_ptr": "*fp32" if reduce else ptr,
             "dx_ptr": ptr, "dy_ptr": ptr, "n": n_ty, "LOG_TARGET": "constexpr",
             "G_SCALAR": "constexpr", "NEED_X": "constexpr", "NEED_Y": "constexpr",
             "BLOCK": "constexpr"},
            {"LOG_TARGET": log_target, "G_SCALAR": reduce, "NEED_X": True,
             "NEED_Y": True, "BLOCK": BLOCK}, NUM_WARPS,
        ))
    return out
