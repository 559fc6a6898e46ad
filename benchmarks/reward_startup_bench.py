"""First-call start-up of `math_reward` from a plain script, here and in another checkout.

Run:
    .venv/bin/python benchmarks/reward_startup_bench.py                       # this checkout only
    git worktree add /tmp/baseline origin/main
    .venv/bin/python benchmarks/reward_startup_bench.py --baseline /tmp/baseline --repeats 5

Each measurement is a fresh `python script.py`; the script times from its first line to the first
reward `math_reward` returns (its workers' start-up included), and prints the reward. Scripts:

  plain          `from ... import math_reward; print(math_reward(...))`, no main guard
  guarded        the same under `if __name__ == "__main__":`
  torch-caller   guarded, but the script imports torch and transformers first, as the trainer
                 does: a worker that re-imports the caller's main module pays for those again

Prints the median seconds per (checkout, script), the baseline/this ratio for each script both
can run, and "fails" where a checkout cannot run a script (the reward is not printed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CALL = r'print("REWARD", math_reward(r"so $x = \boxed{\dfrac{1}{2}}$", "0.5"), time.perf_counter() - START)'
SCRIPTS = {
    "plain": "import time\nSTART = time.perf_counter()\nfrom megatron_s2lpo.reward.math import math_reward\n"
             f"{CALL}\n",
    "guarded": "import time\nSTART = time.perf_counter()\nfrom megatron_s2lpo.reward.math import math_reward\n"
               f"if __name__ == '__main__':\n    {CALL}\n",
    "torch-caller": "import time\nSTART = time.perf_counter()\nimport torch, transformers\n"
                    "from megatron_s2lpo.reward.math import math_reward\n"
                    f"if __name__ == '__main__':\n    {CALL}\n",
}


def first_call_seconds(checkout: Path, script: Path) -> float | None:
    """Seconds to the first reward in a fresh interpreter, importing megatron_s2lpo from `checkout`."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env,
                         cwd=script.parent)
    line = next((x for x in run.stdout.splitlines() if x.startswith("REWARD ")), None)
    if run.returncode != 0 or line is None or line.split()[1] != "1.0":
        return None
    return float(line.split()[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another checkout of the project to measure alongside")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    checkouts = {"this": REPO, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    results: dict[tuple[str, str], list[float | None]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, text in SCRIPTS.items():
            paths[name] = Path(tmp) / f"{name.replace('-', '_')}.py"
            paths[name].write_text(text)
        for _ in range(args.repeats):  # interleaved, so both checkouts see the same machine load
            for checkout_name, checkout in checkouts.items():
                for script_name, path in paths.items():
                    results.setdefault((checkout_name, script_name), []).append(first_call_seconds(checkout, path))

    def median(key: tuple[str, str]) -> float | None:
        values = results[key]
        return None if any(v is None for v in values) else statistics.median(values)

    print(f"first math_reward call, seconds from the script's first line (median of {args.repeats} fresh runs)")
    print(f"{'script':<14}" + "".join(f"{name:>12}" for name in checkouts) + ("   baseline/this" if args.baseline else ""))
    for script_name in SCRIPTS:
        cells = [median((c, script_name)) for c in checkouts]
        row = f"{script_name:<14}" + "".join(f"{'fails' if v is None else f'{v:.2f}':>12}" for v in cells)
        if args.baseline and None not in cells:
            row += f"   {cells[1] / cells[0]:.2f}x"
        print(row)


if __name__ == "__main__":
    main()
