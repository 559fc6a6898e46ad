"""benchmarks/methods_bench.py without training: every method's overrides make a valid config of
both tiny recipes, the token-level baseline anneals to the recipe's temperature, and user
mistakes are usage errors naming what was wrong."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from megatron_s2lpo.config import config_from_dict, load_config

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("methods_bench", BENCH / "methods_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["methods_bench"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("recipe", ["paper", "strong_explorer"])
def test_every_method_is_a_valid_config(bench, recipe, tmp_path):
    args = bench.parse_args(["--recipe", recipe, "--out", str(tmp_path), "--arm", "lr: learner.optim.lr=3e-4"])
    base, arms, num_steps = bench.plan(args)
    assert list(arms) == ["grpo", "temperature", "s2lpo", "lr"] and num_steps == 200
    assert "run.eval_at_start=true" in base and "run.eval_temperature=1.0" in base and "run.save_every=20" in base
    cfgs = {m: load_config(args.config, base + extra) for m, extra in arms.items()}
    assert cfgs["grpo"].algo.t_mix == 0 and cfgs["s2lpo"].algo.t_mix == 100 and cfgs["lr"].algo.t_mix == 100
    t = cfgs["temperature"]
    assert t.algo.t_mix == 0 and t.rollout.learner.sampling.temperature == 1.5
    assert (t.algo.temperature.schedule, t.algo.temperature.end, t.algo.temperature.steps) == ("linear", 1.0, 100)
    assert {c.run.eval_temperature for c in cfgs.values()} == {1.0}
    assert args.pair_list == [("temperature", "grpo"), ("s2lpo", "grpo"), ("lr", "grpo"), ("s2lpo", "temperature")]
    # every seed gets its own warm starts, shared by the methods that keep the recipe's
    runs = bench.seed_runs(3, args, base, arms)
    paths = {m: load_config(args.config, r[1]).rollout.learner.model_path for m, r in runs.items()}
    assert len(set(paths.values())) == 1 and paths["grpo"].startswith(str(tmp_path / "warm_starts" / "l3-e4-"))


@pytest.mark.parametrize("argv, message", [
    (["--arm", "grpo: algo.t_mix=0"], "not one of"),
    (["--arm", "x: lr"], "are not dotted overrides"),
    (["--methods", "grpo,nope"], "unknown: ['nope']"),
    (["--pairs", "s2lpo-grpo"], "each pair is A:B"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--passk-splits", "test"], "heldout and/or train"),
])
def test_usage_errors(bench, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_a_misspelled_override_is_refused_by_name(bench, tmp_path, capsys):
    assert bench.main(["--set", "algo.tmix=3", "--out", str(tmp_path / "out")]) == 2
    assert "unknown config field 'algo.tmix'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_config_field_added_after_a_run_started_is_no_difference_at_its_default(bench, tmp_path):
    args = bench.parse_args(["--out", str(tmp_path), "--methods", "grpo,temperature"])
    base, arms, _ = bench.plan(args)
    runs = bench.seed_runs(1, args, base, arms)
    new = runs["temperature"][2]
    defaults = bench.settings_dict(config_from_dict({}), str(tmp_path))  # every field at its default
    at_default = next(k for k in sorted(new) if k.startswith("algo.pods.") and new[k] == defaults[k])
    assert new["algo.temperature.steps"] != defaults["algo.temperature.steps"]
    # a run recorded by code without those fields
    old = {k: v for k, v in new.items() if k not in (at_default, "algo.temperature.steps")}
    assert bench.differences(old, new) == ["algo.temperature.steps: '(absent)' -> 100"]
    # a changed value and a field the code no longer has are still differences
    old = {**new, "algo.clip_high": 0.3, "algo.gone": 1}
    assert bench.differences(old, new) == ["algo.clip_high: 0.3 -> 0.28", "algo.gone: 1 -> '(absent)'"]
