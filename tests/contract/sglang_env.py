"""SGLang 0.5.23's own Python code on a CPU machine: fetch the wheel, import it with stubs.

    python tests/contract/sglang_env.py            # fetch + unpack into the cache (make install does it)

SGLang cannot be installed here (it pins a CUDA torch 2.14.1 and ~4 GB of CUDA wheels), but its
request types, validators and weight-update state machine are plain Python. `fetch()` runs
`pip download --no-deps sglang==0.5.23` once and unpacks the wheel's Python sources into
`.venv/sglang-0.5.23/` (the project's own install path calls it, so a clean clone in CI has it).
`load()` puts that source on sys.path and imports it, with stub modules for the third-party
packages listed in `STUBS` and nothing else: each of them either exists only for CUDA or cannot
be installed next to the CPU torch 2.13.0 without replacing it. The stubs are served only to
SGLang's own modules (the importing frame is checked), so torch and transformers keep seeing
the real environment; `load()` belongs in a process of its own (the contract server), never in
a test runner that also imports torch's compiler or transformers' vision code for other tests.

Every other SGLang requirement the imported modules need is installed from PyPI, pinned in
setup.py's `dev` extra (msgspec, pyzmq, orjson, pybase64, dill, openai, ipython, ...).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import shutil
import subprocess
import sys
import tempfile
import types
import zipfile

SGLANG_VERSION = "0.5.23"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CACHE = os.path.join(ROOT, ".venv", f"sglang-{SGLANG_VERSION}")

# Third-party packages SGLang imports that cannot exist on this machine: (name, why).
STUBS: dict[str, str] = {
    "triton": "GPU kernel compiler (CUDA only; imported by SGLang's utils and kernels at import time)",
    "torchvision": "PyPI builds require the CUDA torch 2.14.1 (installing it replaces torch 2.13.0); "
                   "imported by SGLang's multimodal configs",
    "vllm": "imported by SGLang's RotaryEmbedding.__init__ on a device that is neither CUDA nor its CPU engine "
            "(the real CPU server environment patches that import to the torch-native rope); the Qwen3-MoE "
            "loader check builds the model's layers but never runs them",
}

# The modules the contract checks use (imported by `load`).
MODULES = (
    "sglang.srt.managers.io_struct",
    "sglang.srt.managers.scheduler_components.weight_updater",
    "sglang.srt.model_executor.model_runner_components.weight_updater",
    "sglang.srt.sampling.sampling_params",
    "sglang.srt.server_args",
    "sglang.srt.weight_sync.tensor_bucket",
    "sglang.srt.utils.patch_torch",
    "sglang.srt.entrypoints.api_contract",
    "sglang.api.v1.api_types",
)


def fetch(cache_dir: str = DEFAULT_CACHE, *, python: str = sys.executable) -> str:
    """The unpacked SGLang source directory (downloads the wheel on first use)."""
    marker = os.path.join(cache_dir, "sglang", "srt", "managers", "io_struct.py")
    if os.path.isfile(marker):
        return cache_dir
    with tempfile.TemporaryDirectory(prefix="sglang-wheel-") as tmp:
        cmd = [python, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", f"sglang=={SGLANG_VERSION}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download sglang=={SGLANG_VERSION} ({' '.join(cmd)}): "
                               f"{done.stderr.strip()[-2000:]}; the contract tests need PyPI once "
                               "(then the unpacked source is cached in " + cache_dir + ")")
        partial = f"{cache_dir}.tmp-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel:
            for name in wheel.namelist():  # no compiled extensions: nothing of it runs natively
                if name.startswith("sglang/") and not name.endswith(".so"):
                    wheel.extract(name, partial)
        shutil.rmtree(cache_dir, ignore_errors=True)
        os.replace(partial, cache_dir)
    return cache_dir


class _StubMeta(type):
    """A stub attribute: a class (isinstance / subclassing work), callable, a no-op decorator."""

    def __getattr__(cls, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _stub(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]  # @triton.jit, @triton.autotune(...)(fn)
        return _stub(f"{cls.__qualname__}()")

    def __getitem__(cls, key):
        return cls

    def __bool__(cls) -> bool:
        return False

    def __or__(cls, other):
        return cls

    __ror__ = __or__


def _stub(qualname: str) -> type:
    return _StubMeta(qualname.rsplit(".", 1)[-1], (), {"__qualname__": qualname})


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _stub(f"{self.__name__}.{name}")


def _imported_by_sglang() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not module.startswith("importlib") and module != __name__:
            return module == "sglang" or module.startswith("sglang.")
        frame = frame.f_back
    return False


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in STUBS and _imported_by_sglang():
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module) -> None:
        pass


def load(source_dir: str | None = None) -> str:
    """Import SGLang's modules (MODULES) from the cached wheel; returns the source directory."""
    source_dir = source_dir or fetch()
    # torch's own optional-triton probes must run before any stub exists (they are cached).
    import torch._dynamo  # noqa: F401
    import torch._inductor.compile_fx  # noqa: F401
    if source_dir not in sys.path:
        sys.path.insert(0, source_dir)
    if not any(isinstance(f, _StubFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _StubFinder())
    for module in MODULES:
        importlib.import_module(module)
    return source_dir


if __name__ == "__main__":
    print(fetch())
