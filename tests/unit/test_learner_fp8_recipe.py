"""The FP8 recipe for RL: blockwise by default, e4m3, fp32 scales set before Transformer Engine reads them.

TE's recipe module (`transformer_engine/common/recipe/__init__.py` of the 2.9.0 wheel) is pure
Python and loads here on its own, so the scale setting is checked against TE's own class, each
case in a fresh interpreter (TE reads the variable once, at import).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from megatron_s2lpo.config.learner import LearnerConfig
from megatron_s2lpo.learner.fp8_rules import TE_VERSION_READ

REPO = Path(__file__).resolve().parents[2]


def test_rl_default_is_blockwise_e4m3_with_fp32_scales():
    config = LearnerConfig(precision="fp8")
    assert (config.fp8_recipe, config.fp8_format, config.fp8_fp32_scales) == ("blockwise", "e4m3", True)


def _run_with_te_recipe(body: str) -> subprocess.CompletedProcess:
    from wheel_sources import wheel_sources

    recipe = wheel_sources("transformer-engine", TE_VERSION_READ, "transformer_engine/") / \
        "transformer_engine" / "common" / "recipe" / "__init__.py"
    prelude = f"""
        import importlib.util, sys

        def import_te_recipe():  # TE's own module, registered under its own name
            spec = importlib.util.spec_from_file_location("transformer_engine.common.recipe", {str(recipe)!r})
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            return module

        from megatron_s2lpo.learner.model import apply_fp8_scale_environment
    """
    env = {k: v for k, v in os.environ.items() if k != "NVTE_FP8_BLOCK_SCALING_FP32_SCALES"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(prelude) + textwrap.dedent(body)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=240)


def test_fp32_scales_reach_transformer_engines_blockwise_recipe():
    out = _run_with_te_recipe("""
        import os
        apply_fp8_scale_environment(True)  # before TE: sets the variable TE reads
        recipe = import_te_recipe().Float8BlockScaling()
        print(os.environ["NVTE_FP8_BLOCK_SCALING_FP32_SCALES"], recipe.use_f32_scales,
              recipe.fp8_quant_fwd_inp.power_2_scale, recipe.fp8_format.name)
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "True", "False", "E4M3"]


def test_te_imported_first_with_power_of_2_scales_is_refused():
    out = _run_with_te_recipe("""
        te = import_te_recipe()
        assert te.Float8BlockScaling().fp8_quant_fwd_inp.power_2_scale  # TE's default without the variable
        apply_fp8_scale_environment(False)  # agrees: fine
        try:
            apply_fp8_scale_environment(True)
        except ValueError as err:
            print(err)
    """)
    assert out.returncode == 0, out.stderr
    assert "learner.fp8_fp32_scales=true but Transformer Engine was imported before the learner" in out.stdout
    assert "export NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1" in out.stdout
