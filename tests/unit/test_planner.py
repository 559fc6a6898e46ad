"""The memory planner: arithmetic, the paper recipes, advice, the CLI and the launcher's refusal.

Its CPU estimate against measured peaks of real learners is a distributed check
(tests/distributed/scripts/tp2_checks.py, `*_planner_within_25pct_of_measured_peak`).
"""

import os

import pytest
import torch

from megatron_s2lpo.config import load_config
from megatron_s2lpo.config.learner import LearnerConfig, OptimConfig
from megatron_s2lpo.planner.archs import KNOWN_ARCHS, known_arch, resolve_arch
from megatron_s2lpo.planner.estimate import CPU, GIB, GPU, estimate_learner, layer_params, stage_params, with_changes
from megatron_s2lpo.planner.measure import peak_allocated_bytes, storage_bytes
from megatron_s2lpo.planner.report import check_fits

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = {"qwen3_8b_explorer_1p7b": 16, "qwen3_8b_explorer_4b": 16, "qwen3_14b_explorer_4b": 32}
QWEN3_8B = KNOWN_ARCHS["qwen3-8b"]


def _recipe(name, *overrides):
    return load_config(os.path.join(REPO, "examples", f"{name}.yaml"), list(overrides))


def test_peak_measurement_follows_the_allocator():
    def work():
        a = torch.ones(1_000_000)  # 4 MB
        b = torch.ones(2_000_000)  # 8 MB: 12 MB live
        del a
        c = torch.ones(500_000)  # 2 MB: 10 MB live
        return b.sum() + c.sum()

    peak, result = peak_allocated_bytes(work)
    assert float(result) == 2_500_000 and 12_000_000 <= peak < 12_100_000
    base = torch.zeros(10)
    assert storage_bytes([base, base[2:], base.view(2, 5), None]) == 40


def test_stage_params_shard_the_model_exactly():
    arch = QWEN3_8B
    _, small = layer_params(arch)
    padding = (arch.padded_vocab_size(4) - arch.vocab_size) * arch.hidden_size * 2  # embedding + output rows
    # TP=4: matmuls split over the ranks, norms replicated on each
    total = 4 * stage_params(arch, 4, 1, 0)[0]
    assert total == pytest.approx(arch.num_params() + padding + 3 * (arch.num_layers * small + arch.hidden_size))
    # PP=2: every layer on exactly one stage, the embedding on the first, the output layer on the last
    first, last = stage_params(arch, 1, 2, 0)[0], stage_params(arch, 1, 2, 1)[0]
    padding = (arch.padded_vocab_size(1) - arch.vocab_size) * arch.hidden_size * 2
    assert first + last == pytest.approx(arch.num_params() + padding)


def test_estimate_terms_move_the_right_way():
    base = LearnerConfig(tensor_parallel_size=4, precision="bf16", micro_batch_tokens=16384,
                         optim=OptimConfig(use_distributed_optimizer=True))

    def est(cfg, **kw):
        return estimate_learner(QWEN3_8B, cfg, dp_size=kw.get("dp", 4), max_seq_len=5120,
                                with_reference=kw.get("ref", False))

    plain = est(base)
    assert plain.item("grads") == pytest.approx(plain.item("weights") * 2)  # fp32 buffer vs bf16 weights
    assert est(base, dp=8).item("optimizer") == pytest.approx(plain.item("optimizer") / 2)
    assert est(with_changes(base, sequence_parallel=True)).item("activations") < plain.item("activations")
    assert est(with_changes(base, recompute_granularity="full")).item("activations") < 0.2 * plain.item("activations")
    assert est(with_changes(base, logprob_chunk_tokens=0)).item("log-prob buffers") > 5 * plain.item("log-prob buffers")
    assert est(with_changes(base, precision="fp8")).item("activations") < plain.item("activations")
    assert est(with_changes(base, **{"optim.cpu_offload": True})).item("optimizer") == 0
    resident = est(with_changes(base, ref_offload=False), ref=True)
    assert resident.peak - est(base, ref=True).peak == pytest.approx(resident.item("reference"))
    pipeline = est(with_changes(base, pipeline_parallel_size=2))
    assert pipeline.item("weights") < 0.6 * plain.item("weights") and pipeline.stage in ("first", "last")


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_paper_recipes_fit_an_h100_with_margin(name):
    report = check_fits(_recipe(name), 80, num_learner_gpus=RECIPES[name])
    assert report.fits, report.text()
    assert report.runs[0].learner.peak < 0.8 * 80 * GIB
    assert {s.name for s in report.runs[0].servers} == {"learner_server", "explorer_server"}
    assert all(s.kv_tokens > 100_000 for s in report.runs[0].servers)


