"""The memory check a launch runs before it writes or submits anything.

`plan_launch` calls `check_launch_memory` with the learner's GPU count of the layout; a recipe
the planner (megatron_s2lpo.planner) finds over budget is refused with the planner's report
and what to change, unless the layout says `allow_over_budget` (examples/launch.py
`--allow-over-budget`). CPU layouts (gpus_per_node=0) are not checked.
"""

from __future__ import annotations

from ..config import RunConfig
from ..planner import PlanReport, check_fits


def check_launch_memory(cfg: RunConfig, *, learner_gpus: int, gpus_per_node: int, gpu_memory_gb: float,
                        allow_over_budget: bool, colocated: bool) -> PlanReport | None:
    """The planner's report for this launch; ValueError when the recipe does not fit."""
    if not gpus_per_node or allow_over_budget:
        return None
    hint = "pass --allow-over-budget (ClusterLayout.allow_over_budget) to launch anyway"
    try:
        report = check_fits(cfg, gpu_memory_gb, num_learner_gpus=learner_gpus, gpus_per_node=gpus_per_node,
                            colocated=colocated)
    except ValueError as err:
        raise ValueError(f"the memory check could not size this recipe: {err}; {hint}") from err
    if not report.fits:
        raise ValueError(f"the recipe does not fit {gpu_memory_gb:g} GB GPUs (s2lpo plan):\n{report.text()}{hint}")
    return report
