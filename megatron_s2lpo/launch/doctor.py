"""Before the first submission: what the launch needs from this Slurm site, one line per finding.

    python examples/launch.py --recipe qwen3_8b_explorer_1p7b --executor slurm --account A \\
        --partition P --venv /shared/envs/s2lpo --check          # or --container-image IMAGE --check

Each finding is `ok`, `warn` or `FAIL`, what was looked at, what was seen and, unless ok, the fix:

  sinfo        Slurm answers here (the login node, or --ssh-host)
  partition    it exists, is up, has the nodes the layout needs
  time limit   the job's limit fits in the partition's, and the recipe's checkpoint cadence
               (run.save_every x step time + stop-signal lead + start) fits in the job
  pyxis        srun has --container-image (pyxis) when an image is asked for; without one the job
               runs in --venv / --python
  gpus         each node group's GPUs per node exist on the partition's nodes (gres gpu)
  environment  the job's interpreter has the pinned megatron-core and torch (this package's own
               requirements), its torch's NCCL, and the servers' interpreter the pinned SGLang
               with the same NCCL; with an image, the same report from inside it (one short srun)
  paths        the models, data and output directory the recipe names are readable (writable) where
               the job sees them: through --mounts with an image, as they are without

`run(command) -> (returncode, output)` runs a shell command where Slurm is; everything else is
read from the plan. Nothing is submitted except, with an image and pyxis present, one srun step.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass

from ..config import RunConfig
from .plan import LaunchPlan
from .walltime import check_walltime, default_signal_lead, parse_slurm_time, startup_allowance

Runner = Callable[[str], tuple[int, str]]
# What a job's interpreter reports: versions by distribution name, and its torch's NCCL.
ENV_REPORT = r"""
import importlib.metadata as m, json, sys
out = {"python": sys.executable}
for name in ("megatron-core", "torch", "sglang", "megatron_s2lpo"):
    try:
        out[name] = m.version(name)
    except m.PackageNotFoundError:
        out[name] = None
try:
    import torch
    out["nccl"] = ".".join(str(x) for x in torch.cuda.nccl.version()[:3]) if hasattr(torch._C, "_nccl_version") else None
except Exception as err:
    out["nccl"] = None
    out["torch_error"] = repr(err)
print("S2LPO_ENV " + json.dumps(out))
"""


@dataclass(kw_only=True, slots=True)
class Finding:
    status: str  # "ok" | "warn" | "FAIL"
    what: str
    seen: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.status:<4} {self.what}: {self.seen}" + (f" -> {self.fix}" if self.fix else "")


def _ok(what, seen):
    return Finding(status="ok", what=what, seen=seen)


def _warn(what, seen, fix):
    return Finding(status="warn", what=what, seen=seen, fix=fix)


def _fail(what, seen, fix):
    return Finding(status="FAIL", what=what, seen=seen, fix=fix)


def pinned_versions() -> dict[str, str]:
    """This package's own pins (`==`) for the environment check: megatron-core, torch, SGLang."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires("megatron_s2lpo") or []
    except PackageNotFoundError:
        return {}
    out = {}
    for req in reqs:
        match = re.match(r"([A-Za-z0-9_.\-]+)==([^;\s]+)", req)
        if match and match.group(1) in ("megatron-core", "torch", "sglang"):
            out.setdefault(match.group(1), match.group(2))
    return out


def check_site(cfg: RunConfig, plan: LaunchPlan, *, partition: str, time: str, container_image: str,
               mounts: list[str], python: str, server_python: str, signal_lead_s: int | None, step_time_s: float,
               startup_s: int | None, run: Runner) -> list[Finding]:
    """Every finding, in the order of the module docstring. `time` "" is the partition's limit;
    `signal_lead_s` / `startup_s` None are the launcher's defaults (walltime.py)."""
    rc, out = run("sinfo --version")
    if rc != 0:
        return [_fail("sinfo", out.strip()[-200:] or "no answer", "run this on a login node where Slurm's commands "
                      "are (or pass --ssh-host/--ssh-user), with the site's Slurm module loaded")]
    findings = [_ok("sinfo", out.strip())]
    rc, out = run(f"sinfo --noheader --partition {shlex.quote(partition)} --format '%a|%l|%D|%t|%G'")
    rows = [line.split("|") for line in out.splitlines() if line.count("|") == 4] if rc == 0 else []
    if not rows:
        findings.append(_fail("partition", f"sinfo knows no partition {partition!r}",
                              "pick one of `sinfo --summarize` and pass it with --partition"))
        return findings
    findings.append(_partition(rows, partition, sum(g.num_nodes for g in plan.groups)))
    findings.append(_time_limit(cfg, rows[0][1], time, signal_lead_s, step_time_s, startup_s))
    pyxis = _pyxis(run, container_image)
    findings += [pyxis, _gpus(rows, plan)]
    if container_image and pyxis.status == "FAIL":
        findings.append(_warn("environment", f"the image {container_image} was not looked into (no pyxis here)",
                              "run --check again once the launch's container question is settled"))
    else:
        findings += _environment(run, container_image, python, server_python, bool(plan.servers), partition, mounts)
    findings += _paths(cfg, plan, container_image, mounts)
    return findings


