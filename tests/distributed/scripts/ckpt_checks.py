"""Checkpoint and reference-model checks, in one 2-process launch.

    pytest tests/distributed/test_learner_checkpoint.py

Part 1 (DP=2, distributed optimizer, reference model): the reference starts as a copy of the
policy; save -> train -> load gives the identical next step (loss, grad norm, log-probs, LR,
RNG); a save that raises partway leaves the previous checkpoint loadable; clear errors for
missing / incomplete checkpoints; the reference loads from a checkpoint.
Part 2 (TP=2 x DP=1, same processes): the TP=1 x DP=2 checkpoint (model + sharded Adam
state) loads resharded and gives the same next step; a plain optimizer is refused clearly.
"""

from __future__ import annotations

import random
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from common import fixed_batch, max_abs_diff, run_check, shared_tmpdir, tiny_arch

from megatron_s2lpo.algo.losses import PolicyLossConfig
from megatron_s2lpo.config.learner import LearnerConfig, OptimConfig
from megatron_s2lpo.learner import checkpoint as ckpt
from megatron_s2lpo.learner.parallel import destroy_parallel, init_parallel

LOSS = PolicyLossConfig(kl_coef=0.1, kl_estimator="low_var_kl")
ARCH = tiny_arch("qwen2", tie=False)  # QKV bias, untied output layer


def learner_config(tp: int, distributed_optimizer: bool) -> LearnerConfig:
    return LearnerConfig(tensor_parallel_size=tp, micro_batch_tokens=64, seq_length_multiple=8,
                         optim=OptimConfig(lr=1e-3, lr_warmup_steps=2, lr_decay_steps=10, lr_decay_style="cosine",
                                           min_lr=1e-4, use_distributed_optimizer=distributed_optimizer))


def batch_for(learner):
    batch = fixed_batch(seed=9)
    batch.old_logprobs = learner.compute_logprobs(batch, 1.0)
    batch.ref_logprobs = learner.compute_logprobs(batch, 1.0, reference=True)
    return batch


class InjectedCrash(RuntimeError):
    pass


