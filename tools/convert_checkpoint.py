"""Convert checkpoints between Hugging Face (safetensors) and megatron-core (torch_dist).

    python tools/convert_checkpoint.py hf-to-mcore --hf /models/Qwen3-8B-Base --out /ckpt/qwen3-8b-tp4 --tp 4 --pp 1
    python tools/convert_checkpoint.py mcore-to-hf --mcore /ckpt/qwen3-8b-tp4 --out /models/qwen3-8b-rl \\
        --hf-config /models/Qwen3-8B-Base
    torchrun --nproc-per-node 4 tools/convert_checkpoint.py hf-to-mcore --hf ... --out ... --tp 4

The same as `s2lpo convert ...`; the logic lives in `megatron_s2lpo/convert/tool.py` (see
docs/convert.md).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_s2lpo.convert.tool import build_parser, main, run  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
