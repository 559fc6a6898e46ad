"""Memory planner: will a recipe fit its GPUs? Pure arithmetic over the config (no torch).

estimate  per-GPU memory items of the learner (weights, grads, optimizer, activations, log-prob
          buffers, reference, weight-sync buffer, checkpoint save, CUDA context, NCCL, workspaces)
          and the formulas behind them
host      the host memory of a learner node (pinned reference, checkpoint staging, offload)
report    check_fits(cfg, gpu_memory_gb) -> PlanReport: the learner, every SGLang server's
          KV-cache room, problems and what to change (`s2lpo plan`, the launcher)
archs     model architectures by name when a checkpoint's config.json is not readable
measure   the measured CPU peak the estimates are checked against (imports torch)
"""

from __future__ import annotations

from megatron_s2lpo.utils.lazy import lazy_exports

_EXPORTS = {
    "check_fits": "report",
    "PlanReport": "report",
    "estimate_learner": "estimate",
    "known_arch": "archs",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
