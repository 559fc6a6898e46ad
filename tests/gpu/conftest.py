"""GPU tier (tests/gpu): the learner, the local engine, weight sync and the distillation objectives
on one CUDA device. Skipped on machines without CUDA.

    python -m pytest tests/gpu          # on a CUDA machine with megatron-core installed
    bash tests/gpu/h100_check.sh        # this tier and benchmarks/gpu_learner_check.py, one command
"""

import os

import pytest
import torch

# Transformer Engine reads this once, at import (megatron imports TE as soon as it is imported):
# the blockwise FP8 tests need the learner's default, fp32 scales, whichever test imports TE first.
os.environ.setdefault("NVTE_FP8_BLOCK_SCALING_FP32_SCALES", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (GPU tier)")
    for item in items:
        if "tests/gpu/" in str(item.fspath):
            item.add_marker(skip)