def test_the_old_14b_settings_do_not_fit_and_the_advice_says_what_to_change():
    old = _recipe("qwen3_14b_explorer_4b", "learner.sequence_parallel=false", "learner.logprob_chunk_tokens=0",
                  "learner.ref_offload=false")
    report = check_fits(old, 80, num_learner_gpus=32)
    assert not report.fits
    assert 90 * GIB < report.runs[0].learner.peak < 100 * GIB  # the full-logits, GPU-reference recipe
    text = report.text()
    assert "DOES NOT FIT" in text and "learner.sequence_parallel=true:" in text and "to fit: " in text
    chosen = text.split("to fit: ")[1].split(" (")[0].split()
    fixed = _recipe("qwen3_14b_explorer_4b", "learner.sequence_parallel=false", "learner.logprob_chunk_tokens=0",
                    "learner.ref_offload=false", *chosen)
    assert check_fits(fixed, 80, num_learner_gpus=32).fits


def test_problems_name_the_field_and_the_numbers():
    long = check_fits(_recipe("qwen3_8b_explorer_1p7b", "learner.micro_batch_tokens=4096"), 80, num_learner_gpus=16)
    assert any("learner.micro_batch_tokens=4096" in p and "5120" in p for p in long.problems)
    tensor = ("sync.transport=tensor",)
    colocated = check_fits(_recipe("qwen3_8b_explorer_1p7b", *tensor), 80, num_learner_gpus=16)
    assert any("rollout.learner.mem_fraction" in p for p in colocated.problems)
    assert check_fits(_recipe("qwen3_8b_explorer_1p7b", *tensor, "rollout.learner.mem_fraction=0.5"),
                      80, num_learner_gpus=16).fits
    with pytest.raises(ValueError, match="rollout.learner: cannot size the model at '/models/MyModel'"):
        check_fits(_recipe("qwen3_8b_explorer_1p7b", "rollout.learner.model_path=/models/MyModel"), 80)
    with pytest.raises(ValueError, match="not a multiple of TP x PP x CP = 4"):
        check_fits(_recipe("qwen3_8b_explorer_1p7b"), 80, num_learner_gpus=6)


def test_server_weights_follow_the_servers_quantization_not_any_fp8_argument():
    def weights(*extra_args):
        cfg = _recipe("qwen3_8b_explorer_1p7b", f"rollout.learner.extra_args={list(extra_args)}")
        server = next(s for s in check_fits(cfg, 80, num_learner_gpus=16).runs[0].servers
                      if s.name == "learner_server")
        return server.weights_per_gpu

    bf16 = weights()
    assert weights("--quantization", "fp8") == pytest.approx(bf16 / 2)
    assert weights("--kv-cache-dtype", "fp8_e4m3") == bf16  # an fp8 KV cache leaves the weights bf16


def test_architectures_by_name_or_config(tmp_path):
    assert known_arch("/models/Qwen3-14B-Base") == KNOWN_ARCHS["qwen3-14b"]
    assert known_arch("Qwen3-1.7B") == KNOWN_ARCHS["qwen3-1.7b"] and known_arch("/models/Llama-3-8B") is None
    assert KNOWN_ARCHS["qwen3-8b"].num_params() == pytest.approx(8.19e9, rel=0.01)
    tiny = KNOWN_ARCHS["qwen3-0.6b"]
    (tmp_path / "config.json").write_text(__import__("json").dumps(tiny.to_hf_config_dict()))
    assert resolve_arch(str(tmp_path), None, "rollout.learner") == tiny


