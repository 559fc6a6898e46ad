"""Resuming with a changed config: what may change, what is refused, and the record of what was accepted.

Every checkpoint's trainer state carries the settings of the run that wrote it (`snapshot`: the
flattened config without API keys, and for every path whose contents define the run (models,
data files, the explorer store, the reference checkpoint) a fingerprint of those contents, as
`<setting> (contents)`: a moved run directory or another mount point is no change, another model
or dataset at the same path is). `--resume` compares them with the current config before
anything is built:

- settings that change how the run executes but not what it computes (`OPERATIONAL`: where
  servers listen, timeouts, parallel layout, logging, checkpoint cadence, ...) may change freely;
- every other difference changes the run's meaning (group size, seeds, learning rate, t_mix,
  sampling, models, data, ...) and is refused, listing each setting with its old and new value,
  unless the user accepts it by name:

      s2lpo train CONFIG algo.t_mix=50 --resume --allow-config-change algo.t_mix
      s2lpo train CONFIG ... --resume run.allow_config_change=[algo.t_mix,data]   # the same

  A name accepts that setting or every setting under it (`algo` accepts all of algo.*, `data`
  the data settings and contents, `rollout.explorer.model_path` that model's contents). Accepted changes are appended to
  `<run.output_dir>/config_changes.jsonl` (time, the step resumed from, setting, old, new) and
  printed, and apply from the resumed step on: the learning-rate schedule and Adam settings that
  the checkpoint brings back are replaced by the config's (`reapply_optimizer_settings`).
- `run.num_steps` may grow or shrink, but not below the checkpoint's step: that is an error (the
  checkpoint is past the end already); equal means nothing is left to train.

Checkpoints written before settings were recorded are resumed without this check (a warning
says so).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from megatron_s2lpo.config import RunConfig

logger = logging.getLogger(__name__)

CONFIG_KEY = "config"  # in the trainer state of a checkpoint
CHANGES_FILE = "config_changes.jsonl"
CONTENTS = " (contents)"  # suffix of the setting that holds a path's content fingerprint

# How the run executes, not what it computes (fnmatch patterns over dotted setting names).
OPERATIONAL = (
    "run.name", "run.output_dir", "run.resume", "run.allow_config_change", "run.num_steps", "run.save_every",
    "run.keep_checkpoints", "run.eval_every", "run.eval_num_samples", "run.eval_temperature", "run.eval_at_start",
    "run.reward_workers",
    "rollout.*.url", "rollout.*.urls", "rollout.*.replicas", "rollout.*.host", "rollout.*.port", "rollout.*.ports",
    "rollout.*.base_gpu_id", "rollout.*.tp_size", "rollout.*.dp_size", "rollout.*.mem_fraction",
    "rollout.*.api_key", "rollout.*.api_key_env", "rollout.*.enable_memory_saver", "rollout.*.extra_args",
    "rollout.*.launch_command", "rollout.*.startup_timeout_s", "rollout.*.max_restarts",
    "rollout.*.max_concurrency", "rollout.*.hang_timeout_s", "rollout.*.request_timeout_s",
    "rollout.*.max_retries", "rollout.*.log_dir", "rollout.prefetch_steps",
    "learner.tensor_parallel_size", "learner.pipeline_parallel_size", "learner.virtual_pipeline_parallel_size",
    "learner.context_parallel_size", "learner.sequence_parallel", "learner.micro_batch_tokens",
    "learner.logprob_micro_batch_tokens", "learner.logprob_chunk_tokens", "learner.recompute_*",
    "learner.overlap_*", "learner.gradient_accumulation_fusion", "learner.ref_offload",
    "learner.optim.cpu_offload", "learner.optim.cpu_offload_fraction", "learner.load",
    "sync.*", "reward.timeout_s", "reward.batch_timeout_s", "logging.*",
)
# Paths whose contents define the run: the path itself may change (a run directory moved, another
# mount point), the contents may not (each gets a `<setting> (contents)` fingerprint).
CONTENT_PATHS = ("rollout.*.model_path", "models.*.model_path", "rollout.explorer_store", "data.train_path",
                 "data.eval_paths", "learner.ref_load")
_SECRETS = ("rollout.*.api_key", "models.*.api_key")
_WHOLE_FILE_BYTES = 64 * 2**20  # files up to this size (data) are hashed whole, larger ones (weights) sampled
_SAMPLE_BYTES = 2**20


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


_DIGESTS: dict[tuple, str] = {}  # (path, inode, size, mtime) -> digest: a run reads each file once


def _file_digest(path: str) -> str:
    """sha256 of a file: whole up to _WHOLE_FILE_BYTES, else its size and first and last MiB (another
    model of the same shape differs there as everywhere; reading 16 GB at each resume would not do)."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256(str(stat.st_size).encode())
        with open(path, "rb") as f:
            if stat.st_size <= _WHOLE_FILE_BYTES:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            else:
                digest.update(f.read(_SAMPLE_BYTES))
                f.seek(stat.st_size - _SAMPLE_BYTES)
                digest.update(f.read(_SAMPLE_BYTES))
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def content_fingerprint(path: str) -> str:
    """A fingerprint of what `path` holds (a file, or a directory's files by relative name): "" for
    no path, "missing" when it does not exist."""
    if not path:
        return ""
    if not os.path.exists(path):
        return "missing"
    if os.path.isfile(path):
        return _file_digest(path)
    digest = hashlib.sha256()
    for directory, _, names in sorted(os.walk(path)):
        for name in sorted(names):
            file = os.path.join(directory, name)
            digest.update(os.path.relpath(file, path).encode() + b"\0" + _file_digest(file).encode())
    return digest.hexdigest()


