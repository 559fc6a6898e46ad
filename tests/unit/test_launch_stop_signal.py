"""The trainer's stop request (megatron_s2lpo/stop_signal.py): what a launcher's signal does.

The trainer itself stopping on SIGUSR1 mid-step and resuming exactly is
tests/integration/test_train.py::test_resume_after_sigusr1_and_after_sigkill_is_exact.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest

from megatron_s2lpo.trainer.stop_signal import (CONTINUE_EXIT_CODE, STOP_MARKER_ENV, RunStopped, received_signal,
                                        stop_on_signal, stop_requested)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_stop_signal_is_recorded_not_fatal_and_the_handlers_are_restored(sig, capfd):
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    with stop_on_signal():
        assert not stop_requested()
        with stop_on_signal():  # nested (a staged run's stages): one request for all
            os.kill(os.getpid(), sig)
        assert stop_requested() and received_signal() == sig
        os.kill(os.getpid(), signal.SIGUSR1)  # a second signal changes nothing
        assert received_signal() == sig
    assert {s: signal.getsignal(s) for s in before} == before
    assert f"{signal.Signals(sig).name}: finishing the current step" in capfd.readouterr().err
    with stop_on_signal():  # a new run starts without the old request
        assert not stop_requested()


def test_outside_the_main_thread_nothing_is_installed():
    seen = []

    def run():
        with stop_on_signal():
            seen.append(signal.getsignal(signal.SIGUSR1))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [signal.getsignal(signal.SIGUSR1)]


def test_exit_code_is_continue_or_the_marker_under_a_launcher(tmp_path, monkeypatch):
    stopped = RunStopped(7, signal.SIGUSR1)
    assert "after step 7" in str(stopped) and "--resume" in str(stopped)
    monkeypatch.delenv(STOP_MARKER_ENV, raising=False)
    assert stopped.exit_code() == CONTINUE_EXIT_CODE == 75
    marker = tmp_path / "stopped"
    monkeypatch.setenv(STOP_MARKER_ENV, str(marker))
    assert stopped.exit_code() == 0 and marker.read_text() == "7\n"
