"""The math-verify scoring process that `MathScorer` starts (one per worker slot and spare).

    python -m megatron_s2lpo.reward.math_worker --parent-pid PID    # frames on stdin / stdout

A fresh interpreter that imports math-verify and this package's reward code only; see
`_worker.serve` for the protocol. Not meant to be started by hand.
"""

from megatron_s2lpo.reward._worker import serve
from megatron_s2lpo.reward.math import score_math_in_process

if __name__ == "__main__":
    serve(score_math_in_process)
