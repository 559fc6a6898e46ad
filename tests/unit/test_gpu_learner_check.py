"""What of benchmarks/gpu_learner_check.py runs without a GPU: arguments, recipes, statistics, the
planner's figure, the refusal without CUDA, and that it needs nothing beyond torch + megatron-core
(+ Transformer Engine on the GPU) and this package."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
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


def test_without_transformer_engine_bf16_runs_on_the_local_spec_and_fp8_says_why():
    hopper = dict(capability=(9, 0), cuda_version="12.9")
    assert check.recipe_skip_reason("bf16", te=False, **hopper) is None
    for recipe in ("fp8-tensorwise", "fp8-blockwise"):
        assert "needs Transformer Engine" in check.recipe_skip_reason(recipe, te=False, **hopper)
        assert check.recipe_skip_reason(recipe, te=True, **hopper) is None
    assert "CUDA 12.9+" in check.recipe_skip_reason("fp8-blockwise", te=True, capability=(9, 0), cuda_version="12.4")
    local = check.learner_config("bf16", 8192, use_te=False)
    assert local.use_te is False and local.pack_sequences and local.token_alignment.pack == 8


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check")
def test_the_one_command_refuses_without_cuda_and_never_writes_over_results(tmp_path):
    """tests/gpu/h100_check.sh: the environment is recorded, then exit 2 naming the missing GPU; a
    results directory that holds something is refused; an unknown argument is a usage error."""
    script = REPO / "tests" / "gpu" / "h100_check.sh"
    env = {**os.environ, "PYTHON": sys.executable}

    def run(*args):
        return subprocess.run(["bash", str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=240)

    out = tmp_path / "results"
    first = run("--out", str(out))
    assert first.returncode == 2 and "no CUDA device" in first.stdout + first.stderr, first.stderr
    recorded = (out / "environment.txt").read_text()
    assert "version set: ngc_pytorch" in recorded and f"torch {torch.__version__}" in recorded
    again = run("--out", str(out))
    assert again.returncode == 2 and "already holds results" in again.stderr
    assert (out / "environment.txt").read_text() == recorded
    bad = run("--steps", "3")
    assert bad.returncode == 2 and "usage: bash tests/gpu/h100_check.sh" in bad.stderr
    # --wheels: installed offline into a temporary directory (removed at exit) before the GPU check
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    empty = run("--out", str(tmp_path / "r2"), "--wheels", str(wheels))
    assert empty.returncode == 2 and "no .whl file there" in empty.stderr
    with zipfile.ZipFile(wheels / "s2lpo_probe-1.0-py3-none-any.whl", "w") as whl:
        whl.writestr("s2lpo_probe/__init__.py", "")
        whl.writestr("s2lpo_probe-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: s2lpo-probe\nVersion: 1.0\n")
        whl.writestr("s2lpo_probe-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                     "Tag: py3-none-any\n")
        whl.writestr("s2lpo_probe-1.0.dist-info/RECORD", "")
    installed = run("--out", str(tmp_path / "r2"), "--wheels", str(wheels))
    assert installed.returncode == 2 and "no CUDA device" in installed.stdout, installed.stderr
