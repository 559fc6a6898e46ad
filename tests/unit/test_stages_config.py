"""Config of methods and multi-stage runs: stage -> single-run mapping, validation messages,
the learner's temperature schedule."""

import os

import pytest

from megatron_s2lpo.algo.schedule import sampling_temperature
from megatron_s2lpo.config import EngineConfig, RunConfig, config_from_dict, load_config, stage_run_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BRIDGE = os.path.join(REPO, "examples", "tiny_bridge_cpu.yaml")
ARCH = {"family": "qwen3", "vocab_size": 101, "hidden_size": 32, "ffn_hidden_size": 64, "num_layers": 1,
        "num_attention_heads": 4, "num_query_groups": 2, "head_dim": 8}


def staged(*stages: dict, **sections) -> dict:
    return {"models": {"teacher": {"model_path": "/m/teacher"}, "student": {"init_arch": ARCH}},
            "stages": list(stages), **sections}


def test_bridge_recipe_maps_every_stage_to_a_single_run():
    cfg = load_config(BRIDGE)
    assert [s.name for s in cfg.stages] == ["teacher_grpo", "warmup", "opd", "student_grpo", "direct_grpo"]
    assert isinstance(cfg.models["teacher"], EngineConfig)
    assert cfg.models["student_direct"] == cfg.models["student"]  # the baseline starts from the same student
    paths = {"teacher": "/out/teacher_hf", "student": "/out/student_hf", "student_direct": "/out/direct_hf"}
    runs = [stage_run_config(cfg, i, paths) for i in range(len(cfg.stages))]
    assert [r.algo.method for r in runs] == ["grpo", "forward_kl", "opd", "grpo", "grpo"]
    assert [r.rollout.learner.model_path for r in runs] == (["/out/teacher_hf"] + ["/out/student_hf"] * 3
                                                            + ["/out/direct_hf"])
    assert all(r.rollout.learner.init_arch is None for r in runs)  # loaded, not rebuilt
    assert runs[1].rollout.teacher.model_path == runs[2].rollout.teacher.model_path == "/out/teacher_hf"
    assert [r.run.num_steps for r in runs] == [s.num_steps for s in cfg.stages]
    dirs = [r.run.output_dir for r in runs]
    assert dirs[0].endswith(os.path.join("stages", "01-teacher_grpo")) and len(set(dirs)) == 5
    assert all(not r.stages and not r.models for r in runs)


def test_stage_overrides_apply_to_their_stage_only():
    cfg = config_from_dict(staged(
        {"name": "a", "method": "grpo", "policy": "teacher", "num_steps": 3},
        {"name": "b", "method": "s2lpo", "policy": "student", "frozen": "teacher", "num_steps": 4,
         "overrides": ["algo.t_mix=2", "learner.optim.lr=0.01"]}))
    first, second = stage_run_config(cfg, 0), stage_run_config(cfg, 1)
    assert first.algo.t_mix == 0 and first.learner.optim.lr == pytest.approx(1e-6)
    assert second.algo.t_mix == 2 and second.learner.optim.lr == pytest.approx(0.01)
    assert second.rollout.explorer.model_path == "/m/teacher"  # s2lpo: the frozen model explores
    assert second.rollout.learner.init_arch is not None  # no trained version yet: built from code