def part_dp2(state: dict, root: Path) -> None:
    from megatron.core import dist_checkpointing

    from megatron_s2lpo.learner import Learner

    groups = init_parallel(seed=3)  # DP=2
    learner = Learner(ARCH, learner_config(1, True), groups=groups, with_reference=True)
    batch = fixed_batch(seed=9)
    initial_lp = learner.compute_logprobs(batch, 1.0)

    def reference_is_initial_policy() -> dict:
        ref = learner.compute_logprobs(batch, 1.0, reference=True)
        return {"ok": max_abs_diff(ref, initial_lp) == 0.0, "diff": max_abs_diff(ref, initial_lp)}

    run_check("reference_starts_as_policy_copy", reference_is_initial_policy)
    for _ in range(2):
        learner.train_step(batch_for(learner), loss_config=LOSS)
    learner.save(root, trainer_state={"sampler": {"epoch": 1, "index": 17}})
    learner.config.checkpoint.optimizer_sharding = "fully_reshardable"  # the same state, for part 2's resharding
    learner.save(state["full_root"], trainer_state={"sampler": {"epoch": 1, "index": 17}})
    learner.config.checkpoint.optimizer_sharding = "dp_reshardable"
    rng_after_save = (random.random(), torch.rand(3))
    state["policy_lp_at_save"] = learner.compute_logprobs(batch, 1.0)
    next_batch = batch_for(learner)
    state["next_batch"] = next_batch
    state["next"] = learner.train_step(next_batch, loss_config=LOSS)
    state["next_lp"] = learner.compute_logprobs(batch, 1.0)

    def resume_identical() -> dict:
        loaded = learner.load(root)
        rng_ok = random.random() == rng_after_save[0] and torch.equal(torch.rand(3), rng_after_save[1])
        again = learner.train_step(next_batch, loss_config=LOSS)
        diffs = {"loss": abs(again["loss"] - state["next"]["loss"]), "lr": abs(again["lr"] - state["next"]["lr"]),
                 "grad_norm": abs(again["grad_norm"] - state["next"]["grad_norm"]),
                 "logprobs": max_abs_diff(learner.compute_logprobs(batch, 1.0), state["next_lp"])}
        ok = (loaded.step == 2 and loaded.trainer_state["sampler"] == {"epoch": 1, "index": 17} and rng_ok
              and learner.step == 3 and diffs["loss"] < 1e-6 and diffs["lr"] == 0 and diffs["grad_norm"] < 1e-6
              and diffs["logprobs"] < 1e-5)
        return {"ok": ok, "step": loaded.step, "rng_ok": rng_ok, "lr_value": again["lr"], **diffs}

    run_check("checkpoint_resume_gives_identical_next_step", resume_identical)
    run_check("dp_reshardable_save_gathers_nothing", lambda: save_transients(learner, root.parent / "formats"))
    run_check("async_save_resumes_identically", lambda: async_resume(learner, root.parent / "async", state))
    run_check("async_write_failure_keeps_previous_checkpoint",
              lambda: async_failure(learner, root.parent / "async", state))

    def interrupted_save() -> dict:
        real_save = dist_checkpointing.save

        def crashing_save(sharded_state_dict, checkpoint_dir, *args, **kwargs):
            (Path(checkpoint_dir) / f"partial_{dist.get_rank()}.distcp").write_bytes(b"half a shard")
            raise InjectedCrash("killed during the save")

        dist_checkpointing.save = crashing_save
        try:
            learner.save(root)
            raised = False
        except ckpt.CheckpointSaveError as err:  # on every rank, the crash as its cause
            raised = isinstance(err.__cause__, InjectedCrash) and "killed during the save" in str(err)
        finally:
            dist_checkpointing.save = real_save
        dist.barrier()
        pointer = (root / ckpt.LATEST).read_text().strip()
        removed = not (root / ".tmp-step_00000003").exists()  # the failed save cleaned up after itself
        loaded = learner.load(root)
        again = learner.train_step(next_batch, loss_config=LOSS)
        loss_diff = abs(again["loss"] - state["next"]["loss"])
        if dist.get_rank() == 0:  # what a SIGKILL mid-save leaves: a later save of the step removes it
            (root / ".tmp-step_00000003" / "dist").mkdir(parents=True)
        dist.barrier()
        saved = learner.save(root)
        clean = not (root / ".tmp-step_00000003").exists() and ckpt.latest_checkpoint(root) == saved
        return {"ok": raised and pointer == "step_00000002" and removed and loaded.step == 2 and loss_diff < 1e-6
                and clean, "raised": raised, "pointer": pointer, "partial_removed": removed, "loss_diff": loss_diff,
                "clean_after_next_save": clean}

    run_check("interrupted_save_leaves_previous_checkpoint", interrupted_save)

    def clear_errors() -> dict:
        errors = {}
        for label, call, expected in (
            ("missing_root", lambda: learner.load(root / "nowhere"), FileNotFoundError),
            ("missing_step", lambda: ckpt.resolve_checkpoint(root / "step_00000042"), FileNotFoundError),
            ("incomplete_step", lambda: ckpt.resolve_checkpoint(root / "step_00000099"), ValueError),
        ):
            if dist.get_rank() == 0 and label == "incomplete_step":
                (root / "step_00000099" / "dist").mkdir(parents=True, exist_ok=True)
            dist.barrier()
            try:
                call()
                errors[label] = "no error"
            except expected as err:
                errors[label] = f"{type(err).__name__}: {err}"
        skipped = ckpt.latest_checkpoint(root).name != "step_00000099"  # incomplete: never picked
        ok = all(not v.startswith("no error") for v in errors.values()) and skipped
        return {"ok": ok, "latest_skips_incomplete": skipped, **errors}

    run_check("checkpoint_errors_are_clear", clear_errors)
    run_check("save_leaves_no_helper_process", no_helper_process)
    run_check("damaged_or_planted_newest_falls_back_to_previous", lambda: falls_back(learner, root, state))
    run_check("full_disk_is_named_and_keeps_the_previous_checkpoint", lambda: full_disk(learner, root, state))

    def reference_from_checkpoint() -> dict:
        learner.reference.load(str(root / "step_00000002"))
        ref = learner.compute_logprobs(batch, 1.0, reference=True)
        return {"ok": max_abs_diff(ref, state["policy_lp_at_save"]) < 1e-6,
                "diff": max_abs_diff(ref, state["policy_lp_at_save"])}

    run_check("reference_loads_from_checkpoint", reference_from_checkpoint)
    destroy_parallel(destroy_process_group=False)


