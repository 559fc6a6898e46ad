"""Block-FP8 Hugging Face checkpoints: the format an SGLang server started with `--quantization
fp8` loads (DeepSeek-V3 / Qwen3-FP8 layout), written by the weight sync and read back by the
in-process engine.

Format (what SGLang 0.5.23 reads, `layers/quantization/fp8.py`):
  - config.json `quantization_config` = {"quant_method": "fp8", "fmt": "e4m3",
    "activation_scheme": "dynamic", "weight_block_size": [128, 128]} (+ "modules_to_not_convert");
    SGLang's `Fp8Config.from_config` turns it into a block-quantized, fp8-serialized config;
  - every linear projection of a decoder layer (q/k/v/o_proj, gate/up/down_proj, the MoE experts'
    too) is `<module>.weight` in float8_e4m3fn plus `<module>.weight_scale_inv`, float32 of shape
    (ceil(n / 128), ceil(k / 128)): the dequantized weight is `weight * scale_inv` per 128 x 128
    block (SGLang's `Fp8LinearMethod.create_weights` makes exactly these two parameters);
  - everything else stays in the training dtype: embeddings and lm_head (SGLang builds them as
    `VocabParallelEmbedding` / `ParallelLMHead`, which `Fp8Config.get_quant_method` leaves
    unquantized), norms, biases, and an MoE router (`mlp.gate`, built with quant_config=None).

The quantizer follows slime's `blockwise_cast_to_fp8_triton` (`slime/utils/fp8_kernel.py`, the
trainer-side quantizer slime uses for FP8 rollouts) written in torch: per block, scale =
max(|w|, 1e-10) / 448 in float32 (1.0 for an all-zero or non-finite block), q = clamp(w * (1 /
scale), -448, 448) rounded to e4m3. Dequantizing gives back every element within
`error_bound`: half an e4m3 step, max(2^-4 |w|, 2^-10 scale) (3 mantissa bits; 2^-9 is the
subnormal step), plus float32 rounding.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
SCALE_SUFFIX = "_scale_inv"  # <module>.weight -> <module>.weight_scale_inv
# HF module names of the linear projections SGLang builds as LinearBase (quantized by Fp8Config).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_EPS = 1e-10  # slime's amax floor


@dataclass(frozen=True, kw_only=True, slots=True)
class Fp8Format:
    """Which tensors are block-quantized, and how (see the module docstring)."""

    block: tuple[int, int] = (128, 128)
    ignored: tuple[str, ...] = ()  # modules_to_not_convert: module paths kept unquantized

    def __post_init__(self) -> None:
        if len(self.block) != 2 or any(int(b) != b or b < 1 for b in self.block):
            raise ValueError(f"weight_block_size must be two positive integers, got {list(self.block)}")

    def quantization_config(self) -> dict:
        """The config.json `quantization_config` SGLang reads (`Fp8Config.from_config`)."""
        out = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
               "weight_block_size": list(self.block)}
        if self.ignored:
            out["modules_to_not_convert"] = list(self.ignored)
        return out

    @classmethod
    def from_quantization_config(cls, config: dict, where: str = "quantization_config") -> "Fp8Format":
        """The format of a config.json `quantization_config`; ValueError unless it is block FP8."""
        method = config.get("quant_method")
        if method != "fp8":
            raise ValueError(f"{where}: quant_method is {method!r}; the weight sync writes block FP8 only "
                             "(quant_method fp8, e4m3, dynamic activations, weight_block_size)")
        if config.get("fmt", "e4m3") != "e4m3" or config.get("activation_scheme", "dynamic") != "dynamic":
            raise ValueError(f"{where}: fmt {config.get('fmt')!r} / activation_scheme "
                             f"{config.get('activation_scheme')!r}: only e4m3 with dynamic activations is supported")
        block = config.get("weight_block_size")
        if block is None:
            raise ValueError(f"{where}: no weight_block_size: per-tensor FP8 checkpoints are not written by the "
                             "weight sync; use block quantization, e.g. [128, 128]")
        if not isinstance(block, (list, tuple)) or len(block) != 2:
            raise ValueError(f"{where}: weight_block_size must be two positive integers, got {block!r}")
        ignored = config.get("modules_to_not_convert") or config.get("ignored_layers") or ()
        return cls(block=(int(block[0]), int(block[1])), ignored=tuple(ignored))

    @classmethod
    def from_model_dir(cls, path: str) -> "Fp8Format | None":
        """The format of a HF directory's config.json (None without a quantization_config)."""
        config_path = os.path.join(path, "config.json")
        with open(config_path) as f:
            config = json.load(f)
        qc = config.get("quantization_config")
        return None if qc is None else cls.from_quantization_config(qc, where=f"{config_path} quantization_config")

    def quantizes(self, name: str, tensor: torch.Tensor) -> bool:
        """Whether HF tensor `name` is stored block-quantized: a 2-D `.weight` of a projection
        whose module is not ignored (SGLang's `is_layer_skipped` path matching)."""
        if not name.endswith(".weight") or tensor.dim() != 2:
            return False
        module = name[: -len(".weight")]
        if module.rsplit(".", 1)[-1] not in PROJECTIONS:
            return False
        return not any(_module_path_match(ignored, module) for ignored in self.ignored)

    def quantize_named(self, named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        """HF (name, tensor) pairs in the stored format: each quantized weight becomes
        (name, float8 weight) + (name + "_scale_inv", float32 scales); the rest is unchanged."""
        out = []
        for name, tensor in named:
            if self.quantizes(name, tensor):
                q, scale = block_quantize(tensor, self.block)
                out += [(name, q), (name + SCALE_SUFFIX, scale)]
            else:
                out.append((name, tensor))
        return out

    def dequantize_named(self, named: Iterable[tuple[str, torch.Tensor]],
                         dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """The inverse for a loader: float8 weights with their scales become `dtype` weights.

        A float8 weight whose scale is missing from `named` (or the reverse) is a ValueError."""
        items = list(named)
        scales = {name[: -len(SCALE_SUFFIX)]: t for name, t in items if name.endswith(".weight" + SCALE_SUFFIX)}
        used = set()
        for name, tensor in items:
            if name.endswith(".weight" + SCALE_SUFFIX):
                continue
            if tensor.dtype == FP8_DTYPE:
                if name not in scales:
                    raise ValueError(f"{name} is float8 but {name}{SCALE_SUFFIX} is missing from the same load")
                used.add(name)
                yield name, block_dequantize(tensor, scales[name], self.block, dtype)
            else:
                yield name, tensor
        orphans = sorted(set(scales) - used)
        if orphans:
            raise ValueError(f"scales without their float8 weight in the same load: {orphans[:3]}")


def _module_path_match(ignored: str, module: str) -> bool:
    """SGLang 0.5.23's `_module_path_match` (layers/quantization/utils.py): dotted-path match,
    so `mlp.gate` matches `...mlp.gate` but not `...mlp.gate_up_proj`."""
    ignored, module = ignored.rstrip("."), module.rstrip(".")
    return ignored == module or module.startswith(ignored + ".") or f".{ignored}." in f".{module}."


def _blocks(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def _tiled(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """(n, k) -> (nb, bn, kb, bk), zero-padded to whole blocks."""
    n, k = x.shape
    nb, kb = _blocks((n, k), block)
    padded = x.new_zeros((nb * block[0], kb * block[1]))
    padded[:n, :k] = x
    return padded.view(nb, block[0], kb, block[1])


def block_quantize(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, k) weight -> ((n, k) float8_e4m3fn, (ceil(n/bn), ceil(k/bk)) float32 scale_inv).

    Per block: scale = max(|w|) / 448 (floor 1e-10; 1.0 for a zero or non-finite block), q =
    clamp(w * (1 / scale), -448, 448) in float32, rounded to nearest e4m3."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"block_quantize takes a 2-D float weight, got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    tiles = _tiled(weight.detach().float(), block)  # (nb, bn, kb, bk)
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=_EPS)  # (nb, kb)
    scale = amax / FP8_MAX
    bad = (amax == 0) | ~torch.isfinite(amax) | ~torch.isfinite(scale)
    scale = torch.where(bad, torch.ones_like(scale), scale)
    inv = (1.0 / scale)[:, None, :, None]
    q = (tiles * inv).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.view(tiles.shape[0] * block[0], tiles.shape[2] * block[1])[:n, :k].contiguous()
    return q, scale.contiguous()


def block_dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, k) float8 weight x per-block scale_inv -> (n, k) `dtype` (SGLang's `block_quant_dequant`)."""
    n, k = q.shape
    if tuple(scale_inv.shape) != _blocks((n, k), block):
        raise ValueError(f"scale_inv has shape {tuple(scale_inv.shape)}, a {n}x{k} weight in {block[0]}x{block[1]} "
                         f"blocks needs {_blocks((n, k), block)}")
    full = scale_inv.float().repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)[:n, :k]
    return (q.float() * full).to(dtype)


def error_bound(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """Per-element bound on |weight - dequantized|: half an e4m3 step at |w| / scale (2^-4
    relative for normal values, 2^-10 x scale below 2^-6 x scale), with float32 slack."""
    n, k = weight.shape
    full = scale_inv.float().repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)[:n, :k]
    w = weight.float().abs()
    return torch.maximum(w * 2.0**-4, full * 2.0**-10) * (1 + 1e-6) + w * 2.0**-23


def write_fp8_dir(src: str, dst: str, fmt: Fp8Format | None = None, *, shard_bytes: int = 2 << 30) -> Fp8Format:
    """A block-FP8 copy of HF directory `src` at `dst` (atomic: written beside it, then renamed);
    config.json gets the `quantization_config`. Refuses to overwrite an existing `dst`."""
    import shutil

    from .hf_io import HFReader, HFShardWriter, copy_aux_files

    fmt = fmt or Fp8Format()
    if os.path.exists(dst):
        raise FileExistsError(f"{dst} exists; remove it or choose another output directory")
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    if config.get("quantization_config"):
        raise ValueError(f"{src}/config.json already has a quantization_config ({config['quantization_config']}); "
                         "convert the unquantized (bf16) checkpoint")
    tmp = f"{dst.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        writer = HFShardWriter(tmp, max_shard_bytes=shard_bytes)
        reader = HFReader(src)
        for name in reader.names():
            writer.add_all(fmt.quantize_named([(name, reader.get(name))]))
        writer.close()
        copy_aux_files(src, tmp)
        write_quantization_config(tmp, fmt)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return fmt


def fp8_copy_path(model_path: str) -> str:
    """Where the launcher expects the block-FP8 copy of `model_path` (`s2lpo convert hf-to-fp8`)."""
    return model_path.rstrip(os.sep) + "-fp8"


def write_quantization_config(model_dir: str, fmt: Fp8Format) -> None:
    """Set `quantization_config` in `model_dir`/config.json (the file must exist)."""
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["quantization_config"] = fmt.quantization_config()
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
