"""Triton backend (impl="triton"). See kdkernels/_dispatch.py for the backend interface.

Kernel modules are imported lazily: Triton reads TRITON_INTERPRET when a kernel is
decorated, so tests running on CPU set it before the first call reaches here.

    kd.py       kd_loss: online-softmax forward / fused backward of every divergence (+ CE),
                and the row-statistics interface of kdkernels/_stats.py (partial,
                mix_partial, grads) over a range of columns
    kl_div.py   F.kl_div's elementwise terms and their sum
    softmax.py  softmax / log_softmax with a temperature
    sparse.py   sparse (top-k) teachers: the student's statistics of a range and the
                gradient with the K gathered columns' terms (sparse_partial, sparse_grads)
    aot.py      ahead-of-time compilation for sm_80 / sm_90 and the register/spill report
"""

from __future__ import annotations

import os
import sys
import types

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def is_available(device: torch.device) -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton is not installed ({e})"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 to run on CPU)"


def kd_rows(s, t, labels, spec, inplace_backward=False):
    from .kd import kd_rows as run

    return run(s, t, labels, spec, inplace_backward)


def partial(s, t, labels, spec, offset=0):
    from .kd import partial as run

    return run(s, t, labels, spec, offset)


def mix_partial(s, t, spec, stats, offset=0):
    from .kd import mix_partial as run

    return run(s, t, spec, stats, offset)


def grads(s, t, labels, spec, stats, offset, grad_rows, need_teacher, out=None, out_t=None):
    from .kd import grads as run

    return run(s, t, labels, spec, stats, offset, grad_rows, need_teacher, out, out_t)


def sparse_partial(s, labels, spec, offset=0):
    from .sparse import sparse_partial as run

    return run(s, labels, spec, offset)


def sparse_grads(s, labels, spec, stats, coef, ids, w, offset=0):
    from .sparse import sparse_grads as run

    return run(s, labels, spec, stats, coef, ids, w, offset)


def kl_div(x, y, log_target, reduce_sum):
    from .kl_div import kl_div as run

    return run(x, y, log_target, reduce_sum)


def softmax(x, inv_temperature, log):
    from .softmax import softmax as run

    return run(x, inv_temperature, log)


# Importing a submodule sets it as an attribute of its package (importlib does
# setattr(package, "softmax", module)), and softmax.py / kl_div.py share their names with the
# entry points above, so importing them (aot.py, tests, the first call) would replace the
# functions of the backend interface with modules. The package refuses that one binding; the
# modules stay reachable through sys.modules, importlib.import_module and `from .x import y`.
_ENTRY_POINTS = ("kd_rows", "kl_div", "softmax")


class _Backend(types.ModuleType):
    def __setattr__(self, name, value):
        if name in _ENTRY_POINTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Backend
