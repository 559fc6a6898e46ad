"""A real Slurm 22.05 on one machine: munge, slurmctld and one `slurmd -N` per emulated node.

    python tests/slurm/emulated_slurm.py install               # Debian packages, once (idempotent)
    python tests/slurm/emulated_slurm.py start /tmp/s2lpo-slurm  # 3 nodes; prints `export SLURM_CONF=...`
    export SLURM_CONF=/tmp/s2lpo-slurm/slurm.conf               # sinfo, sbatch, srun, scancel now use it
    python tests/slurm/emulated_slurm.py stop /tmp/s2lpo-slurm   # cancel jobs, stop daemons by PID, clean up

Needs root and apt (Debian), as the CI machine has. It is the cluster of the Slurm test tier
(tests/slurm/conftest.py) and of the emulated-cluster walk-through in docs/cluster.md.

How it runs without systemd or cgroups: `ProctrackType=proctrack/linuxproc` (steps tracked by
process tree), `TaskPlugin=task/none`, no accounting (no slurmdbd: `sacct` has nothing),
`SlurmdParameters=config_overrides` so each slurmd takes the node's configured CPUs, memory and
GPUs instead of probing. Every node is this machine (127.0.0.1) under its own name (a block of
/etc/hosts that `stop` removes) with its own slurmd port, spool and log; 8 fake GPUs per node
are gres files that point at /dev/null, so `--gpus-per-node=8 --exclusive --mem=0` schedule as
on a GPU cluster (the processes see no GPU). Het jobs start only from the backfill scheduler:
`bf_interval=1` starts them within a second or two.

Daemons run in the foreground as children of the process that starts them, one session each,
and are stopped by the PIDs written to `<dir>/pids.json`; nothing is killed by name.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
SLURM_VERSION_PREFIX = "22.05."
NUM_NODES = 3
GPUS_PER_NODE = 8
NODE_CPUS = 2
NODE_MEMORY_MB = 8000
PARTITION = "batch"
PARTITION_MAX_TIME = "00:20:00"
KILL_WAIT_S = 30  # scancel / time limit: SIGTERM, then SIGKILL this much later (Slurm's default)
# A requeued job waits the step credentials' lifetime before it starts again (AuthInfo
# cred_expire, slurm.conf(5)): 120 s by default, which only the tier's requeue test would wait.
REQUEUE_HOLD_S = 30
HOSTS_FILE = Path("/etc/hosts")
HOSTS_BEGIN, HOSTS_END = "# s2lpo emulated slurm nodes: begin", "# s2lpo emulated slurm nodes: end"
# Debian keeps the packages it downloads here unless told otherwise: a second install on a
# machine whose apt cache was cleaned still finds them.
APT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))) / "s2lpo" / "apt"
# Debian's packages start their own services as they install (munge, and slurmd / slurmctld with
# the system's configuration) where an init system runs; the emulated cluster runs daemons of its
# own, so the install asks invoke-rc.d not to (policy-rc.d(8): exit 101), unless the machine has
# a policy already.
POLICY_RC = Path("/usr/sbin/policy-rc.d")


def node_names(num_nodes: int = NUM_NODES) -> list[str]:
    return [f"s2lpo-n{i}" for i in range(1, num_nodes + 1)]


def skip_reason() -> str:
    """Why a real Slurm cannot run here ("" when it can): root and apt are needed."""
    if sys.platform != "linux":
        return f"the emulated Slurm needs Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "the emulated Slurm runs its daemons as root (run the tier as root, as CI does)"
    if not installed() and shutil.which("apt-get") is None:
        return "Slurm is not installed and apt-get is not available to install it (Debian's slurm-wlm 22.05)"
    return ""


def _package_version(name: str) -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Status}|${Version}", name], capture_output=True, text=True,
                         timeout=60)
    status, _, version = out.stdout.partition("|")
    return version if out.returncode == 0 and status.endswith(" installed") else ""


def installed() -> bool:
    if shutil.which("dpkg-query") is None:
        return all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged"))
    return all(_package_version(p) for p in PACKAGES)


def install(log=print) -> str:
    """Install Debian's Slurm and munge unless present; returns what was done. Raises RuntimeError."""
    if installed():
        version = _package_version("slurmctld") if shutil.which("dpkg-query") else "?"
        if version and version != "?" and not version.startswith(SLURM_VERSION_PREFIX):
            raise RuntimeError(f"slurmctld {version} is installed; the tier is written for Slurm "
                               f"{SLURM_VERSION_PREFIX}x (Debian bookworm's slurm-wlm)")
        return f"already installed (slurmctld {version})"
    APT_CACHE.mkdir(parents=True, exist_ok=True)
    (APT_CACHE / "partial").mkdir(exist_ok=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o", f"Dir::Cache::archives={APT_CACHE}",
               *PACKAGES]
    added_policy = not POLICY_RC.exists()
    if added_policy:
        POLICY_RC.write_text("#!/bin/sh\n# written by the emulated Slurm's install while it runs\nexit 101\n")
        POLICY_RC.chmod(0o755)
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:  # a fresh machine has no package lists yet
            log("emulated_slurm: apt-get update")
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, env=env, timeout=900,
                           check=False)
            proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    finally:
        if added_policy:
            POLICY_RC.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return f"installed {' '.join(PACKAGES)} (slurmctld {_package_version('slurmctld')})"


