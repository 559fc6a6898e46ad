"""PODS inside the trainer: every prompt keeps exactly m of its n rollouts, with the largest
reward variance any m-subset has (brute force over all subsets), chosen across both sources.

Runs the real trainer in this process (megatron learner on gloo, local engines, math-verify)
with a spy around the trainer's `pods_downsample`; the selection is checked on the groups the
trainer really collected, and the logged pods/* counters against the kept groups.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from megatron_s2lpo.trainer.metrics import read_metrics
from megatron_s2lpo.types import Source

REPO_ROOT = Path(__file__).resolve().parents[2]
N, M = 6, 3


def max_variance_brute_force(rewards: list[float], m: int) -> float:
    return max(torch.tensor(subset, dtype=torch.float64).var(unbiased=False).item()
               for subset in itertools.combinations(rewards, m))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_trainer_keeps_m_rollouts_of_maximum_variance(tmp_path: Path, monkeypatch) -> None:
    import megatron_s2lpo.trainer.loop as train_module
    from megatron_s2lpo.config import load_config
    from megatron_s2lpo.learner.parallel import destroy_parallel

    calls = []
    real = train_module.pods_downsample

    def spy(groups, m, method, generator):
        kept = real(groups, m, method, generator)
        calls.append((groups, kept))
        return kept

    monkeypatch.setattr(train_module, "pods_downsample", spy)
    cfg = load_config(str(REPO_ROOT / "examples" / "tiny_cpu.yaml"), [
        "run.num_steps=3", "run.save_every=0", "run.eval_every=0", f"run.output_dir={tmp_path}",
        "data.prompts_per_step=6", f"algo.group_size={M}", f"algo.pods.n={N}", f"algo.pods.m={M}",
        "algo.t_mix=3", "algo.mini_batches_per_step=1", "rollout.learner.init_sft_steps=60",
        "rollout.explorer.init_sft_steps=60", "sync.parity_every=0"])
    try:
        train_module.run_training(cfg)
    finally:
        destroy_parallel()
    assert len(calls) == 3
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    mixed = 0
    for (generated, kept), record in zip(calls, records):
        assert len(kept) == len(generated) == 6
        for before, after in zip(generated, kept):
            assert len(before.rollouts) == N and len(after.rollouts) == M
            assert all(any(r is g for g in before.rollouts) for r in after.rollouts)  # a subset, no copies
            kept_var = torch.tensor(after.rewards(), dtype=torch.float64).var(unbiased=False).item()
            assert kept_var == pytest.approx(max_variance_brute_force(before.rewards(), M), abs=1e-12)
            mixed += 0 < after.num_from(Source.EXPLORER) < M
        for source in Source:
            assert record[f"pods/generated_{source.value}"] == sum(g.num_from(source) for g in generated)
            assert record[f"pods/kept_{source.value}"] == sum(g.num_from(source) for g in kept)
        assert record["pods/kept_explorer"] + record["pods/kept_learner"] == 6 * M
        assert record["share/explorer"] == pytest.approx(record["pods/kept_explorer"] / (6 * M))
    assert mixed > 0, "no kept group mixed both sources: the selection was not exercised across them"
