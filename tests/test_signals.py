"""The one signal-handling helper: installed for the block, restored after it, off the main thread inert."""

import os
import signal
import threading

from ipu_app import signals


def test_the_handler_runs_for_the_block_and_the_old_one_comes_back():
    before = signal.getsignal(signal.SIGTERM)
    seen = []
    with signals.handling(lambda signum, frame: seen.append(signum)) as installed:
        assert installed
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
    assert seen == [signal.SIGTERM, signal.SIGINT]
    assert signal.getsignal(signal.SIGTERM) is before


def test_it_restores_the_handlers_when_the_block_raises():
    before = signal.getsignal(signal.SIGINT)
    try:
        with signals.handling(lambda signum, frame: None, (signal.SIGINT,)):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert signal.getsignal(signal.SIGINT) is before


def test_off_the_main_thread_the_signals_are_left_alone():
    before = signal.getsignal(signal.SIGTERM)
    result = {}

    def body():
        with signals.handling(lambda signum, frame: None) as installed:
            result["installed"] = installed
            result["inside"] = signal.getsignal(signal.SIGTERM)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert result == {"installed": False, "inside": before}
