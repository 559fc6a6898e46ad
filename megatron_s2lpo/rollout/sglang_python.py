"""Which Python interpreter starts an SGLang server: one rule for every path that starts one.

SGLang pins its own torch and CUDA kernels, so the cluster image keeps it in a separate
environment (/opt/sglang, Dockerfile) and names that interpreter in `$S2LPO_SGLANG_PYTHON`.
Everything that starts a server asks here:

- the trainer, for servers it launches itself (`rollout.*.backend: sglang` without a url, staged
  runs): `sglang_python()` resolves the rule now, in the trainer's process;
- the launch plan, for the servers of a cluster job: `sglang_python_expr(trainer_python)` is the
  same rule as a shell expression, resolved when the task starts on its node (the variable is
  the image's, not the submitting machine's).

The rule: `$S2LPO_SGLANG_PYTHON` when set and non-empty; else the project's own SGLang
environment, `.venv-sglang/bin/python` at the repository root, when it exists (`make install`
builds it: tools/sglang_env.py, the CPU machines and CI); else the trainer's own interpreter (a
single environment that holds both, e.g. a workstation with `pip install -e ".[gpu]"`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

SGLANG_PYTHON_ENV = "S2LPO_SGLANG_PYTHON"
# The environment `make install` builds beside .venv (the repository root of an editable install).
PROJECT_SGLANG_PYTHON = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                     ".venv-sglang", "bin", "python")


def sglang_python(environ: Mapping[str, str] | None = None, *, project_env: str | None = None) -> str:
    """The interpreter for `-m sglang.launch_server` in this process (see the module docstring).

    project_env: the project environment's python (default PROJECT_SGLANG_PYTHON). Raises
    ValueError when the variable names something that is not an executable file.
    """
    env = os.environ if environ is None else environ
    value = env.get(SGLANG_PYTHON_ENV, "")
    if not value:
        project_env = PROJECT_SGLANG_PYTHON if project_env is None else project_env
        if os.path.isfile(project_env) and os.access(project_env, os.X_OK):
            return project_env
        return sys.executable
    if not (os.path.isfile(value) and os.access(value, os.X_OK)):
        raise ValueError(f"{SGLANG_PYTHON_ENV}={value!r} is not an executable file: point it at the Python of "
                         "the environment that has SGLang (the image's is /opt/sglang/bin/python), or unset it "
                         "to use this interpreter")
    return value


def sglang_python_expr(trainer_python: str = "python") -> str:
    """The same rule as a shell expression, `${S2LPO_SGLANG_PYTHON:-<trainer_python>}`, for a task
    script to expand inside double quotes (launch/plan.py quotes command words that way)."""
    return "${" + SGLANG_PYTHON_ENV + ":-" + trainer_python + "}"
