"""Helpers every backend shares: accumulation dtype, row chunking, in-place gradient rescale."""

from __future__ import annotations

import functools

import torch

# Elements per row chunk of the chunked torch paths: 2**22 float32 = 16 MiB for each of the
# few temporaries of a chunk.
CHUNK_ELEMENTS = 1 << 22


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_rows(n_rows: int, n_cols: int) -> int:
    """Rows per chunk so that a chunk holds about CHUNK_ELEMENTS elements (at least 1 row)."""
    return max(1, min(n_rows, CHUNK_ELEMENTS // max(n_cols, 1)))


def strided_rows(x: torch.Tensor) -> bool:
    """Whether the kernels read the (N, V) tensor x as it is: each row's elements adjacent
    (stride 1 along V) and rows stride(0) >= V apart. Any row stride is fine, so a view of
    the first columns of wider logits is read in place, never copied."""
    n, v = x.shape
    return (v <= 1 or x.stride(1) == 1) and (n <= 1 or x.stride(0) >= v)


def row_chunks(n_rows: int, n_cols: int):
    """(i, j) bounds of the row chunks of an (n_rows, n_cols) tensor."""
    step = chunk_rows(n_rows, n_cols)
    for i in range(0, n_rows, step):
        yield i, min(i + step, n_rows)


def scale_rows_(grad_rows, *grads):
    """Multiply gradients computed for an upstream gradient of 1 per row (inplace_backward)
    by the real row gradients, in place; None entries pass through."""
    g = grad_rows[:, None]
    return tuple(None if x is None else x.mul_(g.to(x.dtype)) for x in grads)


def take_inplace_grads(ctx):
    """The gradients an inplace_backward forward left on ctx, once: they live in the
    student's buffer, so a second backward (retain_graph=True) has nothing left to return."""
    grads = getattr(ctx, "grads", None)
    if grads is None:
        raise RuntimeError(
            "inplace_backward=True: the gradient was written over student_logits and is "
            "consumed by the first backward; a second backward through the same loss "
            "(retain_graph=True) needs inplace_backward=False"
        )
    del ctx.grads
    return grads


def first_order_only(backward):
    """Decorates an autograd backward that is not itself differentiable: under
    create_graph=True (double backward, Hessian-vector products) it raises instead of
    returning gradients whose own derivatives would be silently wrong or zero."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "kdkernels losses provide first derivatives only: backward with "
                "create_graph=True (double backward) is not supported"
            )
        return backward(ctx, *grads)

    return wrapper