def _partition(rows: list[list[str]], partition: str, needed: int) -> Finding:
    total = sum(int(r[2]) for r in rows)
    usable = sum(int(r[2]) for r in rows if r[3].rstrip("*~#!%$@^-") in ("idle", "mix", "alloc", "comp", "resv"))
    states = ", ".join(f"{r[2]} {r[3]}" for r in rows)
    if rows[0][0] != "up":
        return _fail("partition", f"{partition} is {rows[0][0]}", "ask the site when it is up, or pick another")
    if usable < needed:
        return _fail("partition", f"{partition} has {usable} usable of {total} nodes ({states}); the layout needs "
                     f"{needed}", "lower --nodes (the recipe's layout: docs/cluster.md), or pick a larger partition")
    return _ok("partition", f"{partition} is up, {total} nodes ({states}); the layout needs {needed}")


def _time_limit(cfg: RunConfig, partition_limit: str, time: str, lead: int | None, step_time_s: float,
                startup_s: int | None) -> Finding:
    part_s = parse_slurm_time(partition_limit)
    job_s = parse_slurm_time(time) if time else part_s
    if job_s is None:
        return _fail("time limit", f"the partition has no limit ({partition_limit})", "pass --time HH:MM:SS so the "
                     "job can be signalled before it ends")
    if lead is None:  # as the launcher picks it (experiment._check_walltime)
        lead = min(default_signal_lead(step_time_s), job_s // 2)
    startup_s = startup_allowance(job_s) if startup_s is None else startup_s
    if part_s is not None and job_s > part_s:
        return _fail("time limit", f"--time {time} is longer than the partition's {partition_limit}",
                     f"pass --time {partition_limit} or less")
    if step_time_s <= 0:
        return _warn("time limit", f"job {time or partition_limit}; no step time known for this recipe",
                     "pass --step-time MINUTES so the checkpoint cadence can be checked")
    try:
        check_walltime(save_every=cfg.run.save_every, num_steps=cfg.run.num_steps, walltime_s=job_s,
                       signal_lead_s=lead, step_time_s=step_time_s, source="stated or measured", startup_s=startup_s)
    except ValueError as err:
        return _fail("time limit", f"partition {partition_limit}, job {time or partition_limit}", str(err))
    interval = cfg.run.save_every if 0 < cfg.run.save_every < cfg.run.num_steps else cfg.run.num_steps
    return _ok("time limit", f"partition {partition_limit}, job {time or partition_limit}: a checkpoint every "
               f"{interval} step(s) x {step_time_s / 60:.1f} min fits with the {lead} s stop-signal lead")


def _pyxis(run: Runner, container_image: str) -> Finding:
    rc, out = run("srun --help")
    present = rc == 0 and "--container-image" in out
    if container_image and not present:
        return _fail("pyxis", "srun has no --container-image: this Slurm has no pyxis",
                     "run without a container: drop --container-image and name the environment with --venv DIR "
                     "(docs/cluster.md, 'A site without pyxis')")
    if container_image:
        return _ok("pyxis", f"present: every task runs in {container_image}")
    return _ok("pyxis", f"{'present' if present else 'absent'}; no --container-image: the job runs in the named "
               "environment")


def _gres_gpus(gres: str) -> int:
    counts = [int(m.group(1)) for m in re.finditer(r"gpu(?::[^:,(]+)?:(\d+)", gres)]
    return max(counts, default=0)


def _gpus(rows: list[list[str]], plan: LaunchPlan) -> Finding:
    available = max(_gres_gpus(r[4]) for r in rows)
    needed = max(g.gpus_per_node for g in plan.groups)
    groups = ", ".join(f"{g.name} {g.gpus_per_node}" for g in plan.groups)
    if needed > available:
        return _fail("gpus", f"the nodes have {available} GPU(s) each (gres {rows[0][4]}); the layout asks up to "
                     f"{needed} per node ({groups})", f"pass --gpus-per-node {available} (a layout that fits), or "
                     "pick a GPU partition")
    return _ok("gpus", f"{available} per node (gres {rows[0][4]}); the layout asks {groups}")


def _environment(run: Runner, image: str, python: str, server_python: str, servers: bool, partition: str,
                 mounts: list[str]) -> list[Finding]:
    pins = pinned_versions()
    if image:  # the report from inside the image: one short step on one node
        mount = f" --container-mounts {shlex.quote(','.join(mounts))}" if mounts else ""
        command = (f"srun --partition {shlex.quote(partition)} --nodes 1 --ntasks 1 --time 00:05:00 "
                   f"--container-image {shlex.quote(image)}{mount} python -c {shlex.quote(ENV_REPORT)}")
        where = f"the image {image}"
        trainer = _report(run, command)
        server = _report(run, command.replace("python -c", '"${S2LPO_SGLANG_PYTHON:-python}" -c', 1)) \
            if servers else None
    else:
        where = python
        trainer = _report(run, f"{shlex.quote(python)} -c {shlex.quote(ENV_REPORT)}")
        resolved = server_python if os.path.isabs(server_python) else os.environ.get("S2LPO_SGLANG_PYTHON", python)
        server = _report(run, f"{shlex.quote(resolved)} -c {shlex.quote(ENV_REPORT)}") if servers else None
    if isinstance(trainer, str):
        return [_fail("environment", f"{where} did not answer: {trainer}", "check --venv/--python (or the image) "
                      "and that it has this package installed (pip install -e .)")]
    findings = [_versions("environment", where, trainer, pins, ("megatron-core", "torch"))]
    if trainer.get("nccl"):
        findings.append(_ok("nccl", f"the trainer's torch is built with NCCL {trainer['nccl']}"))
    else:
        findings.append(_warn("nccl", f"the trainer's torch {trainer.get('torch')} has no NCCL (a CPU build)",
                              "fine for a CPU run; GPU nodes need the CUDA torch (the image has it)"))
    if server is not None:
        if isinstance(server, str):
            findings.append(_fail("sglang", f"the servers' interpreter did not answer: {server}",
                                  "pass --sglang-python PATH (SGLang's own environment) or set S2LPO_SGLANG_PYTHON"))
        else:
            findings.append(_versions("sglang", server["python"], server, pins, ("sglang",)))
            if server.get("nccl") != trainer.get("nccl"):
                findings.append(_fail("nccl", f"SGLang's torch has NCCL {server.get('nccl')}, the trainer's "
                                      f"{trainer.get('nccl')}", "the distributed weight sync needs one NCCL in both "
                                      "(docs/cluster.md, 'The image'); or use sync.transport=disk"))
    return findings


def _report(run: Runner, command: str) -> dict | str:
    rc, out = run(command)
    match = re.search(r"^S2LPO_ENV (\{.*\})$", out, re.M)
    if rc != 0 or not match:
        return out.strip().splitlines()[-1][-300:] if out.strip() else f"exit status {rc}"
    return json.loads(match.group(1))


def _versions(what: str, where: str, report: dict, pins: dict[str, str], names: tuple[str, ...]) -> Finding:
    seen = ", ".join(f"{n} {report.get(n) or 'missing'}" for n in names)
    # a local version label (torch's +cpu / +cu129) is the same release
    wrong = [f"{n}=={pins[n]}" for n in names if n in pins and (report.get(n) or "").split("+")[0] != pins[n]]
    missing = [n for n in names if not report.get(n)]
    if missing:
        return _fail(what, f"{where}: {seen}", f"install {' '.join(wrong or missing)} there")
    if wrong:
        return _warn(what, f"{where}: {seen}", f"this release is tested with {' '.join(wrong)}")
    return _ok(what, f"{where}: {seen}")


def recipe_paths(cfg: RunConfig, plan: LaunchPlan) -> list[tuple[str, str]]:
    """(what, path) the job reads: the models of the engines it uses, the data, the learner's load."""
    out = []
    engines = {"learner": cfg.rollout.learner, "explorer": cfg.rollout.explorer, "teacher": cfg.rollout.teacher}
    used = {"learner": True, "explorer": cfg.algo.t_mix > 0, "teacher": cfg.algo.method in ("forward_kl", "opd")}
    for name, engine in engines.items():
        if used[name] and engine.model_path:
            out.append((f"rollout.{name}.model_path", engine.model_path))
    if cfg.data.train_path:
        out.append(("data.train_path", cfg.data.train_path))
    out += [("data.eval_paths", p) for p in cfg.data.eval_paths]
    out += [(f"learner.{name}", getattr(cfg.learner, name)) for name in ("load", "ref_load") if getattr(cfg.learner, name)]
    return out


def _paths(cfg: RunConfig, plan: LaunchPlan, image: str, mounts: list[str]) -> list[Finding]:
    from .walltime import host_path

    def where(path: str) -> str | None:
        return host_path(path, mounts) if image else path

    findings = []
    for what, path in recipe_paths(cfg, plan):
        host = where(path)
        if host is None:
            findings.append(_fail("paths", f"{what}={path} is under none of the --mounts {mounts}",
                                  "add the directory that holds it to --mounts host:container"))
        elif not os.access(host, os.R_OK):
            findings.append(_fail("paths", f"{what}={path} is not readable here ({host})",
                                  "check the path (the login node and the nodes share this storage)"))
        else:
            findings.append(_ok("paths", f"{what}={path} readable" + (f" (as {host})" if host != path else "")))
    out = where(cfg.run.output_dir)
    parent = out
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if out is None:
        findings.append(_fail("paths", f"run.output_dir={cfg.run.output_dir} is under none of the --mounts: "
                              "checkpoints would end with the container", "mount shared storage there"))
    elif not os.access(parent or "/", os.W_OK):
        findings.append(_fail("paths", f"run.output_dir={cfg.run.output_dir}: {parent} is not writable",
                              "choose a directory you can write on shared storage"))
    else:
        findings.append(_ok("paths", f"run.output_dir={cfg.run.output_dir} writable"))
    return findings
