"""Fixtures shared by the unit tests."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run tiny models single-threaded: on a shared 2-core machine that is far faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    """The synthetic task's character tokenizer (built offline, in milliseconds)."""
    from megatron_s2lpo.data.tokenizer import build_synthetic_tokenizer

    return build_synthetic_tokenizer()
