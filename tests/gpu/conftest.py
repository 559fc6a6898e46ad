"""GPU tier (tests/gpu): the learner, the local engine, weight sync and the distillation objectives
on one CUDA device. Skipped on machines without CUDA.

    python -m pytest tests/gpu          # on a CUDA machine with megatron-core installed
"""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (GPU tier)")
    for item in items:
        if "tests/gpu/" in str(item.fspath):
            item.add_marker(skip)
