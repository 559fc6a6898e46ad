"""The whole run: one section per part of the system plus `run` (steps, output, checkpoints),
and optionally `models` + `stages` for a multi-stage pipeline (config/stages.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterable

import yaml

from .algo import AlgoConfig
from .base import apply_overrides, check, from_dict, load_yaml, to_dict
from .data import DataConfig
from .learner import LearnerConfig
from .logs import LoggingConfig
from .reward import RewardConfig
from .rollout import EngineConfig, RolloutConfig
from .stages import StageConfig, stage_run_config
from .sync import SyncConfig


@dataclass(kw_only=True, slots=True)
class RunSection:
    name: str = "s2lpo"
    output_dir: str = "runs/s2lpo"
    seed: int = 1234
    num_steps: int = 100
    save_every: int = 10  # checkpoint every N steps; 0 = only at the end
    keep_checkpoints: int = 2
    eval_every: int = 0  # held-out evaluation every N steps and at the last; 0 = never
    resume: bool = False
    reward_workers: int = 2  # math-verify scoring processes
    eval_num_samples: int = 4  # k of the held-out avg@k Pass@1 every eval_every steps
    eval_temperature: float | None = None  # null: rollout.learner.sampling.temperature
    eval_at_start: bool = False  # also evaluate before the first step (logged as step 0)
    # 1: the learner's engines generate step i+1 (with the weights of step i-1) while step i
    # trains (trainer/pipeline.py); 0: each step generates, then trains
    max_staleness: int = 0

    def __post_init__(self) -> None:
        check(bool(self.name), "run.name must not be empty")
        check(bool(self.output_dir), "run.output_dir must not be empty")
        check(self.num_steps >= 1, f"run.num_steps must be >= 1, got {self.num_steps}")
        check(self.save_every >= 0, f"run.save_every must be >= 0, got {self.save_every}")
        check(self.keep_checkpoints >= 1, f"run.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        check(self.reward_workers >= 1, f"run.reward_workers must be >= 1, got {self.reward_workers}")
        check(self.eval_num_samples >= 1, f"run.eval_num_samples must be >= 1, got {self.eval_num_samples}")
        check(self.eval_every >= 0, f"run.eval_every must be >= 0, got {self.eval_every}")
        check(self.eval_temperature is None or self.eval_temperature > 0,
              f"run.eval_temperature must be > 0 or null, got {self.eval_temperature}")
        check(self.max_staleness in (0, 1),
              f"run.max_staleness={self.max_staleness} is not supported: 0 (generate, then train) or 1 (the "
              "next step's rollouts are generated while the current step trains, one weight version behind); "
              "the pipeline runs at most one step ahead")


@dataclass(kw_only=True, slots=True)
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    models: dict[str, EngineConfig] = field(default_factory=dict)  # named models of `stages`
    stages: list[StageConfig] = field(default_factory=list)  # empty: one run of `algo.method`

    def __post_init__(self) -> None:
        if self.stages:
            self._check_stages()
            return
        # Cross-section rules; each section already validated its own fields.
        uses_explorer = self.algo.t_mix > 0
        has_explorer = bool(self.rollout.explorer.model_path or self.rollout.explorer.attached
                            or self.rollout.explorer_store or self.rollout.explorer.init_arch)
        check(not uses_explorer or has_explorer,
              f"algo.t_mix={self.algo.t_mix} asks for explorer rollouts but none of "
              "rollout.explorer.model_path, rollout.explorer.url(s), rollout.explorer_store or rollout.explorer.init_arch is set; "
              "set one of them, or algo.t_mix=0 for plain GRPO")
        needs_teacher = self.algo.method in ("forward_kl", "opd")
        check(not needs_teacher or self.rollout.has_model("teacher"),
              f"algo.method={self.algo.method} needs the teacher: set rollout.teacher.model_path, "
              "rollout.teacher.url or rollout.teacher.init_arch")
        self._check_pipeline()
        engine = self.rollout.learner
        check(self.learner.routing_replay != "r3" or engine.backend != "sglang" or engine.return_routed_experts,
              "learner.routing_replay=r3 replays the experts the learner's SGLang server routed every token to: set "
              "rollout.learner.return_routed_experts=true (the server starts with --enable-return-routed-experts; "
              "an attached server must have been started with it)")
        self._check_overlong()
        check(self.sync.transport == "disk" or self.rollout.learner.backend == "sglang",
              f"sync.transport={self.sync.transport!r} needs rollout.learner.backend=sglang "
              "(the local engine is synced through the disk path's bucket stream)")
        check(not (self.learner.expandable_segments and self.sync.transport == "tensor"),
              "learner.expandable_segments=true with sync.transport=tensor: CUDA IPC cannot share tensors that live "
              "in expandable segments (the server fails importing them, pidfd_getfd: Operation not permitted in "
              "containers); set learner.expandable_segments=null (auto) or false, or use sync.transport=distributed")

    def resolved_learner(self) -> LearnerConfig:
        """learner with its automatic choices made: expandable_segments null -> on unless
        sync.transport=tensor (kept null in the config itself, so a launcher's transport override
        still decides)."""
        if self.learner.expandable_segments is not None:
            return self.learner
        return dataclasses.replace(self.learner, expandable_segments=self.sync.transport != "tensor")

    def overlong_max_tokens(self) -> int:
        """The response length reward.overlong measures against (its max_response_tokens, or the
        learner's sampling max_new_tokens)."""
        return self.reward.overlong.max_response_tokens or self.rollout.learner.sampling.max_new_tokens

    def _check_overlong(self) -> None:
        overlong = self.reward.overlong
        check(overlong.buffer_tokens <= self.overlong_max_tokens(),
              f"reward.overlong.buffer_tokens={overlong.buffer_tokens} is longer than the response limit it ends "
              f"at ({self.overlong_max_tokens()} tokens: reward.overlong.max_response_tokens, or "
              "rollout.learner.sampling.max_new_tokens when 0); shorten the buffer")

    def _check_pipeline(self) -> None:
        """run.max_staleness=1 needs the importance correction and engines on their own GPUs."""
        if not self.run.max_staleness:
            return
        check(self.algo.is_threshold is not None,
              "run.max_staleness=1 trains on rollouts sampled one weight version behind the learner, so the "
              "policy loss needs the truncated importance weight min(pi_old / pi_behaviour, algo.is_threshold) "
              "(decoupled PPO): without it the update treats the older policy's samples as the proximal "
              f"policy's and is biased (algo.old_logprob={self.algo.old_logprob}). Set algo.is_threshold "
              "(2.0 is the default), or run.max_staleness=0")
        check(self.sync.transport != "tensor",
              "run.max_staleness=1 generates while the learner trains, so the learner's server needs GPUs of its "
              "own; sync.transport=tensor colocates it with the learner. Use sync.transport=distributed (or "
              "disk) with separate server GPUs, or run.max_staleness=0")

    def _check_stages(self) -> None:
        """Every stage must name known models and build a valid single-run config."""
        names = [s.name for s in self.stages]
        check(len(set(names)) == len(names), f"stage names must be unique, got {names}")
        for slot in ("learner", "explorer", "teacher"):
            check(not self.rollout.has_model(slot) and not getattr(self.rollout, slot).model_path,
                  f"with stages, models come from `models` (stage policy / frozen); remove the model of "
                  f"rollout.{slot}")
        check(not self.learner.load and not self.learner.ref_load,
              "learner.load / learner.ref_load would apply to every stage; give the model a model_path in "
              "`models` instead")
        for index, stage in enumerate(self.stages):
            for name in filter(None, (stage.policy, stage.frozen)):
                check(name in self.models, f"stage {stage.name}: unknown model {name!r}; `models` defines "
                      f"{sorted(self.models) or 'none'}")
            stage_run_config(self, index)

    def to_dict(self) -> dict:
        return to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def config_from_dict(data: dict, overrides: Iterable[str] = ()) -> RunConfig:
    return from_dict(RunConfig, apply_overrides(dict(data), overrides))


def split_recipe(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """The recipe is optional: `algo.t_mix=8` alone means the defaults plus that override."""
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        return None, [config, *overrides]
    return config, list(overrides)


def load_config(path: str | None, overrides: Iterable[str] = ()) -> RunConfig:
    """Load a YAML recipe (or the defaults when `path` is None) and apply dotted overrides."""
    data = load_yaml(path) if path else {}
    return config_from_dict(data, overrides)
