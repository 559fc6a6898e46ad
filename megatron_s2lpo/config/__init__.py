"""Run configuration: nested dataclasses per stage, YAML recipes, dotted overrides."""

from .algo import AlgoConfig, PodsConfig
from .base import apply_overrides, from_dict, to_dict
from .data import DataConfig, SyntheticTaskConfig
from .learner import LearnerConfig
from .logs import LoggingConfig
from .model import ModelArch
from .rollout import EngineConfig, RolloutConfig, SamplingConfig
from .run import RunConfig, RunSection, config_from_dict, load_config, split_recipe
from .sync import SyncConfig

__all__ = [
    "AlgoConfig", "DataConfig", "EngineConfig", "LearnerConfig", "LoggingConfig", "ModelArch",
    "PodsConfig", "RolloutConfig", "RunConfig", "RunSection", "SamplingConfig", "SyncConfig",
    "SyntheticTaskConfig", "apply_overrides", "config_from_dict", "from_dict", "load_config",
    "split_recipe", "to_dict",
]
