"""The trainer's entry: one run, or the stages of a multi-stage recipe, with stop signals handled.

    s2lpo train examples/tiny_cpu.yaml run.num_steps=20
    python -m megatron_s2lpo.trainer examples/tiny_cpu.yaml --resume
    torchrun --nproc-per-node 2 -m megatron_s2lpo.trainer CONFIG learner.tensor_parallel_size=2
"""

from __future__ import annotations

import sys

from megatron_s2lpo.config import RunConfig, load_config, split_recipe
from megatron_s2lpo.trainer.stop_signal import RunStopped, stop_on_signal


@stop_on_signal()  # SIGUSR1 / SIGTERM: finish the step, checkpoint it, raise RunStopped (stop_signal.py)
def train(cfg: RunConfig, *, export_dir: str | None = None) -> None:
    """Run `cfg`: its `stages:` in order (stages.py), or the single run (loop.py). export_dir
    (single runs): afterwards write the trained policy there as a Hugging Face directory."""
    if cfg.stages:
        from megatron_s2lpo.trainer.stages import run_stages

        run_stages(cfg)
        return
    from megatron_s2lpo.trainer.loop import run_training

    run_training(cfg, export_dir=export_dir)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    resume_flag = "--resume" in args
    args = [a for a in args if a != "--resume"]
    config, overrides = split_recipe(args[0] if args else None, args[1:])
    try:
        train(load_config(config, overrides + (["run.resume=true"] if resume_flag else [])))
    except (ValueError, FileNotFoundError) as err:
        print(f"s2lpo train: error: {err}", file=sys.stderr)
        return 2
    except RunStopped as stopped:
        print(f"s2lpo train: {stopped}", file=sys.stderr)
        return stopped.exit_code()
    return 0


if __name__ == "__main__":
    sys.exit(main())
