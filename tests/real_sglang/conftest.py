"""The real-SGLang tier: every test talks to SGLang 0.5.23's own server, running on this CPU.

The servers run from the project's SGLang environment (`make install` builds .venv-sglang with
tools/sglang_env.py) and are launched by the project's own `SGLangEngine` with the CPU profile
(`profile: cpu`, rollout/sglang_server.py); no test spells a launch flag. Servers cost about
2.1 GB and 20 s to 2 min each to start, so the tier launches them ONCE (session fixtures; the
tests/conftest.py scheduler keeps the whole tier on one pytest-xdist worker) and tests reset
what they changed (weights and weight version) instead of relaunching.

Run alone:  flock /tmp/s2lpo-heavy.lock .venv/bin/python -m pytest tests/real_sglang -q
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from megatron_s2lpo.config.model import ModelArch
from megatron_s2lpo.config.rollout import EngineConfig
from megatron_s2lpo.rollout.sglang_python import PROJECT_SGLANG_PYTHON, sglang_python
from megatron_s2lpo.utils.ports import server_ports

STARTUP_TIMEOUT_S = 600.0  # a loaded 2-core machine takes up to 2 minutes per server


def tiny_arch(vocab_size: int, *, hidden: int = 32, layers: int = 2) -> ModelArch:
    return ModelArch(family="qwen3", vocab_size=vocab_size, hidden_size=hidden, ffn_hidden_size=2 * hidden,
                     num_layers=layers, num_attention_heads=4, num_query_groups=2, head_dim=8,
                     qk_layernorm=True, tie_word_embeddings=False, max_position_embeddings=256)


def real_engine_config(model_path: str = "", **overrides) -> EngineConfig:
    """An engine of launched real servers with the CPU profile (or attached: pass url/urls)."""
    overrides.setdefault("startup_timeout_s", STARTUP_TIMEOUT_S)
    overrides.setdefault("request_timeout_s", 120.0)
    overrides.setdefault("hang_timeout_s", 120.0)
    if not (overrides.get("url") or overrides.get("urls")):
        overrides.setdefault("ports", server_ports(overrides.get("replicas", 1)))
    return EngineConfig(backend="sglang", model_path=model_path, profile="cpu", **overrides)


@pytest.fixture(scope="session")
def sglang_env() -> str:
    """The interpreter of the project's SGLang environment; the tier fails (not skips) without it."""
    python = sglang_python()
    if python != PROJECT_SGLANG_PYTHON and not os.environ.get("S2LPO_SGLANG_PYTHON"):
        pytest.fail(f"the real-SGLang tier needs {PROJECT_SGLANG_PYTHON} (run `make install`, which runs "
                    "tools/sglang_env.py) or S2LPO_SGLANG_PYTHON naming another SGLang 0.5.23 interpreter")
    return python


@pytest.fixture(scope="session")
def tok():
    from megatron_s2lpo.data.tokenizer import build_synthetic_tokenizer

    return build_synthetic_tokenizer()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tok) -> dict[str, str]:
    """Tiny HF directories (synthetic tokenizer): `learner` (2 layers), `explorer` (1 layer), and
    `learner_alt` (the learner's shape, other weights: a push must change what the server serves)."""
    from megatron_s2lpo.rollout import LocalEngine

    from megatron_s2lpo.config import load_config
    from megatron_s2lpo.trainer.build import _sft_warm_start

    recipe = load_config(str(Path(__file__).resolve().parents[2] / "examples" / "tiny_cpu.yaml"), [])
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for name, arch, seed, sft_steps in (("learner", tiny_arch(len(tok)), 0, 0),
                                        ("learner_alt", tiny_arch(len(tok)), 1, 0),
                                        ("explorer", tiny_arch(len(tok), hidden=32, layers=1), 2, 300)):
        path = str(root / name)
        with torch.random.fork_rng(devices=[]):
            engine = LocalEngine.from_arch(arch, tokenizer=tok, init_seed=seed)
            # The explorer answers about 2 in 3 train prompts greedily after 300 supervised steps (5 s),
            # the learner none: the greedy S2L-PO run's mixed groups have rewards to learn from.
            if sft_steps:
                _sft_warm_start(engine.model, tok, recipe, sft_steps, seed)
        engine.save_pretrained(path)
        dirs[name] = path
    return dirs


@pytest.fixture(scope="session")
def learner_pool(sglang_env, model_dirs, tmp_path_factory):
    """Two real learner replicas, launched once by the project's engine (CPU profile)."""
    from megatron_s2lpo.rollout import SGLangEngine

    logs = tmp_path_factory.mktemp("server-logs")
    engine = SGLangEngine(real_engine_config(model_dirs["learner"], replicas=2), name="learner",
                          log_dir=str(logs), seed=7)
    yield engine
    engine.close()
    shutil.rmtree(logs, ignore_errors=True)


@pytest.fixture(scope="session")
def explorer_server(sglang_env, model_dirs, tmp_path_factory):
    """One real explorer server (the frozen explorer's model), launched once by the project's engine."""
    from megatron_s2lpo.rollout import SGLangEngine

    logs = tmp_path_factory.mktemp("explorer-logs")
    engine = SGLangEngine(real_engine_config(model_dirs["explorer"]), name="explorer", log_dir=str(logs), seed=11)
    yield engine
    engine.close()
    shutil.rmtree(logs, ignore_errors=True)


@pytest.fixture
def fresh_learner_pool(learner_pool, model_dirs):
    """The learner pool at its initial weights and version 0, also after the test changed them."""
    def reset() -> None:
        learner_pool.update_weights_from_disk(model_dirs["learner"], 0)

    reset()
    yield learner_pool
    reset()
