# Softmax / log_softmax with a temperature over the last dim of (N, V) logits.
#
# Forward, one program per row, z = x / T = x * inv_t, with the maximum of the RAW logits:
#   m = max_j x_j,  d = sum_j exp((x_j - m) / T)   (logsumexp(z) = m / T + log d)
#   softmax      y = exp((x - m) / T) / d
#   log_softmax  y = (x - m) / T - log d
# The difference x - m is formed before the scaling: exact near the maximum, where the mass
# is, for any T (x / T - m / T would carry a rounding of |x / T| into every y).
# (m, d) are computed online over vocab tiles, as in flash-attention: after a tile with
# maximum mt, m' = max(m, mt) and d' = d * exp((m - m') / T) + sum_tile exp((x - m') / T).
# A second loop re-reads x and writes y. When the whole row fits one tile (V <= BLOCK) it
# stays in registers and x is read once.
#
# Backward (g = dL/dy, y saved from the forward, dz/dx = 1/T):
#   softmax      dy_i/dz_k = y_i (d_ik - y_k)
#                dx_k = (1/T) sum_i g_i y_i (d_ik - y_k) = y_k (g_k - sum_i g_i y_i) / T
#   log_softmax  dy_i/dz_k = d_ik - y~_k  with y~ = exp(y) the probabilities
#                dx_k = (g_k - exp(y_k) sum_i g_i) / T
# One program per row: a first loop forms the row scalar (sum g y, or sum g), a second
# loop writes dx (a single read when V <= BLOCK).
#
# Memory traffic per element (b = bytes of the dtype), rows wider than one tile:
#   forward   read x twice, write y            3b   (2b when V <= BLOCK)
#   backward  softmax: read g, y twice, write dx   5b   (3b when V <= BLOCK)
#             log_softmax: read g twice, y once, write dx   4b   (3b when V <= BLOCK)
#
# Entries of x equal to -inf (vocab padding) give y = 0 (log_softmax: -inf). A row with a
# NaN, a +inf (m = +inf: inf - inf) or nothing but -inf (m = -inf: -inf - -inf) is NaN
# throughout, as torch.softmax: the NaN reaches d, and every y divides by or subtracts it.

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import first_order_only
from ._common import AotKernel, device_guard

# Widest vocab tile. Rows up to this width are processed in registers in one read
# (8192 float32 over 8 warps is 32 values per thread: no spills on sm_80 / sm_90, see aot.py).
MAX_BLOCK = 8192


