"""Model shapes shared by the benchmarks (imported with `benchmarks/` on sys.path)."""

from megatron_s2lpo.config.model import ModelArch

# Qwen3-1.7B's layer shape with 16 layers instead of 28: 1.12B parameters (tied embeddings).
QWEN3_1B = ModelArch(family="qwen3", vocab_size=151936, hidden_size=2048, ffn_hidden_size=6144, num_layers=16,
                     num_attention_heads=16, num_query_groups=8, head_dim=128, qk_layernorm=True,
                     tie_word_embeddings=True)
# A few-million-parameter model of the same family for --quick smoke runs.
QWEN3_QUICK = ModelArch(family="qwen3", vocab_size=4096, hidden_size=256, ffn_hidden_size=768, num_layers=4,
                        num_attention_heads=8, num_query_groups=4, head_dim=32, qk_layernorm=True)
