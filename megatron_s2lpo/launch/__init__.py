"""Cluster launch: NeMo-Run experiments for the trainer and its SGLang servers.

plan          ClusterLayout -> LaunchPlan: node groups, server commands, the trainer script (no nemo_run)
experiment    NeMo-Run experiments: Slurm (heterogeneous job), local, Docker; dry-run rendering
wait_healthy  `python -m megatron_s2lpo.launch.wait_healthy URL...`: the trainer's health gate

Nothing is imported eagerly: `wait_healthy` runs in the trainer's container before anything heavy,
and nemo_run is imported only inside `experiment`'s functions.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ClusterLayout": "plan", "LaunchPlan": "plan", "NodeGroup": "plan", "ServerTask": "plan",
    "plan_launch": "plan", "SlurmOptions": "experiment", "build_slurm_experiment": "experiment",
    "build_local_experiment": "experiment", "build_docker_experiment": "experiment",
    "render_slurm": "experiment",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
