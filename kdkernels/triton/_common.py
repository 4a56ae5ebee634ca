"""Pieces shared by the Triton kernel modules."""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import torch


class AotKernel(NamedTuple):
    """One kernel launch configuration, as the launcher would choose it, for AOT compilation.

    Each kernel module defines `aot_kernels(V: int, dtype: torch.dtype) -> list[AotKernel]`
    listing every (kernel, constexprs, num_warps) its launchers can pick for rows of width V
    in that dtype; aot.py compiles them for sm_80 / sm_90 and reports registers and spills.
    """

    name: str  # label in the report, e.g. "kd_fwd[forward_kl]"
    fn: Any  # the @triton.jit function
    signature: dict[str, str]  # arg name -> "*bf16", "*fp32", "i32", "i64", "fp32", "constexpr"
    constexprs: dict[str, Any]  # constexpr arg name -> value
    num_warps: int
    num_stages: int = 1


def text_table(head: tuple, body: list) -> str:
    """Columns of strings padded to their widest cell, ` | `-separated, under a rule."""
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(head)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


def device_guard(x: torch.Tensor):
    """The context to launch a kernel on x: Triton launches on the CURRENT device's current
    stream, so tensors on cuda:1 while cuda:0 is current need cuda:1 made current (and its
    stream is then the one used). Nothing for CPU tensors (the interpreter)."""
    if x.device.type == "cuda":
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()
