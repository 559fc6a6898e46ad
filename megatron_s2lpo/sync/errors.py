"""Errors of the weight sync: the engine did not take the new version, or its log-probs disagree."""

from __future__ import annotations

from typing import Any


class WeightVersionError(RuntimeError):
    """After a push the engine does not report the version that was pushed."""


class WeightParityError(RuntimeError):
    """The engine's log-probs of its own samples differ from the learner's beyond the threshold.

    `report` (a `parity.ParityReport`) holds the figures; it is None when the error was rebuilt
    on another rank from its message alone.
    """

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report
