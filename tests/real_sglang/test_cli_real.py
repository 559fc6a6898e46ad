"""`s2lpo explore` and `s2lpo eval` on real SGLang 0.5.23 servers, launched by the command or attached.

Both build the recipe's engines as the trainer does (trainer/evaluate.py): explore with a server it
launches used to fail with "engine model_path is empty" (the model path was blanked for every
non-local backend), and eval always built an in-process transformers engine. Each command is run
once launching its server and once attached to the tier's servers.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_s2lpo.rollout import StoreReader

from megatron_s2lpo.utils.ports import server_ports
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(REPO_ROOT / "examples" / "tiny_cpu.yaml")
SMALL = ["data.synthetic.num_train=12", "data.prompts_per_step=4", "data.synthetic.num_eval=6", "run.reward_workers=1"]


def cli(*args: str, timeout_s: float = 600) -> str:
    proc = subprocess.run([sys.executable, "-m", "megatron_s2lpo.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def stored(store: Path) -> int:
    return StoreReader(str(store)).num_records


def test_explore_launches_the_explorer_server_of_the_recipe(model_dirs, tmp_path, sglang_env):
    out = cli("explore", RECIPE, "rollout.explorer.backend=sglang", "rollout.explorer.profile=cpu",
              f"rollout.explorer.model_path={model_dirs['explorer']}", f"rollout.explorer.port={server_ports(1)[0]}",
              f"rollout.explorer_store={tmp_path / 'store'}", f"run.output_dir={tmp_path / 'run'}", *SMALL,
              "--num-samples", "3")
    assert "12 prompts x 3 samples (36 generated now)" in out
    assert stored(tmp_path / "store") == 36
    assert (tmp_path / "run" / "logs" / "explorer-0.log").is_file()  # the launched server logged with the run


def test_eval_launches_the_learner_server_of_the_recipe(model_dirs, tmp_path, sglang_env):
    """The command of docs/training.md ("s2lpo eval"): a launched server per model directory."""
    out = cli("eval", RECIPE, "rollout.learner.backend=sglang", f"rollout.learner.port={server_ports(1)[0]}",
              f"run.output_dir={tmp_path / 'run'}", *SMALL, "--models", model_dirs["learner"], "--k", "2")
    assert out.count("avg@2 Pass@1 = ") == 1
    rows = (tmp_path / "run" / "eval" / "passk.csv").read_text().splitlines()
    assert rows[0] == "model,k,pass_at_k,avg_at_k_pass1" and len(rows) == 1 + 2
    assert (tmp_path / "run" / "logs" / "eval-0.log").is_file()  # the launched server logged with the run


def test_explore_attached_and_eval_attached_to_real_servers(explorer_server, fresh_learner_pool, model_dirs,
                                                             tmp_path):
    out = cli("explore", RECIPE, "rollout.explorer.backend=sglang", f"rollout.explorer.url={explorer_server.url}",
              f"rollout.explorer_store={tmp_path / 'store'}", f"run.output_dir={tmp_path / 'run'}", *SMALL,
              "--num-samples", "2")
    assert "12 prompts x 2 samples (24 generated now)" in out and stored(tmp_path / "store") == 24
    # eval on the recipe's learner engine: an attached server loads each model directory in turn
    out = cli("eval", RECIPE, "rollout.learner.backend=sglang", f"rollout.learner.url={fresh_learner_pool.urls[0]}",
              f"run.output_dir={tmp_path / 'run'}", *SMALL, "--models", model_dirs["learner"],
              model_dirs["learner_alt"], "--k", "2")
    assert out.count("avg@2 Pass@1 = ") == 2
    rows = (tmp_path / "run" / "eval" / "passk.csv").read_text().splitlines()
    assert rows[0] == "model,k,pass_at_k,avg_at_k_pass1" and len(rows) == 1 + 2 * 2