@pytest.mark.parametrize("stage, message", [
    ({"name": "x", "method": "ppo", "policy": "student"}, r"method must be one of"),
    ({"name": "x", "method": "opd", "policy": "student"}, r"needs frozen: <model> \(its teacher\)"),
    ({"name": "x", "method": "grpo", "policy": "student", "frozen": "teacher"}, r"trains alone; remove frozen"),
    ({"name": "x", "method": "grpo", "policy": "nobody"}, r"unknown model 'nobody'"),
    ({"name": "x", "method": "s2lpo", "policy": "student", "frozen": "teacher"}, r"set algo\.t_mix > 0"),
    ({"name": "x", "method": "grpo", "policy": "student", "overrides": ["algo.clip_low=2"]},
     r"stage x \(1 of 1\): algo\.clip_low must be in"),
    ({"name": "x", "method": "grpo", "policy": "student", "overrides": ["run.num_steps=4"]},
     r"is set by the stage itself"),
    ({"name": "a b", "method": "grpo", "policy": "student"}, r"names a directory"),
])
def test_bad_stages_are_rejected_at_load_time(stage, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(staged(stage))


def test_stage_names_are_unique_and_models_live_in_models():
    one = {"name": "x", "method": "grpo", "policy": "student"}
    with pytest.raises(ValueError, match="stage names must be unique"):
        config_from_dict(staged(one, one))
    with pytest.raises(ValueError, match=r"remove the model of rollout\.learner"):
        config_from_dict(staged(one, rollout={"learner": {"model_path": "/m/x"}}))


@pytest.mark.parametrize("overrides, message", [
    (["algo.method=opd"], r"algo\.method=opd needs the teacher: set rollout\.teacher"),
    (["algo.method=forward_kl", "rollout.teacher.model_path=/t", "algo.t_mix=4",
      "rollout.explorer.model_path=/e"], r"takes no explorer share"),
    (["algo.method=forward_kl", "rollout.teacher.model_path=/t", "algo.kl_coef=0.1"],
     r"algo\.kl_coef / algo\.entropy_coef belong to the PPO-clip loss"),
    (["algo.method=opd", "rollout.teacher.model_path=/t", "algo.distill.opd_mode=loss", "algo.kl_coef=0.1"],
     r"with distill\.opd_mode=loss does not use"),
    (["algo.method=forward_kl", "rollout.teacher.model_path=/t", "algo.pods.n=8", "algo.pods.m=16"],
     r"PODS|pods"),
    (["algo.distill.opd_mode=direct"], r"algo\.distill\.opd_mode must be one of"),
    (["algo.temperature.schedule=linear"], r"needs algo\.temperature\.steps >= 1"),
    (["algo.temperature.schedule=cosine"], r"algo\.temperature\.schedule must be one of"),
    (["run.eval_temperature=0"], r"run\.eval_temperature must be > 0"),
])
def test_method_options_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict({}, overrides)


def test_opd_advantage_mode_may_keep_a_kl_penalty():
    cfg = config_from_dict({}, ["algo.method=opd", "rollout.teacher.model_path=/t", "algo.kl_coef=0.01"])
    assert cfg.algo.method == "opd" and cfg.rollout.has_model("teacher")


def test_defaults_still_round_trip_with_models_and_stages():
    from megatron_s2lpo.config import from_dict, to_dict

    cfg = load_config(BRIDGE)
    assert from_dict(RunConfig, to_dict(cfg)) == cfg


def test_temperature_schedules():
    assert [sampling_temperature(i, 1.3) for i in (1, 50)] == [1.3, 1.3]
    linear = [sampling_temperature(i, 1.5, schedule="linear", end=1.0, steps=5) for i in range(1, 9)]
    assert linear == pytest.approx([1.5, 1.4, 1.3, 1.2, 1.1, 1.0, 1.0, 1.0])
    rising = sampling_temperature(3, 0.5, schedule="linear", end=1.5, steps=4)
    assert rising == pytest.approx(1.0)
    with pytest.raises(ValueError, match="step must be >= 1"):
        sampling_temperature(0, 1.0)
    with pytest.raises(ValueError, match="unknown schedule 'exp'"):
        sampling_temperature(1, 1.0, schedule="exp")


def test_launched_servers_of_one_run_need_their_own_ports():
    from megatron_s2lpo.trainer.build import _check_server_ports

    cfg = config_from_dict({}, ["algo.method=opd", "rollout.teacher.model_path=/t", "rollout.teacher.backend=sglang",
                                "rollout.learner.backend=sglang"])
    with pytest.raises(ValueError, match=r"rollout\.learner at 127\.0\.0\.1:30000, rollout\.teacher at 127\.0\.0\.1:30000"):
        _check_server_ports(cfg, cfg.rollout, uses_explorer=False)
    moved = config_from_dict({}, ["algo.method=opd", "rollout.teacher.model_path=/t", "rollout.teacher.backend=sglang",
                                  "rollout.learner.backend=sglang", "rollout.teacher.port=30002"])
    _check_server_ports(moved, moved.rollout, uses_explorer=False)
    attached = config_from_dict({}, ["algo.method=opd", "rollout.teacher.url=http://n1:30000",
                                     "rollout.teacher.backend=sglang", "rollout.learner.backend=sglang"])
    _check_server_ports(attached, attached.rollout, uses_explorer=False)  # attached: nothing launched here
