"""C++/CUDA extension backend (impl="ext"): not built yet in this revision."""

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_available(device: torch.device) -> tuple[bool, str]:
    return False, "the C++/CUDA extension is not part of this revision"
