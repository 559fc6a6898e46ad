"""Mixture-of-experts (Qwen3-MoE) and context-parallel checks with real megatron-core, in one
2-process launch.

    pytest tests/distributed/test_learner_moe_cp.py

Part 1, EP=2 (TP=1, DP=2; each rank holds 2 of the 4 experts): the learner loads a transformers
Qwen3MoeForCausalLM's weights; its log-probs equal the HF model's; the streaming export (what
weight sync sends) is the HF state dict bit for bit; the conversion tool writes a checkpoint at
EP=2; routing replay: replaying the learner's own routing changes nothing (log-probs, loss, every
gradient, the router's included), replaying other experts changes the log-probs while the
router still gets gradients, the old-log-prob pass records the routing the training passes
replay, and activation recompute replays the same experts. Then log-probs, loss and gradients,
saved for part 2, and one step.
Part 2, EP=1 (DP=2, same processes): the same from part 1's checkpoint (log-probs, loss,
per-parameter gradients, the step), raw logits against transformers, and the tool's EP=2
checkpoint back to HF at EP=1, bit-exact.
Part 3: model chunks at TP=2 x EP=2 and TP=2 x expert-TP=2: logits against transformers, the
export against the HF state dict.
Part 4, context parallelism CP=2 (DP=1): the MoE learner on part 1's checkpoint equals part 2
(log-probs, entropy, loss, every gradient); a dense Qwen3 learner's results and one step, which
part 5 (CP=1, DP=2, the same weights) must reproduce.

Under one process (one GPU: tests/gpu/test_moe_cuda.py) only what needs no second rank runs, at
EP=1: the export, log-probs and logits against transformers, the conversion tool's round trip,
the four routing replay checks and one step (checks named ep1/...).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from common import fixed_batch, max_abs_diff, run_check, shared_tmpdir, tiny_arch

from megatron_s2lpo.algo.losses import PolicyLossConfig
from megatron_s2lpo.config.learner import LearnerConfig, OptimConfig
from megatron_s2lpo.config.model import ModelArch
from megatron_s2lpo.learner.parallel import destroy_parallel, init_parallel

ARCH = ModelArch(family="qwen3_moe", vocab_size=300, hidden_size=32, ffn_hidden_size=48, num_layers=2,
                 num_attention_heads=4, num_query_groups=2, head_dim=8, qk_layernorm=True, rope_theta=10000.0,
                 num_experts=4, num_experts_per_tok=2, moe_ffn_hidden_size=16, norm_topk_prob=True)
LOSS = PolicyLossConfig(clip_low=0.2, clip_high=0.28, loss_agg_mode="token-mean")
# The GPU tier (tests/gpu/test_moe_cuda.py) runs this script on 2 GPUs with the TE spec, looser
# tolerances (fp32 GEMMs of other kernels) and optionally DeepEP's dispatcher.
TOL = float(os.environ.get("S2LPO_MOE_CHECK_TOL", "1e-5"))
# Two passes that must compute the same thing (replaying a pass's own routing): exact up to the
# GPU kernels' nondeterministic reductions (embedding backward's atomics) there.
SAME_TOL = min(TOL, float(os.environ.get("S2LPO_MOE_CHECK_SAME_TOL", "1e-7")))
DISPATCHER = os.environ.get("S2LPO_MOE_DISPATCHER", "alltoall")


def config(*, tp: int = 1, ep: int = 1, etp: int = 1, replay: str = "none", **extra) -> LearnerConfig:
    return LearnerConfig(tensor_parallel_size=tp, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
                         routing_replay=replay, micro_batch_tokens=96, seq_length_multiple=1,
                         moe_token_dispatcher=DISPATCHER,
                         optim=OptimConfig(lr=2e-3, weight_decay=0.0, clip_grad=1.0), **extra)


def make_hf_model(path: str) -> None:
    """A tiny transformers Qwen3-MoE with every weight random (norms around 1), on rank 0."""
    import transformers

    if dist.get_rank() == 0:
        hf_config = transformers.AutoConfig.for_model(**ARCH.to_hf_config_dict())
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, param in model.named_parameters():
                noise = torch.randn(param.shape, generator=gen)
                param.copy_(1 + 0.1 * noise if "norm" in name else (0.5 if "gate.weight" in name else 0.08) * noise)
        model.save_pretrained(path)
    dist.barrier()


def hf_model(path: str):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_logprobs(path: str, batch) -> torch.Tensor:
    """(B, T) log p(token t | tokens < t) of the HF model at every position 1 <= t < len."""
    model = hf_model(path)
    out = torch.zeros(batch.tokens.shape)
    with torch.no_grad():
        for row, n in enumerate(batch.seq_lens.tolist()):
            logits = model(input_ids=batch.tokens[row:row + 1, :n]).logits[0].double()
            out[row, 1:n] = torch.log_softmax(logits[:-1], -1).gather(-1, batch.tokens[row, 1:n, None]).squeeze(-1).float()
    return out


def chunk_logits(chunk, tokens: torch.Tensor) -> torch.Tensor:
    """A model chunk's (TP-sharded) logits for `tokens`, on the CPU (the chunk may sit on a GPU)."""
    device = next(chunk.parameters()).device
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand(tokens.shape[0], -1)
    with torch.no_grad():
        return chunk(tokens.to(device), positions.to(device), None).float().cpu()


