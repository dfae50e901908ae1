"""Graceful stops for long loops: SIGINT (Ctrl-C) and SIGTERM become a "stop after this step" flag.

    with StopRequest() as stop:
        for batch in batches:
            work(batch)
            if stop:                         # a signal came during this batch
                save_checkpoint()
                raise Interrupted("stats", "run the same command again to resume")

Inside the block the first SIGINT or SIGTERM only sets the flag (and prints one line on stderr saying the loop
stops after the current step); a second one raises KeyboardInterrupt at once, as usual, for a loop that hangs.
On leaving the block the previous handlers are restored. Outside the main thread (where Python cannot install
signal handlers) the block is a flag that is never set. `Interrupted` is a NeuronscopeError subclass, so the CLI
prints its sentence; its exit status is 130 (128 + SIGINT) or 143 (SIGTERM), the shell's convention.
"""
from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Any

from .errors import NeuronscopeError

SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)


def signal_name(signum: int | None) -> str:
    """'SIGINT (Ctrl-C)', 'SIGTERM', ... for a signal number."""
    if signum is None:
        return "a signal"
    name = signal.Signals(signum).name
    return f"{name} (Ctrl-C)" if signum == signal.SIGINT else name


class Interrupted(NeuronscopeError):
    """A loop stopped by a signal after saving its work; the message says how to continue."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + int(signum)


class StopRequest:
    """Context manager: while active, SIGINT/SIGTERM set `self.requested` (truthy) instead of killing the process.

    what: a short description for the message printed when the signal arrives ("stats", "training").
    quiet: print nothing when the signal arrives. note: the line to print instead of the default one.
    """

    def __init__(self, what: str = "the run", quiet: bool = False, note: str | None = None):
        self.what = what
        self.quiet = quiet
        self.note = note
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __bool__(self) -> bool:
        return self.requested

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:         # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        if not self.quiet:
            name = signal.Signals(signum).name
            line = self.note or (f"{self.what} stops after the current step and saves its work (send it again to "
                                 "stop at once).")
            print(f"\n{name}: {line}", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def interrupted(self, message: str) -> Interrupted:
        """The exception to raise after saving: `message` plus the signal's exit status."""
        return Interrupted(message, self.signum or signal.SIGINT)
