"""`s2lpo eval` and `s2lpo explore`: held-out pass@k of HF models, and the offline explorer store.

    s2lpo eval examples/tiny_cpu.yaml --models runs/tiny_cpu/models/explorer runs/tiny_cpu/models/learner --k 8
    s2lpo explore CONFIG rollout.explorer_store=runs/store --num-samples 16

eval: for every model directory, k seeded samples of every held-out prompt (the synthetic
held-out split, or data.eval_paths) with the learner's sampling settings, scored by
math-verify; writes `passk.csv` (model, k, pass_at_k, avg_at_k_pass1) with the unbiased pass@k
for k = 1..K, and `passk.png` when matplotlib is importable.

Both commands use the recipe's engines as the trainer builds them: `eval` samples with
`rollout.learner` (`local`: in process; `sglang` launched: one server pool per model directory,
its logs in <run.output_dir>/logs; `sglang` attached: the running server loads each model
directory in turn with /update_weights_from_disk, so give eval a server of its own), `explore`
with `rollout.explorer` (launched servers load its model_path or the model built from
init_arch; attached ones serve what they hold).
"""

from __future__ import annotations

import csv
import os

from megatron_s2lpo.algo.passk import avg_at_k_pass1, pass_at_k_curve
from megatron_s2lpo.config import RunConfig
from megatron_s2lpo.trainer.build import _engine, build_prompts, build_tokenizer, materialize_model, sample_scores


def evaluate_models(cfg: RunConfig, model_dirs: list[str], *, k: int, out_dir: str | None = None) -> dict:
    """{"avg_at_k": {model: value}, "curves": {model: [pass@1..pass@k]}, "files": [paths]}."""
    from megatron_s2lpo.reward import MathScorer

    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}")
    for path in model_dirs:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"--models {path}: no config.json; pass Hugging Face model directories "
                                    "(convert megatron checkpoints with `s2lpo convert mcore-to-hf`)")
    tokenizer = build_tokenizer(cfg)
    _, heldout = build_prompts(cfg, tokenizer)
    if not heldout:
        raise ValueError("no held-out prompts: set data.eval_paths, or data.synthetic.num_eval > 0")
    out_dir = out_dir or os.path.join(cfg.run.output_dir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    result: dict = {"avg_at_k": {}, "curves": {}, "files": []}
    learner = cfg.rollout.learner
    attached = _engine(learner, "", tokenizer, "eval", cfg.run.seed, _logs(cfg)) if learner.attached else None
    try:
        with MathScorer(num_workers=cfg.run.reward_workers, **cfg.reward.scorer_kwargs()) as scorer:
            for path in model_dirs:
                scores = _model_scores(cfg, attached, path, tokenizer, heldout, k, scorer)
                name = os.path.normpath(path)
                result["avg_at_k"][name] = avg_at_k_pass1(scores)
                result["curves"][name] = pass_at_k_curve([int(sum(s)) for s in scores], k, k)
    finally:
        if attached is not None:
            attached.close()
    return _write(result, out_dir)


def _logs(cfg: RunConfig) -> str:
    return os.path.join(cfg.run.output_dir, "logs")  # launched servers' logs, as in a training run


def _model_scores(cfg: RunConfig, attached, path: str, tokenizer, heldout, k: int, scorer):
    """k scored samples per held-out prompt from model directory `path`, on the recipe's learner engine."""
    if attached is not None:  # the running server loads the model (its own path: the server reads it)
        attached.update_weights_from_disk(os.path.abspath(path), attached.weight_version + 1)
        engine = attached
    else:
        engine = _engine(cfg.rollout.learner, path, tokenizer, "eval", cfg.run.seed, _logs(cfg))
    try:
        return sample_scores(engine, heldout, k, cfg.rollout.learner.sampling, scorer, cfg.run.seed)
    finally:
        if engine is not attached:
            engine.close()


def _write(result: dict, out_dir: str) -> dict:
    csv_path = os.path.join(out_dir, "passk.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "k", "pass_at_k", "avg_at_k_pass1"])
        for name, curve in result["curves"].items():
            for i, value in enumerate(curve, start=1):
                writer.writerow([name, i, f"{value:.6f}", f"{result['avg_at_k'][name]:.6f}"])
    result["files"].append(csv_path)
    png = _plot(result["curves"], os.path.join(out_dir, "passk.png"))
    if png:
        result["files"].append(png)
    return result


def _plot(curves: dict[str, list[float]], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # optional: the CSV holds the same numbers
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=os.path.basename(name) or name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def explore(cfg: RunConfig, *, num_samples: int = 0) -> dict:
    """Fill `rollout.explorer_store` with `num_samples` explorer samples of every train prompt."""
    from megatron_s2lpo.rollout import fill_store

    if not cfg.rollout.explorer_store:
        raise ValueError("rollout.explorer_store is empty: say where the explorer store goes, e.g. "
                         "rollout.explorer_store=runs/explorer_store")
    tokenizer = build_tokenizer(cfg)
    train, _ = build_prompts(cfg, tokenizer)
    explorer = cfg.rollout.explorer
    path = materialize_model(explorer, "explorer", cfg, tokenizer) if not explorer.attached else ""
    engine = _engine(explorer, path, tokenizer, "explorer", cfg.run.seed, _logs(cfg))
    try:
        return fill_store(engine, train, num_samples or cfg.algo.group_size, explorer.sampling,
                          cfg.rollout.explorer_store, explorer_model=path or explorer.url or ",".join(explorer.urls),
                          seed=cfg.run.seed)
    finally:
        engine.close()
