"""Build the pinned SGLang 0.5.23 environment `.venv-sglang/` that runs real SGLang servers on a CPU.

    python tools/sglang_env.py            # build or check (make install runs it); seconds when up to date
    python tools/sglang_env.py --force    # rebuild from scratch

SGLang pins a CUDA torch 2.14.1, so it cannot share `.venv` (CPU torch 2.13.0). This script builds
a second environment beside it, at the repository root, that `rollout/sglang_python.py` finds:

1. `python -m venv .venv-sglang`, pip pinned;
2. the CPU `torch==2.13.0` (the only torch allowed on these machines);
3. REQUIREMENTS below, every package pinned exactly, with torch constrained to 2.13.0 so nothing
   replaces it. They are the pure-Python (and CPU) packages SGLang imports on the path the CPU
   profile runs, found by launching the server until it started, serving /generate and every
   weight-update route, plus their own dependencies (the closure, so a build is reproducible);
4. `sglang==0.5.23 --no-deps`;
5. the two source fixes in FIXES (each one line where it applies), applied idempotently and then
   verified by importing and running what they fix. A fix whose original line is no longer in the
   file stops the install with an error naming the file;
6. a stamp holding the hash of everything above: the next run with the same inputs only checks
   the stamp and the fixed lines (milliseconds). A changed pin or fix rebuilds the environment.

What runs on this path (measured December 2026, docs/rollout.md "Real SGLang on a CPU"): SGLang's
own HTTP server, tokenizer manager, scheduler, weight updaters and sampler, with
`--device cpu --attention-backend torch_native --sampling-backend pytorch` (`profile: cpu`,
rollout/sglang_server.py). Not its CUDA kernels: nothing of SGLang is stubbed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_DIR = os.path.join(ROOT, ".venv-sglang")
STAMP_NAME = ".s2lpo-installed.json"
SGLANG = "sglang==0.5.23"
TORCH = "torch==2.13.0"
PIP = "pip==26.3"

# Everything the server imports on the CPU path, and their dependencies, pinned. The packages
# SGLang itself names are marked; the rest are what those pull in. triton: SGLang imports it at
# module level (kernels are never run on CPU); 3.8.0 is the release this machine keeps locally.
# torchvision 0.28.0 is the release built for torch 2.13.0 (SGLang's multimodal configs import
# it; see FIXES). jsonschema is imported by SGLang without being declared.
REQUIREMENTS = [
    "aiohappyeyeballs==2.7.1", "aiohttp==3.14.5", "aiosignal==1.4.0", "annotated-doc==0.0.7",
    "annotated-types==0.8.0", "anyio==4.16.0", "apache-tvm-ffi==0.1.11", "asttokens==3.0.2",
    "attrs==26.1.0", "certifi==2026.10.19.post1", "cffi==2.1.1", "charset-normalizer==3.5.3",
    "click==8.5.1", "compressed-tensors==0.18.0", "dill==0.4.1", "distro==1.9.0", "einops==0.8.2",
    "executing==2.3.0", "fastapi==0.165.0", "filelock==4.3.2", "frozenlist==1.8.0",
    "fsspec==2026.9.0", "gguf==0.19.0", "h11==0.16.0", "hf-xet==1.8.0", "httpcore==1.0.9",
    "httpx==0.29.0", "huggingface_hub==1.33.0", "idna==3.21", "ipython==9.19.1",
    "ipython_pygments_lexers==1.1.1", "jedi==0.20.1", "Jinja2==3.1.6", "jiter==0.19.0",
    "jsonschema==4.26.0", "jsonschema-specifications==2025.9.1", "loguru==0.7.3",
    "markdown-it-py==4.3.0", "MarkupSafe==3.0.4", "matplotlib-inline==0.2.2", "mdurl==0.1.2",
    "mpmath==1.3.0", "msgspec==0.23.0", "multidict==7.2.1", "networkx==3.6.1", "numpy==2.4.6",
    "openai==2.8.0", "opentelemetry-api==1.45.3", "orjson==3.13.0", "packaging==26.4",
    "parso==0.8.7", "partial-json-parser==0.2.1.1.post7", "pexpect==4.9.0", "pillow==13.0.0",
    "prompt_toolkit==3.0.53", "propcache==0.5.4", "psutil==7.2.2", "ptyprocess==0.7.0",
    "pure_eval==0.2.4", "pybase64==1.5.1", "pycparser==3.12", "pydantic==2.14.4",
    "pydantic_core==2.50.5", "Pygments==2.21.0", "python-multipart==0.0.34", "PyYAML==6.0.4",
    "pyzmq==27.3.0", "referencing==0.37.0", "regex==2026.12.2", "requests==2.34.2", "rich==15.0.0",
    "rpds-py==2026.9.1", "safetensors==0.8.0", "sentencepiece==0.2.1", "setproctitle==1.3.8",
    "shellingham==1.5.4", "sniffio==1.3.1", "soundfile==0.14.0", "stack-data==0.6.3",
    "starlette==1.10.0", "sympy==1.14.0", "tokenizers==0.23.2", "torchvision==0.28.0",
    "tqdm==4.70.1", "traitlets==5.16.1", "transformers==5.19.0", "triton==3.8.0", "typer==0.29.2",
    "typing-inspection==0.4.5", "typing_extensions==4.16.0", "urllib3==2.8.0", "uvicorn==0.55.0",
    "uvloop==0.23.0", "wcwidth==0.9.5", "xgrammar==0.2.7", "yarl==1.25.1",
]

# (file under site-packages, original line, fixed line, why). Each original line must occur once.
FIXES = [
    ("sglang/srt/layers/rotary_embedding/base.py",
     "                from vllm._custom_ops import rotary_embedding",
     "                rotary_embedding = None  # no vllm here: this platform runs forward_native",
     "on a device that is neither CUDA nor SGLang's CPU engine, RotaryEmbedding imports vllm's "
     "rope kernel (vllm is absent) although it then dispatches to its torch-native forward"),
    ("torchvision/_meta_registrations.py",
     '@torch.library.register_fake("torchvision::nms")',
     '@(torch.library.register_fake("torchvision::nms") if torchvision.extension._has_ops() else (lambda fn: fn))',
     "PyPI's torchvision 0.28.0 is a CUDA build whose C extension does not load here; registering a "
     "fake kernel for its missing nms op makes `import torchvision` fail"),
    ("torchvision/_meta_registrations.py",
     '@torch.library.register_fake("torchvision::qnms")',
     '@(torch.library.register_fake("torchvision::qnms") if torchvision.extension._has_ops() else (lambda fn: fn))',
     "the same for qnms"),
]

# Run inside the environment after the fixes: each fix's effect, not only its text.
VERIFY = """
import torch, torchvision
from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding
rope = RotaryEmbedding(8, 8, 64, 10000, True, torch.float32)
pos, q, k = torch.arange(3), torch.randn(3, 16), torch.randn(3, 8)
got, want = rope(pos, q.clone(), k.clone())[0], rope.forward_native(pos, q.clone(), k.clone())[0]
assert torch.equal(got, want), "RotaryEmbedding does not dispatch to its torch-native forward"
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("sglang", __import__("sglang").__version__, "torch", torch.__version__, "torchvision", torchvision.__version__)
"""


class InstallError(RuntimeError):
    """The environment could not be built or a fix no longer applies."""


def env_python(env_dir: str = ENV_DIR) -> str:
    return os.path.join(env_dir, "bin", "python")


def inputs_hash() -> str:
    """What the environment is built from: a change to any of it rebuilds."""
    text = json.dumps([sys.version_info[:2], PIP, TORCH, SGLANG, REQUIREMENTS, FIXES, VERIFY])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def site_packages(python: str) -> str:
    out = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.strip()


def apply_fixes(site: str) -> list[str]:
    """Apply every fix that is not applied yet; returns what was changed. Idempotent."""
    changed = []
    for rel, original, fixed, why in FIXES:
        path = os.path.join(site, rel)
        if not os.path.isfile(path):
            raise InstallError(f"{path}: missing, so the fix it needs cannot be applied ({why})")
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        if lines.count(fixed) == 1 and original not in lines:
            continue
        if lines.count(original) != 1:
            raise InstallError(f"{path}: the line the SGLang CPU fix replaces was not found exactly once "
                               f"(expected {original.strip()!r}); the package is not the pinned release. "
                               f"Why the fix exists: {why}. Rebuild with `python tools/sglang_env.py --force`")
        lines[lines.index(original)] = fixed
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines))
        changed.append(rel)
    return changed


def fixes_in_place(site: str) -> bool:
    for rel, original, fixed, _why in FIXES:
        try:
            with open(os.path.join(site, rel), encoding="utf-8") as f:
                lines = f.read().split("\n")
        except OSError:
            return False
        if fixed not in lines or original in lines:
            return False
    return True


def _run(cmd: list[str], what: str, timeout_s: float = 1800) -> None:
    print("+", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, timeout=timeout_s)
    if done.returncode != 0:
        raise InstallError(f"{what} failed (exit {done.returncode}): {' '.join(cmd)}")


def ensure(env_dir: str = ENV_DIR, *, force: bool = False) -> str:
    """The environment's python, built or checked; raises InstallError with what went wrong."""
    stamp = os.path.join(env_dir, STAMP_NAME)
    python = env_python(env_dir)
    if not force and os.path.isfile(stamp) and os.path.isfile(python):
        with open(stamp) as f:
            if json.load(f).get("inputs") == inputs_hash():
                if not fixes_in_place(site_packages(python)):
                    raise InstallError(f"{env_dir}: a SGLang CPU fix is no longer in place (a package was "
                                       "reinstalled?); run `python tools/sglang_env.py --force`")
                print(f"{env_dir}: up to date ({SGLANG}, {TORCH})")
                return python
    started = time.monotonic()
    shutil.rmtree(env_dir, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    _run([base, "-m", "venv", env_dir], "creating the virtual environment")
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _run(pip + [PIP], "installing pip")
    _run(pip + [TORCH], "installing the CPU torch")
    constraints = os.path.join(env_dir, "torch-constraint.txt")
    with open(constraints, "w") as f:
        f.write(TORCH + "\n")
    _run(pip + ["-c", constraints] + REQUIREMENTS, "installing SGLang's requirements")
    _run(pip + ["--no-deps", SGLANG], "installing SGLang")
    changed = apply_fixes(site_packages(python))
    print(f"applied SGLang CPU fixes to {', '.join(dict.fromkeys(changed)) or '(none needed)'}")
    done = subprocess.run([python, "-c", VERIFY], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise InstallError(f"{env_dir}: the fixed environment does not work:\n{done.stderr[-3000:]}")
    print(done.stdout.strip())
    with open(stamp, "w") as f:
        json.dump({"inputs": inputs_hash(), "seconds": round(time.monotonic() - started, 1)}, f)
    print(f"{env_dir}: built in {time.monotonic() - started:.0f} s")
    return python


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    parser.add_argument("--env-dir", default=ENV_DIR, help="where to build (default: .venv-sglang at the root)")
    args = parser.parse_args(argv)
    try:
        ensure(args.env_dir, force=args.force)
    except InstallError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
