"""Does a recipe fit its GPUs? `check_fits(cfg, gpu_memory_gb) -> PlanReport`.

    report = check_fits(load_config("examples/qwen3_8b_explorer_1p7b.yaml"), 80, num_learner_gpus=16)
    print(report.text())          # per-GPU items, each server's KV-cache room, what to change
    if not report.fits: ...

For every learner rank it sums the items of `estimate.estimate_learner`; for every SGLang server
the run launches it subtracts the server's weights from its `mem_fraction` of the GPU and says how
many tokens of KV cache remain (a colocated learner server also has the learner's resident memory
on its GPUs). When something does not fit it lists the changes that would make it fit, each with
the peak it leads to, and the shortest combination found greedily.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_s2lpo.config import EngineConfig, RunConfig
from megatron_s2lpo.config.learner import engine_precision
from megatron_s2lpo.config.model import ModelArch

from .archs import resolve_arch
from .estimate import GIB, GPU, Backend, LearnerMemory, estimate_learner, with_changes
from .host import HostMemory, estimate_host

MARGIN = 0.05  # a recipe fits when its peak leaves this share of the GPU free


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerMemory:
    name: str
    num_gpus: int
    weights_per_gpu: float  # bytes
    kv_cache_per_gpu: float  # bytes left for the KV cache
    kv_tokens: int  # tokens of KV cache that room holds (per server, all TP ranks together)
    problem: str = ""


@dataclass(kw_only=True, slots=True)
class RunPlan:
    """The plan of one single run (a stage of a staged recipe is one run)."""

    title: str
    arch: ModelArch
    layout: str
    learner: LearnerMemory
    servers: list[ServerMemory]
    gpu_memory: float  # bytes
    host: HostMemory | None = None  # host memory of a learner node
    problems: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # valid but wasteful choices

    @property
    def fits(self) -> bool:
        return not self.problems


@dataclass(kw_only=True, slots=True)
class PlanReport:
    runs: list[RunPlan]

    @property
    def fits(self) -> bool:
        return all(run.fits for run in self.runs)

    @property
    def problems(self) -> list[str]:
        return [p for run in self.runs for p in run.problems]

    def text(self) -> str:
        return "\n\n".join(_run_text(run) for run in self.runs) + "\n"


def check_fits(cfg: RunConfig, gpu_memory_gb: float = 80.0, *, num_learner_gpus: int | None = None,
               gpus_per_node: int = 8, colocated: bool | None = None, backend: Backend = GPU,
               host_memory_gb: float | None = None) -> PlanReport:
    """Plan every run of `cfg` (each stage of a staged recipe) on GPUs of `gpu_memory_gb`.

    num_learner_gpus: the learner's GPUs (sets DP; the launcher passes its layout's count);
    None: one node of `gpus_per_node`. colocated: whether the learner's SGLang server shares the
    learner's GPUs (None: when sync.transport=tensor, as the launcher decides by default).
    host_memory_gb: a learner node's host memory; the learner's host memory (planner/host.py) is
    always reported and, given this, checked against it.
    """
    if gpu_memory_gb <= 0:
        raise ValueError(f"--gpu-memory-gb must be > 0, got {gpu_memory_gb}")
    if host_memory_gb is not None and host_memory_gb <= 0:
        raise ValueError(f"--host-memory-gb must be > 0, got {host_memory_gb}")
    configs = runs_of(cfg)
    learner_gpus = num_learner_gpus or gpus_per_node
    plans = [_plan_run(title, run_cfg, gpu_memory_gb * GIB, learner_gpus, backend,
                       run_cfg.sync.transport == "tensor" if colocated is None else colocated)
             for title, run_cfg in configs]
    for plan, (_, run_cfg) in zip(plans, configs):
        _plan_host(plan, run_cfg, learner_gpus, gpus_per_node, host_memory_gb, backend)
    return PlanReport(runs=plans)


def runs_of(cfg: RunConfig) -> list[tuple[str, RunConfig]]:
    """(title, config) of every run of `cfg`: each stage of a staged recipe, else the run itself."""
    if cfg.stages:
        from megatron_s2lpo.config.stages import stage_run_config

        return [(f"stage {s.name}", stage_run_config(cfg, i)) for i, s in enumerate(cfg.stages)]
    return [(cfg.run.name, cfg)]


def _plan_host(run: RunPlan, cfg: RunConfig, learner_gpus: int, gpus_per_node: int,
               host_memory_gb: float | None, backend: Backend) -> None:
    """The learner node's host memory, and notes on wasteful recompute choices."""
    lc = cfg.learner
    dp = learner_gpus // (lc.tensor_parallel_size * lc.pipeline_parallel_size * lc.context_parallel_size)
    run.host = estimate_host(run.arch, lc, dp_size=dp, with_reference=cfg.algo.kl_coef > 0,
                             ranks_per_node=min(gpus_per_node, learner_gpus),
                             colocated=cfg.sync.transport == "tensor")
    if host_memory_gb is not None and run.host.per_node > 0.9 * host_memory_gb * GIB:
        run.problems.append(f"the learner needs {run.host.per_node / GIB:.0f} GB of host memory per node, more than "
                            f"90% of {host_memory_gb:.0f} GB ({run.host.text()})")
    selective = lc.recompute_granularity == "selective" and "core_attn" in (lc.recompute_modules or ["core_attn"])
    if selective and backend.name == "gpu" and lc.use_te is not False:
        run.notes.append("learner.recompute_granularity=selective recomputes core_attn, which saves no memory with "
                         "Transformer Engine's fused attention (its inputs q, k, v stay saved for the recompute and "
                         "its output stays saved by linear_proj) and costs one more attention forward per layer: use "
                         "recompute_granularity=full if activations do not fit, else none")


