"""Build every component of a run from its `RunConfig`; `loop.py` only joins them.

    parts = build_trainer(load_config("examples/tiny_cpu.yaml"))

What is built where (multi-process learners under torchrun): every rank builds the learner
and the weight sync; global rank 0 alone builds the rollout engines, the explorer prefetcher
and the reward scorer, collects and scores each step's groups and broadcasts them
(`pipeline.RolloutPipeline`), so every rank then computes the same advantages and TrainBatch.

Model sources (`rollout.<name>`): `model_path` (a HF directory), or `init_arch` (a model built
from code and written once to `<run.output_dir>/models/<name>`, optionally warm-started by
`init_sft_steps` supervised steps on the synthetic task, then cached).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch

from megatron_s2lpo.config import EngineConfig, ModelArch, RunConfig
from megatron_s2lpo.data import PromptSampler, load_prompts, make_arithmetic_prompts, tokenize_prompts
from megatron_s2lpo.reward.overlong import OverlongShaping
from megatron_s2lpo.trainer.metrics import MetricsWriter
from megatron_s2lpo.trainer.pipeline import RolloutPipeline, RolloutStage, ScoringEngine
from megatron_s2lpo.trainer.run_dir import CHECKPOINT_SUBDIR
from megatron_s2lpo.rollout import GroupCollector, build_engine, build_prefetcher
from megatron_s2lpo.rollout.engine import GenerateRequest, derive_seed
from megatron_s2lpo.rollout.validation import AnswerRules
from megatron_s2lpo.types import Prompt


# ----------------------------------------------------------------------------- models


def _sft_warm_start(model: torch.nn.Module, tokenizer: Any, cfg: RunConfig, num_steps: int, seed: int,
                    num_problems: int = 0, name: str = "") -> None:
    """A few supervised steps on `prompt + \\boxed{answer}<eos>` of the synthetic train split
    (its first `num_problems` problems; 0: all of data.synthetic.num_train)."""
    from megatron_s2lpo.data import arithmetic_completion

    if cfg.data.train_path:
        raise ValueError("rollout.*.init_sft_steps > 0 needs the synthetic task (data.train_path empty)")
    num_train = cfg.data.synthetic.num_train
    if num_problems > num_train:
        raise ValueError(f"rollout.{name}.init_sft_problems={num_problems} exceeds data.synthetic.num_train="
                         f"{num_train}: the warm start takes its problems from the train split")
    prompts = make_arithmetic_prompts(cfg.data.synthetic, split="train", num_prompts=num_problems or num_train)
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(num_steps):
        picks = torch.randint(len(prompts), (32,), generator=gen).tolist()
        rows = [(tokenizer.encode(prompts[i].text),
                 tokenizer.encode(arithmetic_completion(prompts[i].ground_truth)) + [tokenizer.eos_token_id])
                for i in picks]
        length = max(len(p) + len(c) for p, c in rows)
        ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)  # loss on the completion only
        for b, (p, c) in enumerate(rows):
            ids[b, :len(p) + len(c)] = torch.tensor(p + c)
            labels[b, len(p):len(p) + len(c)] = torch.tensor(c)
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def materialize_model(engine_cfg: EngineConfig, name: str, cfg: RunConfig, tokenizer: Any) -> str:
    """The HF directory of engine `name`: its model_path, or the cached model built from init_arch."""
    from megatron_s2lpo.rollout import LocalEngine

    if engine_cfg.model_path:
        return engine_cfg.model_path
    if engine_cfg.init_arch is None:
        raise ValueError(f"rollout.{name}: set model_path (a HF model directory) or init_arch (a model "
                         "built from code)")
    path = os.path.join(cfg.run.output_dir, "models", name)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    with torch.random.fork_rng(devices=[]):
        engine = LocalEngine.from_arch(engine_cfg.init_arch, init_seed=engine_cfg.init_seed, tokenizer=tokenizer)
        if engine_cfg.init_sft_steps:
            _sft_warm_start(engine.model, tokenizer, cfg, engine_cfg.init_sft_steps, engine_cfg.init_seed,
                            engine_cfg.init_sft_problems, name)
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    engine.save_pretrained(tmp)
    os.replace(tmp, path)  # atomic: a killed first run leaves no half-written model behind
    return path


def build_tokenizer(cfg: RunConfig) -> Any:
    if not cfg.data.train_path:
        from megatron_s2lpo.data import build_synthetic_tokenizer

        return build_synthetic_tokenizer()
    from transformers import AutoTokenizer

    path = cfg.rollout.learner.model_path
    if not path:
        raise ValueError("data.train_path is set but rollout.learner.model_path is empty: the tokenizer is "
                         "read from the learner's HF directory")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def build_prompts(cfg: RunConfig, tokenizer: Any) -> tuple[list[Prompt], list[Prompt]]:
    """(train prompts, held-out prompts), tokenized; over-long prompts dropped."""
    data = cfg.data
    if data.train_path:
        template = data.template or None
        train = load_prompts(data.train_path, data.schema, template, dedupe=data.dedupe)
        heldout = [p for path in data.eval_paths for p in load_prompts(path, data.schema, template, dedupe=data.dedupe)]
    else:
        task = data.synthetic
        train = make_arithmetic_prompts(task, split="train", num_prompts=task.num_train)
        heldout = make_arithmetic_prompts(task, split="heldout", num_prompts=task.num_eval) if task.num_eval else []
    keep = [p for p in tokenize_prompts(train, tokenizer) if len(p.token_ids) <= data.max_prompt_tokens]
    if len(keep) < data.prompts_per_step:
        raise ValueError(f"only {len(keep)} train prompts fit data.max_prompt_tokens={data.max_prompt_tokens}; "
                         f"need at least data.prompts_per_step={data.prompts_per_step}")
    return keep, tokenize_prompts(heldout, tokenizer)


# ----------------------------------------------------------------------------- everything


@dataclass(kw_only=True, slots=True)
class TrainerParts:
    config: RunConfig
    tokenizer: Any
    train_prompts: list[Prompt]
    heldout_prompts: list[Prompt]
    sampler: PromptSampler
    learner: Any
    sync: Any
    pipeline: RolloutPipeline  # each step's scored groups (pipeline.py)
    collector: GroupCollector | None
    learner_engine: Any
    explorer_engine: Any
    prefetcher: Any
    scorer: Any
    writer: MetricsWriter | None
    learner_params: int
    explorer_params: int
    checkpoint_root: str
    learner_dir: str  # the learner's initial HF directory (config.json and tokenizer files)
    teacher_engine: Any = None  # forward_kl / opd: the frozen teacher (rank 0)
    teacher_scorer: Any = None  # rollout.scoring.TeacherScorer over teacher_engine (rank 0)

    @property
    def is_driver(self) -> bool:
        return self.learner.groups.rank == 0

    def export_hf(self, out_dir: str) -> str:
        """Write the current policy as a HF directory at `out_dir` (every rank calls; rank 0 writes).

        Written to a temporary sibling and renamed, so `out_dir` is either absent or complete."""
        from megatron_s2lpo.convert.export import iter_hf_buckets
        from megatron_s2lpo.sync.disk import publish_hf_dir

        learner = self.learner
        buckets = iter_hf_buckets(learner.policy_chunks, learner.groups, learner.arch,
                                  bucket_bytes=self.config.sync.bucket_bytes)
        if not self.is_driver:
            for _ in buckets:  # collectives inside: every rank consumes the iterator
                pass
            return out_dir
        publish_hf_dir(out_dir, f"{out_dir.rstrip(os.sep)}.tmp-{os.getpid()}", buckets, arch=learner.arch,
                       shard_bytes=self.config.sync.bucket_bytes, hf_config_dir=self.learner_dir or None)
        return out_dir

    def close(self) -> None:
        # the pipeline first: a collection in flight ends before the engines it uses close
        for part in (self.pipeline, self.collector, self.prefetcher, self.sync, self.learner_engine,
                     self.explorer_engine, self.teacher_engine, self.scorer, self.writer):
            if part is not None:
                part.close()


def _engine(cfg: EngineConfig, path: str, tokenizer: Any, name: str, seed: int, log_dir: str = "") -> Any:
    return build_engine(dataclasses.replace(cfg, model_path=path, api_key=cfg.resolved_api_key()),
                        tokenizer=tokenizer, name=name, seed=seed, log_dir=log_dir or None)


def learner_routing(cfg: RunConfig, arch: ModelArch) -> bool:
    """Whether the learner's samples carry their engine's routed experts: a mixture-of-experts
    learner that replays them (learner.routing_replay=r3) or reports routing metrics."""
    learner = cfg.learner
    return arch.is_moe and (learner.routing_replay == "r3" or learner.routing_metrics_every > 0)


def mix_settings(cfg: RunConfig) -> tuple[int, str, float]:
    """(t_mix, schedule, constant_share) of the collector's explorer slot.

    forward_kl puts the teacher in the explorer slot with a share of 1 at every step (all
    samples are the teacher's); the other methods use algo.t_mix / schedule / constant_share.
    """
    a = cfg.algo
    if a.method == "forward_kl":
        return cfg.run.num_steps, "constant", 1.0
    return a.t_mix, a.schedule, a.constant_share


def learner_temperature(cfg: RunConfig, step: int) -> float:
    """The learner's sampling (and log-prob) temperature at `step` (algo.temperature)."""
    from megatron_s2lpo.algo.schedule import sampling_temperature

    t = cfg.algo.temperature
    return sampling_temperature(step, cfg.rollout.learner.sampling.temperature, schedule=t.schedule,
                                end=t.end, steps=t.steps)


def eval_sampling(cfg: RunConfig) -> Any:
    """The learner's sampling settings at run.eval_temperature (held-out evaluation)."""
    sampling = cfg.rollout.learner.sampling
    if cfg.run.eval_temperature is None:
        return sampling
    return dataclasses.replace(sampling, temperature=cfg.run.eval_temperature)


def build_trainer(cfg: RunConfig) -> TrainerParts:
    """Every component of the run (engines and scorer on global rank 0 only)."""
    from megatron_s2lpo.learner import Learner
    from megatron_s2lpo.reward import MathScorer
    from megatron_s2lpo.sync import WeightSync

    os.makedirs(cfg.run.output_dir, exist_ok=True)
    tokenizer = build_tokenizer(cfg)
    train, heldout = build_prompts(cfg, tokenizer)
    sampler = PromptSampler(len(train), cfg.data.prompts_per_step, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
    algo, rollout = cfg.algo, cfg.rollout
    learner = Learner(model_arch(rollout.learner, "learner"), cfg.resolved_learner(), with_reference=algo.kl_coef > 0)
    groups = learner.groups
    routing = learner_routing(cfg, learner.arch)
    if routing:  # a launched SGLang server must be started able to return its routing
        rollout = dataclasses.replace(rollout, learner=dataclasses.replace(rollout.learner, return_routed_experts=True))
    learner_path = _learner_dir(cfg, tokenizer)  # rank 0 writes it when built from code
    if algo.method == "forward_kl":  # the teacher samples every group, through the explorer slot
        rollout = dataclasses.replace(rollout, explorer=rollout.teacher, explorer_store="")
    t_mix, schedule, constant_share = mix_settings(cfg)
    uses_explorer = t_mix > 0
    explorer_path = ""
    if groups.rank == 0 and uses_explorer and (rollout.explorer.model_path or rollout.explorer.init_arch):
        explorer_path = materialize_model(rollout.explorer, "explorer" if algo.method == "grpo" else "teacher",
                                          cfg, tokenizer)
    if not cfg.learner.load:
        learner.load_hf(learner_path)
    learner_engine = explorer_engine = prefetcher = collector = scorer = writer = None
    teacher_engine = teacher_scorer = None
    if groups.rank == 0:
        _check_server_ports(cfg, rollout, uses_explorer)
        scorer = MathScorer(num_workers=cfg.run.reward_workers, **cfg.reward.scorer_kwargs())
        shaping = OverlongShaping(cfg.reward.overlong, cfg.overlong_max_tokens()) if cfg.reward.overlong.enabled \
            else None
        stage = RolloutStage(None, scorer, shaping)
        logs = os.path.join(cfg.run.output_dir, "logs")  # launched servers' logs belong to the run
        learner_engine = _engine(rollout.learner, learner_path, tokenizer, "learner", cfg.run.seed, logs)
        if explorer_path or (uses_explorer and rollout.explorer.attached):
            explorer_engine = _engine(rollout.explorer, explorer_path, tokenizer, "explorer", cfg.run.seed, logs)
        prefetcher = build_prefetcher(rollout, explorer=explorer_engine, seed=cfg.run.seed)
        collector = GroupCollector(
            learner=ScoringEngine(learner_engine, stage), sampling=rollout.learner.sampling,
            group_size=algo.num_generated_per_prompt, t_mix=t_mix,
            explorer=None if explorer_engine is None else ScoringEngine(explorer_engine, stage),
            explorer_sampling=rollout.explorer.sampling, prefetcher=prefetcher, schedule=schedule,
            rounding=algo.rounding, constant_share=constant_share, seed=cfg.run.seed,
            rules=AnswerRules(vocab_size=learner.arch.vocab_size, max_staleness=cfg.run.max_staleness),
            learner_routing=routing)
        stage.collector = collector
        teacher_engine, teacher_scorer = _teacher(cfg, explorer_engine, tokenizer)
        writer = MetricsWriter(cfg.run.output_dir, cfg.logging, run_name=cfg.run.name)
    else:
        stage = None
    sync_cfg = cfg.sync if cfg.sync.disk_dir else dataclasses.replace(
        cfg.sync, disk_dir=os.path.join(cfg.run.output_dir, "sync"))
    sync = WeightSync.from_learner(learner, learner_engine, sync_cfg,
                                   temperature=rollout.learner.sampling.temperature,
                                   hf_config_dir=learner_path or None)
    # rollout FLOPs scale with the parameters a token passes through (a MoE's active ones)
    explorer_params = ModelArch.from_hf_config(explorer_path).num_active_params() if explorer_path else 0
    pipeline = RolloutPipeline(stage=stage, sampler=sampler, prompts=train, groups=groups, sync=sync,
                               max_staleness=cfg.run.max_staleness, num_steps=cfg.run.num_steps,
                               prefetch_steps=cfg.rollout.prefetch_steps,
                               temperature=lambda step: learner_temperature(cfg, step),
                               dynamic=cfg.algo.dynamic_sampling)
    return TrainerParts(
        config=cfg, tokenizer=tokenizer, train_prompts=train, heldout_prompts=heldout, sampler=sampler,
        learner=learner, sync=sync, pipeline=pipeline, collector=collector, learner_engine=learner_engine,
        explorer_engine=explorer_engine, prefetcher=prefetcher, scorer=scorer, writer=writer,
        learner_params=learner.arch.num_active_params(), explorer_params=explorer_params,
        checkpoint_root=os.path.join(cfg.run.output_dir, CHECKPOINT_SUBDIR), learner_dir=learner_path,
        teacher_engine=teacher_engine, teacher_scorer=teacher_scorer)


def _check_server_ports(cfg: RunConfig, rollout: Any, uses_explorer: bool) -> None:
    """SGLang servers this process launches (backend sglang, no url) must not share host:port."""
    engines = [("learner", rollout.learner, True), ("explorer", rollout.explorer, uses_explorer),
               ("teacher", rollout.teacher, cfg.algo.method == "opd")]
    launched = [(f"rollout.{name}" + (f" replica {i}" if e.replicas > 1 else ""), e.host, port)
                for name, e, used in engines if used and e.backend == "sglang" and not e.attached
                for i, port in enumerate(e.replica_ports())]
    addresses = [(host, port) for _, host, port in launched]
    if len(set(addresses)) != len(addresses):
        raise ValueError("the SGLang servers this run launches need their own ports: "
                         + ", ".join(f"{name} at {host}:{port}" for name, host, port in launched)
                         + "; set rollout.<engine>.port (replica i listens on port + i, or ports[i]; "
                         "models.<name>.port in a staged recipe)")


def _teacher(cfg: RunConfig, explorer_engine: Any, tokenizer: Any) -> tuple[Any, Any]:
    """(engine to close or None, TeacherScorer or None) of the frozen teacher (rank 0).

    opd scores with its own teacher engine; forward_kl with distill.top_k scores with the engine
    that already samples the groups (the teacher, in the explorer slot)."""
    algo = cfg.algo
    distill = algo.distill
    if algo.method not in ("forward_kl", "opd") or (algo.method == "forward_kl" and not distill.top_k):
        return None, None
    from megatron_s2lpo.rollout.scoring import TeacherScorer

    if algo.method == "forward_kl":
        return None, TeacherScorer(explorer_engine, top_k=distill.top_k, batch_size=distill.score_batch_size)
    teacher = cfg.rollout.teacher
    path = materialize_model(teacher, "teacher", cfg, tokenizer) if not teacher.attached else ""
    engine = _engine(teacher, path, tokenizer, "teacher", cfg.run.seed, os.path.join(cfg.run.output_dir, "logs"))
    return engine, TeacherScorer(engine, batch_size=distill.score_batch_size)


def model_arch(engine_cfg: EngineConfig, name: str) -> ModelArch:
    """The architecture of engine `name` as its HF config reads (without writing any model)."""
    if engine_cfg.model_path:
        return ModelArch.from_hf_config(engine_cfg.model_path)
    if engine_cfg.init_arch is None:
        raise ValueError(f"rollout.{name}: set model_path (a HF model directory) or init_arch (a model "
                         "built from code)")
    return ModelArch.from_hf_config(engine_cfg.init_arch.to_hf_config_dict())


def _learner_dir(cfg: RunConfig, tokenizer: Any) -> str:
    """The learner's initial HF directory: rank 0 writes it when built from code, then shares the path."""
    import torch.distributed as dist

    from megatron_s2lpo.utils.procs import is_rank0

    path = cfg.rollout.learner.model_path
    if path:
        return path
    if is_rank0():
        path = materialize_model(cfg.rollout.learner, "learner", cfg, tokenizer)
    if dist.is_initialized():
        holder = [path]
        dist.broadcast_object_list(holder, src=0)
        path = holder[0]
    return path


# ----------------------------------------------------------------------------- evaluation


def sample_scores(engine: Any, prompts: list[Prompt], num_samples: int, sampling: Any, scorer: Any,
                  seed: int, tag: str = "eval") -> list[list[float]]:
    """(num_prompts, num_samples) rewards of `num_samples` seeded completions per prompt."""
    requests = [GenerateRequest.from_sampling(f"{tag}/{p.prompt_id}/{j}", p.token_ids, sampling,
                                              seed=derive_seed(seed, tag, p.prompt_id, j))
                for p in prompts for j in range(num_samples)]
    comps = engine.generate(requests)
    rewards = scorer.score([c.text for c in comps],
                           [p.ground_truth for p in prompts for _ in range(num_samples)])
    return [rewards[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]
