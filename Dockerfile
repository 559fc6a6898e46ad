# One image for every task of a cluster launch: the trainer (torchrun -m megatron_s2lpo.cli train)
# and the SGLang servers ($S2LPO_SGLANG_PYTHON -m sglang.launch_server).
#
#   docker build -t REGISTRY/megatron-s2lpo:0.1.0 .
#   docker build --build-arg S2LPO_USER=s2lpo --build-arg S2LPO_UID=1001 -t ... .   # a non-root user
#   docker push REGISTRY/megatron-s2lpo:0.1.0
#   enroot import -o megatron-s2lpo.sqsh docker://REGISTRY#megatron-s2lpo:0.1.0   # optional, for pyxis
#
# Two Python environments, so that no package replaces another's CUDA build:
# - the system Python of the NGC image: its own torch, Transformer Engine, Apex and NCCL, plus
#   megatron-core, this package and the launcher. /etc/pip/constraints.txt freezes every package
#   of the image's CUDA stack at the version NVIDIA built, and PIP_CONSTRAINT applies it to every
#   later `pip install`: a requirement that would upgrade torch fails instead of replacing it.
# - /opt/sglang, a virtual environment for SGLang 0.5.23, which pins torch==2.14.1,
#   transformers==5.19.0 and its own CUDA 13 kernels. The servers run from it, through
#   docker/sglang-python, which keeps the NGC library path out of it.
# Both environments run one NCCL: the SGLang environment's NCCL wheel is pinned to the version
# the trainer's torch loads, and the build fails unless torch.cuda.nccl.version() and the loaded
# library agree in both (megatron_s2lpo/launch/nccl_check.py; no GPU needed at build time).
# Versions equal setup.py's (tests/unit/test_launch_dockerfile.py checks them); megatron-core is
# the release CI tests. The GPU version set (megatron_s2lpo/utils/versions.py): NGC PyTorch 25.11
# (torch 2.10, CUDA 13.0, Transformer Engine 2.9) + megatron-core 0.16.1, whose declared TE range
# (>=2.9, <2.12) holds the image's TE; the build fails unless the installed versions are that set.
FROM nvcr.io/nvidia/pytorch:25.11-py3

# root by default, as the NGC images run: DockerExecutor writes logs into host-owned job
# directories and checkpoints into host volumes; pyxis runs the container as the submitting user.
ARG S2LPO_USER=root
ARG S2LPO_UID=1000

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/etc/pip/constraints.txt \
    S2LPO_SGLANG_PYTHON=/opt/sglang/bin/s2lpo-python \
    PYTHONUNBUFFERED=1

# Freeze the image's CUDA stack (torch, triton, Transformer Engine, Apex, flash-attn, NCCL and
# other nvidia-* wheels, numpy built against them).
RUN mkdir -p /etc/pip \
    && python -m pip list --format=freeze \
       | grep -iE '^(torch|torchvision|torchaudio|triton|transformer[-_]engine[-_a-z0-9]*|apex|flash[-_]attn|nvidia-[-_a-z0-9]+|numpy|cupy[-_a-z0-9]*)==' \
       > /etc/pip/constraints.txt \
    && grep -iE '^torch==' /etc/pip/constraints.txt

# Trainer side: pinned like setup.py's install_requires (torch and Transformer Engine come from
# the image). megatron-core: the release the CPU tests and the GPU tier run (setup.py allows
# newer ones on Python >= 3.12 outside the image; learner/cpu_shims.py covers 0.19).
RUN python -m pip install \
        "megatron-core==0.16.1" \
        "psutil==7.2.2" \
        "transformers==5.23.0" \
        "safetensors==0.8.0" \
        "math-verify[antlr4-13-2]==0.9.0" \
        "pyyaml==6.0.3" \
        "pyarrow==26.0.1" \
        "aiohttp==3.14.5" \
        "tqdm==4.70.1" \
        "matplotlib==3.11.2" \
        "nemo-run==0.11.1" \
        "leptonai<0.47"
# The image's Transformer Engine must be the version set's and inside megatron-core's declared range.
COPY megatron_s2lpo/utils/versions.py /opt/s2lpo-build/versions.py
RUN python /opt/s2lpo-build/versions.py

# Server side: SGLang with its own pinned torch in a separate environment (the constraints above
# are the system Python's, not this environment's, so PIP_CONSTRAINT is cleared for it). The
# NGC image's LD_LIBRARY_PATH entries are recorded (driver directories excepted) for the
# interpreter wrapper to drop.
RUN python -m venv --without-pip /opt/sglang \
    && PIP_CONSTRAINT="" python -m pip --python /opt/sglang/bin/python install "sglang==0.5.23"
COPY docker/sglang-python /opt/sglang/bin/s2lpo-python
RUN echo "${LD_LIBRARY_PATH:-}" | tr ':' '\n' | { grep -vE '^$|^/usr/local/nvidia/|/compat' || true; } | paste -sd: - \
       > /opt/sglang/ngc-library-path \
    && /opt/sglang/bin/s2lpo-python -c "import sglang, torch; print('sglang', sglang.__version__, torch.__version__)"

# One NCCL for the trainer and the servers (the distributed weight sync broadcasts between them):
# pin the SGLang environment's NCCL wheel to the library the trainer's torch loads, then FAIL the
# build unless both environments report the same NCCL, compiled (torch.cuda.nccl.version(), a
# constant of the torch build) and loaded (ncclGetVersion of the library import torch loaded).
COPY megatron_s2lpo/launch/nccl_check.py /opt/s2lpo-build/nccl_check.py
RUN nccl="$(python /opt/s2lpo-build/nccl_check.py --field loaded)" \
    && wheel="$(PIP_CONSTRAINT="" python -m pip --python /opt/sglang/bin/python list --format=freeze \
                | grep -ioE '^nvidia-nccl-cu[0-9]+')" \
    && PIP_CONSTRAINT="" python -m pip --python /opt/sglang/bin/python install --no-deps "${wheel}==${nccl}" \
    && python /opt/s2lpo-build/nccl_check.py --compare /opt/sglang/bin/s2lpo-python

WORKDIR /opt/megatron_s2lpo
COPY setup.py README.md ./
COPY megatron_s2lpo ./megatron_s2lpo
COPY examples ./examples
COPY tools ./tools
# --no-deps: every requirement is installed above with the image's torch kept.
RUN python -m pip install --no-deps /opt/megatron_s2lpo \
    && python -c "import megatron_s2lpo.launch.wait_healthy, megatron.core, nemo_run, math_verify"

RUN if [ "${S2LPO_USER}" != root ]; then \
        useradd --no-log-init --create-home --uid "${S2LPO_UID}" --shell /bin/bash "${S2LPO_USER}"; \
    fi
USER ${S2LPO_USER}