@dataclass
class EmulatedSlurm:
    """One emulated cluster rooted at `root` (created by start, removed by stop)."""

    root: Path
    num_nodes: int = NUM_NODES
    pids: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """What a client (sinfo, sbatch, NeMo-Run) needs to reach this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def nodes(self) -> list[str]:
        return node_names(self.num_nodes)

    # -- start ---------------------------------------------------------------------------------
    def start(self, *, timeout_s: float = 60.0) -> None:
        from megatron_s2lpo.utils.ports import free_ports

        if self.root.exists() and any(self.root.iterdir()):
            raise FileExistsError(f"{self.root} is not empty: stop the cluster there first (stop {self.root}) "
                                  "or choose another directory")
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munge (its own user) must reach its socket and key below
        try:
            ports = free_ports(1 + self.num_nodes, host="")
            self._write_munge()
            self._write_conf(ctld_port=ports[0], node_ports=ports[1:])
            self._add_hosts()
            self._spawn("munged", self._munged_command(), user="munge")
            self._wait(lambda: (self.root / "munge" / "munge.socket").exists(), "munged's socket", timeout_s)
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._wait(self._ctld_answers, "slurmctld to answer", timeout_s)
            for node in self.nodes():
                self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
            self._wait(self._nodes_idle, "every node to be idle", timeout_s)
        except BaseException:
            self.stop()
            raise

    def _write_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        directory = self.root / "munge"
        directory.mkdir()
        directory.chmod(0o755)  # clients need to reach the socket; the key itself is 0400
        key = directory / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for path in (directory, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)

    def _munged_command(self) -> list[str]:
        d = self.root / "munge"
        return ["munged", "-F", f"--socket={d / 'munge.socket'}", f"--key-file={d / 'munge.key'}",
                f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munged.seed'}"]

    def _write_conf(self, *, ctld_port: int, node_ports: list[int]) -> None:
        r = self.root
        for sub in ("state", "spool", "log", "gpus"):
            (r / sub).mkdir()
        gpu_files = []
        for i in range(GPUS_PER_NODE):  # character devices, as gres/gpu wants; nothing opens them
            path = r / "gpus" / f"fakegpu{i}"
            path.symlink_to("/dev/null")
            gpu_files.append(str(path))
        hostname = os.uname().nodename.split(".")[0]
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={hostname} NodeAddr=127.0.0.1 Port={p} CPUs={NODE_CPUS} "
            f"RealMemory={NODE_MEMORY_MB} Gres=gpu:{GPUS_PER_NODE} State=UNKNOWN"
            for n, p in zip(self.nodes(), node_ports))
        self.conf.write_text(f"""# written by tests/slurm/emulated_slurm.py
