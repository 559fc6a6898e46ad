#!/usr/bin/env bash
# The learner's GPU checks on one H100 in one command (under 13 minutes: every step has a limit).
#
#     bash tests/gpu/h100_check.sh                         # results in ./gpu-check-<UTC time>/
#     bash tests/gpu/h100_check.sh --out DIR --wheels DIR
#
#   1. environment: the GPU, torch and CUDA, megatron-core and Transformer Engine against the
#      version set (megatron_s2lpo/utils/versions.py; reported, not fatal, so that the checks also
#      run outside the image)
#   2. the GPU test tier, python -m pytest tests/gpu -s: packed attention (FlashAttention varlen,
#      TE THD), the FP8 on-policy ratio across packs, Blackwell recipes refused on Hopper, offload,
#      the planner next to max_memory_allocated, Hugging Face parity, weight sync into a CUDA engine
#   3. benchmarks/gpu_learner_check.py: the Qwen3-1.7B shape packed in bf16, FP8 tensorwise and FP8
#      blockwise: MFU, peak memory next to the planner, the on-policy ratio statistics
#   4. mixture of experts, python -m pytest tests/gpu/test_moe_cuda.py -s: a tiny Qwen3-MoE learner
#      (TE grouped GEMM where TE is installed) against transformers, its export and conversion,
#      routing replay with router gradients, one step; SGLang's MoE kernels where SGLang is installed
#
# Needs a CUDA GPU, torch and megatron-core (0.16.1 in the version set); this repository is used
# in place (PYTHONPATH), nothing is installed. Without Transformer Engine the TE and FP8 parts are
# skipped and say so. --wheels DIR first installs every wheel in DIR, offline and without
# dependencies, into a temporary directory (for a machine without network: megatron-core's wheel).
# Limits (seconds) from the environment: S2LPO_GPU_TIER_TIMEOUT (300), S2LPO_GPU_CHECK_TIMEOUT (240),
# S2LPO_GPU_MOE_TIMEOUT (180).
# Exit status: 0 every step passed, 1 a step failed or ran out of time, 2 the machine cannot run
# the checks (no CUDA device, megatron-core missing) or a usage error.

set -u -o pipefail

usage() {
    echo "usage: bash tests/gpu/h100_check.sh [--out DIR] [--wheels DIR]" >&2
    exit 2
}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
out="gpu-check-$(date -u +%Y%m%d-%H%M%S)"
wheels=""
while [ $# -gt 0 ]; do
    case "$1" in
        --out) [ $# -ge 2 ] || usage; out=$2; shift 2 ;;
        --wheels) [ $# -ge 2 ] || usage; wheels=$2; shift 2 ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage ;;
    esac
done
# a results directory is never overwritten
if [ -e "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ]; then
    echo "$out already holds results; pass another --out" >&2
    exit 2
fi
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

if [ -n "$wheels" ]; then
    if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
        echo "--wheels $wheels: no .whl file there" >&2
        exit 2
    fi
    site=$(mktemp -d "${TMPDIR:-/tmp}/s2lpo-gpu-site.XXXXXX") || exit 2
    trap 'rm -rf "$site"' EXIT
    "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl || exit 2
    export PYTHONPATH="$PYTHONPATH:$site"
fi

# 1. environment
{
    nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not found"
    "$python" "$repo/megatron_s2lpo/utils/versions.py"
} 2>&1 | tee "$out/environment.txt"
"$python" - <<'EOF' 2>&1 | tee -a "$out/environment.txt"
import importlib.util, sys
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
print("transformer_engine:", "installed" if importlib.util.find_spec("transformer_engine") else "not installed")
if not torch.cuda.is_available():
    sys.exit("no CUDA device: these checks need one GPU (an H100)")
if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
    sys.exit("megatron-core is not importable: pip install megatron-core==0.16.1 (or --wheels DIR with its wheel)")
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 2

status=0
run_step() {  # name, limit in seconds, command...: output to $out/<name>.log, PASS / FAIL / TIMEOUT
    local name=$1 limit=$2 rc
    shift 2
    echo "== $name (limit ${limit} s): $*"
    (cd "$repo" && timeout --kill-after=20 "$limit" "$@") 2>&1 | tee "$out/$name.log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then
        echo "PASS $name" | tee -a "$out/summary.txt"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "TIMEOUT $name after ${limit} s" | tee -a "$out/summary.txt"
        status=1
    else
        echo "FAIL $name (exit $rc)" | tee -a "$out/summary.txt"
        status=1
    fi
}

# 2. the GPU test tier; 3. the learner check (one JSON line per recipe in learner_check.jsonl)
run_step gpu_tier "${S2LPO_GPU_TIER_TIMEOUT:-300}" "$python" -m pytest tests/gpu -s -p no:cacheprovider \
    --ignore tests/gpu/test_moe_cuda.py --junitxml "$out/gpu_tier.xml"
run_step learner_check "${S2LPO_GPU_CHECK_TIMEOUT:-240}" "$python" benchmarks/gpu_learner_check.py \
    --json "$out/learner_check.jsonl"

# 4. mixture of experts (its own limit: the MoE checks and SGLang's server start)
run_step moe_tier "${S2LPO_GPU_MOE_TIMEOUT:-180}" "$python" -m pytest tests/gpu/test_moe_cuda.py -s \
    -p no:cacheprovider --junitxml "$out/moe_tier.xml"

echo "== results in $out"
cat "$out/summary.txt"
exit $status
