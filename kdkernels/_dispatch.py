"""Choosing the implementation (`impl=`) that computes a loss.

A backend is a module with this interface (all shapes already normalized by functional.py):

    SUPPORTED_DTYPES: tuple of torch dtypes it accepts (optionally narrowed per device by
        supported_dtypes(device) -> tuple)
    is_available(device: torch.device) -> tuple[bool, str]   # (ok, why not)

    The row-statistics interface (kdkernels/_stats.py: the table layout, merge, finish),
    on a column range [offset, offset + Vr) of rows with GLOBAL labels:
    partial(s, t, labels, spec, offset) -> (N, NCOL) statistics table
    mix_partial(s, t, spec, stats, offset) -> (N, 4) a two-pass kind's sums (mixture, tvd,
        alpha_beta), given global stats
    grads(s, t, labels, spec, stats, offset, grad_rows, need_teacher, out=None, out_t=None)
        -> (gs, gt or None); out / out_t: (N, Vr) tensors (any row stride) to write them into
    Logits (and out, out_t) have stride 1 along V and any row stride (_common.strided_rows):
    the first columns of wider logits are read in place (kd_loss's vocab_size, _vocab.py).

    The sparse (top-k) teacher's two student kernels (kdkernels/sparse.py has the contract):
    sparse_partial(s, labels, spec, offset) -> (N, NCOL) table, the student columns only
    sparse_grads(s, labels, spec, stats, coef, ids, w, offset) -> gs

    Whole rows, with autograd (what kd_loss calls without a process_group; the same math as
    partial + finish + grads, fused where the backend can):
    kd_rows(s, t, labels, spec, inplace_backward) -> Tensor (N,)
        s, t: (N, V) logits; labels: (N,) int64 or None; spec: LossSpec.
        Returns each row's loss (float32, float64 for float64 logits) with autograd to s
        (and to t when t.requires_grad); rows with label == ignore_index are 0.
    kl_div(input, target, log_target, reduce_sum) -> Tensor
        Elementwise F.kl_div terms of 1-D contiguous input/target; their sum when reduce_sum.
    softmax(x, inv_temperature, log) -> Tensor (N, V) in x.dtype, with autograd.

"auto" picks: CUDA tensor -> triton, else ext, else torch; CPU tensor -> ext's CPU kernel if
built, else torch. On CUDA Triton comes first because it is the better-proven path: its kernel
code has executed (under the interpreter) in every test, while the CUDA extension has only been
compiled (its math runs in the CPU kernel); run `python -m kdkernels.selfcheck` on a new GPU.
KDKERNELS_IMPL=<impl> replaces "auto" (an explicit impl= argument wins). An explicit impl that
cannot run here is an error, never a silent fallback.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from . import ext, reference
from . import triton as triton_backend

IMPLS = ("auto", "torch", "triton", "ext")

# Imported eagerly (each is cheap: kernels load and the extension builds on first use) so
# that torch.compile never has to trace an import.
_BACKENDS: dict[str, ModuleType] = {"torch": reference, "triton": triton_backend, "ext": ext}


def supported_dtypes(name: str, device: torch.device) -> tuple:
    """The dtypes backend `name` takes on `device`: its SUPPORTED_DTYPES, or what its
    supported_dtypes(device) says where they depend on the device."""
    backend = _BACKENDS[name]
    return getattr(backend, "supported_dtypes", lambda _: backend.SUPPORTED_DTYPES)(device)


def _usable(name: str, device: torch.device, dtypes) -> tuple[bool, str]:
    ok, why = _BACKENDS[name].is_available(device)
    if not ok:
        return False, why
    supported = supported_dtypes(name, device)
    bad = [d for d in dtypes if d not in supported]
    if bad:
        return False, f"impl={name!r} supports dtypes {supported} on {device}, got {bad[0]}"
    return True, ""


def _resolve_name(impl: str, device: str, dtypes: tuple) -> str:
    # Runs once per compiled graph (dynamo treats the result as a constant): availability
    # checks may build the extension or take locks, which must not be traced.
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = os.environ.get("KDKERNELS_IMPL", "auto") or "auto"
        if impl not in IMPLS:
            raise ValueError(f"KDKERNELS_IMPL must be one of {IMPLS}, got {impl!r}")
    dev = torch.device(device)
    if impl != "auto":
        ok, why = _usable(impl, dev, dtypes)
        if not ok:
            raise RuntimeError(f"impl={impl!r} cannot run on {dev}: {why}")
        return impl
    order = ("triton", "ext", "torch") if dev.type == "cuda" else ("ext", "torch")
    for name in order:
        if _usable(name, dev, dtypes)[0]:
            return name
    return "torch"


# torch.compiler.assume_constant_result(fn) only sets this attribute, but importing it pulls in
# torch._dynamo (seconds at `import kdkernels`); tests/test_compile.py proves it still works.
_resolve_name._dynamo_marked_constant = True


def resolve(impl: str, device: torch.device, dtypes=()) -> ModuleType:
    """Return the backend module for `impl` on `device` for tensors of `dtypes`."""
    if impl not in IMPLS:  # checked here too: the error must name the argument eagerly
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return _BACKENDS[_resolve_name(impl, str(device), tuple(dtypes))]