def _used_servers(cfg: RunConfig) -> list[tuple[str, EngineConfig]]:
    used = [("learner", cfg.rollout.learner, True),
            ("explorer", cfg.rollout.explorer, cfg.algo.t_mix > 0),
            ("teacher", cfg.rollout.teacher, cfg.algo.method in ("forward_kl", "opd"))]
    return [(name, engine) for name, engine, on in used if on and engine.backend == "sglang" and not engine.url]


def _max_seq_len(cfg: RunConfig) -> int:
    engines = [cfg.rollout.learner]
    if cfg.algo.t_mix > 0:
        engines.append(cfg.rollout.explorer)
    if cfg.algo.method == "forward_kl":
        engines.append(cfg.rollout.teacher)
    return cfg.data.max_prompt_tokens + max(e.sampling.max_new_tokens for e in engines)


def _plan_run(title: str, cfg: RunConfig, gpu_memory: float, learner_gpus: int, backend: Backend,
              colocated: bool) -> RunPlan:
    lc = cfg.learner
    arch = resolve_arch(cfg.rollout.learner.model_path, cfg.rollout.learner.init_arch, "rollout.learner")
    model_parallel = lc.tensor_parallel_size * lc.pipeline_parallel_size * lc.context_parallel_size
    if learner_gpus % model_parallel:
        raise ValueError(f"{learner_gpus} learner GPUs are not a multiple of TP x PP x CP = {model_parallel}")
    dp = learner_gpus // model_parallel
    experts = ""
    if arch.is_moe:  # experts spread over EP x expert-TP ranks of each pipeline stage
        expert_parallel = lc.expert_model_parallel_size * lc.expert_tensor_parallel_size * lc.pipeline_parallel_size
        if learner_gpus % expert_parallel or arch.num_experts % lc.expert_model_parallel_size:
            raise ValueError(f"{learner_gpus} learner GPUs are not a multiple of EP x expert-TP x PP = {expert_parallel}, "
                             f"or model.num_experts ({arch.num_experts}) is not divisible by EP "
                             f"({lc.expert_model_parallel_size})")
        experts = (f" EP={lc.expert_model_parallel_size} ETP={lc.expert_tensor_parallel_size}"
                   f" ({arch.num_experts // lc.expert_model_parallel_size} of {arch.num_experts} experts per GPU)")
    max_seq_len = _max_seq_len(cfg)
    with_reference = cfg.algo.kl_coef > 0

    sync_bucket = cfg.sync.bucket_bytes if cfg.rollout.learner.backend == "sglang" else 0

    def estimate(learner_cfg) -> LearnerMemory:
        return estimate_learner(arch, learner_cfg, dp_size=dp, max_seq_len=max_seq_len,
                                with_reference=with_reference, backend=backend, sync_bucket_bytes=sync_bucket)

    learner = estimate(lc)
    layout = (f"TP={lc.tensor_parallel_size}{' SP' if lc.sequence_parallel else ''} PP={lc.pipeline_parallel_size} "
              f"CP={lc.context_parallel_size} DP={dp}{experts} ({learner_gpus} GPUs), {lc.precision}"
              + (f" {lc.fp8_recipe}" if lc.precision == "fp8" else ""))
    plan = RunPlan(title=title, arch=arch, layout=layout, learner=learner, servers=[], gpu_memory=gpu_memory)
    budget = gpu_memory * (1 - MARGIN)
    for tokens, name in ((lc.micro_batch_tokens, "micro_batch_tokens"), (lc.logprob_tokens, "logprob_micro_batch_tokens")):
        if max_seq_len > tokens:
            plan.problems.append(f"a sequence can have {max_seq_len} tokens (data.max_prompt_tokens + max_new_tokens) "
                                 f"but learner.{name}={tokens}: raise it to at least {max_seq_len}")
    if learner.peak > budget:
        plan.problems.append(f"the learner needs {learner.peak / GIB:.1f} GB per GPU at its peak "
                             f"({learner.peak_phase}), more than {budget / GIB:.1f} GB "
                             f"({1 - MARGIN:.0%} of {gpu_memory / GIB:.0f} GB)")
        plan.advice = _advice(lc, estimate, budget, dp)
    for name, engine in _used_servers(cfg):
        server_arch = arch if name == "learner" else resolve_arch(engine.model_path, engine.init_arch, f"rollout.{name}")
        resident = _colocated_learner_bytes(learner, backend) if name == "learner" and colocated else 0
        server = _server(name, engine, server_arch, gpu_memory, max_seq_len, resident)
        plan.servers.append(server)
        if server.problem:
            plan.problems.append(server.problem)
    return plan


