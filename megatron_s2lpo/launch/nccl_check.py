"""Do two Python environments use the same NCCL? The image's build runs this and fails if not.

    python nccl_check.py                              # this interpreter's NCCL, as JSON
    python nccl_check.py --field loaded               # one field of it (the Dockerfile pins a wheel to it)
    python nccl_check.py --compare OTHER_PYTHON       # exit 1 unless OTHER_PYTHON's NCCL agrees

The `distributed` weight sync broadcasts between the trainer's torch (the NGC image's build) and
the SGLang environment's torch (its own wheels): both ends must run the same NCCL. Two versions
per environment are compared:

- compiled: `torch.cuda.nccl.version()`, the NCCL headers torch was built against. In torch's
  source (torch/csrc/cuda/nccl.cpp, `version()`) this is a compile-time constant built from
  NCCL_MAJOR / NCCL_MINOR / NCCL_PATCH: it needs no GPU, no driver, no call into NCCL, only
  `import torch` (which a build step can do);
- loaded: `ncclGetVersion()` of the libnccl that `import torch` actually loaded (found in
  /proc/self/maps), the library that will talk on the wire. It also needs no GPU.

Standard library plus torch, no package imports: the build runs it by path in both environments.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys


def _version_text(code: int) -> str:
    """NCCL_VERSION_CODE -> "major.minor.patch" (NCCL >= 2.9 encodes major*10000 + minor*100 + patch)."""
    if code >= 10000:
        return f"{code // 10000}.{code % 10000 // 100}.{code % 100}"
    return f"{code // 1000}.{code % 1000 // 100}.{code % 100}"


def _loaded_library() -> str:
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "libnccl" in line and line.split()[-1].startswith("/")}
    return sorted(paths)[0] if paths else ""


def report() -> dict:
    """This interpreter's torch and NCCL versions (None where there is none)."""
    import torch

    out: dict = {"python": sys.executable, "torch": torch.__version__, "compiled": None, "loaded": None,
                 "library": ""}
    if hasattr(torch._C, "_nccl_version"):  # absent from CPU-only builds
        out["compiled"] = ".".join(str(x) for x in torch.cuda.nccl.version()[:3])
    library = _loaded_library()
    if library:
        code = ctypes.c_int()
        if ctypes.CDLL(library).ncclGetVersion(ctypes.byref(code)) == 0:
            out["loaded"], out["library"] = _version_text(code.value), library
    return out


def disagreement(ours: dict, theirs: dict) -> str:
    """Why the two environments' NCCLs do not agree ("" if they do)."""
    problems = []
    for key, what in (("compiled", "built against (torch.cuda.nccl.version())"),
                      ("loaded", "loaded at run time (ncclGetVersion)")):
        if ours[key] is None or theirs[key] is None:
            problems.append(f"NCCL {what} is missing: {ours['python']}: {ours[key]}, {theirs['python']}: {theirs[key]}")
        elif ours[key] != theirs[key]:
            problems.append(f"NCCL {what} differs: {ours[key]} ({ours['python']}, torch {ours['torch']}) vs "
                            f"{theirs[key]} ({theirs['python']}, torch {theirs['torch']})")
    return "; ".join(problems)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", metavar="OTHER_PYTHON", help="the other environment's interpreter")
    parser.add_argument("--field", choices=("torch", "compiled", "loaded", "library"), help="print only this")
    args = parser.parse_args(argv)
    ours = report()
    if args.field:
        if ours[args.field] is None:
            print(f"nccl_check: error: {sys.executable} has no NCCL ({args.field}: none)", file=sys.stderr)
            return 1
        print(ours[args.field])
        return 0
    if not args.compare:
        print(json.dumps(ours))
        return 0
    proc = subprocess.run([args.compare, __file__], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"nccl_check: {args.compare} could not report its NCCL:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return 1
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    problem = disagreement(ours, theirs)
    if problem:
        print(f"nccl_check: error: {problem}. The weight sync broadcasts between both environments over NCCL; "
              "use an NGC base image and an SGLang release whose torch builds share one NCCL version "
              "(docs/cluster.md, \"The image\")", file=sys.stderr)
        return 1
    print(f"nccl_check: both environments use NCCL {ours['loaded']} (built against {ours['compiled']}): "
          f"{ours['library']} and {theirs['library']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
