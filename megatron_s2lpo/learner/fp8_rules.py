"""Transformer Engine's shape rules for FP8 GEMM inputs, reproduced so packs are checked before TE sees them.

Read in transformer-engine 2.9.0 (the release in the image's version set, Dockerfile and
docs/cluster.md), `transformer_engine/pytorch/`:

  utils.py:438-446   assert_dim_for_fp8_exec: every FP8 GEMM input needs prod(shape[:-1]) % 8 == 0
                     and shape[-1] % 16 == 0. Called on the input of every FP8 Linear
                     (module/linear.py:168), LayerNormLinear (module/layernorm_linear.py:150) and
                     LayerNormMLP (module/layernorm_mlp.py:222) with `inputmat`, the LOCAL input:
                     with sequence parallel, a column-parallel layer's T / TP rows, before its
                     all-gather.
  utils.py:449-456   assert_dim_for_all_gather: when that input is all-gathered (column parallel +
                     sequence parallel: module/linear.py:136-138, layernorm_linear.py:140,
                     layernorm_mlp.py:223), quantizer.is_quantizable(local input) must hold:
                       tensor/quantized_tensor.py:308-310  current scaling (tensorwise): always
                       tensor/float8_blockwise_tensor.py:203-211  blockwise: prod(shape[:-1]) and
                                    shape[-1] divisible by block_len (128)
                       tensor/mxfp8_tensor.py:78-86   mxfp8: both divisible by 32 (constants.py:91)
                       tensor/nvfp4_tensor.py:180-188 nvfp4: both divisible by 16 (constants.py:93)
                     (distributed.py:1103-1118 _all_gather_fp8_blockwise, the backward's gather,
                     silently gathers a non-quantizable blockwise input in BF16 instead.)

Row-parallel layers (linear_proj, linear_fc2) see the full sequence T (their output is
reduce-scattered), column-parallel ones (linear_qkv, linear_fc1, fused with their norm) T / TP
with sequence parallel; context parallelism divides both by CP. The output layer runs in bf16.

Pure Python (no torch): the learner checks its micro-batches with it; the unit tests compare it with TE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TE_VERSION_READ = "2.9.0"
FP8_EXEC_ROWS, FP8_EXEC_COLS = 8, 16  # utils.py:442
QUANTIZABLE_BLOCK = {"tensorwise": 1, "blockwise": 128, "mxfp8": 32, "nvfp4": 16}  # is_quantizable's divisor


def fp8_input_problem(shape: tuple[int, ...], recipe: str, *, all_gathered: bool) -> str | None:
    """Why TE would refuse this FP8 GEMM input (the assertions above), or None."""
    rows, cols = math.prod(shape[:-1]), shape[-1]
    if rows % FP8_EXEC_ROWS or cols % FP8_EXEC_COLS:
        return (f"FP8 GEMM input {list(shape)}: TE needs the product of all dimensions but the last divisible by "
                f"{FP8_EXEC_ROWS} and the last by {FP8_EXEC_COLS} (assert_dim_for_fp8_exec)")
    block = QUANTIZABLE_BLOCK[recipe]
    if all_gathered and (rows % block or cols % block):
        return (f"FP8 GEMM input {list(shape)} is all-gathered (sequence parallel): TE's {recipe} quantizer needs "
                f"both dimensions divisible by {block} (assert_dim_for_all_gather / is_quantizable)")
    return None


@dataclass(frozen=True, kw_only=True, slots=True)
class GemmShapes:
    """Input widths of one transformer layer's FP8 GEMMs on one TP rank."""

    hidden: int  # linear_qkv and linear_fc1 inputs (column parallel)
    attention_out: int  # linear_proj input: num_heads * head_dim / TP (row parallel)
    ffn_out: int  # linear_fc2 input: ffn_hidden / TP (row parallel)


def gemm_shapes(*, hidden_size: int, q_dim: int, ffn_hidden_size: int, tp: int) -> GemmShapes:
    return GemmShapes(hidden=hidden_size, attention_out=q_dim // tp, ffn_out=ffn_hidden_size // tp)


def pack_fp8_problems(num_tokens: int, shapes: GemmShapes, recipe: str, *, tp: int, sequence_parallel: bool,
                      cp: int = 1, batch: int = 1) -> list[str]:
    """Every TE refusal a micro-batch of `num_tokens` tokens per row (`batch` rows: 1 for a pack)
    would meet in one layer's FP8 GEMMs on one rank. Empty when TE accepts all of them."""
    if num_tokens % cp:
        return [f"{num_tokens} tokens do not split over CP={cp} ranks"]
    local = num_tokens // cp
    problems = []
    if sequence_parallel:
        if local % tp:
            return [f"{local} tokens do not split over TP={tp} sequence-parallel ranks"]
        column_rows = local // tp
    else:
        column_rows = local
    for name, shape, gathered in (
            ("linear_qkv / linear_fc1", (column_rows, batch, shapes.hidden), sequence_parallel and tp > 1),
            ("linear_proj", (local, batch, shapes.attention_out), False),
            ("linear_fc2", (local, batch, shapes.ffn_out), False)):
        problem = fp8_input_problem(shape, recipe, all_gathered=gathered)
        if problem:
            problems.append(f"{name}: {problem}")
    return problems


def check_input_shapes(input_shapes: list[tuple[int, int]], shapes: GemmShapes, recipe: str, *, tp: int,
                       sequence_parallel: bool, cp: int = 1) -> None:
    """Raise before the forward if any micro-batch (model input (rows, tokens)) breaks TE's FP8
    rules; the learner's padding (config.learner.token_alignment) is meant to rule that out."""
    for rows, tokens in input_shapes:
        problems = pack_fp8_problems(tokens, shapes, recipe, tp=tp, sequence_parallel=sequence_parallel, cp=cp,
                                     batch=rows)
        if problems:
            raise RuntimeError(f"a ({rows}, {tokens}) micro-batch would fail in Transformer Engine (fp8_recipe="
                               f"{recipe}, TP={tp}, sequence_parallel={sequence_parallel}, CP={cp}): "
                               + "; ".join(problems))