def save_transients(learner, root: Path) -> dict:
    """Memory a save allocates above what is live (torch's allocator events, planner/measure.py):
    dp_reshardable writes each DP rank's own shard (views), fully_reshardable gathers every TP
    shard's fp32 params and Adam moments on the DP ranks first."""
    from megatron_s2lpo.learner.offload import optimizer_tensors
    from megatron_s2lpo.planner.measure import peak_allocated_bytes, storage_bytes

    shard = storage_bytes(optimizer_tensors(learner.optimizer))  # this rank's fp32 params + moments
    peaks = {}
    for sharding in ("dp_reshardable", "fully_reshardable"):
        learner.config.checkpoint.optimizer_sharding = sharding
        peaks[sharding] = peak_allocated_bytes(lambda: learner.save(root / sharding))[0]
    learner.config.checkpoint.optimizer_sharding = "dp_reshardable"
    ratios = {k: round(v / shard, 2) for k, v in peaks.items()}
    return {"ok": ratios["dp_reshardable"] < 1.0 < ratios["fully_reshardable"], "save_peak_over_rank_shard": ratios,
            "rank_shard_bytes": shard}


def async_resume(learner, root: Path, state: dict) -> dict:
    """An asynchronous save of step 2's state while two more steps train (changing every tensor
    the writer reads), committed by a later poll: it resumes to the identical next step, and no
    writer process is left."""
    import psutil

    from megatron_s2lpo.learner.checkpoint_async import AsyncSaves

    learner.load(state["full_root"].parent / "checkpoints")  # step 2 (latest of the main root)
    learner._async_saves = AsyncSaves()
    try:
        learner.save(root)
        staged_pending = learner._async_saves.in_flight is not None and not (root / "step_00000002").exists()
        for _ in range(2):
            learner.train_step(state["next_batch"], loss_config=LOSS)  # polls (commits when written)
        committed = learner.finish_saves(blocking=True) or root / "step_00000002"
        loaded = learner.load(root)
        again = learner.train_step(state["next_batch"], loss_config=LOSS)
    finally:
        learner._async_saves = None
    children = [p.pid for p in psutil.Process().children(recursive=True)]
    diffs = {"loss": abs(again["loss"] - state["next"]["loss"]),
             "grad_norm": abs(again["grad_norm"] - state["next"]["grad_norm"])}
    ok = (staged_pending and loaded.step == 2 and committed == root / "step_00000002"
          and ckpt.latest_checkpoint(root) == committed and max(diffs.values()) < 1e-6 and not children)
    return {"ok": ok, "pending_after_save": staged_pending, "children": children, **diffs}


