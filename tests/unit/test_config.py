"""Config loading: YAML recipes, dotted overrides, validation messages that name the field."""

import glob
import os

import pytest
import yaml

from megatron_s2lpo.config import RunConfig, config_from_dict, from_dict, load_config, to_dict
from megatron_s2lpo.config import algo as algo_cfg
from megatron_s2lpo.config.base import apply_overrides

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPLORER = ["rollout.explorer.model_path=/models/explorer"]


def test_defaults_are_valid_and_round_trip():
    cfg = RunConfig()
    again = from_dict(RunConfig, to_dict(cfg))
    assert again == cfg
    assert yaml.safe_load(cfg.to_yaml()) == to_dict(cfg)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("run:\n  name: x\nalgo:\n  group_size: 8\n  t_mix: 4\n"
                    "rollout:\n  explorer:\n    model_path: /m\n")
    cfg = load_config(str(path), ["algo.t_mix=6", "algo.clip_high=0.28", "data.eval_paths=[a, b]"])
    assert cfg.run.name == "x"
    assert cfg.algo.group_size == 8 and cfg.algo.t_mix == 6
    assert cfg.algo.clip_high == pytest.approx(0.28)
    assert cfg.data.eval_paths == ["a", "b"]


def test_exponent_without_dot_is_a_float(tmp_path):
    # YAML 1.1 reads 3e-6 as a string; float fields accept it (from files and overrides).
    path = tmp_path / "recipe.yaml"
    path.write_text("learner:\n  optim:\n    lr: 3e-6\n")
    assert load_config(str(path)).learner.optim.lr == pytest.approx(3e-6)
    assert config_from_dict({}, ["learner.optim.lr=2e-5"]).learner.optim.lr == pytest.approx(2e-5)
    with pytest.raises(ValueError, match=r"learner\.optim\.lr must be a number, got 'fast'"):
        config_from_dict({}, ["learner.optim.lr=fast"])


def test_int_is_accepted_for_float_but_not_the_reverse():
    cfg = config_from_dict({}, ["algo.clip_high=1"])
    assert isinstance(cfg.algo.clip_high, float)
    with pytest.raises(ValueError, match=r"algo\.t_mix must be an integer"):
        config_from_dict({}, ["algo.t_mix=2.5"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algo.tmix=3"], r"unknown config field 'algo\.tmix'; did you mean 'algo\.t_mix'"),
        (["algo.t_mix=-1"], r"algo\.t_mix must be >= 0"),
        (["algo.t_mix=abc"], r"algo\.t_mix must be an integer"),
        (["algo.schedule=exp"], r"algo\.schedule must be one of"),
        (["algo.pods.n=8"], r"algo\.pods\.n and algo\.pods\.m"),
        (["algo.pods.n=8", "algo.pods.m=4"], r"algo\.pods\.m \(4\) must equal algo\.group_size"),
        (["rollout.learner.backend=vllm"], r"rollout\.learner\.backend must be one of \['local', 'sglang'\]"),
        (["rollout.learner.sampling.temperature=0"], r"sampling\.temperature must be > 0"),
        (["rollout.learner.sampling.temperature=inf"], r"rollout\.learner\.sampling\.temperature must be a finite"),
        (["rollout.learner.sampling.temperature=.nan"], r"rollout\.learner\.sampling\.temperature must be a finite"),
        (["algo.temperature.end=.inf"], r"algo\.temperature\.end must be a finite number, got inf"),
        (["sync.transport=rdma"], r"sync\.transport must be one of"),
        (["run.num_steps=0"], r"run\.num_steps must be >= 1"),
        (["algo.normalize_std=yes please"], r"algo\.normalize_std must be true or false"),
        (["algo=3"], r"algo must be a mapping"),
        (["algo.t_mix"], r"must look like section\.field=value"),
        (["algo.t_mix=4"], r"algo\.t_mix=4 asks for explorer rollouts"),
        (["sync.transport=tensor"], r"needs rollout\.learner\.backend=sglang"),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict({}, overrides)


def test_a_non_finite_temperature_is_refused_however_the_config_is_made():
    from megatron_s2lpo.config import SamplingConfig
    from megatron_s2lpo.rollout.engine import GenerateRequest

    for value in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="sampling.temperature must be > 0 and finite"):
            SamplingConfig(temperature=value)
        with pytest.raises(ValueError, match="temperature must be > 0 and finite"):
            GenerateRequest(request_id="r", prompt_ids=[1], temperature=value)


def test_a_duplicate_yaml_key_is_refused_naming_the_key_and_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("run:\n  num_steps: 5\nlearner:\n  optim:\n    lr: 1.0e-6\n    lr: 1.0e-5\n")
    with pytest.raises(ValueError, match=rf"config file {path} .*duplicate key 'lr' at line 6 \(first at line 5\)"):
        load_config(str(path))
    path.write_text("algo: {t_mix: 0}\nalgo: {t_mix: 4}\n")  # whole sections too
    with pytest.raises(ValueError, match="duplicate key 'algo' at line 2 \\(first at line 1\\)"):
        load_config(str(path))
    with pytest.raises(ValueError, match="override 'algo.pods=.*duplicate key 'n'"):
        config_from_dict({}, ["algo.pods={n: 8, n: 4}"])


def test_explorer_present_allows_t_mix():
    cfg = config_from_dict({}, ["algo.t_mix=4", *EXPLORER])
    assert cfg.algo.t_mix == 4


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(str(bad))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(str(listy))


def test_override_does_not_mutate_nested_value_types():
    data = apply_overrides({}, ["a.b.c=1", "a.b.d=x", "a.e=null"])
    assert data == {"a": {"b": {"c": 1, "d": "x"}, "e": None}}


def test_config_names_match_algorithm_registries():
    # The config lists names as tuples so it does not import algo/; keep them in step.
    from megatron_s2lpo.algo import losses, pods, schedule

    assert set(algo_cfg.SCHEDULE_NAMES) == set(schedule.SCHEDULES)
    assert set(algo_cfg.LOSS_AGGREGATIONS) == set(losses.AGGREGATIONS)
    assert set(algo_cfg.KL_TYPES) == set(losses.KL_ESTIMATORS)
    assert set(algo_cfg.PODS_SELECTORS) == set(pods.SELECTORS)
    assert set(algo_cfg.TEMPERATURE_SCHEDULES) == set(schedule.TEMPERATURE_SCHEDULES)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "examples", "*.yaml"))))
def test_example_recipes_load(path):
    load_config(path)
