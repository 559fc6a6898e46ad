"""What every bucket must be before it leaves the trainer: the names, shapes and dtypes of `arch`.

A malformed bucket is worse than a failed push. What real SGLang 0.5.23 does with one (measured on
its CPU server, docs/sync.md "Malformed buckets"):

- `/update_weights_from_tensor` loads the bucket inside the scheduler without a guard
  (`WeightUpdater._update_weights_from_flattened_bucket`): a tensor of the wrong shape fails an
  assertion in the model's weight loader, a name with a layer the model does not have raises
  KeyError, a bucket whose bytes do not match its metadata fails to rebuild, and any of these
  makes the scheduler exit and takes the WHOLE server down;
- `/update_weights_from_distributed` catches the same errors and answers success=false, but the
  tensors of the bucket before the bad one are already loaded ("partially updated");
- a name the model does not know (outside the stacked q/k/v and gate/up names) is skipped with
  a log warning on every route, and the update reports success and the new version while the
  server keeps its old weights;
- an integer tensor is cast into the float parameter without a word.

So the sender refuses all of these before the first byte is posted (`WeightSync` checks every
bucket of every transport): each name must be one of the architecture's HF tensors, once per
bucket, with the HF shape (the exporter removes megatron's vocabulary padding) and a floating
dtype (the server casts between float dtypes, e.g. a bf16 learner into an fp32 server). A block-FP8
bucket (an engine started with `--quantization fp8`) also carries `<linear>.weight_scale_inv`, a
float32 2-D tensor next to each quantized 2-D weight; those names are accepted too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from megatron_s2lpo.config.model import ModelArch

Bucket = list[tuple[str, torch.Tensor]]
SCALE_SUFFIX = "weight_scale_inv"  # block-FP8 scales (SGLang's Fp8LinearMethod, block quantization)


class BucketRules:
    """The HF tensors a push of `arch` may carry: name -> shape."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], *, what: str) -> None:
        self.shapes = shapes
        self.what = what  # for messages: "the qwen3 architecture of the learner"

    @classmethod
    def from_arch(cls, arch: ModelArch) -> "BucketRules":
        from megatron_s2lpo.convert.mapping import hf_shapes, param_maps

        shapes = {name: shape for pm in param_maps(arch) for name, shape in zip(pm.hf_names, hf_shapes(pm, arch))}
        return cls(shapes, what=f"the learner's {arch.family} architecture ({arch.num_layers} layers)")

    def check(self, bucket: Bucket, index: int = 0) -> None:
        """ValueError naming the first tensor of bucket `index` that must not be pushed."""
        if not bucket:
            raise ValueError(f"weight bucket {index} is empty; the exporter must not yield empty buckets")
        seen: set[str] = set()
        for name, tensor in bucket:
            where = f"weight bucket {index}, tensor {name!r}"
            if name in seen:
                raise ValueError(f"{where} appears twice in the bucket")
            seen.add(name)
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"{where} is a {type(tensor).__name__}, not a tensor")
            if not tensor.dtype.is_floating_point:
                raise ValueError(f"{where} has dtype {tensor.dtype}; a server casts it into its float parameter "
                                 "silently, so only floating-point weights are pushed")
            if self._is_scale(name):
                if tensor.dtype != torch.float32 or tensor.dim() != 2:
                    raise ValueError(f"{where} is a block-FP8 scale and must be a float32 matrix, got "
                                     f"{tensor.dtype} of shape {tuple(tensor.shape)}")
                continue  # its block grid is the quantization's business
            expected = self.shapes.get(name)
            if expected is None:
                raise ValueError(f"{where} is not a tensor of {self.what}: the server would skip it with a "
                                 "warning and report the new version while keeping its old weights (or, for "
                                 "a layer it does not have, exit); check the exporter's name mapping")
            if tuple(tensor.shape) != expected:
                raise ValueError(f"{where} has shape {tuple(tensor.shape)}, expected {expected} for {self.what}; "
                                 "SGLang's tensor route would take the whole server down on it")

    def _is_scale(self, name: str) -> bool:
        base = name.removesuffix(SCALE_SUFFIX)
        return base != name and len(self.shapes.get(base + "weight", ())) == 2

    def checked(self, buckets: Iterable[Bucket]) -> Iterator[Bucket]:
        """The buckets, each checked just before it is handed on (nothing of a bad bucket is sent)."""
        for index, bucket in enumerate(buckets):
            self.check(bucket, index)
            yield bucket