def test_cpu_backend_counts_attention_probabilities():
    cfg = LearnerConfig(micro_batch_tokens=1024, logprob_chunk_tokens=256)
    arch = KNOWN_ARCHS["qwen3-0.6b"]
    short = estimate_learner(arch, cfg, dp_size=1, max_seq_len=128, with_reference=False, backend=CPU)
    long = estimate_learner(arch, cfg, dp_size=1, max_seq_len=1024, with_reference=False, backend=CPU)
    assert long.item("activations") > short.item("activations")
    gpu_short = estimate_learner(arch, cfg, dp_size=1, max_seq_len=128, with_reference=False, backend=GPU)
    gpu_long = estimate_learner(arch, cfg, dp_size=1, max_seq_len=1024, with_reference=False, backend=GPU)
    assert gpu_long.item("activations") == gpu_short.item("activations")  # fused attention keeps no L^2


def test_cli_plan_exit_codes(capsys):
    from megatron_s2lpo.cli import main

    recipe = os.path.join(REPO, "examples", "qwen3_14b_explorer_4b.yaml")
    assert main(["plan", recipe, "--learner-gpus", "32"]) == 0
    assert "peak" in capsys.readouterr().out
    assert main(["plan", recipe, "learner.sequence_parallel=false", "--learner-gpus", "32"]) == 1
    assert "what would help" in capsys.readouterr().out
    assert main(["plan", recipe, "--gpu-memory-gb", "0"]) == 2
    assert "--gpu-memory-gb must be > 0" in capsys.readouterr().err


def test_launcher_refuses_an_over_budget_recipe_unless_allowed():
    from megatron_s2lpo.launch.plan import ClusterLayout, plan_launch

    recipe = os.path.join(REPO, "examples", "qwen3_14b_explorer_4b.yaml")
    over = load_config(recipe, ["learner.sequence_parallel=false"])
    with pytest.raises(ValueError, match="(?s)does not fit 80 GB GPUs.*--allow-over-budget"):
        plan_launch(over, recipe, ClusterLayout(num_nodes=6))
    plan = plan_launch(over, recipe, ClusterLayout(num_nodes=6, allow_over_budget=True))
    assert plan.learner_nodes == 4
    assert plan_launch(load_config(recipe), recipe, ClusterLayout(num_nodes=6)).learner_nodes == 4
    with pytest.raises(ValueError, match="does not fit 40 GB"):
        plan_launch(load_config(recipe), recipe, ClusterLayout(num_nodes=6, gpu_memory_gb=40))


def _est(cfg, dp=4, **kw):
    return estimate_learner(QWEN3_8B, cfg, dp_size=dp, max_seq_len=5120, with_reference=kw.get("ref", False),
                            backend=kw.get("backend", GPU), sync_bucket_bytes=kw.get("sync", 0))


def test_selective_core_attention_recompute_saves_nothing_with_fused_attention():
    base = LearnerConfig(tensor_parallel_size=4, sequence_parallel=True, precision="bf16", micro_batch_tokens=16384)
    selective = with_changes(base, recompute_granularity="selective")
    assert _est(selective).item("activations") == _est(base).item("activations")  # before: 1.1 GB less
    assert _est(with_changes(base, recompute_granularity="full")).item("activations") < 0.2 * _est(base).item("activations")
    cpu = LearnerConfig(micro_batch_tokens=1024)  # the math kernel keeps probabilities: selective frees them
    cpu_est = lambda c: estimate_learner(KNOWN_ARCHS["qwen3-0.6b"], c, dp_size=1, max_seq_len=1024,  # noqa: E731
                                         with_reference=False, backend=CPU)
    assert cpu_est(with_changes(cpu, recompute_granularity="selective")).item("activations") < \
        cpu_est(cpu).item("activations")
    note = check_fits(_recipe("qwen3_8b_explorer_1p7b", "learner.recompute_granularity=selective"), 80,
                      num_learner_gpus=16).runs[0].notes
    assert note and "saves no memory with Transformer Engine's fused attention" in note[0]
    assert not check_fits(_recipe("qwen3_8b_explorer_1p7b"), 80, num_learner_gpus=16).runs[0].notes


