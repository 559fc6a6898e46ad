# Placeholder image for the trainer on the NGC PyTorch base.
# The full cluster image (pinned SGLang, non-root user, one image for the trainer and for
# sglang.launch_server) is built in docs/cluster.md once the launch package lands.
FROM nvcr.io/nvidia/pytorch:25.10-py3

WORKDIR /opt/megatron_s2lpo
COPY setup.py README.md ./
COPY megatron_s2lpo ./megatron_s2lpo
# The NGC image ships its own CUDA torch; install our package without touching it.
RUN pip install --no-cache-dir --no-deps -e . \
    && pip install --no-cache-dir "megatron-core>=0.16.1,<0.20" "transformers==5.23.0" \
       "safetensors==0.8.0" "math-verify[antlr4-13-2]==0.9.0" "pyyaml==6.0.3" "pyarrow==26.0.1" \
       "aiohttp==3.14.5" "tqdm==4.70.1" "psutil==7.2.2"