def logits_against_hf(chunk, tokens: torch.Tensor, hf_dir: str) -> dict:
    chunk.eval()
    ours = chunk_logits(chunk, tokens)[..., :ARCH.vocab_size]
    with torch.no_grad():
        theirs = hf_model(hf_dir)(input_ids=tokens).logits
    diff = max_abs_diff(ours, theirs)
    return {"ok": diff < TOL, "max_abs_diff": diff}


def export_equals_hf(chunks, groups, hf_dir: str) -> dict:
    """The streaming export (what weight sync sends) against the HF checkpoint, bit for bit."""
    from megatron_s2lpo.convert.export import iter_hf_tensors
    from megatron_s2lpo.convert.hf_io import HFReader

    reader = HFReader(hf_dir)
    exported = {name: t.cpu() for name, t in iter_hf_tensors(chunks, groups, ARCH)}
    same = sorted(exported) == sorted(reader.names()) and all(torch.equal(t, reader[n]) for n, t in exported.items())
    return {"ok": same, "tensors": len(exported)}


def named_grads(learner) -> dict[str, torch.Tensor]:
    """main_grad of this rank's parameters under global layer AND expert numbers."""
    from megatron_s2lpo.convert.live import global_named_parameters

    return {name: p.main_grad.detach().clone() for name, p in global_named_parameters(learner.model)}


def results(learner, batch, routing: str = "auto") -> dict:
    logprobs, entropy = learner.compute_logprobs(batch, 0.7, with_entropy=True, routing=routing)
    metrics = learner.compute_gradients(batch, loss_config=LOSS, temperature=0.7)
    return {"logprobs": logprobs, "entropy": entropy, "loss": metrics["loss"], "grads": named_grads(learner)}


def compare(a: dict, b: dict, tol: float = TOL) -> dict:
    common = [k for k in a["grads"] if k in b["grads"]]
    diffs = {"logprobs": max_abs_diff(a["logprobs"], b["logprobs"]), "entropy": max_abs_diff(a["entropy"], b["entropy"]),
             "loss": abs(a["loss"] - b["loss"]),
             "grads": max(max_abs_diff(a["grads"][k], b["grads"][k]) for k in common)}
    router = [k for k in common if k.endswith("router.weight")]
    router_grad = max((float(a["grads"][k].abs().max()) for k in router), default=float("nan"))
    worst = max(common, key=lambda k: max_abs_diff(a["grads"][k], b["grads"][k]))
    return {"ok": max(diffs.values()) < tol and (not router or router_grad > 0) and len(common) == len(a["grads"]),
            "router_grad": router_grad, "compared": len(common), "worst_grad": worst, **diffs}