ClusterName=s2lpo-emulated
SlurmctldHost={hostname}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r / 'munge' / 'munge.socket'},cred_expire={REQUEUE_HOLD_S}
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}/%n
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'spool'}/slurmd-%n.pid
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log'}/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2,sched_min_interval=100000
ReturnToService=2
KillWait={KILL_WAIT_S}
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=20
{nodes}
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime={PARTITION_MAX_TIME} State=UP
""")
        (r / "gres.conf").write_text(
            "".join(f"NodeName={n} Name=gpu File={f}\n" for n in self.nodes() for f in gpu_files))

    def _add_hosts(self) -> None:
        text = HOSTS_FILE.read_text()
        if HOSTS_BEGIN in text:
            raise RuntimeError(f"{HOSTS_FILE} already holds an emulated cluster's nodes: another cluster is "
                               "running (stop it first)")
        block = "\n".join([HOSTS_BEGIN, *(f"127.0.0.1 {n}" for n in self.nodes()), HOSTS_END])
        HOSTS_FILE.write_text(text.rstrip("\n") + "\n" + block + "\n")
        self._record("hosts", 0)

    def _spawn(self, name: str, command: list[str], *, user: str = "") -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        if user:
            command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *command]
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, **self.env})
        log.close()
        self.procs[name] = proc
        self._record(name, proc.pid)

    def _record(self, name: str, pid: int) -> None:
        self.pids[name] = pid
        (self.root / "pids.json").write_text(json.dumps(self.pids, indent=1))

    def _wait(self, ready, what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}:\n{self.logs_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} within {timeout_s:.0f} s:\n{self.logs_tail()}")
            time.sleep(0.2)

    def run(self, *args: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, **self.env})

    def _ctld_answers(self) -> bool:
        return self.run("scontrol", "ping").returncode == 0

    def _nodes_idle(self) -> bool:
        out = self.run("sinfo", "--noheader", "--Node", "--format", "%N %t").stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return all(states.get(n) == "idle" for n in self.nodes())

    def logs_tail(self, lines: int = 15) -> str:
        out = []
        for path in sorted((self.root / "log").glob("*")) if (self.root / "log").is_dir() else []:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(out)

    # -- stop ----------------------------------------------------------------------------------
    def stop(self, *, timeout_s: float = 90.0) -> list[str]:
        """Cancel every job, stop the daemons by PID, remove the hosts block and the directory.
        Returns the problems met (an empty list: nothing is left behind)."""
        problems: list[str] = []
        if not self.pids and (self.root / "pids.json").is_file():
            self.pids = json.loads((self.root / "pids.json").read_text())
        if self.pids.get("slurmctld") and _alive(self.pids["slurmctld"]):
            problems += self._cancel_jobs(timeout_s)
        for name in sorted(self.pids, key=lambda n: (n == "munged", n != "slurmctld")):
            if name == "hosts":
                continue
            if not _stop_pid(self.pids[name], self.procs.get(name), timeout_s=15):
                problems.append(f"{name} (pid {self.pids[name]}) did not stop")
        if "hosts" in self.pids:
            _remove_hosts_block()
        if not problems:
            shutil.rmtree(self.root, ignore_errors=True)
        return problems

    def _cancel_jobs(self, timeout_s: float) -> list[str]:
        self.run("scancel", "--full", "--partition", PARTITION)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.run("squeue", "--noheader", "--format", "%i").stdout.strip():
                # a step's processes outlive its job by up to KillWait; slurmd reaps them
                if not self._stepds_alive():
                    return []
            time.sleep(0.5)
        return [f"jobs or job steps still running {timeout_s:.0f} s after scancel: "
                f"{self.run('squeue').stdout.strip()} {self._stepds_alive()}"]

    def _stepds_alive(self) -> list[int]:
        """slurmstepd processes whose parent is one of our slurmd (the steps of our jobs)."""
        ours = {pid for name, pid in self.pids.items() if name.startswith("slurmd-")}
        out = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                    comm = stat[stat.index("(") + 1:stat.rindex(")")]
                    ppid = int(stat[stat.rindex(")") + 2:].split()[1])
                except (OSError, ValueError):
                    continue
                if comm.startswith("slurmstepd") and (ppid in ours or ppid == 1 and _is_our_stepd(entry, self.root)):
                    out.append(int(entry.name))
        return out


def _is_our_stepd(entry: Path, root: Path) -> bool:
    try:
        return str(root) in (entry / "environ").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _stop_pid(pid: int, proc: subprocess.Popen | None, *, timeout_s: float) -> bool:
    if not pid or not _alive(pid):
        if proc is not None:
            proc.poll()
        return True
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None or not _alive(pid):
            return True
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    if proc is not None:
        proc.wait(timeout=10)
    return not _alive(pid)


def _remove_hosts_block() -> None:
    lines = HOSTS_FILE.read_text().splitlines()
    if HOSTS_BEGIN not in lines:
        return
    begin = lines.index(HOSTS_BEGIN)
    end = lines.index(HOSTS_END, begin) if HOSTS_END in lines[begin:] else begin
    HOSTS_FILE.write_text("\n".join(lines[:begin] + lines[end + 1:]) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("action", choices=("install", "start", "stop"))
    parser.add_argument("dir", nargs="?", default="", help="the cluster's directory (start, stop)")
    parser.add_argument("--nodes", type=int, default=NUM_NODES)
    args = parser.parse_args(argv)
    reason = skip_reason()
    if reason:
        print(f"emulated_slurm: cannot run here: {reason}", file=sys.stderr)
        return 2
    if args.action == "install":
        print(f"emulated_slurm: {install()}")
        return 0
    if not args.dir:
        parser.error(f"{args.action} needs the cluster's directory, e.g. /tmp/s2lpo-slurm")
    cluster = EmulatedSlurm(Path(args.dir).resolve(), num_nodes=args.nodes)
    if args.action == "start":
        install()
        try:
            cluster.start()
        except (OSError, RuntimeError, TimeoutError) as err:
            print(f"emulated_slurm: {err}", file=sys.stderr)
            return 1
        for proc in cluster.procs.values():  # the daemons outlive this command; `stop` ends them by PID
            proc.returncode = 0
        print(f"emulated_slurm: {args.nodes} nodes up ({', '.join(cluster.nodes())}), partition {PARTITION}")
        print(f"export SLURM_CONF={cluster.conf}")
        return 0
    problems = cluster.stop()
    for problem in problems:
        print(f"emulated_slurm: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a file: the checkout's package is importable
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