def async_failure(learner, root: Path, state: dict) -> dict:
    """A write that fails in the background writer (ENOSPC raised by megatron's own shard writer in
    the forked process): the commit never happens, every rank raises CheckpointSaveError naming
    the full disk, the partial directory is removed and `latest` still names step 2."""
    import errno

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_s2lpo.learner.checkpoint_async import AsyncSaves

    real_write = filesystem_async._write_item

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    learner._async_saves = AsyncSaves()
    filesystem_async._write_item = no_space  # the forked writers inherit it
    try:
        learner.save(root, step=5)
        message = "no error"
        try:
            learner.finish_saves(blocking=True)
        except ckpt.CheckpointSaveError as err:
            message = str(err)
    finally:
        filesystem_async._write_item = real_write
        learner._async_saves = None
    dist.barrier()
    leftover = [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]
    pointer = (root / "latest").read_text().strip()
    ok = ("no space left on device (ENOSPC)" in message and not leftover and pointer == "step_00000002"
          and ckpt.latest_checkpoint(root).name == "step_00000002")
    return {"ok": ok, "message": message[:300], "leftover": leftover, "pointer": pointer}


def no_helper_process() -> dict:
    """megatron's save would leave a spawned Manager and a resource tracker behind (both outlive a
    SIGKILLed trainer); the save runs without any helper process."""
    import psutil

    children = [" ".join(c.cmdline())[:120] for c in psutil.Process().children(recursive=True)]
    return {"ok": not children, "children": children}


class Planted:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _on_rank0(fn) -> None:
    if dist.get_rank() == 0:
        fn()
    dist.barrier()


def falls_back(learner, root: Path, state: dict) -> dict:
    """The newest checkpoint (step 3) with a truncated shard, then with a planted pickle as its
    RNG file: the load of the root falls back to step 2 and the next step is identical; the
    planted code never runs."""
    newest = root / "step_00000003"
    shard = sorted((newest / "dist").glob("*.distcp"))[0]
    rng_file = newest / "rng" / "rank_00001.pt"
    intact = {shard: shard.read_bytes(), rng_file: rng_file.read_bytes()}
    marker = root.parent / "pwned"
    outcomes = {}
    for label, damage in (("truncated_shard", lambda: shard.write_bytes(intact[shard][:100])),
                          ("planted_rng_pickle", lambda: torch.save(Planted(marker), rng_file))):
        _on_rank0(damage)
        loaded = learner.load(root)
        again = learner.train_step(state["next_batch"], loss_config=LOSS)
        outcomes[label] = {"step": loaded.step, "loss_diff": abs(again["loss"] - state["next"]["loss"])}
        _on_rank0(lambda: [path.write_bytes(data) for path, data in intact.items()])
    ran = marker.exists()
    ok = not ran and all(o["step"] == 2 and o["loss_diff"] < 1e-6 for o in outcomes.values())
    return {"ok": ok, "planted_code_ran": ran, **outcomes}


def _small_filesystem(path: Path, size_bytes: int) -> bool:
    """Mount a tmpfs of `size_bytes` at `path` (root only); False where mounting is not allowed."""
    import subprocess

    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