def replay_checks(learner, batch, hf_dir: str, *, ep: int = 2) -> None:
    """Routing replay at EP=`ep` (module docstring); checks named ep{ep}/..."""
    free = results(learner, batch, routing="free")
    own = learner.last_routing.clone()  # the routing of the free pass, (B, T, layers, k)

    def own_routing_is_identity() -> dict:
        learner.config.routing_replay = "r3"
        batch.routed_experts = own
        replayed = results(learner, batch)  # old pass replays `own`, training replays what it recorded
        same_record = bool(torch.equal(batch.replay_experts, own))
        return {**compare(replayed, free, tol=SAME_TOL), "recorded_equals_replayed": same_record,
                "ok": compare(replayed, free, tol=SAME_TOL)["ok"] and same_record}

    def other_experts_change_logprobs() -> dict:
        learner.config.routing_replay = "r3"
        shifted = own.clone()
        learner_rows = torch.arange(batch.num_seqs) % 2 == 0  # odd rows: explorer-like, no engine routing
        shifted[learner_rows] = torch.where(own[learner_rows] >= 0, (own[learner_rows] + 1) % ARCH.num_experts,
                                            own[learner_rows])
        shifted[~learner_rows] = -1
        batch.routed_experts = shifted
        replayed = results(learner, batch)
        record = batch.replay_experts
        target = shifted >= 0
        followed = bool(torch.equal(record[target], shifted[target]))  # replayed where given
        own_elsewhere = bool(torch.equal(record[~learner_rows], own[~learner_rows]))  # free where not
        moved = max_abs_diff(replayed["logprobs"], free["logprobs"])
        router = {k: g for k, g in replayed["grads"].items() if k.endswith("router.weight")}
        router_grad = min(float(g.abs().max()) for g in router.values())
        finite = all(bool(torch.isfinite(g).all()) for g in replayed["grads"].values())
        return {"ok": followed and own_elsewhere and moved > 1e-3 and router_grad > 0 and finite,
                "followed": followed, "explorer_rows_route_freely": own_elsewhere, "logprobs_moved": moved,
                "min_router_grad": router_grad}

    def recompute_replays_the_same_experts() -> dict:
        from megatron_s2lpo.learner import Learner

        recomputing = Learner(ARCH, config(ep=ep, replay="r3", recompute_granularity="full"),
                              groups=learner.groups)
        recomputing.load_hf(hf_dir)
        plain = results(learner, batch)  # batch.routed_experts is still the shifted routing
        again = results(recomputing, batch)
        return compare(again, plain, tol=SAME_TOL)

    def r2_replays_the_old_pass() -> dict:
        learner.config.routing_replay = "r2"
        batch.routed_experts = None  # r2 needs no engine routing
        replayed = results(learner, batch)
        same_record = bool(torch.equal(batch.replay_experts, own))  # the old pass's own routing
        diffs = compare(replayed, free, tol=SAME_TOL)
        return {**diffs, "recorded_equals_free": same_record, "ok": diffs["ok"] and same_record}

    run_check(f"ep{ep}/r2_replays_the_old_log_prob_pass", r2_replays_the_old_pass)
    run_check(f"ep{ep}/replay_own_routing_changes_nothing", own_routing_is_identity)
    run_check(f"ep{ep}/replay_other_experts_keeps_router_gradients", other_experts_change_logprobs)
    run_check(f"ep{ep}/replay_under_activation_recompute", recompute_replays_the_same_experts)
    learner.config.routing_replay = "none"
    batch.routed_experts = batch.replay_experts = None


