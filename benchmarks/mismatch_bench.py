"""Engine/learner mismatch on CPU: an injected gap between the sampling engine and the learner,
and what each correction (algo.mismatch.correction) makes of it.

    python benchmarks/mismatch_bench.py                 # the tiny_cpu recipe's warm-started learner
    python benchmarks/mismatch_bench.py --quick         # fewer samples (seconds)

The learner is the warm-started tiny learner of examples/tiny_cpu.yaml (built once into --out,
like `s2lpo train` does). Its engines sample 8 completions of each of 32 synthetic train prompts
at temperature 1, each engine with another gap to the learner's fp32 weights:
  exact          the same weights (the learner's numerics: the ratio must be 1 everywhere)
  fp8            block-FP8 weights as the weight sync pushes them (convert/fp8.py)
  fp8+noise s    those plus Gaussian noise of s x each tensor's std (s = 3%, 10%, 30%)
The learner scores the same tokens (teacher forced, fp32) for pi_old; pi_behaviour is what the
engine returned. Per engine: the ratio statistics of r = pi_old / pi_behaviour (token and
sequence geometric mean), the k3 KL estimate, and per correction the share of tokens it zeroes
(masked), capped (truncated) and of sequences it drops, at the bands of the recipe switches:
token_tis / seq_tis cap 2, icepop [0.5, 2], seq_mask_tis [0.99, 1.01] (narrower than NeMo-RL's
reference [0.999, 1.002], which a tiny model's per-sequence gap exceeds at once).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_s2lpo.algo.losses import MismatchCorrection, mismatch_stats  # noqa: E402
from megatron_s2lpo.config import load_config  # noqa: E402
from megatron_s2lpo.convert.fp8 import Fp8Format, write_fp8_dir  # noqa: E402
from megatron_s2lpo.rollout.engine import GenerateRequest  # noqa: E402
from megatron_s2lpo.rollout.local import LocalEngine  # noqa: E402
from megatron_s2lpo.rollout.scoring import ScoreRequest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORRECTIONS = {"token_tis": MismatchCorrection(kind="token_tis", high=2.0),
               "icepop": MismatchCorrection(kind="icepop", high=2.0, low=0.5),
               "seq_mask_tis": MismatchCorrection(kind="seq_mask_tis", high=1.01, low=0.99),
               "seq_tis": MismatchCorrection(kind="seq_tis", high=2.0)}


def learner_dir(out: str) -> tuple[str, list]:
    """The tiny recipe's warm-started learner (cached in `out`) and its train prompts."""
    from megatron_s2lpo.trainer.build import build_prompts, build_tokenizer, materialize_model

    cfg = load_config(os.path.join(ROOT, "examples", "tiny_cpu.yaml"), [f"run.output_dir={out}"])
    tokenizer = build_tokenizer(cfg)
    train, _ = build_prompts(cfg, tokenizer)
    return materialize_model(cfg.rollout.learner, "learner", cfg, tokenizer), train


def engines(path: str, out: str) -> dict[str, LocalEngine]:
    fp8_dir = os.path.join(out, "learner-fp8")
    if not os.path.isdir(fp8_dir):
        write_fp8_dir(path, fp8_dir, Fp8Format())
    found = {"exact": LocalEngine.from_pretrained(path), "fp8": LocalEngine.from_pretrained(fp8_dir)}
    base = found["fp8"].model.state_dict()
    for scale in (0.03, 0.1, 0.3):
        engine = LocalEngine.from_pretrained(fp8_dir)
        gen = torch.Generator().manual_seed(int(scale * 1000))
        noisy = [(n, t + scale * t.std() * torch.randn(t.shape, generator=gen)) for n, t in base.items()
                 if t.dim() == 2 and "rotary" not in n]
        engine.fp8 = None  # the noisy weights go in as they are
        engine.update_weights_from_tensors(noisy, version=0)
        found[f"fp8+noise {scale:.0%}"] = engine
    return found


def measure(engine: LocalEngine, learner: LocalEngine, prompts: list, samples: int):
    requests = [GenerateRequest(request_id=f"{p.prompt_id}/{j}", prompt_ids=p.token_ids, max_new_tokens=12,
                                temperature=1.0, seed=1000 * i + j) for i, p in enumerate(prompts)
                for j in range(samples)]
    comps = [c for c in engine.generate(requests) if c.token_ids]
    scores = learner.score([ScoreRequest(request_id=c.request_id, prompt_ids=c.prompt_ids, response_ids=c.token_ids)
                            for c in comps])
    width = max(len(c.token_ids) for c in comps)
    old, behaviour, mask = (torch.zeros(len(comps), width, dtype=torch.float64) for _ in range(3))
    for row, (c, s) in enumerate(zip(comps, scores)):
        n = len(c.token_ids)
        old[row, :n], behaviour[row, :n], mask[row, :n] = torch.tensor(s.logprobs), torch.tensor(c.logprobs), 1
    return old, behaviour, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "mismatch_bench"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    path, prompts = learner_dir(args.out)
    prompts = prompts[:8 if args.quick else 32]
    samples = 4 if args.quick else 8
    learner = LocalEngine.from_pretrained(path)
    print(f"{len(prompts)} prompts x {samples} samples, temperature 1; r = pi_old / pi_behaviour")
    print(f"{'engine':<16}{'|log r|':>9}{'k3 KL':>9}{'r min':>8}{'r max':>8}{'seq min':>9}{'seq max':>9}  "
          + "  ".join(f"{k} masked/trunc/seqs" for k in CORRECTIONS))
    for name, engine in engines(path, args.out).items():
        old, behaviour, mask = measure(engine, learner, prompts, samples)
        base = mismatch_stats(old, behaviour, mask)
        cells = []
        for kind, correction in CORRECTIONS.items():
            st = mismatch_stats(old, behaviour, mask, correction)
            cells.append(f"{st['masked_frac']:>9.3f}/{st['truncated_frac']:.3f}/{st['masked_seq_frac']:.3f}")
        print(f"{name:<16}{base['abs_log_ratio']:>9.2e}{base['k3_kl']:>9.2e}{base['ratio_min']:>8.3f}"
              f"{base['ratio_max']:>8.3f}{base['seq_ratio_min']:>9.4f}{base['seq_ratio_max']:>9.4f}  "
              + "  ".join(f"{c:>{len(k) + 19}}" for c, k in zip(cells, CORRECTIONS)))


if __name__ == "__main__":
    main()
