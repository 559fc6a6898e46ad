"""Run configuration: nested dataclasses per stage, YAML recipes, dotted overrides."""

from .algo import AlgoConfig, DistillConfig, PodsConfig, TemperatureScheduleConfig
from .base import apply_overrides, from_dict, to_dict
from .data import DataConfig, SyntheticTaskConfig
from .learner import LearnerConfig
from .logs import LoggingConfig
from .reward import RewardConfig
from .model import ModelArch
from .rollout import EngineConfig, RolloutConfig, SamplingConfig
from .run import RunConfig, RunSection, config_from_dict, load_config, split_recipe
from .stages import StageConfig, stage_dir, stage_run_config
from .sync import SyncConfig

__all__ = [
    "AlgoConfig", "DataConfig", "DistillConfig", "EngineConfig", "LearnerConfig", "LoggingConfig", "ModelArch",
    "PodsConfig", "RewardConfig", "RolloutConfig", "RunConfig", "RunSection", "SamplingConfig", "StageConfig", "SyncConfig",
    "SyntheticTaskConfig", "TemperatureScheduleConfig", "apply_overrides", "config_from_dict", "from_dict", "load_config",
    "split_recipe", "stage_dir", "stage_run_config", "to_dict",
]
