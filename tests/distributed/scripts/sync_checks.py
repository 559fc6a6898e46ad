"""Weight sync from a real megatron learner into rollout engines, in one 2-process launch.

    pytest tests/distributed/test_sync_distributed.py

Part 1 (TP=2): rank 0 holds a LocalEngine with other random weights. Parity fails before the
sync; the disk transport (real files) brings the engine to the learner's weights bit-exactly and
parity passes; the engine's log-probs of its own samples equal the learner's within 1e-5;
perturbing the engine or the learner fails parity, a new sync repairs it; the default route
(disk + in-process engine -> buckets); errors raised on rank 0 only (mid-export, with more
buckets to come) reach rank 1 and leave no collective hanging; an SGLangEngine that launched
tests/protocol_server.py gets the weights over HTTP (/update_weights_from_disk), reports the new
version and passes parity.
Part 2 (TP=1, DP=2): only rank 0's replica exports; both ranks get the same result; log-probs
equal. Part 3 (PP=2): disk sync + parity with the embedding and the output on different stages.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading

import torch
import torch.distributed as dist

from common import RANK, max_abs_diff, run_check, shared_tmpdir, tiny_arch

from megatron_s2lpo.config.learner import LearnerConfig
from megatron_s2lpo.config.rollout import EngineConfig
from megatron_s2lpo.config.sync import SyncConfig
from megatron_s2lpo.rollout.engine import GenerateRequest
from megatron_s2lpo.rollout.local import LocalEngine
from megatron_s2lpo.sync.collective import run_on_driver
from megatron_s2lpo.sync.errors import WeightParityError
from megatron_s2lpo.sync.parity import completions_to_batch
from megatron_s2lpo.sync.weight_sync import WeightSync

TOL = 1e-5
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def sync_config(root: str, name: str, **overrides) -> SyncConfig:
    values = dict(disk_dir=os.path.join(root, name), parity_num_sequences=4, parity_max_new_tokens=8,
                  parity_threshold=1e-4)
    return SyncConfig(**{**values, **overrides})


def learner_for(arch, tp: int = 1, pp: int = 1):
    from megatron_s2lpo.learner import Learner
    from megatron_s2lpo.learner.parallel import init_parallel

    groups = init_parallel(tp, pp, seed=11)
    config = LearnerConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp, micro_batch_tokens=512,
                           seq_length_multiple=1)
    return Learner(arch, config, groups=groups)


def same_on_all_ranks(value) -> bool:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return all(v == values[0] for v in values)


def engine_matches_export(learner, engine) -> float:
    """Max |engine weight - exported learner weight| (collective; 0.0 off rank 0)."""
    from megatron_s2lpo.convert.export import iter_hf_tensors

    worst = 0.0
    for name, tensor in iter_hf_tensors(learner.policy_chunks, learner.groups, learner.arch):
        if engine is not None:
            worst = max(worst, max_abs_diff(engine.model.state_dict()[name], tensor))
    return worst


def own_samples_gap(learner, engine, *, temperature: float, top_p: float) -> dict:
    """The engine samples (its own seeds, top-p on); the learner recomputes: max |delta logp|."""
    def sample():
        requests = [GenerateRequest(request_id=f"own-{i}", prompt_ids=list(range(3 + i, 12 + 2 * i)),
                                    temperature=temperature, top_p=top_p, max_new_tokens=10, seed=100 + i)
                    for i in range(3)]
        return [(c.prompt_ids, c.token_ids, c.logprobs) for c in engine.generate(requests)]

    batch = completions_to_batch(run_on_driver(sample, learner.groups))
    learned = learner.compute_logprobs(batch, temperature)
    mask = batch.loss_mask > 0
    gap = max_abs_diff(learned[mask], batch.behaviour_logprobs[mask])
    return {"ok": gap < TOL, "max_abs_logp_diff": gap, "tokens": int(mask.sum())}


def expect_parity_error(sync) -> dict:
    try:
        sync.check_parity()
    except WeightParityError as err:
        return {"ok": err.report is not None and err.report.mean_abs_diff > 1e-3,
                "mean_abs_diff": err.report.mean_abs_diff if err.report else None}
    return {"ok": False, "error": "no WeightParityError"}


def perturb(model: torch.nn.Module, pattern: str, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if pattern in name:
                param.add_(scale * torch.randn(param.shape, generator=gen, dtype=param.dtype))


class FailingEngine(LocalEngine):
    """Refuses its first weight update (a server error on rank 0 in the middle of an export)."""

    failed = False

    def update_weights_from_tensors(self, named_tensors, version, flush=True):
        if not self.failed:
            self.failed = True
            raise ConnectionError("server went away")
        super().update_weights_from_tensors(named_tensors, version, flush)


def part_tp2(root: str, server: dict) -> None:
    from megatron_s2lpo.learner.parallel import destroy_parallel
    from megatron_s2lpo.sync.exporter import MegatronExporter

    arch = tiny_arch("qwen3", tie=True)
    learner = learner_for(arch, tp=2)
    engine = LocalEngine.from_arch(arch, init_seed=123) if RANK == 0 else None
    sync = WeightSync.from_learner(learner, engine, sync_config(root, "tp2"), temperature=0.9, transport="disk")
    run_check("sync_tp2_parity_fails_before_sync", lambda: expect_parity_error(sync))

    def disk_sync() -> dict:
        result = sync.sync(1)
        worst = engine_matches_export(learner, engine)
        checks = {"same_result": same_on_all_ranks((result.version, result.num_bytes, result.num_buckets)),
                  "files": RANK != 0 or os.path.isfile(os.path.join(result.path, "model.safetensors.index.json")),
                  "version": RANK != 0 or engine.weight_version == 1, "weights_equal": worst == 0.0,
                  "parity": result.parity.mean_abs_diff < TOL}
        return {"ok": all(checks.values()), **checks, "parity_mean": result.parity.mean_abs_diff,
                "transport": result.transport, "bytes": result.num_bytes}

    run_check("sync_tp2_disk_files_sync_and_parity", disk_sync)
    run_check("sync_tp2_engine_logprobs_equal_learner",
              lambda: own_samples_gap(learner, engine, temperature=0.8, top_p=0.9))

    def perturbed_engine() -> dict:
        if RANK == 0:
            perturb(engine.model, "layers.1.mlp.down_proj")
        failed = expect_parity_error(sync)
        repaired = sync.sync(2).parity.mean_abs_diff
        return {"ok": failed["ok"] and repaired < TOL, "mean_abs_diff": failed.get("mean_abs_diff"),
                "after_resync": repaired}

    run_check("sync_tp2_perturbed_engine_fails_parity", perturbed_engine)

    def perturbed_learner() -> dict:
        for chunk in learner.policy_chunks:
            perturb(chunk, "layers.0.mlp.linear_fc2")
        failed = expect_parity_error(sync)
        repaired = sync.sync(3).parity.mean_abs_diff
        return {"ok": failed["ok"] and repaired < TOL, "mean_abs_diff": failed.get("mean_abs_diff"),
                "after_resync": repaired}

    run_check("sync_tp2_perturbed_learner_fails_parity", perturbed_learner)

    def default_route() -> dict:
        if RANK == 0:
            perturb(engine.model, "embed_tokens")
        buckets = WeightSync.from_learner(learner, engine, sync_config(root, "unused"), temperature=0.9)
        result = buckets.sync(4)
        worst = engine_matches_export(learner, engine)
        return {"ok": buckets.transport_name == "buckets" and worst == 0.0 and result.parity.mean_abs_diff < TOL
                and not os.path.exists(os.path.join(root, "unused")), "transport": buckets.transport_name}

    run_check("sync_tp2_default_route_is_in_process_buckets", default_route)

    def errors_reach_every_rank() -> dict:
        failing = FailingEngine(LocalEngine.from_arch(arch, init_seed=3).model) if RANK == 0 else None
        small = MegatronExporter(learner.policy_chunks, learner.groups, arch, bucket_bytes=32 * 1024)
        flaky = WeightSync.from_learner(learner, failing, sync_config(root, "flaky"), exporter=small)
        try:
            flaky.sync(1)
            return {"ok": False, "error": "the failed push did not raise"}
        except ConnectionError as err:
            message = str(err)
        marked = RANK == 0 or "[raised on learner rank 0]" in message
        again = flaky.sync(1)  # the export was drained: nothing is left hanging, the retry works
        return {"ok": marked and "server went away" in message and again.num_buckets > 3
                and again.parity.mean_abs_diff < TOL, "buckets": again.num_buckets, "message": message}

    run_check("sync_tp2_rank0_errors_reach_every_rank", errors_reach_every_rank)

    def http_disk_sync() -> dict:
        server["thread"].join()
        sglang = server.get("engine")
        if RANK == 0 and sglang is None:
            raise RuntimeError(f"the protocol server did not start: {server.get('error')}")
        http = WeightSync.from_learner(learner, sglang, sync_config(root, "http"), temperature=0.9)
        before = expect_parity_error(http)
        result = http.sync(1)
        info = sglang.get_model_info() if RANK == 0 else {"weight_version": "1"}
        checks = {"transport": result.transport == "disk", "parity_before_fails": before["ok"],
                  "engine_version": RANK != 0 or sglang.weight_version == 1,
                  "server_version": info["weight_version"] == "1", "parity": result.parity.mean_abs_diff < TOL,
                  "path_is_final": RANK != 0 or os.path.basename(result.path) == "weights_v00000001"}
        return {"ok": all(checks.values()), **checks, "parity_mean": result.parity.mean_abs_diff}

    run_check("sync_tp2_http_disk_sync_and_parity", http_disk_sync)
    destroy_parallel(destroy_process_group=False)


def part_tp1_dp2(root: str) -> None:
    from megatron_s2lpo.learner.parallel import destroy_parallel

    arch = tiny_arch("llama", tie=False)
    learner = learner_for(arch, tp=1)
    engine = LocalEngine.from_arch(arch, init_seed=9) if RANK == 0 else None

    def dp2() -> dict:
        sync = WeightSync.from_learner(learner, engine, sync_config(root, "dp2"), temperature=1.0)
        result = sync.sync(1)
        gap = own_samples_gap(learner, engine, temperature=1.0, top_p=1.0)
        exports = [None] * 2
        dist.all_gather_object(exports, sync.exports)
        same = same_on_all_ranks((result.version, result.num_bytes, round(result.parity.mean_abs_diff, 12)))
        return {"ok": gap["ok"] and exports == [True, False] and same and result.parity.mean_abs_diff < TOL,
                "max_abs_logp_diff": gap["max_abs_logp_diff"], "dp_size": learner.groups.dp_size}

    run_check("sync_tp1_dp2_sync_and_logprobs", dp2)
    destroy_parallel(destroy_process_group=False)


def part_pp2(root: str) -> None:
    from megatron_s2lpo.learner.parallel import destroy_parallel

    arch = tiny_arch("qwen2", num_layers=4, tie=True)
    learner = learner_for(arch, pp=2)
    engine = LocalEngine.from_arch(arch, init_seed=4) if RANK == 0 else None

    def pp2() -> dict:
        sync = WeightSync.from_learner(learner, engine, sync_config(root, "pp2"), temperature=0.7, transport="disk")
        result = sync.sync(1)
        worst = engine_matches_export(learner, engine)
        gap = own_samples_gap(learner, engine, temperature=0.7, top_p=1.0)
        return {"ok": worst == 0.0 and gap["ok"] and result.parity.mean_abs_diff < TOL,
                "parity_mean": result.parity.mean_abs_diff, "max_abs_logp_diff": gap["max_abs_logp_diff"]}

    run_check("sync_pp2_disk_sync_and_parity", pp2)
    destroy_parallel(destroy_process_group=False)


def start_server(root: str) -> dict:
    """Rank 0: an SGLangEngine launching the protocol test server (other random weights), in a
    thread so that its start overlaps the megatron work."""
    state: dict = {}

    def launch() -> None:
        try:
            from megatron_s2lpo.rollout.sglang_engine import SGLangEngine
            from megatron_s2lpo.utils.ports import free_port

            model_dir = os.path.join(root, "server_model")
            LocalEngine.from_arch(tiny_arch("qwen3", tie=True), init_seed=77).save_pretrained(model_dir)
            cfg = EngineConfig(backend="sglang", model_path=model_dir, port=free_port(), startup_timeout_s=120,
                               launch_command=[sys.executable, os.path.join(REPO, "tests", "protocol_server.py")])
            state["engine"] = SGLangEngine(cfg, name="protocol-server")
        except Exception as err:  # noqa: BLE001 - reported by the check that needs the server
            state["error"] = repr(err)

    state["thread"] = threading.Thread(target=launch if RANK == 0 else (lambda: None), daemon=True)
    state["thread"].start()
    return state


def main() -> None:
    torch.set_num_threads(1)
    root = shared_tmpdir("sync_checks_")
    server = start_server(root)
    try:
        part_tp2(root, server)
        part_tp1_dp2(root)
        part_pp2(root)
    finally:
        if server.get("engine") is not None:
            server["engine"].close()
    dist.barrier()
    if RANK == 0:
        shutil.rmtree(root, ignore_errors=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
