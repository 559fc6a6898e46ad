"""Block until every SGLang server answers GET /health with 200, or fail with the laggards.

    python -m megatron_s2lpo.launch.wait_healthy --timeout-s 1800 http://node1:30000 http://node2:30001

The trainer script of a cluster launch runs this before the trainer, so the trainer never
starts against a server that is still loading weights. Standard library only: it runs before
anything heavy is imported.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable


# The servers are the job's own nodes: never reach them through an http_proxy the job inherited
# from the login environment (urllib follows $http_proxy unless $no_proxy names the host).
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def probe_health(url: str, timeout_s: float = 5.0) -> tuple[bool, str]:
    """(healthy, what was seen) for one GET `url`/health, never through a proxy."""
    try:
        with _DIRECT.open(url.rstrip("/") + "/health", timeout=timeout_s) as answer:
            return answer.status == 200, f"HTTP {answer.status}"
    except urllib.error.HTTPError as err:
        return False, f"HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:  # refused, DNS, timeout
        return False, str(getattr(err, "reason", err))


def wait_all_healthy(urls: list[str], *, timeout_s: float, poll_s: float = 2.0,
                     probe: Callable[[str], tuple[bool, str]] = probe_health,
                     log: Callable[[str], None] = print) -> float:
    """Poll every URL until all are healthy; returns the seconds waited.

    Raises TimeoutError naming each server that never answered and its last answer.
    """
    if not urls:
        raise ValueError("wait_healthy needs at least one server URL (http://host:port)")
    bad = [u for u in urls if not u.startswith(("http://", "https://"))]
    if bad:
        raise ValueError(f"server URL {bad[0]!r} must start with http:// or https:// (e.g. http://node1:30000)")
    start = time.monotonic()
    pending = {url: "not probed yet" for url in urls}
    while True:
        for url in list(pending):
            ok, seen = probe(url)
            if ok:
                del pending[url]
                log(f"wait_healthy: {url} is healthy after {time.monotonic() - start:.0f} s")
            else:
                pending[url] = seen
        if not pending:
            return time.monotonic() - start
        if time.monotonic() - start >= timeout_s:
            lines = "\n".join(f"  {url}/health: last answer: {seen}" for url, seen in pending.items())
            raise TimeoutError(
                f"{len(pending)} of {len(urls)} SGLang server(s) were not healthy within {timeout_s:g} s:\n"
                f"{lines}\nCheck the servers' logs (log-*.out next to the sbatch script, docs/cluster.md); "
                "a large model on slow storage may need a longer --timeout-s")
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("urls", nargs="+", help="server base URLs, e.g. http://node1:30000")
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    parser.add_argument("--poll-s", type=float, default=2.0)
    args = parser.parse_args(argv)
    try:
        wait_all_healthy(args.urls, timeout_s=args.timeout_s, poll_s=args.poll_s)
    except (TimeoutError, ValueError) as err:
        print(f"wait_healthy: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
