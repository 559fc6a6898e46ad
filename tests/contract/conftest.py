"""The contract tier: the project's requests and call sequences checked by SGLang 0.5.23's own code.

SGLang's source comes from its wheel (`sglang_env.fetch`, run by `make install`; fetched here if
the cache is missing) and runs inside contract-mode protocol servers, never in the test process.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sglang_env  # noqa: E402


@pytest.fixture(scope="session")
def sglang_source() -> str:
    """The unpacked SGLang 0.5.23 wheel (downloaded once into .venv/sglang-0.5.23/)."""
    return sglang_env.fetch()


@pytest.fixture(scope="module")
def tok():
    """The synthetic task's character tokenizer (built offline, in milliseconds)."""
    from megatron_s2lpo.data.tokenizer import build_synthetic_tokenizer

    return build_synthetic_tokenizer()
