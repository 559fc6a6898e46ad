"""Training wrappers, megatron optimizer and LR schedule for the policy model chunks.

    chunks = [DDP(Float16Module(GPTModel))]   # Float16Module only for bf16 / fp8
    optimizer = get_megatron_optimizer(OptimizerConfig(adam, ...), chunks)
    scheduler = OptimizerParamScheduler(optimizer, warmup / decay from OptimConfig)

megatron's `DistributedDataParallel` keeps one contiguous fp32 gradient buffer (`main_grad`),
all-reduces it over DP in `finalize_model_grads` (which also sums tied-embedding gradients
between the first and last pipeline stage and qk-layernorm gradients across TP) and averages by
1 / dp_size; `step.py` compensates that average in the loss. Adam: decoupled weight decay, no
decay on biases and norm weights (megatron's standard parameter groups), global grad-norm clip.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_s2lpo.config.learner import OptimConfig


def wrap_for_training(chunks: list[Any], *, use_distributed_optimizer: bool, overlap_grad_reduce: bool = False,
                      overlap_param_gather: bool = False, grad_reduce_in_fp32: bool = True) -> list[Any]:
    """Wrap bare GPTModel chunks in (Float16Module and) megatron DDP; sets the schedule hooks.

    overlap_grad_reduce: bucketed DP reduce launched during the backward (megatron's no_sync /
    start_grad_sync hooks drive it across micro-batches); overlap_param_gather: the distributed
    optimizer's param all-gather runs in the next forward's pre-hooks (see Learner.sync_params).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.transformer.module import Float16Module

    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    wrapped = []
    for index, chunk in enumerate(chunks):
        if config.bf16 or config.fp16:
            chunk = Float16Module(config, chunk)
        wrapped.append(DistributedDataParallel(
            config, ddp_config, chunk,
            # Only the first chunk buckets (megatron's rule for interleaved pipelines).
            disable_bucketing=index > 0,
        ))
    # The schedule calls this after the last backward: DP all-reduce, embedding and layernorm syncs.
    config.finalize_model_grads_func = finalize_model_grads
    if overlap_grad_reduce:  # as megatron's trainer sets them (training.py, align_grad_reduce)
        no_sync = [chunk.no_sync for chunk in wrapped]
        grad_sync = [chunk.start_grad_sync for chunk in wrapped]
        config.no_sync_func = no_sync[0] if len(wrapped) == 1 else no_sync
        config.grad_sync_func = grad_sync[0] if len(wrapped) == 1 else grad_sync
    return wrapped


def build_optimizer(chunks: list[Any], optim: OptimConfig, *, precision: str) -> Any:
    """megatron's Adam (optionally distributed, ZeRO-1) over DDP-wrapped chunks."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    half = precision in ("bf16", "fp8")
    kwargs: dict[str, Any] = dict(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=half,
        params_dtype=torch.bfloat16 if half else torch.float32,
        use_distributed_optimizer=optim.use_distributed_optimizer,
    )
    if optim.cpu_offload:
        if not torch.cuda.is_available():
            raise ValueError("learner.optim.cpu_offload moves Adam from the GPU to host memory; it needs CUDA "
                             "(on a CPU-only machine the state is in host memory already): set it false")
        # megatron's HybridDeviceOptimizer reuses the precision-aware optimizer's code path
        # (Megatron-LM refuses --optimizer-cpu-offload without --use-precision-aware-optimizer)
        kwargs.update(optimizer_cpu_offload=True, optimizer_offload_fraction=optim.cpu_offload_fraction,
                      use_precision_aware_optimizer=True, overlap_cpu_optimizer_d2h_h2d=True)
    config = OptimizerConfig(**kwargs)
    optimizer = get_megatron_optimizer(config, chunks)
    chunks[0].config.grad_scale_func = optimizer.scale_loss
    return optimizer


def build_scheduler(optimizer: Any, optim: OptimConfig) -> Any:
    """LR warmup (linear from 0) then decay to min_lr; weight decay constant.

    The learner steps the scheduler BEFORE each optimizer step, so optimizer step k (1-based)
    uses the schedule's value at k: warmup reaches the full lr at step lr_warmup_steps instead
    of spending the first step at lr 0.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    constant = optim.lr_decay_style == "constant"
    # megatron asserts decay_steps > warmup_steps even for a constant schedule.
    decay_steps = optim.lr_warmup_steps + 1 if constant else optim.lr_decay_steps
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.lr_warmup_steps > 0 else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.lr_warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=1,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )


def zero_grads(chunks: list[Any], optimizer: Any) -> None:
    """Clear DDP grad buffers and the optimizer's grads before accumulating a new step."""
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
