"""The project's SGLang environment (tools/sglang_env.py) and the CPU profile of launched servers."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from megatron_s2lpo.config.rollout import EngineConfig
from megatron_s2lpo.rollout.sglang_server import (CPU_MEM_FRACTION, CPU_PROFILE_ARGS, CPU_THREADS_BIND_ENV,
                                                  build_launch_command, launch_env)

ROOT = Path(__file__).resolve().parents[2]


def load_tool():
    spec = importlib.util.spec_from_file_location("sglang_env_tool", ROOT / "tools" / "sglang_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_site(tmp_path: Path, tool) -> Path:
    """The files the fixes touch, as the pinned releases ship them (original lines only)."""
    for rel, original, _fixed, _why in tool.FIXES:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        text = path.read_text() if path.exists() else "import torch\n"
        path.write_text(text + original + "\ndef f():\n    pass\n")
    return tmp_path


def test_fixes_apply_once_and_are_idempotent(tmp_path):
    tool = load_tool()
    site = fake_site(tmp_path, tool)
    assert not tool.fixes_in_place(str(site))
    assert sorted(set(tool.apply_fixes(str(site)))) == sorted({rel for rel, *_ in tool.FIXES})
    assert tool.fixes_in_place(str(site))
    snapshot = {rel: (site / rel).read_text() for rel, *_ in tool.FIXES}
    assert tool.apply_fixes(str(site)) == []  # a second run changes nothing
    assert {rel: (site / rel).read_text() for rel, *_ in tool.FIXES} == snapshot


def test_a_fix_that_no_longer_applies_is_an_error_naming_the_file(tmp_path):
    tool = load_tool()
    site = fake_site(tmp_path, tool)
    rel, original, _fixed, _why = tool.FIXES[0]
    (site / rel).write_text((site / rel).read_text().replace(original, "    # another release"))
    with pytest.raises(tool.InstallError, match=f"{os.path.join(str(site), rel)}: the line the SGLang CPU fix"):
        tool.apply_fixes(str(site))


def test_the_stamp_hash_covers_pins_and_fixes(monkeypatch):
    tool = load_tool()
    before = tool.inputs_hash()
    monkeypatch.setattr(tool, "REQUIREMENTS", tool.REQUIREMENTS + ["extra==1.0"])
    assert tool.inputs_hash() != before
    assert all("==" in r for r in tool.REQUIREMENTS) and not any(r.startswith("torch==") for r in tool.REQUIREMENTS)


def test_the_cpu_profile_is_one_set_of_flags_before_the_users_own():
    cfg = EngineConfig(backend="sglang", model_path="/m", profile="cpu", replicas=2, mem_fraction=0.7,
                       extra_args=["--max-total-tokens", "2048"])
    cmd = build_launch_command(cfg, python="py", replica=1)
    flags = cmd[3:]
    start = flags.index(CPU_PROFILE_ARGS[0])
    assert flags[start:start + len(CPU_PROFILE_ARGS)] == CPU_PROFILE_ARGS
    assert flags[-2:] == ["--max-total-tokens", "2048"]  # extra_args last: SGLang takes the last value
    assert flags[flags.index("--mem-fraction-static") + 1] == str(CPU_MEM_FRACTION)
    assert flags[flags.index("--base-gpu-id") + 1] == "1"
    gpu = build_launch_command(EngineConfig(backend="sglang", model_path="/m"), python="py")
    assert "--device" not in gpu and gpu[gpu.index("--mem-fraction-static") + 1] == "0.8"


def test_cpu_profile_binds_each_device_index_to_a_core(monkeypatch):
    monkeypatch.delenv(CPU_THREADS_BIND_ENV, raising=False)
    two = EngineConfig(backend="sglang", model_path="/m", profile="cpu", replicas=2)
    assert launch_env(two, cores=[0, 1])[CPU_THREADS_BIND_ENV] == "0|1"
    shifted = EngineConfig(backend="sglang", model_path="/m", profile="cpu", base_gpu_id=1)
    assert launch_env(shifted, cores=[4, 5])[CPU_THREADS_BIND_ENV] == "4|5"  # replica 0 reads entry 1
    three = EngineConfig(backend="sglang", model_path="/m", profile="cpu", replicas=3)
    assert launch_env(three, cores=[0, 1])[CPU_THREADS_BIND_ENV] == "0|1|0"
    assert launch_env(EngineConfig(backend="sglang", model_path="/m")) is None  # GPUs: inherit
    monkeypatch.setenv(CPU_THREADS_BIND_ENV, "0-1|0-1")
    assert launch_env(two, cores=[0, 1])[CPU_THREADS_BIND_ENV] == "0-1|0-1"  # the user's binding wins


def test_cpu_profile_refuses_deterministic_inference_and_unknown_profiles():
    with pytest.raises(ValueError, match="profile cpu with deterministic: true"):
        EngineConfig(backend="sglang", profile="cpu", deterministic=True)
    with pytest.raises(ValueError, match="engine profile must be one of"):
        EngineConfig(backend="sglang", profile="tpu")
