"""`Learner`: what the trainer calls. Policy (and reference) model, optimizer, checkpoints.

    learner = Learner(arch, run_config.learner, with_reference=algo.kl_coef > 0)
    old = learner.compute_logprobs(batch, temperature)            # (B, T), no grad
    metrics = learner.train_step(batch, loss_config=..., temperature=temperature)
    learner.save(ckpt_root, step, trainer_state={...})
    learner.offload(); ...; learner.onload()                      # a colocated server's turn

Every rank calls every method with the SAME full TrainBatch; the learner takes this rank's
data-parallel share (token-balanced, deterministic) and returns full-batch results on every
rank (log-probs are gathered over DP and broadcast from the last pipeline stage; metrics are
reduced the same way).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_s2lpo.algo.losses import PolicyLossConfig, loss_normalizer
from megatron_s2lpo.config.learner import LearnerConfig
from megatron_s2lpo.config.model import ModelArch
from megatron_s2lpo.types import TrainBatch

from . import checkpoint as ckpt
from . import routing as routing_module
from .checkpoint_async import AsyncSaves
from .batching import MicroBatch, rank_micro_batches, scatter_rows
from .fp8_rules import check_input_shapes, gemm_shapes
from .model import apply_fp8_scale_environment, build_model_chunks, unwrap_model
from .offload import StorageOffloader, ddp_buffers, module_tensors, optimizer_tensors
from .optimizer import build_optimizer, build_scheduler, wrap_for_training, zero_grads
from .parallel import ParallelGroups, init_parallel
from .reference import ReferenceModel
from .routing import RoutingState
from .step import LogProbSpec, LossSpec, logprob_forward_step, reduce_metrics, run_schedule, train_forward_step

Tensor = torch.Tensor


def check_moe_options(arch: ModelArch, config: LearnerConfig) -> None:
    """Mixture-of-experts options on a dense learner, refused with the field to change."""
    if arch.is_moe:
        if config.tensor_parallel_size > 1 and not config.sequence_parallel:
            raise ValueError(
                "a mixture-of-experts learner with learner.tensor_parallel_size > 1 needs "
                "learner.sequence_parallel=true (megatron-core refuses to train MoE layers under TP without it), "
                "which needs the Transformer Engine spec (GPU); on this machine use tensor_parallel_size=1 and "
                "spread the experts with learner.expert_model_parallel_size")
        return
    for name, off in (("expert_model_parallel_size", 1), ("expert_tensor_parallel_size", 1),
                      ("routing_replay", "none")):
        if getattr(config, name) != off:
            raise ValueError(f"learner.{name}={getattr(config, name)!r} applies to mixture-of-experts learners; the "
                             f"learner model is a dense {arch.family} model: set learner.{name}={off!r}")


class Learner:
    """A megatron-core GPT policy with its optimizer, LR schedule and optional frozen reference."""

    def __init__(
        self,
        arch: ModelArch,
        config: LearnerConfig,
        *,
        groups: ParallelGroups | None = None,
        with_reference: bool = False,
    ) -> None:
        self.arch = arch
        self.config = config
        check_moe_options(arch, config)
        if config.precision == "fp8" and config.fp8_recipe == "blockwise":
            apply_fp8_scale_environment(config.fp8_fp32_scales)  # before megatron imports TE
        self.groups = groups or init_parallel(
            config.tensor_parallel_size, config.pipeline_parallel_size,
            config.effective_vpp_size, seed=config.seed, context_parallel_size=config.context_parallel_size,
            expert_model_parallel_size=config.expert_model_parallel_size,
            expert_tensor_parallel_size=config.expert_tensor_parallel_size)
        g = self.groups
        layout = (g.tp_size, g.pp_size, g.vpp_size, g.cp_size, g.ep_size, g.etp_size)
        wanted = (config.tensor_parallel_size, config.pipeline_parallel_size, config.effective_vpp_size,
                  config.context_parallel_size, config.expert_model_parallel_size, config.expert_tensor_parallel_size)
        if layout != wanted:
            raise ValueError(f"the parallel groups (TP, PP, VPP, CP, EP, ETP) = {layout} do not match the learner "
                             f"config {wanted} (learner.tensor_parallel_size, pipeline_parallel_size, "
                             "virtual_pipeline_parallel_size, context_parallel_size, expert_model_parallel_size, "
                             "expert_tensor_parallel_size)")
        if config.expandable_segments and torch.cuda.is_available():
            # packs differ in shape every micro-batch; segments that grow in place keep the caching
            # allocator from fragmenting (set before the model's first allocation)
            torch.cuda.memory._set_allocator_settings("expandable_segments:True")
        build = dict(precision=config.precision, use_te=config.use_te, fp8_format=config.fp8_format,
                     fp8_recipe=config.fp8_recipe, sequence_parallel=config.sequence_parallel,
                     transformer_overrides=config.transformer_overrides,
                     moe_token_dispatcher=config.moe_token_dispatcher, moe_grouped_gemm=config.moe_grouped_gemm,
                     moe_aux_loss_coeff=config.moe_aux_loss_coeff)
        model_kwargs = dict(build, recompute_granularity=config.recompute_granularity,
                            recompute_method=config.recompute_method,
                            recompute_num_layers=config.recompute_num_layers,
                            recompute_modules=config.recompute_modules,
                            gradient_accumulation_fusion=config.gradient_accumulation_fusion)
        self.model = wrap_for_training(build_model_chunks(arch, self.groups, **model_kwargs),
                                       use_distributed_optimizer=config.optim.use_distributed_optimizer,
                                       overlap_grad_reduce=config.overlap_grad_reduce,
                                       overlap_param_gather=config.overlap_param_gather,
                                       grad_reduce_in_fp32=config.grad_reduce_in_fp32)
        self.routing: RoutingState | None = None  # mixture of experts: routing replay (routing.py)
        self.last_routing: Tensor | None = None  # (B, T, layers, k) of the last pass that recorded it
        if arch.is_moe:
            self.routing = RoutingState(num_layers=arch.num_layers, top_k=arch.num_experts_per_tok,
                                        tp_rank=g.tp_rank, tp_size=g.tp_size,
                                        sequence_parallel=config.sequence_parallel, cp_rank=g.cp_rank,
                                        cp_size=g.cp_size)
            routing_module.install(self.model)
            for chunk in self.model:
                unwrap_model(chunk).routing_state = self.routing
        self.optimizer = build_optimizer(self.model, config.optim, precision=config.precision)
        self.scheduler = build_scheduler(self.optimizer, config.optim)
        self.step = 0  # optimizer steps taken
        self.alignment = config.token_alignment  # what sequences and packs are padded to
        self._fp8_shapes = None if config.precision != "fp8" else gemm_shapes(
            hidden_size=arch.hidden_size, q_dim=arch.num_attention_heads * arch.head_dim,
            ffn_hidden_size=arch.ffn_hidden_size, tp=self.groups.tp_size)
        self._params_pending = False  # overlap_param_gather: updated shards not yet all-gathered
        self._offloader: StorageOffloader | None = None
        self._async_saves = AsyncSaves() if config.checkpoint.async_save else None
        self.reference = None
        if with_reference:
            self.reference = ReferenceModel(arch, self.groups, offload=config.ref_offload, **build)
        if config.load:
            self.load(config.load)
        if self.reference is not None:
            if config.ref_load:
                self.reference.load(config.ref_load)
            else:
                self.reference.copy_from(self.model)

    # ------------------------------------------------------------------ views

    @property
    def policy_chunks(self) -> list[Any]:
        """The bare GPTModel chunks of the policy (for weight sync and conversion), with every
        parameter up to date (see `sync_params`)."""
        self._require_onloaded("read the policy weights")
        self.sync_params()
        return [unwrap_model(chunk) for chunk in self.model]

    def sync_params(self) -> None:
        """Finish the distributed optimizer's parameter all-gather of the last step.

        With learner.overlap_param_gather megatron gathers the updated parameter shards lazily,
        in the forward pre-hooks of the next forward pass; anything that reads the parameters
        outside a forward (weight sync, checkpoints, the reference copy, offload) calls this
        first. A no-op otherwise."""
        if self._params_pending:
            for chunk in self.model:
                chunk.start_param_sync(force_sync=True)
            self._params_pending = False

    # ------------------------------------------------------------------ colocated servers

    @property
    def offloaded(self) -> bool:
        return self._offloader is not None

    def offload(self) -> None:
        """Move weights, optimizer state (and drop gradient buffers) to host memory, releasing the
        device memory for a colocated rollout server; `onload()` restores everything exactly.

        Between the two, nothing of the policy may run (methods that need it raise). The
        reference model is in host memory already with learner.ref_offload."""
        if self._offloader is not None:
            return
        self.sync_params()
        offloader = StorageOffloader()
        param_buffers, grad_buffers = ddp_buffers(self.model)
        offloader.add(module_tensors(self.model))
        offloader.add(param_buffers)
        offloader.add(optimizer_tensors(self.optimizer))
        offloader.add(grad_buffers, keep_values=False)  # zeroed before every step anyway
        offloader.offload()
        self._offloader = offloader

    def onload(self) -> None:
        """Bring back what `offload()` moved; a no-op when not offloaded."""
        if self._offloader is not None:
            self._offloader.onload()
            self._offloader = None

    def _require_onloaded(self, what: str) -> None:
        if self._offloader is not None:
            raise RuntimeError(f"the learner is offloaded (its weights are in host memory); call onload() "
                               f"before you {what}")

    def load_hf(self, path: str) -> None:
        """Set the policy (and the reference, if any) to the weights of Hugging Face directory `path`.

        Mixed-precision optimizers (bf16 / fp8) keep fp32 main copies of the weights, made when
        the optimizer was built; they are refreshed from the loaded weights here
        (`reload_model_params`), so the first update starts from these weights and not from
        the random initialisation."""
        from megatron_s2lpo.convert.hf_io import HFReader
        from megatron_s2lpo.convert.live import load_hf_state

        self._require_onloaded("load weights")
        g = self.groups
        load_hf_state(self.policy_chunks, g.tp_rank, g.tp_size, self.arch, HFReader(path), etp_rank=g.etp_rank,
                      etp_size=g.etp_size)
        self.optimizer.reload_model_params()
        if self.reference is not None:
            self.init_reference_from_policy()

    def init_reference_from_policy(self) -> None:
        """Make the reference a copy of the current policy (call after loading initial weights)."""
        if self.reference is None:
            raise ValueError("this learner has no reference model; build it with with_reference=True")
        self.reference.copy_from(self.policy_chunks)

    # ------------------------------------------------------------------ batches

    def _local_micro_batches(self, batch: TrainBatch, max_tokens: int, routing: Tensor | None = None
                             ) -> list[MicroBatch]:
        """This DP rank's share of `batch` as token-budget micro-batches (batching.rank_micro_batches),
        carrying `routing`, the (B, T, layers, k) experts to replay, when given."""
        g = self.groups
        if routing is not None:
            routing = routing_module.sanitize(routing, self.arch.num_experts)
        micro = rank_micro_batches(batch, dp_rank=g.dp_rank, dp_size=g.dp_size, max_tokens=max_tokens,
                                   alignment=self.alignment, packed=self.config.pack_sequences,
                                   uniform_multiple_of=g.pp_size if g.vpp_size is not None else None,
                                   routing=routing)
        if self._fp8_shapes is not None:  # TE's own rule, checked here rather than raised inside a layer
            c = self.config
            check_input_shapes([m.input_shape for m in micro], self._fp8_shapes, c.fp8_recipe,
                               tp=c.tensor_parallel_size, sequence_parallel=c.sequence_parallel,
                               cp=c.context_parallel_size)
        return micro

    def _gather_rows(self, values: Tensor) -> Tensor:
        """Rows computed on each DP rank (zeros elsewhere) -> the full tensor on every rank."""
        g = self.groups
        values = values.to(g.device)
        if g.is_last_stage and g.dp_size > 1:
            dist.all_reduce(values, group=g.dp_group)  # row sets are disjoint: the sum assembles
        if g.pp_size > 1:
            dist.broadcast(values, src=dist.get_global_rank(g.pp_group, g.pp_size - 1), group=g.pp_group)
        return values.cpu()

    # ------------------------------------------------------------------ log-probs

    @torch.no_grad()
    def compute_logprobs(
        self,
        batch: TrainBatch,
        temperature: float = 1.0,
        *,
        reference: bool = False,
        with_entropy: bool = False,
        all_tokens: bool = False,
        routing: str = "auto",
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Log-probs of `batch.tokens` under the policy (or the reference); (B, T) on every rank.

        Aligned with tokens (types.py): entry [b, t] = log p(tokens[b, t] | tokens[b, :t]) at
        `temperature`, computed where batch.loss_mask is 1 (the response tokens the loss uses)
        and 0 elsewhere; with `all_tokens`, at every position 1 <= t < seq_len (prompts too).
        With `with_entropy`, also the (B, T) entropy of the same distributions. The output layer
        runs on learner.logprob_chunk_tokens of those positions at a time (step.py).

        Mixture-of-experts policy (routing.py, docs/learner.md "Routing replay"): routing "auto"
        follows learner.routing_replay: r3 replays batch.routed_experts (the engine's routing,
        where a row has it), r2 routes freely; both record the routing the pass used into
        batch.replay_experts, which the training passes then replay. "free" (the router's own
        choice everywhere) and "engine" (batch.routed_experts replayed, as r3) record into
        `last_routing` only: the routing metrics' passes. The reference model routes freely.
        """
        if reference and self.reference is None:
            raise ValueError("reference log-probs requested but the learner has no reference model "
                             "(build it with with_reference=True, i.e. algo.kl_coef > 0)")
        self._require_onloaded("compute log-probs")
        spec = LogProbSpec(vocab_size=self.arch.vocab_size, tp_group=self.groups.tp_group,
                           temperature=temperature, with_entropy=with_entropy,
                           chunk_tokens=self.config.logprob_chunk_tokens, all_tokens=all_tokens,
                           cp_group=self.groups.cp_group if self.groups.cp_size > 1 else None)
        if routing not in ("auto", "free", "engine"):
            raise ValueError(f"routing must be 'auto', 'free' or 'engine', got {routing!r}")
        mode = {"auto": self.config.routing_replay, "free": "none", "engine": "r3"}[routing]
        record = self.routing is not None and not reference and (routing != "auto" or mode != "none")
        replay = batch.routed_experts if mode == "r3" else None
        micro = self._local_micro_batches(batch, self.config.logprob_tokens, replay)
        if reference:
            with self.reference.on_device() as chunks:
                stored = run_schedule(partial(logprob_forward_step, spec=spec), chunks, micro, forward_only=True)
        else:
            for chunk in self.model:
                chunk.eval()
            if self.routing is not None:
                self.routing.begin(self.model, training=False, replay=replay is not None, recording=record)
            stored = run_schedule(partial(logprob_forward_step, spec=spec), self.model, micro, forward_only=True)
        num_seqs, seq_len = batch.tokens.shape
        if record:
            self.last_routing = routing_module.combine_over_ranks(
                self.routing.collect(self.model, num_seqs, seq_len), self.arch.num_experts, self.groups.device)
            if routing == "auto":
                batch.replay_experts = self.last_routing
        logprobs = self._gather_rows(scatter_rows([(s["indices"], s["logprobs"]) for s in stored], num_seqs, seq_len))
        if not with_entropy:
            return logprobs
        return logprobs, self._gather_rows(scatter_rows([(s["indices"], s["entropy"]) for s in stored],
                                                        num_seqs, seq_len))

    # ------------------------------------------------------------------ training

    def train_step(
        self,
        batch: TrainBatch,
        *,
        loss_config: PolicyLossConfig,
        temperature: float = 1.0,
        is_threshold: float | None = None,
        is_sources: tuple[int, ...] | None = None,
        objective: str = "policy",
        distill_coef: float = 1.0,
    ) -> dict[str, float]:
        """One optimizer step on `batch` (one mini-batch); returns full-batch metrics on every rank.

        The loss is `algo.losses.policy_loss` over all loss tokens of the batch, normalised by
        the whole batch's `loss_normalizer`, so it and its gradient do not depend on how the
        batch is split into micro-batches or DP ranks (see step.py). is_threshold: multiply
        the policy-gradient terms by truncated importance weights min(exp(old - behaviour),
        is_threshold) (None: off), on the rows whose source code is in is_sources (None: every
        row; types.SOURCE_CODES). objective: `policy` (the above), `forward_kl` (cross-entropy
        on the batch's tokens, against batch.teacher_topk_* when present) or `reverse_kl` (direct
        on-policy distillation loss against batch.teacher_logprobs, weighted by distill_coef); see
        algo/distill.py. Metric `loss` is the loss before the update.
        """
        self.finish_saves(blocking=False)  # commits a finished asynchronous save (every rank trains)
        metrics = self.compute_gradients(batch, loss_config=loss_config, temperature=temperature,
                                         is_threshold=is_threshold, is_sources=is_sources, objective=objective,
                                         distill_coef=distill_coef)
        metrics.update(self.optimizer_step())
        return metrics

    def compute_gradients(
        self,
        batch: TrainBatch,
        *,
        loss_config: PolicyLossConfig,
        temperature: float = 1.0,
        is_threshold: float | None = None,
        is_sources: tuple[int, ...] | None = None,
        micro_batch_tokens: int | None = None,
        objective: str = "policy",
        distill_coef: float = 1.0,
    ) -> dict[str, float]:
        """Zero the gradients, run forward and backward over `batch`; no optimizer step.

        Leaves the full-batch gradient (summed over DP ranks, see step.py) in each parameter's
        `main_grad`. micro_batch_tokens overrides learner.micro_batch_tokens for this call. A
        mixture-of-experts policy with learner.routing_replay r2 / r3 replays batch.replay_experts
        (set by the old-log-prob pass, `compute_logprobs`); without it, it routes freely.
        """
        if objective == "policy" and loss_config.kl_coef > 0 and batch.ref_logprobs is None:
            raise ValueError("loss_config.kl_coef > 0 needs batch.ref_logprobs; compute them with "
                             "compute_logprobs(batch, reference=True)")
        self._require_onloaded("train")
        g = self.groups
        normalizer = loss_normalizer(batch.loss_mask.float(), loss_config.loss_agg_mode)
        if normalizer <= 0:  # checked here, on every rank, not inside the last pipeline stage
            raise ValueError("the batch has no loss tokens (loss_mask is all zero): nothing to train on")
        replay = batch.replay_experts if self.config.routing_replay != "none" else None
        micro = self._local_micro_batches(batch, micro_batch_tokens or self.config.micro_batch_tokens, replay)
        if self.routing is not None:
            self.routing.begin(self.model, training=True, replay=replay is not None, recording=False)
        spec = LossSpec(loss_config=loss_config, normalizer=normalizer,
                        num_microbatches=len(micro), dp_size=g.dp_size, vocab_size=self.arch.vocab_size,
                        tp_group=g.tp_group, temperature=temperature, is_threshold=is_threshold,
                        is_sources=is_sources, objective=objective, distill_coef=distill_coef,
                        chunk_tokens=self.config.logprob_chunk_tokens,
                        cp_group=g.cp_group if g.cp_size > 1 else None)
        for chunk in self.model:
            chunk.train()
        zero_grads(self.model, self.optimizer)
        stored = run_schedule(partial(train_forward_step, spec=spec), self.model, micro, forward_only=False)
        metrics = reduce_metrics(stored, dp_group=g.dp_group, pp_group=g.pp_group, is_last_stage=g.is_last_stage,
                                 device=g.device)
        metrics.update(num_micro_batches=float(len(micro)), normalizer=spec.normalizer)
        return metrics

    def optimizer_step(self) -> dict[str, float]:
        """Advance the LR schedule and apply the accumulated gradients (clipped) with Adam."""
        self.scheduler.step(increment=1)  # the LR of this step (see optimizer.build_scheduler)
        self._require_onloaded("step the optimizer")
        update_successful, grad_norm, _num_zeros = self.optimizer.step()
        self._params_pending = self.config.overlap_param_gather
        if update_successful:
            self.step += 1
        else:  # skipped (non-finite gradients): the schedule does not advance either
            self.scheduler.step(increment=-1)
        return {
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "update_successful": float(bool(update_successful)),
        }

    # ------------------------------------------------------------------ checkpoints

    def save(self, root: str | Path, *, step: int | None = None, trainer_state: dict | None = None,
             extra_files: dict[str, bytes] | None = None, wait: bool = False) -> Path:
        """Atomic dist checkpoint of policy + optimizer + LR schedule + RNG (+ trainer_state, and
        extra_files {name: bytes} written by rank 0 into the checkpoint directory).

        With learner.checkpoint.async_save the shards are written in the background and the
        checkpoint is committed by a later `finish_saves` (each train_step polls; `wait=True`, the
        next save and a load wait for it); the returned path exists once it is committed."""
        self._require_onloaded("save a checkpoint")
        self.finish_saves(blocking=True)  # one save in flight at a time
        self.sync_params()
        state = {"learner_step": self.step, **(trainer_state or {})}
        path = ckpt.save_checkpoint(root, self.step if step is None else step, model_chunks=self.model,
                                    optimizer=self.optimizer, scheduler=self.scheduler, trainer_state=state,
                                    extra_files=extra_files, optimizer_sharding=self.config.checkpoint.optimizer_sharding,
                                    async_saves=self._async_saves)
        if wait:
            self.finish_saves(blocking=True)
        return path

    def finish_saves(self, *, blocking: bool = True) -> Path | None:
        """Commit a pending asynchronous save once every rank has written it (blocking: wait).
        Returns the committed checkpoint or None. Collective; a no-op with synchronous saves."""
        return self._async_saves.finish(blocking=blocking) if self._async_saves is not None else None

    def load(self, path: str | Path, *, load_optimizer: bool = True) -> ckpt.LoadedState:
        """Load a checkpoint (directory or root -> latest complete), resharding as needed.

        load_optimizer=False loads the weights only (fresh optimizer state and LR schedule)."""
        self._require_onloaded("load a checkpoint")
        self.finish_saves(blocking=True)  # a save still being written commits first
        self.sync_params()  # a pending gather must not overwrite the loaded weights later
        loaded = ckpt.load_checkpoint(path, model_chunks=self.model,
                                      optimizer=self.optimizer if load_optimizer else None,
                                      scheduler=self.scheduler if load_optimizer else None)
        if not load_optimizer:  # weights only: fp32 main copies (bf16 / fp8) must follow them
            self.optimizer.reload_model_params()
        self.step = int(loaded.trainer_state.get("learner_step", loaded.step))
        return loaded
