"""Checkpoint conversion between Hugging Face and megatron-core (Qwen3, Qwen2.5, Llama 3).

- `mapping`: pure per-parameter maps (names, QKV / gate-up fusion, vocab padding, TP split/merge);
- `hf_io`: sharded safetensors read/write with `model.safetensors.index.json`;
- `live`: live model chunks <-> global names; loading HF weights into chunks at any TP/PP/VP;
- `export`: streaming export of a live, sharded learner as HF-named tensors in buckets (`sync/`);
- `mcore_io`: megatron-core dist checkpoints (torch_dist) for `tools/convert_checkpoint.py`.

Only `mcore_io` imports megatron (lazily); the rest needs torch alone. See docs/convert.md.
"""

from .export import FlatBucket, iter_flat_buckets, iter_hf_buckets, iter_hf_tensors
from .live import load_hf_state
from .mapping import ParamMap, hf_names, hf_to_mcore_state, mcore_to_hf_state, param_maps

__all__ = [
    "FlatBucket", "ParamMap", "hf_names", "hf_to_mcore_state", "iter_flat_buckets", "iter_hf_buckets",
    "iter_hf_tensors", "load_hf_state", "mcore_to_hf_state", "param_maps",
]
