"""Timing helper shared by the benchmarks (imported with `benchmarks/` on sys.path)."""

import statistics
import time


def median_seconds(fn, repeats: int, warmup: int = 3) -> float:
    """Median wall time of `repeats` calls of fn(), after `warmup` untimed calls (which pay for
    thread-pool start, allocator growth and first-call imports)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