def test_checkpoint_save_weight_sync_and_fixed_costs_are_counted():
    base = LearnerConfig(tensor_parallel_size=4, precision="bf16", micro_batch_tokens=16384,
                         optim=OptimConfig(use_distributed_optimizer=True))
    params = stage_params(QWEN3_8B, 4, 1, 0)[0]
    full = with_changes(base, **{"checkpoint": base.checkpoint.__class__(optimizer_sharding="fully_reshardable")})
    # fully_reshardable without overlap: the whole fp32 buffer all-gathered; dp_reshardable: nothing
    assert _est(full).item("checkpoint save") == pytest.approx(params * 4 * (1 + 1 / 4))
    assert _est(with_changes(full, overlap_grad_reduce=True)).item("checkpoint save") < 0.1 * _est(full).item(
        "checkpoint save")
    assert _est(base).item("checkpoint save") == 0
    assert _est(full).phase("checkpoint save") - _est(base).phase("checkpoint save") == pytest.approx(
        _est(full).item("checkpoint save"))
    synced = _est(base, sync=512 << 20)
    largest = QWEN3_8B.vocab_size * QWEN3_8B.hidden_size * 2
    assert synced.item("weight-sync buffer") == largest  # the embedding is larger than the 512 MiB bucket
    assert synced.phase("weight sync") - synced.phase("checkpoint save") == pytest.approx(2 * largest)
    assert synced.peak - _est(base).peak == pytest.approx(largest)  # the buffer is kept through training
    fixed = {n: _est(base).item(n) for n in ("cuda context", "nccl", "workspaces")}
    assert fixed["nccl"] == 2 * GPU.nccl_bytes_per_group and fixed["cuda context"] > 0  # TP and DP communicators
    assert _est(base, dp=1).item("nccl") == GPU.nccl_bytes_per_group
    assert _est(with_changes(base, grad_reduce_in_fp32=False)).item("grads") == pytest.approx(params * 2)


def test_host_memory_of_a_learner_node():
    from megatron_s2lpo.planner.host import estimate_host

    arch = QWEN3_8B
    cfg = LearnerConfig(tensor_parallel_size=4, precision="bf16", optim=OptimConfig(use_distributed_optimizer=True))
    params = stage_params(arch, 4, 1, 0)[0]
    host = estimate_host(arch, cfg, dp_size=4, with_reference=True, ranks_per_node=8)
    items = {i.name: i.bytes for i in host.items}
    assert items["reference"] == params * 2  # pinned bf16 copy
    assert items["checkpoint"] == pytest.approx(params * 12 / 4 + params * 2)  # own optimizer shard + weights
    full = with_changes(cfg, **{"checkpoint": cfg.checkpoint.__class__(optimizer_sharding="fully_reshardable")})
    gathered = {i.name: i.bytes for i in estimate_host(arch, full, dp_size=4, with_reference=True,
                                                       ranks_per_node=8).items}
    assert gathered["checkpoint"] - items["checkpoint"] == pytest.approx(params * 12)  # the TP shard on every rank
    assert host.per_node == pytest.approx(8 * host.per_rank)
    report = check_fits(_recipe("qwen3_8b_explorer_1p7b"), 80, num_learner_gpus=16, host_memory_gb=64)
    assert any("GB of host memory per node, more than 90% of 64 GB" in p for p in report.problems)
    assert "host memory per learner node" in report.text()
