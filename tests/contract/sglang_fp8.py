"""A contract server started with `--quantization fp8`: SGLang 0.5.23's own FP8 model and loader.

Loaded by sglang_backend.ContractBackend when SGLang's `ServerArgs` (parsed from the launch line)
say quantization=fp8. What runs is SGLang's, from the wheel:
  - its distributed set-up (`init_distributed_environment` + `initialize_model_parallel`, gloo,
    one rank) and `runtime_context.publish` with the rank bundle, as a scheduler process does;
  - `ModelConfig.from_server_args` (reads config.json, checks `--quantization` against its
    `quantization_config`) and the cold-start loader `get_model_loader(...).load_model(...)`:
    `_get_quantization_config` -> `Fp8Config.from_config`, the model class from SGLang's registry
    (Qwen3ForCausalLM, ...), whose linear layers get `Fp8LinearMethod.create_weights` (float8
    `weight` + float32 `BlockQuantScaleParameter` `weight_scale_inv`), then the model's own
    `load_weights` (q/k/v -> qkv_proj and gate/up -> gate_up_proj shards, block-scale shards
    placed by their loaders) and `process_weights_after_loading`;
  - every later update goes through SGLang's model-runner `WeightUpdater` holding that model
    (disk: `update_weights_from_disk`, the real loader again; tensor and distributed: the model's
    `load_weights` between `begin_weight_update` (`restore_weights_before_loading`) and
    `end_weight_update` (`postprocess_weights`)).
What stands in for the GPU is only generation: FP8 GEMMs need CUDA (or an AMX CPU with the CPU
build of sgl_kernel), so after each completed update the server's in-process engine gets the
model's weights dequantized by SGLang's `block_quant_dequant` (fused layers split back into HF
names by their `output_partition_sizes`), and samples with them in fp32.
"""

from __future__ import annotations

import argparse
import socket
import torch

# HF module names of SGLang's fused linear layers, in shard order (SGLang's stacked_params_mapping)
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class Fp8Serving:
    """SGLang's model of a `--quantization fp8` server, loaded and updated by SGLang's code."""

    def __init__(self, parser: argparse.ArgumentParser, known_argv: list[str]) -> None:
        from sglang.srt import runtime_context
        from sglang.srt.configs.device_config import DeviceConfig
        from sglang.srt.configs.load_config import LoadConfig
        from sglang.srt.configs.model_config import ModelConfig
        from sglang.srt.distributed.parallel_state import init_distributed_environment, initialize_model_parallel
        from sglang.srt.model_loader.loader import get_model_loader
        from sglang.srt.server_args import ServerArgs

        self.server_args = ServerArgs.from_cli_args(parser.parse_args(known_argv + ["--device", "cpu"]))
        runtime_context.publish(self.server_args, role="scheduler", ranks=runtime_context.SpawnRanks(world_rank=0))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        init_distributed_environment(world_size=1, rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}",
                                     local_rank=0, backend="gloo")
        initialize_model_parallel(backend="gloo")
        self.model_config = ModelConfig.from_server_args(self.server_args)
        self.model = get_model_loader(LoadConfig(load_format="auto"), self.model_config).load_model(
            model_config=self.model_config, device_config=DeviceConfig("cpu"))
        self.block = list(self.model.quant_config.weight_block_size)

    def parameters(self) -> dict[str, list]:
        """Every parameter of SGLang's model: name -> [dtype, shape] (for the tests)."""
        return {n: [str(p.dtype).removeprefix("torch."), list(p.shape)] for n, p in self.model.named_parameters()}

    def hf_weights(self) -> list[tuple[str, torch.Tensor]]:
        """The served weights under HF names, float32: FP8 layers dequantized by SGLang's
        `block_quant_dequant`, fused layers split back into their HF shards."""
        from sglang.srt.layers.quantization.fp8_utils import block_quant_dequant

        out = []
        for prefix, module in self.model.named_modules():
            weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
            if weight is None:
                continue
            scale = module._parameters.get("weight_scale_inv")
            full = (block_quant_dequant(weight.data, scale.data, self.block, torch.float32) if scale is not None
                    else weight.data.float())
            if getattr(module, "org_vocab_size", None) is not None:  # embedding rows padded to 64
                full = full[: module.org_vocab_size]
            parent, _, leaf = prefix.rpartition(".")
            if leaf in FUSED:
                sizes = list(module.output_partition_sizes)
                for shard, part in zip(FUSED[leaf], torch.split(full, sizes, dim=0), strict=True):
                    out.append((f"{parent}.{shard}.weight", part.clone()))
            else:
                out.append((f"{prefix}.weight", full))
        return out