def _colocated_learner_bytes(learner: LearnerMemory, backend: Backend) -> float:
    """What the learner keeps on a GPU it shares with its rollout server while the server runs."""
    kept = ("weights", "grads", "optimizer", "cuda context", "nccl", "workspaces")
    return sum(i.bytes for i in learner.items if i.name in kept)


def _server(name: str, engine: EngineConfig, arch: ModelArch, gpu_memory: float, max_seq_len: int,
            resident: float) -> ServerMemory:
    """SGLang's static pool (`mem_fraction` of the GPU) = weights + KV cache."""
    quantized = "fp8" in engine_precision(engine)  # --quantization fp8 (w8a8_fp8, ...): 1-byte weights
    weights = arch.num_params() * (1 if quantized else 2) / engine.tp_size
    kv_heads = max(1.0, arch.num_query_groups / engine.tp_size)  # heads are replicated past the group count
    kv_per_token = 2 * arch.num_layers * kv_heads * arch.head_dim * 2  # K and V, bf16, per GPU
    pool = engine.mem_fraction * gpu_memory
    kv_room = pool - weights
    tokens = int(max(kv_room, 0) / kv_per_token) * engine.dp_size
    problem = ""
    label = f"rollout.{name}"
    if resident and pool + resident > gpu_memory:
        room = max(gpu_memory - resident, 0) / gpu_memory
        problem = (f"{label} shares the learner's GPUs (colocated): mem_fraction={engine.mem_fraction} "
                   f"asks for {pool / GIB:.1f} GB but the learner keeps {resident / GIB:.1f} GB there; set "
                   f"{label}.mem_fraction below {room:.2f} or give the server its own node")
    elif tokens < max_seq_len:
        problem = (f"{label}: {kv_room / GIB:.1f} GB per GPU is left for the KV cache after "
                   f"{weights / GIB:.1f} GB of weights, {tokens} tokens, fewer than one {max_seq_len}-token sequence; "
                   f"raise {label}.mem_fraction or {label}.tp_size")
    return ServerMemory(name=f"{name}_server", num_gpus=engine.tp_size * engine.dp_size, weights_per_gpu=weights,
                        kv_cache_per_gpu=kv_room, kv_tokens=tokens, problem=problem)


