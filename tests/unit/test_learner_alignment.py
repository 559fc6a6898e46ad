"""Pack-level padding for sequence parallel, context parallel and FP8, judged by Transformer Engine's own rule.

TE cannot import here (its torch binding needs CUDA), so its rule is read from the 2.9.0 wheel
(`wheel_sources`): the bodies of `assert_dim_for_fp8_exec`, `assert_dim_for_all_gather` and the
quantizers' `is_quantizable` are compiled from TE's files and run on meta tensors of the shapes
our packs give, and `learner/fp8_rules.py` (which the learner checks packs with) must agree
with them on every shape.
"""

from __future__ import annotations

import __future__
import ast
import math
import typing

import pytest
import torch

from megatron_s2lpo.config.learner import LearnerConfig, TokenAlignment, token_alignment
from megatron_s2lpo.learner.batching import make_micro_batches, random_batch, rank_micro_batches
from megatron_s2lpo.learner.fp8_rules import (TE_VERSION_READ, check_input_shapes, fp8_input_problem, gemm_shapes,
                                              pack_fp8_problems)
from megatron_s2lpo.planner.archs import KNOWN_ARCHS

RECIPE_QUANTIZERS = {  # recipe -> (file, class) of TE's quantizer and the attributes its is_quantizable reads
    "tensorwise": ("tensor/quantized_tensor.py", "Quantizer", {}),
    "blockwise": ("tensor/float8_blockwise_tensor.py", "Float8BlockQuantizer", {"block_len": 128}),
    "mxfp8": ("tensor/mxfp8_tensor.py", "MXFP8Quantizer", {}),
    "nvfp4": ("tensor/nvfp4_tensor.py", "NVFP4Quantizer", {}),
}


def _te_function(path, name, namespace, cls=None):
    """Compile TE's own definition of `name` (a method of `cls`) from `path` into `namespace`."""
    tree = ast.parse(path.read_text())
    body = tree.body
    if cls is not None:
        body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == cls).body
    node = next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == name)
    code = compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec",
                   flags=__future__.annotations.compiler_flag, dont_inherit=True)
    exec(code, namespace)  # noqa: S102 - TE's own source from its published wheel
    return namespace[name]


