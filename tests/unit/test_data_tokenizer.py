"""Character-level tokenizer of the synthetic task."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from megatron_s2lpo.data import templates
from megatron_s2lpo.data.synthetic import SyntheticTaskConfig, arithmetic_completion, make_arithmetic_prompts
from megatron_s2lpo.data.tokenizer import CHARACTERS, build_synthetic_tokenizer, synthetic_vocab

TASK_STRINGS = [
    "12+7=",
    "\\boxed{19}",
    "3*4-50=\\boxed{-38}",
    templates.BOXED.render("What is 2+2?"),
    templates.MULTIPLE_CHOICE.render("Pick one\nA. x\nB. y"),
    "  two  spaces , then . and\ttab\n\nend ",
    "".join(CHARACTERS),
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_synthetic_tokenizer()


def test_vocabulary_and_special_tokens(tokenizer):
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert len(tokenizer) == len(synthetic_vocab()) == 101 < 128
    special_ids = (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id)
    assert special_ids == (0, 1, 2, 3)
    assert (tokenizer.pad_token, tokenizer.eos_token) == ("<pad>", "<eos>")
    assert tokenizer.get_vocab() == synthetic_vocab()
    assert build_synthetic_tokenizer().get_vocab() == tokenizer.get_vocab()  # deterministic ids


@pytest.mark.parametrize("text", TASK_STRINGS)
def test_one_token_per_character_and_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    vocab = synthetic_vocab()
    assert ids == [vocab[c] for c in text]  # no special tokens added, one id per character
    assert tokenizer.decode(ids) == text


def test_synthetic_prompts_and_completions_round_trip(tokenizer):
    config = SyntheticTaskConfig(num_digits=2, num_terms=3, operators="+-*", seed=5)
    for p in make_arithmetic_prompts(config, split="train", num_prompts=50):
        full = p.text + arithmetic_completion(p.ground_truth)
        assert tokenizer.decode(tokenizer.encode(full)) == full
        assert tokenizer.unk_token_id not in tokenizer.encode(full)


def test_special_tokens_and_unknown_characters(tokenizer):
    ids = tokenizer.encode("1+1=\\boxed{2}<eos>")
    assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == "1+1=\\boxed{2}"
    assert tokenizer.encode("\u00e9") == [tokenizer.unk_token_id]


def test_batch_padding(tokenizer):
    batch = tokenizer(["1+2=", "10+20="], padding=True)
    assert batch["input_ids"][0][-2:] == [0, 0]
    assert batch["attention_mask"] == [[1, 1, 1, 1, 0, 0], [1] * 6]


@pytest.mark.parametrize("loader", [AutoTokenizer.from_pretrained, PreTrainedTokenizerFast.from_pretrained])
def test_save_and_load_round_trip(tokenizer, tmp_path, loader):
    tokenizer.save_pretrained(tmp_path)
    loaded = loader(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id) == (0, 1, 2)
    for text in TASK_STRINGS:
        assert loaded.encode(text) == tokenizer.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