def _candidates(cfg, dp: int) -> list[tuple[str, dict]]:
    """Single changes that lower the learner's memory, as (label, with_changes keywords), cheapest
    in throughput first: sharding and chunking cost (almost) nothing, recompute costs about a
    third more compute, a larger TP more communication, optimizer offload host bandwidth."""
    out = []
    if not cfg.optim.use_distributed_optimizer and dp > 1:
        out.append(("learner.optim.use_distributed_optimizer=true", {"optim.use_distributed_optimizer": True}))
    if cfg.tensor_parallel_size > 1 and not cfg.sequence_parallel and cfg.use_te is not False:
        out.append(("learner.sequence_parallel=true", {"sequence_parallel": True}))
    if cfg.logprob_chunk_tokens == 0 or cfg.logprob_chunk_tokens > 1024:
        out.append(("learner.logprob_chunk_tokens=1024", {"logprob_chunk_tokens": 1024}))
    if not cfg.ref_offload:
        out.append(("learner.ref_offload=true", {"ref_offload": True}))
    if cfg.micro_batch_tokens >= 8192:
        half = cfg.micro_batch_tokens // 2
        out.append((f"learner.micro_batch_tokens={half}", {"micro_batch_tokens": half}))
    if cfg.recompute_granularity != "full":
        out.append(("learner.recompute_granularity=full", {"recompute_granularity": "full", "recompute_modules": []}))
    if cfg.tensor_parallel_size < 8:
        out.append((f"learner.tensor_parallel_size={2 * cfg.tensor_parallel_size}",
                    {"tensor_parallel_size": 2 * cfg.tensor_parallel_size}))
    if cfg.optim.use_distributed_optimizer and not cfg.optim.cpu_offload:
        out.append(("learner.optim.cpu_offload=true", {"optim.cpu_offload": True}))
    return out


def _advice(cfg, estimate, budget: float, dp: int) -> list[str]:
    """Each single change with its peak, then the cheapest-first combination that fits (taking the
    candidates in order, keeping each one that lowers the peak, until it fits)."""
    lines, chosen = [], []
    for label, changes in _candidates(cfg, dp):
        try:
            lines.append(f"{label}: {estimate(with_changes(cfg, **changes)).peak / GIB:.1f} GB")
        except ValueError:  # not valid with this recipe (e.g. heads not divisible by the new TP)
            continue
    current, current_peak = cfg, estimate(cfg).peak
    for label, changes in _candidates(cfg, dp):
        try:
            changed = with_changes(current, **changes)
            peak = estimate(changed).peak
        except ValueError:
            continue
        if peak < current_peak:
            current, current_peak = changed, peak
            chosen.append(label)
            if peak <= budget:
                lines.append(f"to fit: {' '.join(chosen)} ({peak / GIB:.1f} GB)")
                break
    return lines


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _run_text(run: RunPlan) -> str:
    lm = run.learner
    out = [f"{run.title}: learner {run.arch.family} {_count(run.arch.num_params())} params, {run.layout}",
           f"  per learner GPU (busiest rank: {lm.stage} pipeline stage)"]
    for item in lm.items:
        out.append(f"    {item.name:<18}{item.bytes / GIB:8.2f} GB   {item.note}")
    spare = run.gpu_memory - lm.peak
    out.append(f"    {'peak':<18}{lm.peak / GIB:8.2f} GB   {lm.peak_phase}, of {run.gpu_memory / GIB:.0f} GB "
               + (f"({spare / GIB:.1f} GB spare)" if spare >= 0 else f"({-spare / GIB:.1f} GB over)"))
    out.append("    phases: " + ", ".join(f"{name} {value / GIB:.1f}" for name, value in lm.phases))
    if run.host is not None:
        out.append(f"  {run.host.text()}")
    for server in run.servers:
        out.append(f"  {server.name}: {server.num_gpus} GPU(s), weights {server.weights_per_gpu / GIB:.1f} GB/GPU, "
                   f"KV cache {server.kv_cache_per_gpu / GIB:.1f} GB/GPU = {server.kv_tokens} tokens")
    out += [f"  note: {n}" for n in run.notes]
    out.append("  fits" if run.fits else "  DOES NOT FIT:")
    out += [f"    - {p}" for p in run.problems]
    if run.advice:
        out.append("  what would help (peak per learner GPU after the change):")
        out += [f"    {a}" for a in run.advice]
    return "\n".join(out)
