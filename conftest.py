"""Hooks shared by the test suite (tests/) and the benchmark suite (bench/)."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped without a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