def part_ep2(state: dict, root: str) -> None:
    from megatron_s2lpo.convert.mcore_io import hf_to_mcore_checkpoint
    from megatron_s2lpo.learner import Learner

    hf_dir = state["hf_dir"]
    groups = init_parallel(1, 1, seed=5, expert_model_parallel_size=2)
    learner = Learner(ARCH, config(ep=2), groups=groups)
    learner.load_hf(hf_dir)
    batch = fixed_batch()

    def export_equals() -> dict:
        return {**export_equals_hf(learner.policy_chunks, groups, hf_dir),
                "local_experts": len(learner.policy_chunks[0].decoder.layers[0].mlp.local_expert_indices)}

    def logprobs_equal_hf() -> dict:
        ours = learner.compute_logprobs(batch, 1.0, all_tokens=True)
        diff = max_abs_diff(ours, hf_logprobs(hf_dir, batch))
        return {"ok": diff < TOL and bool((ours != 0).any()), "max_abs_diff": diff}

    run_check("ep2/export_equals_hf_state_dict", export_equals)
    run_check("ep2/logprobs_equal_transformers", logprobs_equal_hf)
    run_check("ep2/tool_writes_checkpoint", lambda: {"arch": hf_to_mcore_checkpoint(
        hf_dir, os.path.join(root, "tool_ep2"), groups).family})
    replay_checks(learner, batch, hf_dir)
    learner.save(os.path.join(root, "ckpt"))
    state["ep2"] = results(learner, batch)
    state["step"] = learner.train_step(batch, loss_config=LOSS, temperature=0.7)
    state["lp_after"] = learner.compute_logprobs(batch, 0.7)
    destroy_parallel(destroy_process_group=False)


def part_ep1(state: dict, root: str) -> None:
    from megatron_s2lpo.convert.hf_io import HFReader
    from megatron_s2lpo.convert.mcore_io import mcore_to_hf_checkpoint
    from megatron_s2lpo.learner import Learner

    hf_dir = state["hf_dir"]
    groups = init_parallel(1, 1, seed=5)  # DP=2, all experts on every rank
    learner = Learner(ARCH, config(), groups=groups)
    learner.load(os.path.join(root, "ckpt"))
    batch = fixed_batch()
    state["ep1"] = results(learner, batch)
    run_check("ep2_equals_ep1", lambda: compare(state["ep2"], state["ep1"]))

    def step_equal() -> dict:
        metrics = learner.train_step(batch, loss_config=LOSS, temperature=0.7)
        after = learner.compute_logprobs(batch, 0.7)
        diffs = {"loss": abs(metrics["loss"] - state["step"]["loss"]),
                 "grad_norm": abs(metrics["grad_norm"] - state["step"]["grad_norm"]),
                 "logprobs_after_step": max_abs_diff(after, state["lp_after"])}
        moved = max_abs_diff(after, state["ep1"]["logprobs"])
        return {"ok": diffs["loss"] < 1e-6 and diffs["grad_norm"] < 1e-5 and diffs["logprobs_after_step"] < 1e-4
                and moved > 1e-2, "moved": moved, **diffs}

    def logits_equal_hf() -> dict:
        fresh = Learner(ARCH, config(), groups=groups)
        fresh.load_hf(hf_dir)
        return logits_against_hf(fresh.policy_chunks[0], batch.tokens[:2, :16], hf_dir)

    def tool_round_trip() -> dict:
        out = os.path.join(root, "tool_back")
        mcore_to_hf_checkpoint(os.path.join(root, "tool_ep2"), out, hf_dir, groups)
        original, back = HFReader(hf_dir), HFReader(out)
        same = sorted(back.names()) == sorted(original.names()) and all(
            torch.equal(back[n], original[n]) for n in original.names())
        return {"ok": same, "tensors": len(back.names())}

    run_check("ep2_step_equals_ep1_step", step_equal)
    run_check("ep1/logits_equal_transformers", logits_equal_hf)
    run_check("tool_ep2_checkpoint_back_to_hf_at_ep1", tool_round_trip)
    destroy_parallel(destroy_process_group=False)


