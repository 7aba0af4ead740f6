"""A command in a terminal of its own, closed under it as a dropped SSH connection closes one (no tmux needed)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import subprocess
import termios
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from conftest import cli_command, cli_env


class Terminal:
    """`neuronscope ARGS` in a terminal of its own: a pty that is its controlling terminal, as an SSH session's is,
    its output read as it comes. `hang_up` closes the terminal as a dropped connection does: the kernel sends the
    command SIGHUP, and from then on every write to the terminal fails."""

    def __init__(self, args: Sequence[str], ignore_hangup: bool = False, **env: str) -> None:
        master, slave = pty.openpty()

        def controlled() -> None:  # in the child: the pty is its terminal (and SIGHUP ignored, as `disown` leaves it)
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            if ignore_hangup:
                signal.signal(signal.SIGHUP, signal.SIG_IGN)

        self.proc = subprocess.Popen(
            cli_command(args), stdin=slave, stdout=slave, stderr=slave, cwd=Path(__file__).resolve().parent.parent,
            env=cli_env(TERM="xterm-256color", **env), start_new_session=True, preexec_fn=controlled)  # noqa: PLW1509
        os.close(slave)
        self._master: int | None = master
        self.seen = ""

    def wait_for(self, pattern: str, accept: Callable[[re.Match[str]], bool], timeout: float = 120) -> None:
        """Read the output until `pattern` matches a part of it that `accept` takes."""
        assert self._master is not None, "the terminal is closed"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([self._master], [], [], 0.1)[0]:
                try:
                    self.seen += os.read(self._master, 65536).decode(errors="replace")
                except OSError:  # every process closed the terminal: the command ended
                    raise AssertionError(f"the command ended before {pattern!r} showed: {self.seen[-2000:]!r}"
                                         ) from None
                if any(accept(found) for found in re.finditer(pattern, self.seen)):
                    return
        raise AssertionError(f"{pattern!r} not seen in {timeout} s; the terminal showed: {self.seen[-2000:]!r}")

    def hang_up(self) -> None:
        if self._master is not None:
            os.close(self._master)
            self._master = None

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *_: object) -> None:
        self.hang_up()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
