"""GPU tier for mixture-of-experts learners and context parallelism: what the CPU cannot run.

    bash tests/gpu/h100_check.sh                       # one H100: this file is its step 4 (not yet timed)
    python -m pytest tests/gpu/test_moe_cuda.py -s     # a node with >= 2 GPUs, TE, SGLang 0.5.23

0. One GPU: tests/distributed/scripts/moe_cp_checks.py in one process at EP = 1 with TE's
   grouped-GEMM experts (the local spec where TE is missing) against transformers (log-probs,
   logits), the export with grouped-GEMM names, the conversion tool's round trip, routing replay
   through those layers (own routing changes nothing, other experts keep router gradients,
   recompute, r2) and one step.
1. Two GPUs: the same script on 2 ranks over NCCL with the Transformer Engine spec:
   TE grouped-GEMM experts (TEGroupedMLP) against transformers' Qwen3MoeForCausalLM, EP = 2 = EP = 1,
   routing replay through the TE layers (own routing changes nothing, router gradients, recompute),
   the export and conversion with grouped-GEMM names, TP = 2 x EP = 2 and expert-TP = 2 logits,
   TE's THD context-parallel attention CP = 2 = CP = 1; again with DeepEP (moe_token_dispatcher=flex)
   when deep_ep is installed.
2. One GPU: a real SGLang 0.5.23 server (its MoE kernels) serving a tiny Qwen3-MoE with
   --enable-return-routed-experts: the routing it returns agrees with a teacher-forced pass of the
   same weights, and its log-probs with the in-process engine's.
Skipped where CUDA, two GPUs, Transformer Engine or SGLang are missing.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "distributed"))

pytestmark = pytest.mark.gpu
two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs 2 CUDA devices")
needs_te = pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None, reason="needs Transformer Engine")


# fp32 GEMMs without TF32, deterministic TE attention; other kernels than the CPU's: looser tolerances
GPU_ENV = {"S2LPO_MOE_CHECK_TOL": "1e-4", "S2LPO_MOE_CHECK_SAME_TOL": "1e-5", "NVIDIA_TF32_OVERRIDE": "0",
           "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0"}


def _run_checks(env: dict[str, str], nprocs: int = 2, timeout: float = 900) -> dict[str, dict]:
    from launch import parse_checks, run_distributed

    outputs = run_distributed(REPO / "tests" / "distributed" / "scripts" / "moe_cp_checks.py", nprocs=nprocs,
                              timeout=timeout, env={**GPU_ENV, **env})
    checks: dict[str, dict] = {}
    for output in outputs:
        for name, record in parse_checks(output).items():
            if name not in checks or not record["ok"]:
                checks[name] = record
    return checks


def _report(checks: dict[str, dict]) -> dict[str, dict]:
    for name, record in sorted(checks.items()):
        print(name, {k: v for k, v in record.items() if k not in ("name", "rank")})
    return {name: record for name, record in checks.items() if not record["ok"]}


@pytest.mark.timeout(300)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moe_checks_on_one_gpu():
    """The TE spec (grouped GEMM experts) where Transformer Engine is installed, else the local one
    on CUDA; the export check's record says which experts ran (TEGroupedMLP / SequentialMLP)."""
    checks = _run_checks({"S2LPO_MOE_DISPATCHER": "alltoall"}, nprocs=1, timeout=150)
    failed = _report(checks)
    assert len(checks) == 9 and not failed, failed  # the ep1/... checks of the one-process mode


@two_gpus
@needs_te
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("dispatcher", ["alltoall", "flex"])
def test_moe_and_cp_checks_on_gpus(dispatcher):
    if dispatcher == "flex" and importlib.util.find_spec("deep_ep") is None:
        pytest.skip("DeepEP (deep_ep) is not installed")
    checks = _run_checks({"S2LPO_MOE_DISPATCHER": dispatcher})
    failed = _report(checks)
    assert len(checks) >= 14 and not failed, failed


@pytest.mark.timeout(900)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sglang_moe_kernels_return_the_routing_they_used(tmp_path):
    pytest.importorskip("sglang")
    from megatron_s2lpo.config.model import ModelArch
    from megatron_s2lpo.config.rollout import EngineConfig
    from megatron_s2lpo.learner.routing import agreement
    from megatron_s2lpo.rollout.engine import GenerateRequest
    from megatron_s2lpo.rollout.local import LocalEngine
    from megatron_s2lpo.rollout.sglang_engine import SGLangEngine
    from megatron_s2lpo.utils.ports import server_ports

    arch = ModelArch(family="qwen3_moe", vocab_size=1024, hidden_size=256, ffn_hidden_size=512, num_layers=4,
                     num_attention_heads=8, num_query_groups=4, head_dim=32, qk_layernorm=True, num_experts=16,
                     num_experts_per_tok=4, moe_ffn_hidden_size=128, norm_topk_prob=True)
    local = LocalEngine.from_arch(arch, init_seed=3)
    local.save_pretrained(str(tmp_path / "model"))
    cfg = EngineConfig(backend="sglang", model_path=str(tmp_path / "model"), port=server_ports(1)[0], mem_fraction=0.3,
                       return_routed_experts=True,
                       extra_args=["--dtype", "float32", "--skip-tokenizer-init", "--disable-cuda-graph"])
    engine = SGLangEngine(cfg, name="learner", seed=1)
    try:
        requests = [GenerateRequest(request_id=f"r{i}", prompt_ids=list(range(5, 25 + i)), max_new_tokens=16,
                                    seed=i, return_routed_experts=True) for i in range(8)]
        answers = engine.generate(requests)
    finally:
        engine.close()
    overlaps, gaps = [], []
    for answer in answers:
        sequence = torch.tensor([answer.prompt_ids + answer.token_ids[:-1]])
        with local._routing.recording(True) as recorded, torch.no_grad():
            logits = local.model(input_ids=torch.tensor([answer.prompt_ids + answer.token_ids])).logits[0]
        ours = recorded.stacked(1)[0][:sequence.shape[1]].view(1, -1, arch.num_layers, arch.num_experts_per_tok)
        theirs = answer.routed_experts.view(1, -1, arch.num_layers, arch.num_experts_per_tok)
        overlaps.append(agreement(ours.to(torch.int16), theirs, torch.ones(1, ours.shape[1]))["overlap"])
        logp = torch.log_softmax(logits[len(answer.prompt_ids) - 1:-1].float(), -1)
        mine = logp.gather(-1, torch.tensor(answer.token_ids)[:, None]).squeeze(-1)
        gaps.append(float((mine - torch.tensor(answer.logprobs)).abs().mean()))
    print(f"SGLang vs teacher-forced routing overlap {sum(overlaps) / len(overlaps):.4f}, "
          f"log-prob gap {sum(gaps) / len(gaps):.2e}")
    assert min(overlaps) > 0.95 and max(gaps) < 1e-2
