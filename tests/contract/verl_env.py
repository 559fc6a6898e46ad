"""verl's own Python code on a CPU machine: fetch its wheel, put its source on a path.

    python tests/contract/verl_env.py            # fetch + unpack into the cache (make install does it)

The DAPO recipe's reward manager (`verl.workers.reward_manager.dapo.DAPORewardManager`) imports
and runs on a CPU: verl's package imports numpy, ray (installed with nemo-run) and tensordict
(pinned in setup.py's `dev` extra), nothing CUDA. `fetch()` runs `pip download --no-deps
verl==VERL_VERSION` once and unpacks the wheel's `verl/` sources into `.venv/verl-<version>/`;
a test runs verl in a process of its own with that directory on PYTHONPATH
(tests/contract/verl_dapo_reference.py), never in the test runner.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

VERL_VERSION = "0.9.1"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CACHE = os.path.join(ROOT, ".venv", f"verl-{VERL_VERSION}")


def fetch(cache_dir: str = DEFAULT_CACHE, *, python: str = sys.executable) -> str:
    """The directory holding verl's unpacked source (downloads the wheel on first use)."""
    marker = os.path.join(cache_dir, "verl", "workers", "reward_manager", "dapo.py")
    if os.path.isfile(marker):
        return cache_dir
    with tempfile.TemporaryDirectory(prefix="verl-wheel-") as tmp:
        cmd = [python, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", f"verl=={VERL_VERSION}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download verl=={VERL_VERSION} ({' '.join(cmd)}): "
                               f"{done.stderr.strip()[-2000:]}; the verl contract test needs PyPI once "
                               "(then the unpacked source is cached in " + cache_dir + ")")
        partial = f"{cache_dir}.tmp-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel:
            for name in wheel.namelist():  # pure Python: nothing of it runs natively
                if name.startswith("verl/") and not name.endswith(".so"):
                    wheel.extract(name, partial)
        shutil.rmtree(cache_dir, ignore_errors=True)
        os.replace(partial, cache_dir)
    return cache_dir


if __name__ == "__main__":
    print(fetch())
