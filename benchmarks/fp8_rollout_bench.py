"""FP8 against bf16 rollouts on one GPU: tokens/s of SGLang 0.5.23 and the mismatch FP8 costs.

    python benchmarks/fp8_rollout_bench.py --model /models/Qwen3-8B-Base                 # 256 prompts x 1024 tokens
    python benchmarks/fp8_rollout_bench.py --model /models/Qwen3-8B-Base --prompts 64 --max-new-tokens 256

GPU only (SGLang's FP8 kernels need CUDA). The block-FP8 copy of --model is written once next
to it (`<model>-fp8`, as the launcher expects; `s2lpo convert hf-to-fp8`) unless it exists. Then,
one server at a time on this GPU (`--mem-fraction-static`, `--tp-size`):
  1. an FP8 server (`--quantization fp8`) generates --prompts completions of at most
     --max-new-tokens (arithmetic prompts with the model's tokenizer, temperature 1, seeded),
     timed after a warm-up batch: output tokens/s;
  2. a bf16 server does the same: tokens/s and the ratio FP8 / bf16;
  3. the bf16 server scores the FP8 server's completions (prefill, `score`): with bf16 as the
     learner's stand-in, r = pi_bf16 / pi_fp8 per token, and what each correction of
     algo.mismatch does with it (benchmarks/mismatch_bench.py's table); the same for the bf16
     server's own completions (prefill vs decode numerics: the floor).
The figures a training run logs are `mismatch/learner/*` with the recipe's learner (docs/training.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_s2lpo.config.rollout import EngineConfig  # noqa: E402
from megatron_s2lpo.convert.fp8 import Fp8Format, fp8_copy_path, write_fp8_dir  # noqa: E402
from megatron_s2lpo.rollout.engine import GenerateRequest  # noqa: E402
from megatron_s2lpo.rollout.scoring import ScoreRequest  # noqa: E402
from megatron_s2lpo.rollout.sglang_engine import SGLangEngine  # noqa: E402
from megatron_s2lpo.utils.ports import free_port  # noqa: E402
from megatron_s2lpo.algo.losses import mismatch_stats  # noqa: E402
from mismatch_bench import CORRECTIONS  # noqa: E402


def prompts(model: str, num: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(num):
        a, b, c = torch.randint(10, 1000, (3,), generator=gen).tolist()
        text = (f"Solve step by step and put the final answer in \\boxed{{}}.\n"
                f"Compute ({a} * {b}) - {c}, then explain how you checked it.\nAnswer:")
        out.append(tok(text)["input_ids"])
    return out


def server(model: str, args: argparse.Namespace, extra: list[str], logs: str) -> SGLangEngine:
    cfg = EngineConfig(backend="sglang", model_path=model, port=free_port(), tp_size=args.tp_size,
                       mem_fraction=args.mem_fraction, extra_args=extra, startup_timeout_s=1800,
                       max_concurrency=args.prompts)
    return SGLangEngine(cfg, name="bench", seed=0, log_dir=logs)


def generate(engine: SGLangEngine, ids: list[list[int]], max_new: int) -> tuple[list, float]:
    reqs = [GenerateRequest(request_id=f"b{i}", prompt_ids=p, max_new_tokens=max_new, temperature=1.0, seed=i)
            for i, p in enumerate(ids)]
    engine.generate(reqs[:8])  # warm-up (CUDA graphs, caches)
    start = time.perf_counter()
    comps = engine.generate(reqs)
    return comps, time.perf_counter() - start


def mismatch(scorer: SGLangEngine, comps: list) -> dict[str, dict]:
    comps = [c for c in comps if c.token_ids]
    scores = scorer.score([ScoreRequest(request_id=f"s{i}", prompt_ids=c.prompt_ids, response_ids=c.token_ids)
                           for i, c in enumerate(comps)])
    width = max(len(c.token_ids) for c in comps)
    old, behaviour, mask = (torch.zeros(len(comps), width, dtype=torch.float64) for _ in range(3))
    for row, (c, s) in enumerate(zip(comps, scores)):
        n = len(c.token_ids)
        old[row, :n], behaviour[row, :n], mask[row, :n] = torch.tensor(s.logprobs), torch.tensor(c.logprobs), 1
    out = {"none": mismatch_stats(old, behaviour, mask)}
    out.update({k: mismatch_stats(old, behaviour, mask, c) for k, c in CORRECTIONS.items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="unquantized HF checkpoint (e.g. /models/Qwen3-8B-Base)")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--mem-fraction", type=float, default=0.85)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("fp8_rollout_bench.py needs a GPU (SGLang's FP8 kernels run on CUDA)")
    fp8_dir = fp8_copy_path(args.model)
    if not os.path.isdir(fp8_dir):
        write_fp8_dir(args.model, fp8_dir, Fp8Format())
    ids = prompts(args.model, args.prompts)
    logs = tempfile.mkdtemp(prefix="fp8-bench-")
    results = {}
    for name, model, extra in (("fp8", fp8_dir, ["--quantization", "fp8"]), ("bf16", args.model, [])):
        engine = server(model, args, extra, logs)
        try:
            comps, seconds = generate(engine, ids, args.max_new_tokens)
            tokens = sum(len(c.token_ids) for c in comps)
            results[name] = (comps, tokens / seconds)
            print(f"{name}: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.0f} tokens/s", flush=True)
            if name == "bf16":  # the bf16 server scores both sets of completions
                stats = {"bf16 vs its own decode": mismatch(engine, comps),
                         "bf16 vs fp8 samples": mismatch(engine, results["fp8"][0])}
        finally:
            engine.close()
    print(f"FP8 / bf16 output tokens/s: {results['fp8'][1] / results['bf16'][1]:.3f}")
    for label, table in stats.items():
        base = table["none"]
        print(f"{label}: |log r| {base['abs_log_ratio']:.2e}  k3 KL {base['k3_kl']:.2e}  r [{base['ratio_min']:.3f}, "
              f"{base['ratio_max']:.3f}]  sequence [{base['seq_ratio_min']:.4f}, {base['seq_ratio_max']:.4f}]")
        for kind in CORRECTIONS:
            st = table[kind]
            print(f"    {kind:<13} masked {st['masked_frac']:.4f}  truncated {st['truncated_frac']:.4f}  "
                  f"sequences dropped {st['masked_seq_frac']:.4f}  mean weight {st['weight_mean']:.4f}")


if __name__ == "__main__":
    main()
