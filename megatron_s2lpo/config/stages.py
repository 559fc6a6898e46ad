"""Multi-stage runs: named models, and stages that each train one of them.

    models:
      teacher: {init_arch: {...}, init_sft_steps: 600}     # or model_path: /ckpt/qwen3-8b
      student: {model_path: /ckpt/qwen3-1.7b}
    stages:
      - {name: teacher_grpo, method: grpo, policy: teacher, num_steps: 200}
      - {name: warmup, method: forward_kl, policy: student, frozen: teacher, num_steps: 50}
      - {name: opd, method: opd, policy: student, frozen: teacher, num_steps: 100}
      - {name: student_grpo, method: grpo, policy: student, num_steps: 200,
         overrides: ["learner.optim.lr=1e-6"]}

Each stage is an ordinary single run (`stage_run_config`): the rest of the recipe, with
rollout.learner = models[policy] and the frozen model in the slot its method reads
(rollout.explorer for s2lpo, rollout.teacher for forward_kl / opd), its own step count and
output directory, then the stage's own dotted overrides. A model trained by a stage is handed
to every later stage as the Hugging Face directory that stage exported (`model_paths`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .base import check

STAGE_METHODS = ("grpo", "s2lpo", "forward_kl", "opd")
_FROZEN_SLOT = {"s2lpo": "explorer", "forward_kl": "teacher", "opd": "teacher"}
_ALGO_METHOD = {"grpo": "grpo", "s2lpo": "grpo", "forward_kl": "forward_kl", "opd": "opd"}


@dataclass(kw_only=True, slots=True)
class StageConfig:
    name: str
    method: str  # one of STAGE_METHODS
    policy: str  # the model this stage trains (a key of `models`)
    frozen: str = ""  # the frozen second model: explorer (s2lpo) or teacher (forward_kl, opd)
    num_steps: int = 1
    overrides: list[str] = field(default_factory=list)  # dotted overrides for this stage only

    def __post_init__(self) -> None:
        check(bool(self.name) and self.name.replace("_", "").replace("-", "").isalnum(),
              f"stage name {self.name!r} must be non-empty letters, digits, '_' or '-' (it names a directory)")
        check(self.method in STAGE_METHODS,
              f"stage {self.name}: method must be one of {STAGE_METHODS}, got {self.method!r}")
        check(self.num_steps >= 1, f"stage {self.name}: num_steps must be >= 1, got {self.num_steps}")
        needs_frozen = self.method in _FROZEN_SLOT
        check(needs_frozen == bool(self.frozen),
              f"stage {self.name}: method {self.method} "
              + (f"needs frozen: <model> (its {_FROZEN_SLOT.get(self.method)})" if needs_frozen
                 else "trains alone; remove frozen"))
        check(self.frozen != self.policy, f"stage {self.name}: policy and frozen are both {self.policy!r}")
        for item in self.overrides:
            key = item.partition("=")[0].strip()
            check(not key.startswith(("stages", "models", "run.output_dir", "run.num_steps", "run.resume")),
                  f"stage {self.name}: override {item!r} is set by the stage itself (num_steps, the "
                  "output directory, resume) or is not per-stage (models, stages)")


def stage_dir(output_dir: str, index: int, stage: StageConfig) -> str:
    """<run.output_dir>/stages/<NN>-<name> (1-indexed)."""
    return os.path.join(output_dir, "stages", f"{index + 1:02d}-{stage.name}")


def stage_run_config(cfg, index: int, model_paths: dict[str, str] | None = None):
    """The single-run RunConfig of stage `index` of multi-stage config `cfg`.

    model_paths: {model name: HF directory} for models that earlier stages trained or that
    were written from `init_arch`; such a model is loaded from that directory.
    """
    from .base import apply_overrides, to_dict
    from .run import config_from_dict

    stage = cfg.stages[index]
    data = to_dict(cfg)
    data["models"], data["stages"] = {}, []

    def engine(name: str) -> dict:
        out = to_dict(cfg.models[name])
        if model_paths and name in model_paths:
            out.update(model_path=model_paths[name], init_arch=None, init_sft_steps=0)
        return out

    data["rollout"]["learner"] = engine(stage.policy)
    if stage.frozen:
        data["rollout"][_FROZEN_SLOT[stage.method]] = engine(stage.frozen)
    data["algo"]["method"] = _ALGO_METHOD[stage.method]
    if stage.method != "s2lpo":
        data["algo"]["t_mix"] = 0
    data["run"].update(num_steps=stage.num_steps, output_dir=stage_dir(cfg.run.output_dir, index, stage),
                       name=f"{cfg.run.name}/{stage.name}", resume=False)
    try:
        out = config_from_dict(apply_overrides(data, stage.overrides))
    except ValueError as err:
        raise ValueError(f"stage {stage.name} ({index + 1} of {len(cfg.stages)}): {err}") from None
    check(stage.method != "s2lpo" or out.algo.t_mix > 0,
          f"stage {stage.name}: method s2lpo needs an explorer share; set algo.t_mix > 0 (in the recipe "
          "or the stage's overrides)")
    return out
