"""The trainer's entry: one run, or the stages of a multi-stage recipe, with stop signals handled.

    s2lpo train examples/tiny_cpu.yaml run.num_steps=20
    python -m megatron_s2lpo.trainer examples/tiny_cpu.yaml --resume
    s2lpo train examples/tiny_cpu.yaml algo.t_mix=50 --resume --allow-config-change algo.t_mix
    torchrun --nproc-per-node 2 -m megatron_s2lpo.trainer CONFIG learner.tensor_parallel_size=2
"""

from __future__ import annotations

import errno
import os
import sys

from megatron_s2lpo.config import RunConfig, load_config, split_recipe
from megatron_s2lpo.trainer.stop_signal import RunInterrupted, RunStopped, stop_on_signal


@stop_on_signal()  # SIGUSR1 / SIGTERM: finish the step, checkpoint it, raise RunStopped (stop_signal.py)
def train(cfg: RunConfig, *, export_dir: str | None = None) -> None:
    """Run `cfg`: its `stages:` in order (stages.py), or the single run (loop.py). export_dir
    (single runs): afterwards write the trained policy there as a Hugging Face directory."""
    if cfg.stages:
        from megatron_s2lpo.trainer.run_dir import hold_run_dir
        from megatron_s2lpo.trainer.stages import run_stages

        with hold_run_dir(cfg.run.output_dir) as lock:  # each stage's own directory is locked by its run
            lock.record_holder()
            run_stages(cfg)
        return
    from megatron_s2lpo.trainer.loop import run_training

    run_training(cfg, export_dir=export_dir)


ALLOW_FLAG = "--allow-config-change"
_DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only filesystem", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.EIO: "input/output error"}


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """(recipe, overrides) of `s2lpo train` arguments: --resume is run.resume=true, and
    --allow-config-change KEY... (up to the next flag or override) is run.allow_config_change=[KEY,...]
    (config_changes.py)."""
    positional, extra, allowed = [], [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--resume":
            extra.append("run.resume=true")
        elif arg.startswith(ALLOW_FLAG + "="):
            allowed += [v for v in arg.split("=", 1)[1].split(",") if v]
        elif arg == ALLOW_FLAG:
            start = len(allowed)
            while i < len(argv) and not argv[i].startswith("-") and "=" not in argv[i]:
                allowed += [v for v in argv[i].split(",") if v]
                i += 1
            if len(allowed) == start:
                raise ValueError(f"{ALLOW_FLAG} needs the settings it accepts changes of, e.g. "
                                 f"{ALLOW_FLAG} algo.t_mix run.seed")
        else:
            positional.append(arg)
    config, overrides = split_recipe(positional[0] if positional else None, positional[1:])
    if allowed:
        extra.append(f"run.allow_config_change=[{','.join(allowed)}]")
    return config, overrides + extra


def main(argv: list[str] | None = None) -> int:
    from megatron_s2lpo.learner.checkpoint_files import CheckpointSaveError
    from megatron_s2lpo.rollout.sglang_client import EngineRequestError
    from megatron_s2lpo.rollout.validation import InvalidAnswerError

    try:
        config, overrides = parse_args(list(sys.argv[1:] if argv is None else argv))
        train(load_config(config, overrides))
    except (ValueError, FileNotFoundError) as err:
        print(f"s2lpo train: error: {err}", file=sys.stderr)
        return 2
    except RunStopped as stopped:
        print(f"s2lpo train: {stopped}", file=sys.stderr)
        return stopped.exit_code()
    except RunInterrupted as interrupted:
        print(f"s2lpo train: {interrupted}", file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(interrupted.exit_code())  # threads stuck on a vanished peer are not joined
    except (EngineRequestError, InvalidAnswerError, CheckpointSaveError) as err:
        # a peer that failed or hung past its bound, an answer that cannot be trained on, a save that
        # did not complete: the message says which and why; the newest checkpoint is untouched
        print(f"s2lpo train: error: {err}\nThe run stopped; its newest complete checkpoint is intact: fix the cause, "
              "then run again with --resume", file=sys.stderr)
        return 1
    except OSError as err:
        if err.errno not in _DISK_ERRNOS:
            raise
        where = f" ({err.filename})" if err.filename else ""
        print(f"s2lpo train: error: {_DISK_ERRNOS[err.errno]}{where}: {err.strerror}. Nothing of the run was lost: "
              "its newest complete checkpoint is intact. Free space (or fix the permissions), then run again with "
              "--resume", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
