"""Suite-wide hooks.

`make test` runs test files in parallel workers with `--dist loadfile` (one file stays on one
worker, so its module fixtures are built once). The real-SGLang tier (tests/real_sglang/) launches
its servers once per worker that runs it (about 2.1 GB each); its files are therefore scheduled
as ONE unit, on one worker, first (it is the longest).
"""

from __future__ import annotations

REAL_SGLANG_TIER = "tests/real_sglang/"


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadFileScheduling

    class TierScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.startswith(REAL_SGLANG_TIER):
                return REAL_SGLANG_TIER
            return super()._split_scope(nodeid)

        def _assign_work_unit(self, node) -> None:
            if REAL_SGLANG_TIER in self.workqueue:  # the workers take scopes from the front
                self.workqueue.move_to_end(REAL_SGLANG_TIER, last=False)
            super()._assign_work_unit(node)

    if config.getoption("dist") != "loadfile":
        return None
    return TierScheduling(config, log)
