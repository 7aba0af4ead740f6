"""`neuronscope collect` in a subprocess whose stderr a test reads as it comes (tests of stop requests and of
collections that share their store)."""

from __future__ import annotations

import queue
import signal
import subprocess
import threading
import time
from pathlib import Path

from conftest import cli_command, cli_env

ROOT = Path(__file__).resolve().parent.parent


class Collector:
    """`neuronscope collect` in a subprocess, with its stderr read line by line in a thread."""

    def __init__(self, args: list[object], **env: str) -> None:
        # Ctrl-C at its default, as in a terminal: a test run launched in the background by a script (`cmd &`
        # without job control) passes on SIGINT ignored, and a process started so rightly keeps ignoring it.
        self.proc = subprocess.Popen(cli_command(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=cli_env(**env), cwd=ROOT,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)

    def wait_for(self, needle: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                assert self.proc.poll() is None, f"collect ended early: {''.join(self.seen)}"
                continue
            self.seen.append(line)
            if needle in line:
                return
        raise AssertionError(f"no {needle!r} on stderr after {timeout} s: {''.join(self.seen)}")

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        # stderr has exactly one reader (the thread), so its lines keep their order.
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=timeout)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return self.proc.returncode, out, "".join(self.seen)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
