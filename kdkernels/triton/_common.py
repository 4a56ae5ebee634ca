"""Pieces shared by the Triton kernel modules."""

from __future__ import annotations

from typing import Any, NamedTuple


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
