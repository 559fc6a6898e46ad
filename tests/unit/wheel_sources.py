"""A dependency's Python sources from its PyPI wheel, for tests that run its own code where it cannot install.

    sources = wheel_sources("megatron-core", "0.19.2", "megatron/", python_version="3.12")
    sources = wheel_sources("transformer-engine", "2.9.0", "transformer_engine/")

`pip download --no-deps` once (cached under ~/.cache/megatron_s2lpo/wheels or
$S2LPO_WHEEL_CACHE), then the `.py` files under `prefix` are unpacked next to the wheel. The test
is skipped when PyPI cannot be reached.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest


def wheel_sources(package: str, version: str, prefix: str, *, python_version: str | None = None) -> Path:
    """The directory holding `prefix` of `package==version`'s wheel (its `.py` files)."""
    cache = Path(os.environ.get("S2LPO_WHEEL_CACHE", Path.home() / ".cache" / "megatron_s2lpo" / "wheels"))
    stem = package.replace("-", "_")
    sources = cache / f"{stem}-{version}"
    if (sources / prefix).is_dir():
        return sources
    cache.mkdir(parents=True, exist_ok=True)
    wheels = list(cache.glob(f"{stem}-{version}-*.whl"))
    if not wheels:
        extra = ["--python-version", python_version] if python_version else []
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--only-binary=:all:",
                               *extra, "-d", str(cache), f"{package}=={version}"],
                              capture_output=True, text=True, timeout=120)
        wheels = list(cache.glob(f"{stem}-{version}-*.whl"))
        if proc.returncode or not wheels:
            pytest.skip(f"could not download {package} {version} (needs PyPI): {proc.stderr[-500:]}")
    tmp = cache / f".tmp-{stem}-{os.getpid()}"
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extractall(tmp, [n for n in wheel.namelist() if n.startswith(prefix) and n.endswith(".py")])
    os.replace(tmp, sources)
    return sources
