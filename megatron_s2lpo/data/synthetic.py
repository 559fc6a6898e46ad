"""A synthetic verifiable task for CPU demos and tests: short integer arithmetic.

Prompts are as short as "12+7=" and the expected completion is "\\boxed{19}", so a tiny model
with the character tokenizer of `data/tokenizer.py` can learn it in a few hundred steps, and the
ground truth is a plain integer string that math-verify compares exactly.

Determinism: problems depend only on the config and the split (a private `random.Random` seeded
from them), never on global RNG state. Train/held-out membership is a hash of the expression
string alone, so the two splits never share an expression, whatever the seed or sizes.
"""

from __future__ import annotations

import hashlib
import itertools
import random

from megatron_s2lpo.config.data import ARITHMETIC_OPERATORS as OPERATORS
from megatron_s2lpo.config.data import SyntheticTaskConfig
from megatron_s2lpo.data import templates
from megatron_s2lpo.types import Prompt

SPLITS = ("train", "heldout")
DATA_SOURCE = "synthetic_arithmetic"
# Spaces up to this many expressions are enumerated (exact counts, exact errors); larger ones
# are sampled with rejection, where a collision is rare.
MAX_ENUMERATED = 50_000


def evaluate_expression(expression: str) -> int:
    """Value of `a op b op c ...` over non-negative integers, `*` before `+`/`-`.

    >>> evaluate_expression("2+3*4-5")
    9
    """
    total, sign, product, number = 0, 1, 1, ""
    for char in expression + "+":  # the sentinel flushes the last term
        if char.isdigit():
            number += char
            continue
        if not number or char not in OPERATORS:
            raise ValueError(f"malformed expression {expression!r}; expected digits joined by {OPERATORS!r}")
        product *= int(number)
        number = ""
        if char != "*":
            total += sign * product
            sign, product = (1 if char == "+" else -1), 1
    return total


def heldout_score(expression: str) -> float:
    """A stable pseudo-random number in [0, 1) per expression (independent of PYTHONHASHSEED)."""
    digest = hashlib.blake2b(expression.encode("ascii"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_of(expression: str, heldout_fraction: float) -> str:
    return "heldout" if heldout_score(expression) < heldout_fraction else "train"


def num_expressions(config: SyntheticTaskConfig) -> int:
    """Size of the expression space, both splits together."""
    return (10**config.num_digits) ** config.num_terms * len(config.operators) ** (config.num_terms - 1)


def _format(operands: tuple[int, ...], ops: tuple[str, ...]) -> str:
    parts = [str(operands[0])]
    for op, operand in zip(ops, operands[1:]):
        parts += [op, str(operand)]
    return "".join(parts)


def _enumerated(config: SyntheticTaskConfig, split: str, rng: random.Random) -> list[str]:
    operand_range = range(10**config.num_digits)
    expressions = [
        _format(operands, ops)
        for operands in itertools.product(operand_range, repeat=config.num_terms)
        for ops in itertools.product(config.operators, repeat=config.num_terms - 1)
    ]
    expressions = [e for e in expressions if split_of(e, config.heldout_fraction) == split]
    rng.shuffle(expressions)
    return expressions


def _sampled(config: SyntheticTaskConfig, split: str, rng: random.Random, num_prompts: int) -> list[str]:
    high = 10**config.num_digits - 1
    seen: set[str] = set()
    expressions: list[str] = []
    max_draws = 100 * num_prompts + 1000
    for _ in range(max_draws):
        if len(expressions) == num_prompts:
            break
        operands = tuple(rng.randint(0, high) for _ in range(config.num_terms))
        ops = tuple(rng.choice(config.operators) for _ in range(config.num_terms - 1))
        expression = _format(operands, ops)
        if expression in seen or split_of(expression, config.heldout_fraction) != split:
            continue
        seen.add(expression)
        expressions.append(expression)
    return expressions


def make_arithmetic_prompts(config: SyntheticTaskConfig, *, split: str, num_prompts: int) -> list[Prompt]:
    """`num_prompts` distinct problems of one split, deterministic in (config, split).

    A larger `num_prompts` extends a smaller one with the same seed (the smaller list is a prefix).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    rng = random.Random(f"arithmetic:{config.seed}:{split}")  # str seeds hash with sha512: stable
    if num_expressions(config) <= MAX_ENUMERATED:
        expressions = _enumerated(config, split, rng)[:num_prompts]
    else:
        expressions = _sampled(config, split, rng, num_prompts)
    if len(expressions) < num_prompts:
        raise ValueError(
            f"the {split} split has only {len(expressions)} distinct problems with num_digits="
            f"{config.num_digits}, num_terms={config.num_terms}, operators={config.operators!r}, "
            f"heldout_fraction={config.heldout_fraction}; ask for fewer or raise the difficulty"
        )
    template = templates.get_template(config.template)
    return [
        Prompt(
            prompt_id=f"arith:{expression}",
            text=template.render(expression),
            ground_truth=str(evaluate_expression(expression)),
            data_source=DATA_SOURCE,
            metadata={"problem": expression, "split": split},
        )
        for expression in expressions
    ]


def arithmetic_completion(ground_truth: str) -> str:
    """The completion a perfect model writes, e.g. for warm-up SFT: "19" -> "\\boxed{19}"."""
    return f"\\boxed{{{ground_truth}}}"