@pytest.fixture(scope="module")
def te_rule():
    """TE's verdict on one FP8 GEMM input: None when accepted, the assertion's text when refused."""
    from wheel_sources import wheel_sources

    root = wheel_sources("transformer-engine", TE_VERSION_READ, "transformer_engine/") / "transformer_engine" / "pytorch"
    constants = {}
    for node in ast.parse((root / "constants.py").read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            constants[node.targets[0].id] = node.value.value
    namespace = {"math": math, "torch": torch, "List": typing.List, **constants}
    fp8_exec = _te_function(root / "utils.py", "assert_dim_for_fp8_exec", namespace)
    all_gather = _te_function(root / "utils.py", "assert_dim_for_all_gather", namespace)
    quantizers = {}
    for recipe, (file, cls, attrs) in RECIPE_QUANTIZERS.items():
        method = _te_function(root / file, "is_quantizable", dict(namespace), cls)
        quantizers[recipe] = type(cls, (), {"is_quantizable": method, **attrs})()

    def verdict(shape, recipe, all_gathered):
        tensor = torch.empty(shape, device="meta")
        try:
            fp8_exec(tensor)
            all_gather(tensor, all_gathered, quantizers[recipe])
        except AssertionError as err:
            return str(err)
        return None

    return verdict


@pytest.mark.parametrize("recipe", sorted(RECIPE_QUANTIZERS))
def test_fp8_rules_agree_with_transformer_engines_own_code(te_rule, recipe):
    checked = refused = 0
    for rows in range(1, 300):
        for cols in (4096, 2176, 1000, 24):
            for gathered in (False, True):
                shape = (rows, 1, cols)
                ours, theirs = fp8_input_problem(shape, recipe, all_gathered=gathered), te_rule(shape, recipe, gathered)
                assert (ours is None) == (theirs is None), (shape, gathered, ours, theirs)
                checked += 1
                refused += theirs is not None
    assert 0 < refused < checked


def test_token_alignment_is_one_function_of_the_recipe():
    assert LearnerConfig().token_alignment == TokenAlignment(sequence=8, pack=8)
    fp8 = dict(precision="fp8", seq_length_multiple=8)
    assert token_alignment(**fp8, fp8_recipe="tensorwise") == TokenAlignment(sequence=8, pack=16)
    assert token_alignment(**fp8, fp8_recipe="tensorwise", tensor_parallel_size=4, sequence_parallel=True).pack == 64
    assert token_alignment(**fp8, fp8_recipe="tensorwise", tensor_parallel_size=4).pack == 16  # no SP: T per rank
    assert token_alignment(**fp8, fp8_recipe="blockwise", tensor_parallel_size=4, sequence_parallel=True).pack == 512
    assert token_alignment(**fp8, fp8_recipe="mxfp8").pack == 32
    assert token_alignment(**fp8, fp8_recipe="nvfp4").pack == 128
    assert token_alignment(tensor_parallel_size=3, sequence_parallel=True, seq_length_multiple=4) == \
        TokenAlignment(sequence=4, pack=12)
    # context parallel: every sequence to 2 x CP; a pack over CP x TP ranks, each rank's share FP8-aligned
    assert token_alignment(context_parallel_size=4, seq_length_multiple=1) == TokenAlignment(sequence=8, pack=8)
    assert token_alignment(**fp8, fp8_recipe="blockwise", context_parallel_size=2, tensor_parallel_size=4,
                           sequence_parallel=True) == TokenAlignment(sequence=8, pack=1024)


def test_a_budget_below_one_pack_alignment_is_refused():
    with pytest.raises(ValueError, match=r"learner.micro_batch_tokens=256 is smaller than one pack's alignment \(512"):
        LearnerConfig(precision="fp8", fp8_recipe="blockwise", tensor_parallel_size=4, sequence_parallel=True,
                      micro_batch_tokens=256)


def _rl_lengths(num, max_len, median_response, seed):
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(32, 1025, (num,), generator=gen)
    responses = torch.exp(torch.randn(num, generator=gen) + math.log(median_response)).long().clamp(min=8)
    return [int(min(p + r, max_len)) for p, r in zip(prompts, responses)]


@pytest.mark.parametrize("recipe", ["tensorwise", "blockwise"])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("packed", [True, False])
def test_every_micro_batch_passes_tes_rule_at_every_tp(recipe, tp, packed):
    """The learner's micro-batches (rank_micro_batches, as Learner._local_micro_batches builds them)
    under FP8 + sequence parallel on the 8B / 14B shapes and RL lengths: TE accepts every GEMM input
    of every pack, packs keep to the budget, and pack padding costs less than one alignment each."""
    for arch_name, budget, median in (("qwen3-8b", 16384, 2048), ("qwen3-14b", 8192, 700)):
        arch = KNOWN_ARCHS[arch_name]
        config = LearnerConfig(tensor_parallel_size=tp, sequence_parallel=tp > 1, precision="fp8", fp8_recipe=recipe,
                               micro_batch_tokens=budget, pack_sequences=packed)
        align = config.token_alignment
        shapes = gemm_shapes(hidden_size=arch.hidden_size, q_dim=arch.num_attention_heads * arch.head_dim,
                             ffn_hidden_size=arch.ffn_hidden_size, tp=tp)
        batch = random_batch(_rl_lengths(128, 5120, median, seed=tp), 1000)
        for dp_rank in range(2):
            micro = rank_micro_batches(batch, dp_rank=dp_rank, dp_size=2, max_tokens=budget, alignment=align,
                                       packed=packed)
            check_input_shapes([m.input_shape for m in micro], shapes, recipe, tp=tp, sequence_parallel=tp > 1)
            for m in micro:
                rows, tokens = m.input_shape
                assert rows * tokens <= budget and tokens % align.pack == 0
                if packed:
                    unpadded = sum(-(-int(n) // align.sequence) * align.sequence for n in m.seq_lens)
                    assert tokens - unpadded < align.pack


def test_sequence_only_padding_is_what_te_refused():
    """The defect: sequences padded to lcm(8, 16, TP) (the old rule) leave packs whose per-rank
    share TE refuses at TP 4 with sequence parallel; the pack alignment fixes exactly those."""
    arch = KNOWN_ARCHS["qwen3-8b"]
    shapes = gemm_shapes(hidden_size=arch.hidden_size, q_dim=arch.num_attention_heads * arch.head_dim,
                         ffn_hidden_size=arch.ffn_hidden_size, tp=4)
    batch = random_batch(_rl_lengths(256, 5120, 2048, seed=4), 1000)
    old = make_micro_batches(batch, list(range(256)), max_tokens=16384, multiple=math.lcm(8, 16, 4), packed=True)
    refused = [m for m in old if pack_fp8_problems(m.packed.num_tokens, shapes, "tensorwise", tp=4,
                                                   sequence_parallel=True)]
    assert len(refused) >= len(old) // 4
    new = make_micro_batches(batch, list(range(256)), max_tokens=16384, multiple=8, pack_multiple=64, packed=True)
    assert not [m for m in new if pack_fp8_problems(m.packed.num_tokens, shapes, "tensorwise", tp=4,
                                                    sequence_parallel=True)]


def test_pack_padding_follows_the_last_sequence_and_changes_no_loss_row():
    batch = random_batch([37, 5, 21, 12], 50, prompt_tokens=2)
    plain = make_micro_batches(batch, [0, 1, 2, 3], max_tokens=200, multiple=4, packed=True)
    grown = make_micro_batches(batch, [0, 1, 2, 3], max_tokens=200, multiple=4, pack_multiple=64, packed=True)
    assert len(plain) == len(grown) == 1
    a, b = plain[0], grown[0]
    assert b.packed.num_tokens == 128 and a.packed.num_tokens == 84
    assert torch.equal(b.packed.tokens[0, :84], a.packed.tokens[0]) and not b.packed.tokens[0, 84:].any()
    assert torch.equal(b.packed.cu_seqlens[:-1], a.packed.cu_seqlens[:-1]) and int(b.packed.cu_seqlens[-1]) == 128
    last = int(a.packed.cu_seqlens[-2])
    assert torch.equal(b.packed.position_ids[0, last:], torch.arange(128 - last))
    for name in ("tokens", "loss_mask", "advantages", "old_logprobs"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    # a budget that is not a multiple of the alignment is rounded down, never exceeded
    for m in make_micro_batches(batch, [0, 1, 2, 3], max_tokens=100, multiple=4, pack_multiple=32, packed=True):
        assert m.packed.num_tokens <= 96 and m.packed.num_tokens % 32 == 0


def test_check_input_shapes_names_the_layer_and_rule():
    shapes = gemm_shapes(hidden_size=4096, q_dim=4096, ffn_hidden_size=12288, tp=4)
    with pytest.raises(RuntimeError, match=r"linear_qkv / linear_fc1: FP8 GEMM input \[4, 1, 4096\].*divisible by 8"):
        check_input_shapes([(1, 16)], shapes, "tensorwise", tp=4, sequence_parallel=True)
    with pytest.raises(RuntimeError, match="blockwise quantizer needs both dimensions divisible by 128"):
        check_input_shapes([(1, 64 * 4)], shapes, "blockwise", tp=4, sequence_parallel=True)
    check_input_shapes([(1, 512)], shapes, "blockwise", tp=4, sequence_parallel=True)