def full_disk(learner, root: Path, state: dict) -> dict:
    """A save onto a filesystem with room for one checkpoint only (a real tmpfs when this process may
    mount one; else OSError(ENOSPC) raised by megatron's shard writer itself): the error says no
    space left on device, the partial save is removed, `latest` and the previous checkpoint load."""
    import errno
    import shutil
    import subprocess

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = root / "step_00000002"
    size = sum(f.stat().st_size for f in previous.rglob("*") if f.is_file())
    small = root.parent / "small"
    mounted = [False]
    _on_rank0(lambda: mounted.__setitem__(0, _small_filesystem(small, int(size * 1.5) + 65536)))
    holder = [mounted[0]]
    dist.broadcast_object_list(holder, src=0)
    real_write = filesystem_async._write_item
    if not holder[0]:  # the writer processes are forked: they inherit the replaced function
        def no_space(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        filesystem_async._write_item = no_space
        _on_rank0(lambda: small.mkdir(parents=True, exist_ok=True))
    small_root = small / "checkpoints"
    _on_rank0(lambda: (shutil.copytree(previous, small_root / previous.name),
                       (small_root / "latest").write_text(previous.name + "\n")))
    try:
        try:
            learner.save(small_root, step=4)
            message = "no error"
        except ckpt.CheckpointSaveError as err:
            message = str(err)
        finally:
            filesystem_async._write_item = real_write
        dist.barrier()
        leftover = [p.name for p in small_root.iterdir() if p.name.startswith(".tmp-")]
        pointer = (small_root / "latest").read_text().strip()
        loaded = learner.load(small_root)
        again = learner.train_step(state["next_batch"], loss_config=LOSS)
        loss_diff = abs(again["loss"] - state["next"]["loss"])
        dist.barrier()
    finally:
        if dist.get_rank() == 0:
            if holder[0]:
                subprocess.run(["umount", "-l", str(small)], check=False)
            shutil.rmtree(small, ignore_errors=True)
    dist.barrier()
    ok = ("no space left on device (ENOSPC)" in message and "step_00000002, which stays loadable" in message
          and not leftover and pointer == "step_00000002" and loaded.step == 2 and loss_diff < 1e-6)
    return {"ok": ok, "real_filesystem": holder[0], "message": message[:400], "leftover": leftover,
            "pointer": pointer, "loss_diff": loss_diff}


def part_tp2(state: dict, root: Path) -> None:
    from megatron_s2lpo.learner import Learner

    groups = init_parallel(tensor_parallel_size=2, seed=3)
    learner = Learner(ARCH, learner_config(2, True), groups=groups)  # DP=1 here

    def resharded_resume() -> dict:  # a fully_reshardable checkpoint moves between layouts
        loaded = learner.load(state["full_root"] / "step_00000002")
        again = learner.train_step(state["next_batch"], loss_config=LOSS)
        diffs = {"loss": abs(again["loss"] - state["next"]["loss"]),
                 "grad_norm": abs(again["grad_norm"] - state["next"]["grad_norm"]),
                 "logprobs_after_step": max_abs_diff(learner.compute_logprobs(fixed_batch(seed=9), 1.0),
                                                     state["next_lp"])}
        return {"ok": loaded.step == 2 and diffs["loss"] < 1e-6 and diffs["grad_norm"] < 1e-5
                and diffs["logprobs_after_step"] < 1e-4, **diffs}

    run_check("checkpoint_reshards_dp2_distopt_to_tp2", resharded_resume)

    def dp_reshardable_refuses_layout() -> dict:
        try:
            learner.load(root / "step_00000002")
        except ValueError as err:
            text = str(err)
            ok = ("dp_reshardable optimizer state" in text and "learner.tensor_parallel_size: saved 1, now 2" in text
                  and "load_optimizer=False" in text)
            weights = learner.load(root / "step_00000002", load_optimizer=False)  # the weights still load
            return {"ok": ok and weights.step == 2, "error": text}
        return {"ok": False, "error": "no error"}

    run_check("dp_reshardable_checkpoint_refuses_another_tp_clearly", dp_reshardable_refuses_layout)

    def optimizer_kind_mismatch() -> dict:
        learner.optimizer.__class__  # the distributed one; build a plain one to be refused
        from megatron_s2lpo.learner.optimizer import build_optimizer

        plain = build_optimizer(learner.model, learner_config(2, False).optim, precision="fp32")
        try:
            ckpt.load_checkpoint(root, model_chunks=learner.model, optimizer=plain)
        except ValueError as err:
            return {"ok": "use_distributed_optimizer=true" in str(err), "error": str(err)}
        return {"ok": False, "error": "no error"}

    run_check("checkpoint_optimizer_kind_mismatch_is_clear", optimizer_kind_mismatch)
    destroy_parallel(destroy_process_group=False)


def main() -> None:
    root = Path(shared_tmpdir("ckpt_checks_")) / "checkpoints"
    state: dict = {"full_root": root.parent / "fully_reshardable"}
    part_dp2(state, root)
    part_tp2(state, root)
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(root.parent, ignore_errors=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
