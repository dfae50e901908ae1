"""interrupt.StopRequest: a signal becomes a flag, a second one stops at once, the old handlers come back."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from neuronscope.errors import NeuronscopeError
from neuronscope.interrupt import Interrupted, StopRequest, signal_name


def _send(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.05)            # the handler runs between bytecodes of the main thread


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_sets_the_flag_and_the_old_handler_comes_back(sig, code, capsys):
    old = signal.getsignal(sig)
    with StopRequest("the test") as stop:
        assert not stop
        _send(sig)
        assert stop and stop.signum == sig
        exc = stop.interrupted("saved; run again")
        with pytest.raises(KeyboardInterrupt):       # a second signal stops at once
            _send(sig)
    assert signal.getsignal(sig) is old
    assert isinstance(exc, Interrupted) and isinstance(exc, NeuronscopeError) and exc.exit_code == code
    assert "the test stops after the current step" in capsys.readouterr().err
    assert signal_name(signal.SIGINT) == "SIGINT (Ctrl-C)"


def test_outside_the_main_thread_it_is_a_flag_that_is_never_set():
    seen = []

    def body():
        with StopRequest() as stop:
            seen.append(bool(stop))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == [False]
