"""Benchmarks of the distillation path: teacher scoring and the distillation losses.

Run:
    .venv/bin/python benchmarks/distill_bench.py            # full run (about a minute on 2 cores)
    .venv/bin/python benchmarks/distill_bench.py --quick    # smoke run (seconds)

Prints
1. Teacher scoring (`LocalEngine.score`, one teacher-forced pass per batch) of sequences the
   same engine just generated (KV-cached decoding), both timed in this run: seconds, tokens/s,
   the scoring / generation time ratio, and the largest gap between the scores and the
   engine's own sampling log-probs (they must agree: same model, temperature 1).
2. Forward + backward time of each learner objective from the same logits (B, T, V), against
   the GRPO policy loss measured in the same run: forward KL on sampled tokens, forward KL
   against a teacher top-k (the extra vocab-parallel gather at K ids), the direct reverse-KL
   loss, and OPD in advantage mode (the policy loss plus the per-token advantages).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import QWEN3_QUICK  # noqa: E402
from timing import median_seconds  # noqa: E402

from megatron_s2lpo.algo.distill import forward_kl_loss, opd_token_advantages, reverse_kl_loss  # noqa: E402
from megatron_s2lpo.algo.losses import PolicyLossConfig, loss_normalizer, policy_loss  # noqa: E402
from megatron_s2lpo.learner.logprobs import token_logprobs, token_topk_logprobs  # noqa: E402
from megatron_s2lpo.rollout import GenerateRequest, LocalEngine, ScoreRequest  # noqa: E402


def bench_scoring(num_seqs: int, prompt_len: int, new_tokens: int) -> None:
    arch = QWEN3_QUICK
    print(f"== teacher scoring vs generation: {num_seqs} sequences, prompt {prompt_len} + {new_tokens} new tokens, "
          f"{arch.num_params() / 1e6:.1f}M-parameter Qwen3 shape, fp32 CPU")
    engine = LocalEngine.from_arch(arch, init_seed=0, eos_token_ids=[], max_batch_size=num_seqs)
    gen = torch.Generator().manual_seed(0)
    requests = [GenerateRequest(request_id=f"r{i}", prompt_ids=torch.randint(arch.vocab_size, (prompt_len,),
                                                                             generator=gen).tolist(),
                                max_new_tokens=new_tokens, seed=i) for i in range(num_seqs)]
    start = time.perf_counter()
    comps = engine.generate(requests)
    gen_s = time.perf_counter() - start
    scores_req = [ScoreRequest(request_id=c.request_id, prompt_ids=c.prompt_ids, response_ids=c.token_ids)
                  for c in comps]
    score_s = median_seconds(lambda: engine.score(scores_req), repeats=3, warmup=1)
    scores = engine.score(scores_req)
    gap = max(abs(a - b) for c, s in zip(comps, scores) for a, b in zip(c.logprobs, s.logprobs))
    tokens = sum(len(c.token_ids) for c in comps)
    print(f"generate {gen_s:.3f} s ({tokens / gen_s:,.0f} new tok/s)  score {score_s:.3f} s "
          f"({tokens / score_s:,.0f} scored tok/s)  score/generate {score_s / gen_s:.3f}  "
          f"max |score - sampling log-prob| {gap:.2e}")


def bench_losses(batch: int, seq_len: int, vocab: int, top_k: int, repeats: int) -> None:
    print(f"== learner objectives, forward + backward from logits ({batch}, {seq_len}, {vocab}), fp32 CPU, "
          f"teacher top-{top_k}")
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, seq_len, vocab, generator=gen)
    tokens = torch.randint(vocab, (batch, seq_len), generator=gen)
    mask = torch.zeros(batch, seq_len)
    mask[:, seq_len // 4:] = 1.0  # the last three quarters are the response
    teacher = -torch.rand(batch, seq_len, generator=gen) * 3
    top_ids = torch.randint(vocab, (batch, seq_len, top_k), generator=gen)
    top_lps = torch.log_softmax(torch.randn(batch, seq_len, top_k, generator=gen), dim=-1)
    advantages = torch.randn(batch, 1, generator=gen).expand(batch, seq_len) * mask
    norm = loss_normalizer(mask, "token-mean")
    config = PolicyLossConfig()
    with torch.no_grad():
        old, _ = token_logprobs(logits, tokens, vocab_size=vocab)

    def run(objective):
        def step():
            leaf = logits.clone().requires_grad_(True)
            logprobs, _ = token_logprobs(leaf, tokens, vocab_size=vocab)
            loss = objective(leaf, logprobs)
            loss.backward()
        return step

    def grpo(leaf, lp):
        return policy_loss(lp, old, advantages, mask, config=config, normalizer=norm)[0]

    def fkl_sampled(leaf, lp):
        return forward_kl_loss(lp, mask, normalizer=norm)[0]

    def fkl_topk(leaf, lp):
        student_topk = token_topk_logprobs(leaf, top_ids, vocab_size=vocab)
        return forward_kl_loss(lp, mask, normalizer=norm, student_topk_logprobs=student_topk,
                               teacher_topk_logprobs=top_lps)[0]

    def opd_loss(leaf, lp):
        return reverse_kl_loss(lp, teacher, mask, normalizer=norm)[0]

    def opd_advantage(leaf, lp):
        dense = opd_token_advantages(old, teacher, mask)
        return policy_loss(lp, old, dense, mask, config=config, normalizer=norm)[0]

    base = median_seconds(run(grpo), repeats, warmup=1)
    print(f"{'objective':<34} {'ms':>8} {'x GRPO':>7}")
    print(f"{'grpo policy loss (baseline)':<34} {base * 1e3:8.1f} {1.0:7.2f}")
    for name, objective in (("forward_kl, sampled tokens", fkl_sampled), (f"forward_kl, teacher top-{top_k}", fkl_topk),
                            ("opd, direct reverse-KL loss", opd_loss), ("opd, advantage mode", opd_advantage)):
        seconds = median_seconds(run(objective), repeats, warmup=1)
        print(f"{name:<34} {seconds * 1e3:8.1f} {seconds / base:7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, one repeat")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.quick:
        bench_scoring(num_seqs=8, prompt_len=16, new_tokens=8)
        bench_losses(batch=2, seq_len=64, vocab=1024, top_k=4, repeats=1)
    else:
        bench_scoring(num_seqs=32, prompt_len=64, new_tokens=64)
        bench_losses(batch=4, seq_len=512, vocab=32768, top_k=16, repeats=5)


if __name__ == "__main__":
    main()
