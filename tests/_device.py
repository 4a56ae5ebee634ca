"""The device the tests run on, for test modules and the processes they spawn.

Here rather than in conftest.py: a spawned worker re-imports its test module, and there
`conftest` may resolve to the repository's root conftest.py (which the benchmarks share)."""

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def float64_device(impl):
    """Where `impl` runs float64: the test device, but the CPU for impl="ext" (its CUDA
    kernels take float16/bfloat16/float32 only, its CPU kernel also float64)."""
    return torch.device("cpu") if impl == "ext" else DEVICE
