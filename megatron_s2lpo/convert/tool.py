"""Convert checkpoints between Hugging Face (safetensors) and megatron-core (torch_dist).

    s2lpo convert hf-to-mcore --hf /models/Qwen3-8B-Base --out /ckpt/qwen3-8b-tp4 --tp 4   # installed command

    # Hugging Face -> megatron-core dist checkpoint (loads into the learner at any TP/PP)
    python tools/convert_checkpoint.py hf-to-mcore \\
        --hf /models/Qwen3-8B-Base --out /ckpt/qwen3-8b-tp4 --tp 4 --pp 1

    # megatron-core dist checkpoint -> Hugging Face directory (config/tokenizer copied from --hf-config)
    python tools/convert_checkpoint.py mcore-to-hf \\
        --mcore /ckpt/qwen3-8b-tp4 --out /models/qwen3-8b-rl --hf-config /models/Qwen3-8B-Base

    # the same with one process per TP x PP rank (each builds and handles only its shard)
    torchrun --nproc-per-node 4 tools/convert_checkpoint.py hf-to-mcore --hf ... --out ... --tp 4

Run as a plain script, the tool is a single process: it builds the whole model once (in the
checkpoint dtype) and dist_checkpointing stores global tensors, so the output reshards to any
TP/PP on load; --tp/--pp are then checked against the architecture and recorded in
convert_info.json. Under torchrun (WORLD_SIZE set) the model is built at --tp x --pp (and, for
a Qwen3-MoE model, its experts spread over --ep ranks) and the world size must be a multiple of
tp * pp and of ep * pp. See docs/convert.md.
"""

from __future__ import annotations

import argparse
import os
import sys

DTYPES = ("auto", "bf16", "fp16", "fp32")
# What a previous conversion leaves in an output directory (removed by --force).
_OUTPUT_PATTERNS = (".distcp", ".safetensors", ".safetensors.tmp")
_OUTPUT_FILES = (".metadata", "metadata.json", "common.pt", "convert_info.json",
                 "model.safetensors.index.json")

