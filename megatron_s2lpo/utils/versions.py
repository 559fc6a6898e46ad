"""The GPU version set (NGC PyTorch base, megatron-core, Transformer Engine) and the check of it.

    python megatron_s2lpo/utils/versions.py      # exit 1 unless the installed versions are the set

One coherent set: the NGC PyTorch 25.11 image ships Transformer Engine 2.9 (with torch 2.10 and
CUDA 13.0), which lies inside what megatron-core 0.16.1 declares it works with
(`transformer-engine>=2.9,<2.12`, its METADATA). The image's build runs this file after
installing megatron-core and fails on any disagreement, so a new base image or megatron-core
release cannot slip in a Transformer Engine that megatron-core does not support: outside its range
megatron's TE integration degrades without an error (megatron-core 0.16.1 imports
`transformer_engine.pytorch.module.base.get_workspace` for `te_general_gemm`, which later TE
releases dropped, and then sets it to None). The learner calls `problems` too and warns.

Standalone (standard library + `packaging`): the image build copies it before the package exists.
"""

from __future__ import annotations

import sys
from importlib import metadata

VERSION_SET = {"ngc_pytorch": "25.11", "megatron-core": "0.16.1", "transformer-engine": "2.9"}
_TE_DISTRIBUTIONS = ("transformer-engine", "transformer_engine", "transformer-engine-torch")


def installed_version(name: str) -> str | None:
    names = _TE_DISTRIBUTIONS if name == "transformer-engine" else (name,)
    for dist in names:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def megatron_te_specifier(requires: list[str]) -> str | None:
    """The Transformer Engine versions megatron-core declares (any extra), as a specifier string."""
    from packaging.requirements import Requirement

    for line in requires:
        req = Requirement(line)
        if req.name.replace("_", "-").lower() == "transformer-engine" and str(req.specifier):
            return str(req.specifier)
    return None


def problems(versions: dict[str, str | None], megatron_requires: list[str],
             version_set: dict[str, str] = VERSION_SET) -> list[str]:
    """What disagrees: versions {megatron-core, transformer-engine} as installed (None: absent),
    megatron_requires: megatron-core's Requires-Dist lines."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    out = []
    mcore, te = versions.get("megatron-core"), versions.get("transformer-engine")
    if mcore is None:
        return ["megatron-core is not installed"]
    if Version(mcore) != Version(version_set["megatron-core"]):
        out.append(f"megatron-core {mcore} is installed but the version set is {version_set['megatron-core']} "
                   "(megatron_s2lpo/utils/versions.py)")
    if te is None:
        return out + ["transformer-engine is not installed (the NGC PyTorch image ships it)"]
    release = Version(te).release
    if ".".join(map(str, release[:2])) != version_set["transformer-engine"]:
        out.append(f"transformer-engine {te} is installed but the version set is {version_set['transformer-engine']}.x "
                   f"(NGC PyTorch {version_set['ngc_pytorch']}); restate the set after checking the new one")
    spec = megatron_te_specifier(megatron_requires)
    if spec is not None and not SpecifierSet(spec, prereleases=True).contains(Version(te).base_version,
                                                                             prereleases=True):
        out.append(f"transformer-engine {te} is outside what megatron-core {mcore} declares ({spec}): its TE "
                   "integration degrades silently there")
    return out


def installed_problems() -> list[str]:
    """`problems` of this Python environment."""
    versions = {name: installed_version(name) for name in ("megatron-core", "transformer-engine")}
    requires = (metadata.requires("megatron-core") or []) if versions["megatron-core"] else []
    return problems(versions, requires)


def main() -> int:
    found = installed_problems()
    print("version set: " + ", ".join(f"{k} {v}" for k, v in VERSION_SET.items()))
    for problem in found:
        print(f"version check: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
