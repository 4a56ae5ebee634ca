"""Choosing the implementation (`impl=`) that computes a loss.

A backend is a module with this interface (all shapes already normalized by functional.py):

    SUPPORTED_DTYPES: tuple of torch dtypes it accepts
    is_available(device: torch.device) -> tuple[bool, str]   # (ok, why not)
    kd_rows(s, t, labels, spec, inplace_backward) -> Tensor (N,)
        s, t: (N, V) contiguous logits; labels: (N,) int64 or None; spec: LossSpec.
        Returns each row's loss (float32, float64 for float64 logits) with autograd to s
        (and to t when t.requires_grad); rows with label == ignore_index are 0.
    kl_div(input, target, log_target, reduce_sum) -> Tensor
        Elementwise F.kl_div terms of 1-D contiguous input/target; their sum when reduce_sum.
    softmax(x, inv_temperature, log) -> Tensor (N, V) in x.dtype, with autograd.

"auto" picks: CUDA tensor -> ext if built, else triton; CPU tensor -> ext's CPU kernel if
built, else torch. KDKERNELS_IMPL=<impl> replaces "auto" (an explicit impl= argument wins).
An explicit impl that cannot run here is an error, never a silent fallback.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

IMPLS = ("auto", "torch", "triton", "ext")

_MODULES = {
    "torch": "kdkernels.reference",
    "triton": "kdkernels.triton",
    "ext": "kdkernels.ext",
}


def _load(name: str) -> ModuleType:
    return importlib.import_module(_MODULES[name])


def _usable(name: str, device: torch.device, dtypes) -> tuple[bool, str]:
    try:
        backend = _load(name)
    except ImportError as e:  # a backend whose dependencies are missing
        return False, f"impl={name!r} cannot be imported: {e}"
    ok, why = backend.is_available(device)
    if not ok:
        return False, why
    bad = [d for d in dtypes if d not in backend.SUPPORTED_DTYPES]
    if bad:
        return False, (
            f"impl={name!r} supports dtypes {backend.SUPPORTED_DTYPES}, got {bad[0]}"
        )
    return True, ""


def resolve(impl: str, device: torch.device, dtypes=()) -> ModuleType:
    """Return the backend module for `impl` on `device` for tensors of `dtypes`."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = os.environ.get("KDKERNELS_IMPL", "auto") or "auto"
        if impl not in IMPLS:
            raise ValueError(f"KDKERNELS_IMPL must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        ok, why = _usable(impl, device, dtypes)
        if not ok:
            raise RuntimeError(f"impl={impl!r} cannot run on {device}: {why}")
        return _load(impl)
    order = ("ext", "triton", "torch") if device.type == "cuda" else ("ext", "torch")
    for name in order:
        if _usable(name, device, dtypes)[0]:
            return _load(name)
    return _load("torch")
