"""Synthetic arithmetic task: determinism, split disjointness, correct answers."""

from __future__ import annotations

import itertools
import random
import re

import pytest
import torch

from megatron_s2lpo.data.synthetic import (
    SyntheticTaskConfig,
    arithmetic_completion,
    evaluate_expression,
    make_arithmetic_prompts,
    num_expressions,
)


def _triples(prompts):
    return [(p.prompt_id, p.text, p.ground_truth) for p in prompts]


@pytest.mark.parametrize(
    "config",
    [
        SyntheticTaskConfig(seed=3),  # enumerated space (200 expressions)
        SyntheticTaskConfig(num_digits=3, num_terms=3, operators="+-*", seed=3),  # sampled space
    ],
)
def test_same_seed_same_problems_independent_of_global_rng(config):
    random.seed(1)
    torch.manual_seed(1)
    first = make_arithmetic_prompts(config, split="train", num_prompts=12)
    random.seed(999)
    torch.manual_seed(999)
    [random.random() for _ in range(17)]
    second = make_arithmetic_prompts(config, split="train", num_prompts=12)
    assert _triples(first) == _triples(second)
    other_seed = SyntheticTaskConfig(
        num_digits=config.num_digits, num_terms=config.num_terms, operators=config.operators, seed=4
    )
    assert _triples(make_arithmetic_prompts(other_seed, split="train", num_prompts=12)) != _triples(first)
    # A longer list extends a shorter one.
    longer = make_arithmetic_prompts(config, split="train", num_prompts=20)
    assert _triples(longer[:12]) == _triples(first)


def test_splits_partition_the_enumerated_space():
    config = SyntheticTaskConfig(num_digits=1, num_terms=2, operators="+-*", heldout_fraction=0.25)
    total = num_expressions(config)
    brute = {f"{a}{op}{b}" for a, b in itertools.product(range(10), repeat=2) for op in "+-*"}
    assert total == len(brute) == 300
    # Ask for more than exists to learn each split's size from the error, then take all of it.
    sizes = {}
    for split in ("train", "heldout"):
        with pytest.raises(ValueError, match=rf"the {split} split has only \d+ distinct problems") as info:
            make_arithmetic_prompts(config, split=split, num_prompts=total + 1)
        sizes[split] = int(re.search(r"has only (\d+)", str(info.value)).group(1))
    train = {p.metadata["problem"] for p in make_arithmetic_prompts(config, split="train", num_prompts=sizes["train"])}
    heldout = {
        p.metadata["problem"] for p in make_arithmetic_prompts(config, split="heldout", num_prompts=sizes["heldout"])
    }
    assert not train & heldout
    assert train | heldout == brute
    assert 0.1 < len(heldout) / total < 0.4  # about heldout_fraction


def test_splits_disjoint_across_seeds_in_sampled_space():
    train = set()
    heldout = set()
    for seed in range(3):
        config = SyntheticTaskConfig(num_digits=2, num_terms=3, operators="+-", seed=seed, heldout_fraction=0.3)
        train |= {p.prompt_id for p in make_arithmetic_prompts(config, split="train", num_prompts=300)}
        heldout |= {p.prompt_id for p in make_arithmetic_prompts(config, split="heldout", num_prompts=300)}
    assert len(train) > 300 and len(heldout) > 300
    assert not train & heldout


def test_problems_are_distinct_and_answers_match_python():
    config = SyntheticTaskConfig(num_digits=2, num_terms=4, operators="+-*", seed=11)
    prompts = make_arithmetic_prompts(config, split="train", num_prompts=200)
    assert len({p.prompt_id for p in prompts}) == 200
    for p in prompts:
        expression = p.metadata["problem"]
        assert p.text == expression + "="
        assert p.ground_truth == str(eval(expression))  # Python's precedence is the reference
        assert p.ground_truth.lstrip("-").isdigit()
        assert p.data_source == "synthetic_arithmetic" and p.metadata["split"] == "train"


def test_evaluate_expression_against_eval():
    rng = random.Random(0)
    for _ in range(500):
        terms = [str(rng.randint(0, 99)) for _ in range(rng.randint(1, 5))]
        expression = terms[0] + "".join(rng.choice("+-*") + t for t in terms[1:])
        assert evaluate_expression(expression) == eval(expression)
    for bad in ["", "1+", "+1", "1/2", "1++2"]:
        with pytest.raises(ValueError, match="malformed expression"):
            evaluate_expression(bad)


def test_config_validation_and_completion():
    with pytest.raises(ValueError, match="num_digits"):
        SyntheticTaskConfig(num_digits=0)
    with pytest.raises(ValueError, match="num_terms"):
        SyntheticTaskConfig(num_terms=1)
    with pytest.raises(ValueError, match="operators"):
        SyntheticTaskConfig(operators="+/")
    with pytest.raises(ValueError, match="heldout_fraction"):
        SyntheticTaskConfig(heldout_fraction=0.0)
    with pytest.raises(ValueError, match="unknown template"):
        make_arithmetic_prompts(SyntheticTaskConfig(template="nope"), split="train", num_prompts=1)
    with pytest.raises(ValueError, match="split must be one of"):
        make_arithmetic_prompts(SyntheticTaskConfig(), split="test", num_prompts=1)
    assert arithmetic_completion("19") == "\\boxed{19}"
    assert arithmetic_completion("-3") == "\\boxed{-3}"
