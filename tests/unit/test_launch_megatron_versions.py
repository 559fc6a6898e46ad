"""megatron-core versions: the image installs the release CI runs (0.16.1, tests/unit/
test_launch_dockerfile.py); a user on Python 3.12 outside the image may resolve 0.19.x, so the CPU
shims (learner/cpu_shims.py) are checked here against megatron-core 0.19.2's own code.

The check downloads the 0.19.2 wheel once (`pip download --no-deps`, 2.4 MB, cached under
~/.cache/megatron_s2lpo/wheels or $S2LPO_WHEEL_CACHE) and puts its sources first on PYTHONPATH.
The wheel declares Python >= 3.12, but its Python code imports and runs on this 3.11: enough to
run the learner on it. One process, gloo: build the tiny GPT learner (DDP + distributed
optimizer) and take one optimizer step (without the shims the schedules' import chain needs
triton, and the grad buffer's sync calls torch.cuda.current_stream()). The trainer's checkpoints
on 0.19.2 were checked by hand (`s2lpo train examples/tiny_cpu.yaml run.save_every=1` with these
sources first on PYTHONPATH; docs/cluster.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from wheel_sources import wheel_sources

REPO = Path(__file__).resolve().parents[2]
VERSION = "0.19.2"

SCRIPT = """
import math, sys
sys.path.insert(0, "tests/distributed/scripts")
from common import fixed_batch, tiny_arch
from megatron_s2lpo.algo.losses import PolicyLossConfig
from megatron_s2lpo.config.learner import LearnerConfig
from megatron_s2lpo.learner import Learner

if __name__ == "__main__":
    learner = Learner(tiny_arch(), LearnerConfig(micro_batch_tokens=96))  # applies the CPU shims first
    import megatron.core
    assert megatron.core.__version__ == "{version}", megatron.core.__version__
    metrics = learner.train_step(fixed_batch(), loss_config=PolicyLossConfig())
    assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0, metrics
    print("OK", megatron.core.__version__, metrics["loss"])
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cpu_shims_run_the_learner_on_megatron_core_0_19():
    sources = wheel_sources("megatron-core", VERSION, "megatron/", python_version="3.12")
    env = {**os.environ, "PYTHONPATH": f"{sources}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(version=VERSION)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and "OK 0.19.2" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
