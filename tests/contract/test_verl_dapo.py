"""reward.overlong against verl's own DAPORewardManager (verl 0.9.1's wheel, run in a process of its
own by verl_dapo_reference.py): the same response lengths, scores and settings give the same
rewards. verl computes the penalty on float32 tensors, the project in float64: they agree to
float32 rounding. Dynamic sampling is compared with verl's trainer loop in
tests/unit/test_dynamic_sampling.py (that loop cannot run outside Ray)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

import verl_env
from megatron_s2lpo.reward.overlong import overlong_penalty

HERE = os.path.dirname(os.path.abspath(__file__))


def verl_rewards(cases: list[dict]) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([verl_env.fetch(), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, os.path.join(HERE, "verl_dapo_reference.py")], input=json.dumps(cases),
                          capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_overlong_penalty_equals_verls_dapo_reward_manager() -> None:
    rng = random.Random(0)
    cases = [{"max_resp_len": 20, "buffer_len": 4, "penalty_factor": 1.0, "lengths": list(range(1, 21)),
              "scores": [1.0, 0.0] * 10},
             {"max_resp_len": 16, "buffer_len": 16, "penalty_factor": 0.5, "lengths": [1, 8, 15, 16],
              "scores": [1.0, 1.0, -1.0, 0.0]},  # the buffer is the whole limit
             {"max_resp_len": 48, "buffer_len": 7, "penalty_factor": 1.3,
              "lengths": [rng.randint(1, 48) for _ in range(40)],
              "scores": [rng.choice([0.0, 1.0]) for _ in range(40)]}]
    for case, verl in zip(cases, verl_rewards(cases), strict=True):
        ours = [score + overlong_penalty(n, max_tokens=case["max_resp_len"], buffer_tokens=case["buffer_len"],
                                         penalty_factor=case["penalty_factor"])
                for n, score in zip(case["lengths"], case["scores"], strict=True)]
        assert verl["rewards"] == pytest.approx(ours, abs=1e-6), case
        penalties = [r - s for r, s in zip(ours, case["scores"], strict=True)]
        assert verl["overlong_reward"] == pytest.approx(penalties, abs=1e-6), case
        assert any(p < 0 for p in penalties) and any(p == 0 for p in penalties) or case["buffer_len"] == 16
