"""Multi-stage pipelines: run the `stages:` of a recipe in order and hand trained models on.

    s2lpo train examples/tiny_bridge_cpu.yaml             # teacher GRPO -> forward KL -> OPD -> student GRPO
    s2lpo train examples/tiny_bridge_cpu.yaml --resume    # after a kill: continues where it stopped

Each stage is an ordinary run of `loop.py` (config/stages.py builds its config) in
`<run.output_dir>/stages/<NN>-<name>`, with its own checkpoints and metrics.jsonl. When a stage
ends, its policy is exported as a Hugging Face directory `<stage dir>/hf`, and later stages load
that model from there. Models built from code (`init_arch`) are written once to
`<run.output_dir>/models/<name>` before the first stage.

Resuming. `<run.output_dir>/stages.json` records the finished stages and where every model
lives, rewritten atomically after each stage. `--resume` skips the finished stages and resumes
the current one from its newest loadable checkpoint (mid-stage), or starts it when its directory
is unused (at a boundary); a stage directory that holds results but no loadable checkpoint is
refused (run_dir.py), as is a fresh start when any stage directory holds results. A stage
killed after its last checkpoint but before its export resumes with no steps left and exports.
"""

from __future__ import annotations

import json
import os
from typing import Any

from megatron_s2lpo.config import RunConfig, stage_dir, stage_run_config
from megatron_s2lpo.utils.files import write_atomic
from megatron_s2lpo.utils.procs import barrier, is_rank0

STATE_FILE = "stages.json"


def _read_state(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def initial_models(cfg: RunConfig) -> dict[str, str]:
    """{model name: HF directory} of the models the stages use: model_path, or the directory
    written from init_arch (by rank 0)."""
    from megatron_s2lpo.trainer.build import build_tokenizer, materialize_model

    used = {name for stage in cfg.stages for name in (stage.policy, stage.frozen) if name}
    models = {name: engine for name, engine in cfg.models.items() if name in used}
    paths = {name: engine.model_path for name, engine in models.items() if engine.model_path}
    built = [name for name, engine in models.items() if not engine.model_path and engine.init_arch]
    if built:
        tokenizer = build_tokenizer(stage_run_config(cfg, 0))
        for name in built:
            path = os.path.join(cfg.run.output_dir, "models", name)
            if is_rank0():
                materialize_model(cfg.models[name], name, cfg, tokenizer)
            paths[name] = path
        barrier()
    return paths


def run_stages(cfg: RunConfig) -> dict:
    """Run (or resume) every stage of `cfg`; returns the final state (see the module docstring)."""
    from megatron_s2lpo.learner.parallel import destroy_parallel
    from megatron_s2lpo.trainer.run_dir import run_traces
    from megatron_s2lpo.trainer.loop import run_training

    state_path = os.path.join(cfg.run.output_dir, STATE_FILE)
    if not cfg.run.resume:  # the same rule as a single run: never start over on a used directory
        used = ([state_path] if os.path.isfile(state_path) else []) + [
            f"{stage_dir(cfg.run.output_dir, i, s)}: {trace}" for i, s in enumerate(cfg.stages)
            for trace in run_traces(stage_dir(cfg.run.output_dir, i, s))]
        if used:
            raise ValueError(f"{cfg.run.output_dir} already holds a staged run ({'; '.join(used)}); pass --resume "
                             "(run.resume=true) to continue it, or choose another run.output_dir")
    os.makedirs(cfg.run.output_dir, exist_ok=True)
    state = _read_state(state_path) if os.path.isfile(state_path) else {"models": {}, "done": []}
    _check_same_stages(cfg, state, state_path)
    state["models"] = {**initial_models(cfg), **state["models"]}  # trained versions win
    if is_rank0():
        write_atomic(state_path, json.dumps(state, indent=2))
    for index, stage in enumerate(cfg.stages):
        if index < len(state["done"]):
            continue
        scfg = stage_run_config(cfg, index, state["models"])
        out = stage_dir(cfg.run.output_dir, index, stage)
        # train() continues the stage from its checkpoint, starts it when its directory is unused,
        # and refuses a used one it cannot continue
        scfg.run.resume = cfg.run.resume
        print(f"=== stage {index + 1}/{len(cfg.stages)} {stage.name}: {stage.method} on {stage.policy}"
              + (f" with {stage.frozen}" if stage.frozen else "")
              + (" (resumed)" if cfg.run.resume and run_traces(out) else ""), flush=True)
        hf_dir = os.path.join(out, "hf")
        run_training(scfg, export_dir=hf_dir)
        destroy_parallel(destroy_process_group=False)  # the next stage may train another model
        state["models"][stage.policy] = hf_dir
        state["done"].append({"name": stage.name, "method": stage.method, "policy": stage.policy,
                              "frozen": stage.frozen, "num_steps": stage.num_steps, "hf_dir": hf_dir,
                              **stage_evals(out)})
        if is_rank0():
            write_atomic(state_path, json.dumps(state, indent=2))
        barrier()
    if is_rank0():
        print(summary_table(state), flush=True)
    return state


def _check_same_stages(cfg: RunConfig, state: dict, state_path: str) -> None:
    for index, done in enumerate(state["done"]):
        if index >= len(cfg.stages) or cfg.stages[index].name != done["name"]:
            raise ValueError(f"{state_path} records stage {index + 1} as {done['name']!r}, but the recipe's "
                             f"stages are {[s.name for s in cfg.stages]}; resume with the recipe that "
                             "started the run, or choose another run.output_dir")


def stage_evals(out: str) -> dict[str, Any]:
    """{"eval_start", "eval_end"}: the stage's first and last held-out avg@k (None if not evaluated)."""
    from megatron_s2lpo.trainer.metrics import METRICS_FILE, read_metrics

    path = os.path.join(out, METRICS_FILE)
    evals = [(r["step"], r["eval/avg_at_k"]) for r in (read_metrics(path) if os.path.isfile(path) else [])
             if r.get("eval/avg_at_k") is not None]
    start = next((v for step, v in evals if step == 0), None)
    return {"eval_start": start, "eval_end": evals[-1][1] if evals else None}


def summary_table(state: dict) -> str:
    """Held-out avg@k of each stage's policy before and after the stage, one row per stage."""
    def fmt(value: float | None) -> str:
        return "   -  " if value is None else f"{value:6.3f}"

    width = max([6] + [len(d["policy"]) for d in state["done"]] + [len(d["frozen"]) for d in state["done"]])
    rows = [f"{'stage':<16} {'method':<11} {'policy':<{width}} {'frozen':<{width}} {'steps':>5}  {'before':>6}  "
            f"{'after':>6}"]
    for done in state["done"]:
        rows.append(f"{done['name']:<16} {done['method']:<11} {done['policy']:<{width}} {done['frozen'] or '-':<{width}} "
                    f"{done['num_steps']:>5}  {fmt(done.get('eval_start'))}  {fmt(done.get('eval_end'))}")
    return "\n".join(rows)

