"""Stop requests during a collection's pass. Ctrl-C (SIGINT), SIGTERM (a scheduler preempting the job, `scancel`,
the end of a job's time, torchrun stopping its ranks) and SIGHUP (the terminal closed) are taken at the end of the
batch in progress rather than wherever they land, so that the pass can save its state as a checkpoint before it
stops: a batch folded into some layers and not others is no state to save. A second Ctrl-C stops at once, as a
plain interrupt, unless it comes within REPEATED seconds of the first: then it is the same request passed on (a
terminal's Ctrl-C reaches torchrun and its ranks alike, and torchrun passes it on). A second SIGTERM or SIGHUP never
cuts the save short: no person is asking again. Launchers send them to the other ranks once one rank stops (torchrun,
`srun --kill-on-bad-exit`), and a shell passes its own hangup on; a sender that insists sends SIGKILL, which the
atomically written checkpoints survive."""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType, TracebackType
from typing import Any

from neuronscope.core.errors import STOP_SIGNALS, Interrupted, Terminated

#: Seconds within which a second stop request is the first passed on by a launcher, not a person asking again.
REPEATED = 0.5


class Stopped(Interrupted):
    """A collection stopped at a batch's end, on a stop request; its message says where its state was saved."""


class StopRequests:
    """While entered (in the main thread: elsewhere signals cannot be caught, and nothing changes), SIGINT, SIGTERM
    and SIGHUP (those the process does not ignore) set `signal` instead of stopping the process; a later Ctrl-C,
    REPEATED seconds after the first request or more, raises KeyboardInterrupt where it lands; a later SIGTERM or
    SIGHUP is only noted. The previous handlers come back on exit."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._first = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, *STOP_SIGNALS):
                if signal.getsignal(number) is not signal.SIG_IGN:  # one this process ignores (`cmd &` in a script)
                    self._previous[number] = signal.signal(number, self._request)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)  # None: not set from Python
        self._previous.clear()

    def _request(self, number: int, _frame: FrameType | None) -> None:
        now = time.monotonic()
        if number in STOP_SIGNALS:
            Terminated.note(number)  # (what the run records)
        if self.signal is None:
            self.signal, self._first = number, now
        elif number == signal.SIGINT and now - self._first >= REPEATED:  # a person asking again: at once
            raise KeyboardInterrupt
