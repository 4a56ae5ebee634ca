"""Shared fixtures. Without a GPU the Triton kernels run on CPU under TRITON_INTERPRET=1;
Triton reads the variable when a kernel is decorated, so it is set before any kernel module
is imported (kdkernels.triton imports its kernels lazily)."""

import os
import tempfile

import pytest
import torch
from _device import DEVICE

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Inductor's on-disk cache keys do not cover a custom op's Python fake kernel: a graph cached
# before an op's output shapes changed would be reused and fail. Each test session compiles
# into its own cache.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="kdkernels-inductor-"))

# Every implementation is tested through the public API. None is skipped on CPU: an impl
# that cannot run here (e.g. the extension failed to build) fails its tests.
IMPLS = ("torch", "triton", "ext")

@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def tensors_on_device(device):
    """New tensors are created on the test device (CUDA when present, so Triton runs its
    compiled kernels there); a no-op on CPU."""
    if device.type == "cpu":
        yield
    else:
        with torch.device(device):
            yield