def snapshot(cfg: RunConfig) -> dict[str, Any]:
    """The run's settings as a checkpoint records them: dotted names -> values (API keys left out),
    and a content fingerprint of every path whose contents define the run (CONTENT_PATHS)."""
    flat = {k: v for k, v in _flatten(cfg.to_dict()).items()
            if not any(fnmatch.fnmatchcase(k, pattern) for pattern in _SECRETS)}
    for key, value in list(flat.items()):
        if any(fnmatch.fnmatchcase(key, pattern) for pattern in CONTENT_PATHS):
            paths = value if isinstance(value, list) else [value]
            flat[key + CONTENTS] = [content_fingerprint(str(v)) for v in paths] if isinstance(value, list) \
                else content_fingerprint(str(value or ""))
    return json.loads(json.dumps(flat))  # as it reads back from the checkpoint (tuples -> lists)


def _matches(key: str, names: list[str] | tuple[str, ...]) -> bool:
    return any(key == name or key.startswith(name + ".") or key == name + CONTENTS or fnmatch.fnmatchcase(key, name)
               for name in names)


def _operational(key: str) -> bool:
    """A setting that may change freely: OPERATIONAL, or a content path (its contents are compared)."""
    return _matches(key, OPERATIONAL) or any(fnmatch.fnmatchcase(key, p) for p in CONTENT_PATHS)


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(setting, old, new) of every meaningful setting that differs (OPERATIONAL ones left out)."""
    keys = sorted(set(saved) | set(current))
    return [(k, saved.get(k), current.get(k)) for k in keys
            if saved.get(k) != current.get(k) and not _operational(k)]


def check_resume_config(cfg: RunConfig, checkpoint: Path, trainer_state: dict) -> list[tuple[str, Any, Any]]:
    """ValueError for a resume that would change the run's meaning without the user's consent, or
    a run.num_steps below the checkpoint's step; the accepted changes otherwise (module docstring)."""
    step = int(trainer_state.get("step", 0))
    if cfg.run.num_steps < step:
        raise ValueError(f"run.num_steps={cfg.run.num_steps} is below the step of the checkpoint to resume, "
                         f"{checkpoint} (step {step}): that run is past its end already; set run.num_steps >= {step} "
                         "to continue it (equal: nothing left to train)")
    saved = trainer_state.get(CONFIG_KEY)
    if not isinstance(saved, dict):
        logger.warning("checkpoint %s does not record the settings of its run (written before they were "
                       "recorded); resuming without checking the config for changes", checkpoint)
        return []
    changes = config_changes(saved, snapshot(cfg))
    allowed = list(cfg.run.allow_config_change)
    refused = [c for c in changes if not _matches(c[0], allowed)]
    if refused:
        listing = "".join(f"\n  {key}: {_show(old)} -> {_show(new)}" for key, old, new in refused)
        names = " ".join(dict.fromkeys(key.removesuffix(CONTENTS) for key, _, _ in refused))
        raise ValueError(f"--resume from {checkpoint}: the config changes what the run computes:{listing}\n"
                         "Resume with the settings the run was started with, or accept the change: "
                         f"--allow-config-change {names} (run.allow_config_change=[{names.replace(' ', ',')}]); "
                         f"accepted changes are recorded in {CHANGES_FILE}")
    return changes


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def record_changes(output_dir: str, checkpoint: Path, changes: list[tuple[str, Any, Any]]) -> None:
    """Append the accepted changes to <output_dir>/config_changes.jsonl and print them (rank 0)."""
    if not changes:
        return
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(os.path.join(output_dir, CHANGES_FILE), "a") as f:
        for key, old, new in changes:
            f.write(json.dumps({"time": stamp, "resumed_from": checkpoint.name, "setting": key, "old": old,
                                "new": new}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    for key, old, new in changes:
        print(f"config change accepted at resume from {checkpoint.name}: {key}: {_show(old)} -> {_show(new)}",
              flush=True)


_SCHEDULE = ("lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style", "weight_decay")
_ADAM = ("adam_beta1", "adam_beta2", "adam_eps")


def reapply_optimizer_settings(learner: Any, cfg: RunConfig, trainer_state: dict, scheduler_state: dict | None) -> None:
    """After a checkpoint load: accepted changes of learner.optim.* take effect (the load restored the
    checkpoint's schedule and Adam settings). Keeps the schedule's position (its step count)."""
    saved = trainer_state.get(CONFIG_KEY)
    if not isinstance(saved, dict):
        return
    from megatron_s2lpo.learner.optimizer import build_scheduler

    optim = cfg.learner.optim
    changed = {name for name in _SCHEDULE + _ADAM if saved.get(f"learner.optim.{name}") != getattr(optim, name)}
    if changed & set(_SCHEDULE) and scheduler_state is not None and learner.scheduler is not None:
        # the load replaced the schedule's settings by the checkpoint's, in the scheduler and in each
        # of megatron's param groups (their max_lr / min_lr win over the scheduler's): a schedule
        # built from the config takes only the position (step count) from the checkpoint
        for group in learner.optimizer.param_groups:
            group.update({key: value for key, value in (("max_lr", optim.lr), ("min_lr", optim.min_lr))
                          if key in group})
        scheduler = build_scheduler(learner.optimizer, optim)
        scheduler.override_opt_param_scheduler = True  # megatron: the object's values win over the state's
        scheduler.num_steps = 0  # load_state_dict adds the saved step count
        scheduler.load_state_dict(scheduler_state)
        learner.scheduler = scheduler
    if changed & set(_ADAM):
        for group in learner.optimizer.param_groups:
            group["betas"] = (optim.adam_beta1, optim.adam_beta2)
            group["eps"] = optim.adam_eps
