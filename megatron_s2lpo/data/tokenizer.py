"""A character-level Hugging Face tokenizer for the synthetic task, built offline from code.

One token per printable ASCII character plus newline and tab (every character the synthetic
task and the base-model templates use), and four special tokens: 101 entries, so tiny test models
have a tiny embedding. It is a real `PreTrainedTokenizerFast`: `save_pretrained` /
`from_pretrained` round-trip, and `decode(encode(x)) == x` for any ASCII text. Characters outside
the vocabulary become `<unk>` (and do not round-trip).

Ids: <pad>=0, <eos>=1, <bos>=2, <unk>=3, then characters in code-point order. `encode` adds no
special tokens (like Qwen base tokenizers); `<bos>` exists for models that want one.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK)
CHARACTERS = tuple(chr(code) for code in range(32, 127)) + ("\n", "\t")


def synthetic_vocab() -> dict[str, int]:
    """token -> id, special tokens first."""
    return {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}


def build_synthetic_tokenizer(model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """The synthetic task's tokenizer (deterministic: same vocabulary and ids every call)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel(vocab=synthetic_vocab(), unk_token=UNK))
    # Split into single characters; [\s\S] because the regex engine's "." skips newlines.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # concatenate, no spaces between tokens
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # " ." must stay " ."
    )
