"""A trainer killed while an asynchronous checkpoint is being written (run by test_learner_checkpoint.py).

    python ckpt_async_kill.py ROOT kill     # 2 ranks: commit step 1, start step 2's async save, die mid-write
    python ckpt_async_kill.py ROOT resume   # 1 rank: load ROOT (DP=2 -> DP=1) and take the next step

`kill`: step 1 is saved and committed; one more step is trained (its loss printed as the
reference), then step 2's save starts with megatron's shard writer slowed down (the forked
writers inherit the patched function), the writers' pids are printed and both ranks SIGKILL
themselves. `resume`: the root must resolve to step 1 (the half-written step 2 is a `.tmp-*`
directory), whose dp_reshardable state loads at DP=1; the next step's loss is printed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from common import fixed_batch, tiny_arch

from megatron_s2lpo.algo.losses import PolicyLossConfig
from megatron_s2lpo.config.learner import CheckpointConfig, LearnerConfig, OptimConfig

LOSS = PolicyLossConfig()


def learner():
    from megatron_s2lpo.learner import Learner

    config = LearnerConfig(micro_batch_tokens=64, checkpoint=CheckpointConfig(async_save=True),
                           optim=OptimConfig(lr=1e-3, use_distributed_optimizer=True))
    return Learner(tiny_arch("qwen3"), config)


def batch(model):
    b = fixed_batch(seed=4)
    b.old_logprobs = model.compute_logprobs(b, 1.0)
    return b


def kill(root: Path) -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    model = learner()
    model.train_step(batch(model), loss_config=LOSS)
    model.save(root, wait=True)  # step 1, committed
    reference = model.train_step(batch(model), loss_config=LOSS)
    print("REFERENCE " + json.dumps({"loss": reference["loss"]}), flush=True)
    model.train_step(batch(model), loss_config=LOSS)
    real_write = filesystem_async._write_item

    def slow_write(*args, **kwargs):
        time.sleep(300)  # the test kills it long before
        return real_write(*args, **kwargs)

    filesystem_async._write_item = slow_write
    model.save(root)  # step 3, in flight
    print("WRITERS " + json.dumps(model._async_saves.writer_pids()), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def resume(root: Path) -> None:
    model = learner()
    loaded = model.load(root)
    metrics = model.train_step(batch(model), loss_config=LOSS)
    print("RESUMED " + json.dumps({"step": loaded.step, "path": str(loaded.path), "loss": metrics["loss"]}), flush=True)


if __name__ == "__main__":
    {"kill": kill, "resume": resume}[sys.argv[2]](Path(sys.argv[1]))
