"""Every CPU shim megatron-core needs, in one place, applied only when CUDA is absent.

megatron-core assumes a GPU in places that have nothing to do with the math: it asks
`torch.cuda.current_device()` for the device of new tensors, creates scalars with a literal
`device="cuda"`, checks `x.type() == 'torch.cuda.FloatTensor'`, calls `x.cuda()` and
`torch.cuda.synchronize()`, and saves the CUDA RNG state around activation recompute. On a
CPU-only torch (dev machines, CI) those calls raise. `apply_cpu_shims()` redirects exactly those
calls to the CPU (each replacement below says what it replaces) and works around three defects of
the distributed optimizer with torch's Adam, the only Adam there is without Apex / TE. With CUDA
present it does nothing, so GPU runs use megatron-core untouched.

Settings that megatron exposes as config are not shims and live where the config is built
(`model.py`): `use_cpu_initialization=True`, explicit `pipeline_dtype`, and for gloo
`batch_p2p_comm=False`. The CUDA RNG tracker is replaced through megatron's own option
(`model_parallel_cuda_manual_seed(..., inference_rng_tracker=True)`, see `parallel.py`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any, Iterator

import torch

_APPLIED = False

# megatron-core modules that build tensors with a literal device="cuda"; inside each, the name
# `torch` is rebound to `_CpuTorch`, which maps that device to the CPU (nothing else changes).
_MODULES_WITH_CUDA_LITERALS = (
    # forward_backward_*: `total_num_tokens = torch.zeros([], device="cuda")` per step
    "megatron.core.pipeline_parallel.schedules",
    # get_default_causal_mask: the causal attention mask of the local (non-TE) softmax
    "megatron.core.transformer.utils",
    # get_grad_norm_fp32 / clip_grad_by_total_norm_fp32 / count_zeros_fp32: norm scalars
    "megatron.core.optimizer.clip_grads",
    # MixedPrecisionOptimizer / FP32Optimizer: found_inf, _scale_one, _dummy_overflow_buf
    "megatron.core.optimizer.optimizer",
    # ConstantGradScaler / DynamicGradScaler: the loss-scale scalars (bf16 / fp16 only)
    "megatron.core.optimizer.grad_scaler",
    # local_multi_tensor_l2_norm (grad-norm fallback without Apex/TE): its result scalar
    "megatron.core.utils",
    # dist_checkpointing save: the all-ranks "can reuse the save plan" flag
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    # dist_checkpointing load/exchange: receive buffers of exchanged shards
    "megatron.core.dist_checkpointing.exchange_utils",
    # MoEAlltoAllTokenDispatcher: a side `torch.cuda.Stream()` for the device-to-host copies of
    # its split sizes, entered with `torch.cuda.stream(...)` and waited on through an event; on
    # CPU the copies are already synchronous (`_CpuCuda` below gives it a stream that does nothing)
    "megatron.core.transformer.moe.token_dispatcher",
)


def _cpu_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    device = kwargs.get("device")
    if device is not None and str(device).startswith("cuda"):
        kwargs = {**kwargs, "device": "cpu"}
    kwargs.pop("pin_memory", None)  # pinned memory needs a CUDA driver
    return kwargs


class _CpuTorch:
    """The `torch` module as seen by one megatron module: device="cuda" factories give CPU tensors."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def zeros(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._real.zeros(*args, **_cpu_kwargs(kwargs))

    def ones(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._real.ones(*args, **_cpu_kwargs(kwargs))

    def empty(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._real.empty(*args, **_cpu_kwargs(kwargs))

    def empty_like(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._real.empty_like(*args, **_cpu_kwargs(kwargs))

    def tensor(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._real.tensor(*args, **_cpu_kwargs(kwargs))

    def full(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._real.full(*args, **_cpu_kwargs(kwargs))

    @property
    def cuda(self) -> "_CpuCuda":
        return _CpuCuda(self._real.cuda)


class _CpuCuda:
    """`torch.cuda` as seen by one megatron module: streams and stream contexts that do nothing
    (every CPU op has finished when it returns); everything else is the real torch.cuda."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    @staticmethod
    def Stream(*_args: Any, **_kwargs: Any) -> "_CpuStream":  # noqa: N802 - torch's name
        return _CpuStream()

    @staticmethod
    def current_stream(*_args: Any, **_kwargs: Any) -> "_CpuStream":
        return _CPU_STREAM

    @staticmethod
    def stream(_stream: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def _cpu_device() -> torch.device:
    return torch.device("cpu")


def _no_op(*_args: Any, **_kwargs: Any) -> None:
    return None


def apply_cpu_shims() -> None:
    """Make megatron-core run on a CPU-only torch; idempotent, a no-op when CUDA is available.

    Call it before building models (the learner's `init_parallel` does). It only touches the
    current process.
    """
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return
    _import_without_triton()
    # Replaces the CUDA device index that ~170 megatron call sites pass as `device=` when they
    # allocate: weights (`use_cpu_initialization` still allocates some buffers), the attention
    # scratch buffer (`GlobalMemoryBuffer.get_tensor`), RoPE frequencies, p2p receive buffers.
    torch.cuda.current_device = _cpu_device  # type: ignore[assignment]
    # Replaces the device barrier around dist_checkpointing save/load and p2p (CPU ops are
    # synchronous, so there is nothing to wait for).
    torch.cuda.synchronize = _no_op  # type: ignore[assignment]
    # Replaces the compute stream that megatron-core 0.19's grad buffer asks for in every
    # start_grad_sync (`torch.cuda.current_stream().wait_event(...)` for CUDA-graph replays): on
    # CPU every op has finished when it returns, so waiting on a stream or event is a no-op.
    torch.cuda.current_stream = _cpu_stream  # type: ignore[assignment]
    for name in _MODULES_WITH_CUDA_LITERALS:
        module = importlib.import_module(name)
        if not isinstance(module.torch, _CpuTorch):
            module.torch = _CpuTorch(module.torch)
    for module_name, attribute in _FUNCTIONS_WITH_CUDA_TENSOR_CALLS:
        _run_with_cpu_tensor_methods(module_name, attribute)
    _fix_torch_adam_step_in_distributed_optimizer()
    _bind_missing_te_names_in_moe_utils()
    _split_sizes_as_numpy_in_token_dispatcher()
    # Replaces the CUDA generator state that activation recompute (CheckpointFunction) saves
    # and restores around the recomputed forward: there is no CUDA generator on CPU (the CPU
    # generator state is saved separately by megatron).
    random_module = importlib.import_module("megatron.core.tensor_parallel.random")
    random_module._get_cuda_rng_state = _empty_cuda_rng_state
    _APPLIED = True


class _CpuStream:
    """What megatron-core calls on a CUDA stream (and on the event it records); nothing to wait
    for on CPU."""

    def wait_event(self, _event: Any) -> None:
        return None

    def wait_stream(self, _stream: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def record_event(self, *_args: Any) -> "_CpuStream":
        return self  # an event whose synchronize() returns at once


_CPU_STREAM = _CpuStream()


def _cpu_stream(*_args: Any, **_kwargs: Any) -> _CpuStream:
    return _CPU_STREAM


# megatron-core modules that `import triton` unconditionally and sit on the import path of every
# model (megatron-core 0.19: `import megatron.core` -> pipeline schedules -> moe.paged_stash ->
# these kernels, `@triton.jit` at import). A CPU-only torch has no triton; the placeholder module
# keeps the names importable and fails only if a kernel is launched (MoE paged stash, GPU only).
_TRITON_KERNEL_MODULES = {
    "megatron.core.transformer.moe.ops.paged_stash": {
        "constants": {"GLOBAL_BLOCK_SIZE": 1024},
        "kernels": ("paged_stash_copy_kernel", "paged_stash_pop_kernel"),
    },
}


class _TritonKernelPlaceholder:
    """Stands in for a `@triton.jit` kernel; launching it (`kernel[grid](...)`) raises."""

    def __init__(self, qualname: str) -> None:
        self.qualname = qualname

    def __getitem__(self, _grid: Any) -> Any:
        raise RuntimeError(f"{self.qualname} is a triton kernel (MoE paged stash) and needs triton and a "
                           "CUDA GPU; this CPU-only torch has neither")

    __call__ = __getitem__


class _TritonFreeKernelModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import hook that answers for `_TRITON_KERNEL_MODULES` with placeholder modules."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in _TRITON_KERNEL_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> None:
        return None  # the default module object

    def exec_module(self, module: Any) -> None:
        entry = _TRITON_KERNEL_MODULES[module.__name__]
        vars(module).update(entry["constants"])
        for name in entry["kernels"]:
            setattr(module, name, _TritonKernelPlaceholder(f"{module.__name__}.{name}"))
        module.__all__ = sorted([*entry["constants"], *entry["kernels"]])


def _import_without_triton() -> None:
    """Let `import megatron.core` succeed without triton (megatron-core 0.19; see above).

    Must run before megatron-core is first imported; does nothing when triton is installed or a
    module in the table was already imported for real.
    """
    if importlib.util.find_spec("triton") is not None:
        return
    if any(isinstance(finder, _TritonFreeKernelModules) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _TritonFreeKernelModules())


# megatron-core 0.16.1's moe_utils imports these Transformer Engine functions inside a
# try/except that leaves the names UNBOUND without TE, while its own fallbacks test them for None
# (`if te_general_gemm is not None` in the router's gating linear): without TE every MoE
# forward raises NameError. Binding them to None selects megatron's torch fallbacks.
_MOE_UTILS_TE_NAMES = ("fused_compute_score_for_moe_aux_loss", "fused_moe_aux_loss", "fused_permute",
                       "fused_permute_with_probs", "fused_sort_chunks_by_index",
                       "fused_sort_chunks_by_index_with_probs", "fused_topk_with_score_function",
                       "fused_unpermute", "te_general_gemm")


def _bind_missing_te_names_in_moe_utils() -> None:
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    for name in _MOE_UTILS_TE_NAMES:
        if not hasattr(moe_utils, name):
            setattr(moe_utils, name, None)


def _split_sizes_as_numpy_in_token_dispatcher() -> None:
    """MoEAlltoAllTokenDispatcher moves its all-to-all split sizes to the host with
    `maybe_move_tensor_to_cpu(t, as_numpy=True)`, which converts only CUDA tensors: on CPU the
    sizes stay tensors, and torch's all_to_all_single takes no tensor as split sizes. The
    replacement also gives CPU tensors the numpy form a GPU run hands over."""
    dispatcher = importlib.import_module("megatron.core.transformer.moe.token_dispatcher")
    original = importlib.import_module("megatron.core.transformer.moe.moe_utils").maybe_move_tensor_to_cpu

    @functools.wraps(original)
    def to_host(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    dispatcher.maybe_move_tensor_to_cpu = to_host


def _empty_cuda_rng_state(*_args: Any, **_kwargs: Any) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)


def _fix_torch_adam_step_in_distributed_optimizer() -> None:
    """Distributed-optimizer checkpoints with torch's Adam (the CPU fallback for Apex/TE Adam).

    torch's Adam keeps a per-parameter `step` tensor, created at the first step. megatron's
    DistributedOptimizer (1) reads it from every parameter to save it, failing on a fresh
    optimizer (the state a checkpoint is loaded into); (2) restores it by handing ONE tensor to
    every parameter, which torch's Adam then increments once per parameter per step; (3) copies
    the reshardable (param, exp_avg, exp_avg_sq) shards into every key of a parameter's state,
    `step` included, failing on the missing key (fully_reshardable), or copies back the LIVE
    `step` tensor that the dp_reshardable format passes through unsaved, undoing the restored
    one. The replacements (1) create the state torch's first step would create (step 0, zero
    moments: the same first update), (2) give each parameter its own copy, (3) keep the `step`
    restored from the saved param groups and copy only the tensors.
    """
    distrib = importlib.import_module("megatron.core.optimizer.distrib_optimizer").DistributedOptimizer
    set_states, load_state_dict = distrib._set_main_param_and_optimizer_states, distrib.load_state_dict
    state_dict = distrib.state_dict

    @functools.wraps(state_dict)
    def state_dict_of_fresh_adam(self: Any) -> Any:
        if not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            for group in self.optimizer.param_groups:
                for param in group["params"]:
                    state = self.optimizer.state[param]
                    if "step" not in state:
                        state["step"] = torch.tensor(0.0)
                        state.setdefault("exp_avg", torch.zeros_like(param))
                        state.setdefault("exp_avg_sq", torch.zeros_like(param))
        return state_dict(self)

    @functools.wraps(set_states)
    def set_states_keeping_step(self: Any, model_param: Any, tensors: dict) -> None:
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return set_states(self, model_param, tensors)
        tensors = {key: value for key, value in tensors.items() if key != "step"}
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None)
        try:
            set_states(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    @functools.wraps(load_state_dict)
    def load_with_own_steps(self: Any, state_dict: Any) -> None:
        load_state_dict(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    distrib.state_dict = state_dict_of_fresh_adam
    distrib._set_main_param_and_optimizer_states = set_states_keeping_step
    distrib.load_state_dict = load_with_own_steps


# megatron functions that call CUDA-only tensor METHODS; they run inside `cpu_tensor_methods`.
_FUNCTIONS_WITH_CUDA_TENSOR_CALLS = (
    # asserts `param.grad.type() == 'torch.cuda.FloatTensor'` before clipping
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"),
    # distributed optimizer: sorts parameters into fp32 / half groups by `param.type()`
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer._build_model_and_main_param_groups"),
    # distributed optimizer checkpoint: `send_tensor.cuda()` before gathering Adam state over DP
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.get_parameter_state_dp_zero"),
    # tied embeddings with PP: `weight.data.cuda()` before the first/last-stage all-reduce
    ("megatron.core.models.common.language_module.language_module",
     "LanguageModule.setup_embeddings_and_output_layer"),
)


def _run_with_cpu_tensor_methods(module_name: str, attribute: str) -> None:
    """Replace `module.attribute` (a function, method or classmethod) by a wrapper that runs it
    inside `cpu_tensor_methods()`."""
    owner: Any = importlib.import_module(module_name)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    raw = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    is_classmethod = isinstance(raw, classmethod)
    function = raw.__func__ if is_classmethod else raw

    @functools.wraps(function)
    def on_cpu(*args: Any, **kwargs: Any) -> Any:
        with cpu_tensor_methods():
            return function(*args, **kwargs)

    setattr(owner, name, classmethod(on_cpu) if is_classmethod else on_cpu)


@contextlib.contextmanager
def cpu_tensor_methods() -> Iterator[None]:
    """For the duration of the block: `x.type()` reports CUDA type names, `x.cuda()` is `x`.

    Replaces the type-string checks `param.type() == 'torch.cuda.FloatTensor'` (also Half and
    BFloat16; on CPU the names lack the `cuda.`) and the `.cuda()` moves in the functions listed
    in `_FUNCTIONS_WITH_CUDA_TENSOR_CALLS`. Only those functions run inside it, only without CUDA.
    """
    if torch.cuda.is_available():
        yield
        return
    original_type, original_cuda = torch.Tensor.type, torch.Tensor.cuda

    def type_with_cuda_name(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = original_type(self, *args, **kwargs)
        if not args and not kwargs and isinstance(result, str) and result.startswith("torch."):
            return result.replace("torch.", "torch.cuda.", 1)
        return result

    def stay_on_cpu(self: torch.Tensor, *_args: Any, **_kwargs: Any) -> torch.Tensor:
        return self

    torch.Tensor.type = type_with_cuda_name  # type: ignore[method-assign]
    torch.Tensor.cuda = stay_on_cpu  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.type = original_type  # type: ignore[method-assign]
        torch.Tensor.cuda = original_cuda  # type: ignore[method-assign]
