"""GPU tier: Transformer Engine, FP8, NCCL and real SGLang. Skipped on machines without CUDA."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (GPU tier)")
    for item in items:
        if "tests/gpu/" in str(item.fspath):
            item.add_marker(skip)