@triton.jit
def _softmax_fwd_kernel(
    x_ptr,  # (N, V) logits, row-major contiguous, fp16 / bf16 / fp32
    y_ptr,  # (N, V) output in x's dtype: softmax(x * inv_t) or log_softmax(x * inv_t)
    V,  # row length (vocabulary size)
    inv_t,  # 1 / temperature
    LOG: tl.constexpr,  # write log_softmax instead of softmax
    BLOCK: tl.constexpr,  # vocab tile width, a power of two
    SINGLE: tl.constexpr,  # V <= BLOCK: the row is held in registers, x read once
):
    row = tl.program_id(0).to(tl.int64)  # row * V passes 2**31 at real sizes
    x_row = x_ptr + row * V
    y_row = y_ptr + row * V
    cols = tl.arange(0, BLOCK)
    if SINGLE:
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
        m = tl.max(x, 0)
        zm = (x - m) * inv_t
        e = tl.exp(zm)
        d = tl.sum(e, 0)
        if LOG:
            y = zm - tl.log(d)
        else:
            y = e / d
        tl.store(y_row + cols, y, mask=mask)
    else:
        m = -float("inf")
        d = 0.0
        for start in range(0, V, BLOCK):
            mask = start + cols < V
            x = tl.load(x_row + start + cols, mask=mask, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            # while every entry so far is -inf, keep d = 0 instead of exp(-inf + inf) = nan
            m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
            d = d * tl.exp((m - m_ref) * inv_t) + tl.sum(tl.exp((x - m_ref) * inv_t), 0)
            m = m_new
        # y from (x - m) / T (exact for nearby values) rather than x / T - lse: lse rounds at
        # the magnitude of x / T, an error of up to 2**-24 |x / T| in every y
        log_d = tl.log(d)
        inv_d = 1.0 / d
        for start in range(0, V, BLOCK):
            mask = start + cols < V
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            zm = (x - m) * inv_t
            if LOG:
                y = zm - log_d
            else:
                y = tl.exp(zm) * inv_d
            tl.store(y_row + start + cols, y, mask=mask)


@triton.jit
def _softmax_bwd_kernel(
    g_ptr,  # (N, V) upstream gradient dL/dy, contiguous, y's dtype
    y_ptr,  # (N, V) forward output (softmax or log_softmax), contiguous
    dx_ptr,  # (N, V) output dL/dx in y's dtype
    V,  # row length
    inv_t,  # 1 / temperature (chain rule of z = x * inv_t)
    LOG: tl.constexpr,  # y is log_softmax
    BLOCK: tl.constexpr,  # vocab tile width
    SINGLE: tl.constexpr,  # V <= BLOCK: one read of g and y
):
    row = tl.program_id(0).to(tl.int64)
    g_row = g_ptr + row * V
    y_row = y_ptr + row * V
    dx_row = dx_ptr + row * V
    cols = tl.arange(0, BLOCK)
    if SINGLE:
        mask = cols < V
        g = tl.load(g_row + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_row + cols, mask=mask, other=0.0).to(tl.float32)
        if LOG:
            dx = (g - tl.exp(y) * tl.sum(g, 0)) * inv_t
        else:
            dx = y * (g - tl.sum(g * y, 0)) * inv_t
        tl.store(dx_row + cols, dx, mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            mask = start + cols < V
            g = tl.load(g_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            if LOG:
                acc += g
            else:
                y = tl.load(y_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                acc += g * y
        total = tl.sum(acc, 0)  # sum g (log_softmax) or sum g y (softmax)
        for start in range(0, V, BLOCK):
            mask = start + cols < V
            g = tl.load(g_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            if LOG:
                dx = (g - tl.exp(y) * total) * inv_t
            else:
                dx = y * (g - total) * inv_t
            tl.store(dx_row + start + cols, dx, mask=mask)


# --------------------------------------------------------------------------------------
# launch configuration (shared by the launchers and aot_kernels)
# --------------------------------------------------------------------------------------


def launch_config(V: int) -> tuple[int, int, bool]:
    """(BLOCK, num_warps, SINGLE) the launchers use for rows of width V."""
    block = min(triton.next_power_of_2(max(V, 1)), MAX_BLOCK)
    num_warps = 8 if block >= 4096 else 4 if block >= 1024 else 1 if block <= 128 else 2
    return block, num_warps, V <= block


def _fwd(x: torch.Tensor, inv_t: float, log: bool) -> torch.Tensor:
    n, v = x.shape
    y = torch.empty_like(x)
    if n == 0:
        return y
    block, num_warps, single = launch_config(v)
    with device_guard(x):
        _softmax_fwd_kernel[(n,)](
            x, y, v, inv_t, LOG=log, BLOCK=block, SINGLE=single, num_warps=num_warps,
            num_stages=1,
        )
    return y


def _bwd(g: torch.Tensor, y: torch.Tensor, inv_t: float, log: bool) -> torch.Tensor:
    n, v = y.shape
    g = g.to(y.dtype).contiguous()  # autograd may hand an expanded (stride-0) gradient
    dx = torch.empty_like(y)
    if n == 0:
        return dx
    block, num_warps, single = launch_config(v)
    with device_guard(y):
        _softmax_bwd_kernel[(n,)](
            g, y, dx, v, inv_t, LOG=log, BLOCK=block, SINGLE=single, num_warps=num_warps,
            num_stages=1,
        )
    return dx


# --------------------------------------------------------------------------------------
# torch ops: opaque to torch.compile (no graph break), with fake and autograd registrations
# --------------------------------------------------------------------------------------


@torch.library.custom_op("kdkernels_triton::softmax_fwd", mutates_args=())
def softmax_fwd(x: torch.Tensor, inv_temperature: float, log: bool) -> torch.Tensor:
    return _fwd(x, inv_temperature, log)


@softmax_fwd.register_fake
def _(x, inv_temperature, log):
    return torch.empty_like(x)


@torch.library.custom_op("kdkernels_triton::softmax_bwd", mutates_args=())
def softmax_bwd(
    grad: torch.Tensor, y: torch.Tensor, inv_temperature: float, log: bool
) -> torch.Tensor:
    return _bwd(grad, y, inv_temperature, log)


@softmax_bwd.register_fake
def _(grad, y, inv_temperature, log):
    return torch.empty_like(y)


def _setup_context(ctx, inputs, output):
    _, inv_temperature, log = inputs
    ctx.inv_t, ctx.log = inv_temperature, log
    ctx.save_for_backward(output)


@first_order_only
def _backward(ctx, grad):
    (y,) = ctx.saved_tensors
    return softmax_bwd(grad, y, ctx.inv_t, ctx.log), None, None


softmax_fwd.register_autograd(_backward, setup_context=_setup_context)


def softmax(x: torch.Tensor, inv_temperature: float, log: bool) -> torch.Tensor:
    """softmax(x * inv_temperature) (log_softmax when `log`) of contiguous (N, V) x."""
    return softmax_fwd(x.contiguous(), float(inv_temperature), bool(log))


# --------------------------------------------------------------------------------------
# ahead-of-time compilation configs (see aot.py)
# --------------------------------------------------------------------------------------

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def aot_kernels(V: int, dtype: torch.dtype) -> list[AotKernel]:
    """Every (kernel, constexprs, num_warps) the launchers pick for rows of width V."""
    ptr = "*" + _TRITON_DTYPE[dtype]
    block, num_warps, single = launch_config(V)
    out = []
    for log in (False, True):
        tag = ("log_softmax" if log else "softmax") + ("[one_tile]" if single else "")
        const = {"LOG": log, "BLOCK": block, "SINGLE": single}
        out.append(AotKernel(
            tag.replace("softmax", "softmax_fwd", 1), _softmax_fwd_kernel,
            {"x_ptr": ptr, "y_ptr": ptr, "V": "i32", "inv_t": "fp32",
             "LOG": "constexpr", "BLOCK": "constexpr", "SINGLE": "constexpr"},
            const, num_warps,
        ))
        out.append(AotKernel(
            tag.replace("softmax", "softmax_bwd", 1), _softmax_bwd_kernel,
            {"g_ptr": ptr, "y_ptr": ptr, "dx_ptr": ptr, "V": "i32", "inv_t": "fp32",
             "LOG": "constexpr", "BLOCK": "constexpr", "SINGLE": "constexpr"},
            const, num_warps,
        ))
    return out