EPILOG = """examples:
  python tools/convert_checkpoint.py hf-to-mcore --hf /models/Qwen3-8B-Base --out /ckpt/qwen3-8b-tp4 --tp 4 --pp 1
  python tools/convert_checkpoint.py mcore-to-hf --mcore /ckpt/qwen3-8b-tp4 --out /models/qwen3-8b-rl \\
      --hf-config /models/Qwen3-8B-Base --max-shard-size 5GB

supported architectures: Qwen3ForCausalLM, Qwen2ForCausalLM (Qwen2.5), LlamaForCausalLM (Llama 3)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint.py", description=__doc__.split("\n\n")[0],
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="direction", required=True)
    to_mcore = sub.add_parser(
        "hf-to-mcore", help="Hugging Face safetensors -> megatron-core torch_dist checkpoint",
        description="Write a megatron-core dist checkpoint (torch_dist) of a HF model directory. "
        "Example: python tools/convert_checkpoint.py hf-to-mcore --hf /models/Qwen3-8B-Base "
        "--out /ckpt/qwen3-8b-tp4 --tp 4 --pp 1")
    to_mcore.add_argument("--hf", required=True, help="HF model directory (config.json + *.safetensors)")
    to_mcore.add_argument("--out", required=True, help="output checkpoint directory")
    to_mcore.add_argument("--tp", type=int, default=1, help="tensor parallel size it will be trained at")
    to_mcore.add_argument("--pp", type=int, default=1, help="pipeline parallel size it will be trained at")
    to_mcore.add_argument("--dtype", choices=DTYPES, default="auto",
                          help="parameter dtype in the checkpoint (auto: the HF tensors' dtype)")
    to_hf = sub.add_parser(
        "mcore-to-hf", help="megatron-core torch_dist checkpoint -> Hugging Face safetensors",
        description="Write a HF model directory (sharded safetensors + index, config, tokenizer, "
        "generation config) from a megatron-core dist checkpoint. Example: python "
        "tools/convert_checkpoint.py mcore-to-hf --mcore /ckpt/qwen3-8b-tp4 --out /models/qwen3-8b-rl "
        "--hf-config /models/Qwen3-8B-Base")
    to_hf.add_argument("--mcore", required=True, help="dist checkpoint directory (or a Megatron-LM "
                       "save dir with latest_checkpointed_iteration.txt)")
    to_hf.add_argument("--out", required=True, help="output HF model directory")
    to_hf.add_argument("--hf-config", required=True, help="HF directory whose config.json describes the "
                       "model; its config, tokenizer and generation config are copied")
    to_hf.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (e.g. 5GB, 500MB)")
    to_hf.add_argument("--dtype", choices=DTYPES, default="auto",
                       help="dtype of the written tensors (auto: the checkpoint's)")
    to_hf.add_argument("--tp", type=int, default=1, help="tensor parallel size under torchrun")
    to_hf.add_argument("--pp", type=int, default=1, help="pipeline parallel size under torchrun")
    for p in (to_mcore, to_hf):
        p.add_argument("--ep", type=int, default=1, help="expert parallel size under torchrun (mixture-of-experts "
                       "models; the checkpoint loads at any EP)")
        p.add_argument("--force", action="store_true", help="write into a non-empty output directory, "
                       "removing files of a previous conversion there")
    return parser


def check_output(out_dir: str, force: bool) -> None:
    """Refuse a non-empty output directory unless --force (every rank checks, before any work)."""
    if os.path.isfile(out_dir):
        raise ValueError(f"--out {out_dir} is a file; pass a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise ValueError(f"--out {out_dir} is not empty; pass --force to overwrite it or choose "
                         "another directory")


def clear_output(out_dir: str) -> None:
    """Remove the files of an earlier conversion (stale shards would otherwise linger)."""
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if os.path.isfile(path) and (name.endswith(_OUTPUT_PATTERNS) or name in _OUTPUT_FILES):
            os.remove(path)


def _dtype(name: str):
    import torch

    return None if name == "auto" else {"bf16": torch.bfloat16, "fp16": torch.float16,
                                        "fp32": torch.float32}[name]


def run(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from tqdm import tqdm

    from megatron_s2lpo.config.model import ModelArch
    from megatron_s2lpo.convert import mapping as M
    from megatron_s2lpo.convert import mcore_io
    from megatron_s2lpo.convert.hf_io import HFReader, parse_size

    check_output(args.out, args.force)
    arch = ModelArch.from_hf_config(args.hf if args.direction == "hf-to-mcore" else args.hf_config)
    M.check_supported(arch)
    M.check_tp_size(arch, args.tp)
    M.check_pp_size(arch, args.pp)
    M.check_expert_parallel(arch, args.ep)
    # fail on user mistakes before megatron is imported or a model is built
    if args.direction == "hf-to-mcore":
        reader = HFReader(args.hf)
        M.check_hf_shapes(arch, {name: reader.shape(name) for name in reader.names()})
    else:
        mcore_io.resolve_checkpoint_dir(args.mcore)
    max_shard = parse_size(args.max_shard_size) if args.direction == "mcore-to-hf" else 0

    from megatron_s2lpo.learner.parallel import destroy_parallel, init_parallel

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    groups = (init_parallel(args.tp, args.pp, expert_model_parallel_size=args.ep) if distributed
              else init_parallel(1, 1))
    try:
        if groups.rank == 0:
            clear_output(args.out)
        dist.barrier()
        if args.direction == "hf-to-mcore":
            n = len(M.param_maps(arch)) if groups.world_size == 1 else None
            with tqdm(total=n, desc="HF -> megatron", unit="param", disable=groups.rank != 0) as bar:
                mcore_io.hf_to_mcore_checkpoint(
                    args.hf, args.out, groups, dtype=_dtype(args.dtype),
                    progress=lambda done: bar.update(done - bar.n),
                    info={"target_tensor_parallel_size": args.tp, "target_pipeline_parallel_size": args.pp})
        else:
            with tqdm(total=len(M.hf_names(arch)), desc="megatron -> HF", unit="tensor",
                      disable=groups.rank != 0) as bar:
                mcore_io.mcore_to_hf_checkpoint(args.mcore, args.out, args.hf_config, groups,
                                                max_shard_bytes=max_shard, dtype=_dtype(args.dtype),
                                                progress=lambda done: bar.update(done - bar.n))
        if groups.rank == 0:
            print(f"wrote {args.out}")
    finally:
        destroy_parallel()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"convert_checkpoint.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