def part_tp2(state: dict, root: str, *, ep: int, etp: int) -> None:
    """Model chunks at TP=2 (megatron trains MoE under TP only with sequence parallelism, a TE
    feature, so no Learner here): logits against transformers and the export against the HF state."""
    from megatron_s2lpo.convert.hf_io import HFReader
    from megatron_s2lpo.convert.live import load_hf_state
    from megatron_s2lpo.learner.model import build_model_chunks

    hf_dir = state["hf_dir"]
    groups = init_parallel(2, 1, seed=5, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
    chunks = build_model_chunks(ARCH, groups)
    reader = HFReader(hf_dir)
    load_hf_state(chunks, groups.tp_rank, groups.tp_size, ARCH, reader, etp_rank=groups.etp_rank,
                  etp_size=groups.etp_size)

    def logits_and_export() -> dict:
        tokens = fixed_batch().tokens[:2, :16]
        chunks[0].eval()
        shard = chunk_logits(chunks[0], tokens).to(groups.device)
        parts = [torch.empty_like(shard) for _ in range(2)]
        dist.all_gather(parts, shard.contiguous(), group=groups.tp_group)
        with torch.no_grad():
            theirs = hf_model(hf_dir)(input_ids=tokens).logits
        diff = max_abs_diff(torch.cat(parts, -1).cpu()[..., :ARCH.vocab_size], theirs)
        same = export_equals_hf(chunks, groups, hf_dir)["ok"]
        return {"ok": diff < TOL and same, "logits_max_abs_diff": diff, "export_equals_hf": same}

    run_check(f"tp2_ep{ep}_etp{etp}/logits_and_export_equal_hf", logits_and_export)
    destroy_parallel(destroy_process_group=False)


def part_cp2(state: dict, root: str) -> None:
    """CP=2 (DP=1): the MoE learner on part 1's checkpoint against part 2's EP=1 results, and a dense
    Qwen3 learner whose CP=1 reference runs in part 5."""
    from megatron_s2lpo.learner import Learner

    groups = init_parallel(1, 1, seed=5, context_parallel_size=2)
    batch = fixed_batch()
    moe = Learner(ARCH, config(context_parallel_size=2), groups=groups)
    moe.load(os.path.join(root, "ckpt"))
    run_check("cp2_moe_equals_cp1", lambda: compare(results(moe, batch), state["ep1"]))
    dense = Learner(tiny_arch("qwen3"), config(context_parallel_size=2), groups=groups)
    dense.save(os.path.join(root, "dense"))
    state["cp2"] = results(dense, batch)
    state["cp2_step"] = dense.train_step(batch, loss_config=LOSS, temperature=0.7)
    state["cp2_after"] = dense.compute_logprobs(batch, 0.7)
    destroy_parallel(destroy_process_group=False)


def part_cp1_dense(state: dict, root: str) -> None:
    from megatron_s2lpo.learner import Learner

    groups = init_parallel(1, 1, seed=5)  # DP=2
    dense = Learner(tiny_arch("qwen3"), config(), groups=groups)
    dense.load(os.path.join(root, "dense"))
    batch = fixed_batch()

    def equal() -> dict:
        reference = results(dense, batch)
        step = dense.train_step(batch, loss_config=LOSS, temperature=0.7)
        after = dense.compute_logprobs(batch, 0.7)
        same = compare(state["cp2"], reference)
        diffs = {"step_loss": abs(step["loss"] - state["cp2_step"]["loss"]),
                 "step_grad_norm": abs(step["grad_norm"] - state["cp2_step"]["grad_norm"]),
                 "logprobs_after_step": max_abs_diff(after, state["cp2_after"])}
        ok = same["ok"] and diffs["step_loss"] < 1e-6 \
            and diffs["step_grad_norm"] < 1e-5 and diffs["logprobs_after_step"] < 1e-4
        return {**same, **diffs, "ok": ok}

    run_check("cp2_dense_equals_cp1", equal)
    destroy_parallel(destroy_process_group=False)


def part_one_device(state: dict, root: str) -> None:
    """One process (one GPU): every check that needs no second rank, at EP=1."""
    from megatron_s2lpo.convert.hf_io import HFReader
    from megatron_s2lpo.convert.mcore_io import hf_to_mcore_checkpoint, mcore_to_hf_checkpoint
    from megatron_s2lpo.learner import Learner

    hf_dir = state["hf_dir"]
    groups = init_parallel(1, 1, seed=5)
    learner = Learner(ARCH, config(), groups=groups)
    learner.load_hf(hf_dir)
    batch = fixed_batch()

    def logprobs_equal_hf() -> dict:
        ours = learner.compute_logprobs(batch, 1.0, all_tokens=True)
        diff = max_abs_diff(ours, hf_logprobs(hf_dir, batch))
        return {"ok": diff < TOL and bool((ours != 0).any()), "max_abs_diff": diff}

    def tool_round_trip() -> dict:
        hf_to_mcore_checkpoint(hf_dir, os.path.join(root, "tool_ep1"), groups)
        mcore_to_hf_checkpoint(os.path.join(root, "tool_ep1"), os.path.join(root, "tool_back"), hf_dir, groups)
        original, back = HFReader(hf_dir), HFReader(os.path.join(root, "tool_back"))
        same = sorted(back.names()) == sorted(original.names()) and all(
            torch.equal(back[n], original[n]) for n in original.names())
        return {"ok": same, "tensors": len(back.names())}

    def step_moves_logprobs() -> dict:
        before = learner.compute_logprobs(batch, 0.7)
        metrics = learner.train_step(batch, loss_config=LOSS, temperature=0.7)
        moved = max_abs_diff(learner.compute_logprobs(batch, 0.7), before)
        finite = all(bool(torch.isfinite(torch.tensor(float(metrics[k])))) for k in ("loss", "grad_norm"))
        return {"ok": finite and moved > 1e-2, "moved": moved, "loss": metrics["loss"],
                "grad_norm": metrics["grad_norm"]}

    def export_equals() -> dict:
        experts = type(learner.policy_chunks[0].decoder.layers[0].mlp.experts).__name__  # TEGroupedMLP with TE
        return {**export_equals_hf(learner.policy_chunks, groups, hf_dir), "device": str(groups.device),
                "experts": experts}

    run_check("ep1/export_equals_hf_state_dict", export_equals)
    run_check("ep1/logprobs_equal_transformers", logprobs_equal_hf)
    run_check("ep1/logits_equal_transformers", lambda: logits_against_hf(
        learner.policy_chunks[0], batch.tokens[:2, :16], hf_dir))
    run_check("ep1/tool_round_trip_bit_exact", tool_round_trip)
    replay_checks(learner, batch, hf_dir, ep=1)
    run_check("ep1/step_moves_logprobs", step_moves_logprobs)
    destroy_parallel(destroy_process_group=False)


def main() -> None:
    if torch.cuda.is_available() and not dist.is_initialized():  # NCCL on GPUs, not shared_tmpdir's gloo
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    root = shared_tmpdir("moe_checks_")
    state: dict = {"hf_dir": os.path.join(root, "hf")}
    make_hf_model(state["hf_dir"])
    if dist.get_world_size() == 1:
        part_one_device(state, root)
        shutil.rmtree(root, ignore_errors=True)
        dist.destroy_process_group()
        return
    part_ep2(state, root)
    part_ep1(state, root)
    part_tp2(state, root, ep=2, etp=1)
    part_tp2(state, root, ep=1, etp=2)
    part_cp2(state, root)
    part_cp1_dense(state, root)
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(root, ignore_errors=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
