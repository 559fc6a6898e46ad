"""What of benchmarks/gpu_learner_check.py runs without a GPU: arguments, recipes, statistics, the
planner's figure, the refusal without CUDA, and that it needs nothing beyond torch + megatron-core
(+ Transformer Engine on the GPU) and this package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_learner_check as check  # noqa: E402


def test_arguments_and_recipes():
    args = check.parse_args([])
    assert args.recipes.split(",") == ["bf16", "fp8-tensorwise", "fp8-blockwise"] and args.steps == 3
    with pytest.raises(SystemExit):
        check.parse_args(["--recipes", "fp8-delayed"])
    configs = {r: check.learner_config(r, 8192) for r in check.RECIPES}
    assert configs["fp8-blockwise"].token_alignment.pack == 128 and configs["fp8-tensorwise"].token_alignment.pack == 16
    assert all(c.pack_sequences and c.use_te and c.logprob_tokens == 4 * 8192 for c in configs.values())


def test_ratio_statistics():
    old = torch.zeros(2, 4)
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.float)
    same = check.ratio_statistics(old.clone(), old, mask)
    assert same == {"ratio_mean": 1.0, "ratio_max": 1.0, "clip_frac": 0.0, "mean_abs_logprob_diff": 0.0, "tokens": 5}
    new = old.clone()
    new[0, 1] = 0.5  # ratio e^0.5 = 1.65: clipped at 0.2
    stats = check.ratio_statistics(new, old, mask)
    assert stats["clip_frac"] == pytest.approx(0.2) and stats["ratio_max"] == pytest.approx(1.6487, abs=1e-4)


def test_planner_figure_counts_what_the_allocator_counts():
    from megatron_s2lpo.planner.estimate import estimate_learner

    config = check.learner_config("bf16", 8192)
    figure = check.planner_allocated_bytes(config, 4096)
    full = estimate_learner(check.ARCH, config, dp_size=1, max_seq_len=4096, with_reference=False).peak
    assert 20 * 2**30 < figure < full  # weights + grads + Adam of 1.7B alone are 29 GB
    assert full - figure == pytest.approx(sum(i.bytes for i in estimate_learner(
        check.ARCH, config, dp_size=1, max_seq_len=4096, with_reference=False).items if i.name in check.NOT_ALLOCATOR))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check")
def test_without_cuda_it_says_so_and_imports_only_what_it_needs():
    code = ("import sys; sys.argv = ['x']; sys.path.insert(0, 'benchmarks'); import gpu_learner_check as c; "
            "bad = sorted(m for m in ('transformers', 'sglang', 'nemo_run', 'math_verify', 'aiohttp') "
            "if m in sys.modules); print('EXTRA', bad); sys.exit(c.main([]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert out.returncode == 2 and "needs a CUDA GPU" in out.stderr, out.stderr
    assert "EXTRA []" in out.stdout
