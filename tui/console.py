"""What every `neuronscope` command shares: the consoles, one-line errors, progress bars, status lines."""

from __future__ import annotations

import argparse
import errno
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import IO, Any, NoReturn, cast

from rich.console import Console
from rich.text import Text

from neuronscope.core.errors import STOP_SIGNALS, leave_closed_terminal, terminate

#: Exit statuses, the same for every command (README, "Commands"; `neuronscope --help`).
EXIT_DONE = 0
"""Everything asked was done."""
EXIT_ERROR = 2
"""A one-line error: bad input, or a failure of the disk, the store or a server, with what to do."""
EXIT_UNFINISHED = 3
"""A job did not finish every neuron (some failed, or --max-tokens stopped it); the same command resumes it."""
EXIT_INTERRUPTED = 130
"""Ctrl-C, SIGTERM or SIGHUP (`terminate_as_interrupt`): nothing half-written is marked complete, a collection's
state is saved first; the same command resumes or redoes it."""
#: What --help says of them.
EXIT_HELP = (f"exit status: {EXIT_DONE} all done; {EXIT_ERROR} an error, in one line (bad input, or a failure of the "
             f"disk, the store or a server, with what to do); {EXIT_UNFINISHED} a job left neurons unfinished (some "
             f"failed, or --max-tokens stopped it: the same command resumes it); {EXIT_INTERRUPTED} interrupted "
             "(Ctrl-C, SIGTERM or SIGHUP; the same command goes on)")
#: Largest --samples: each is an explainer call and a simulation per neuron.
MAX_SAMPLES = 64


class _Stream:
    """sys.stdout or sys.stderr, looked up at each write as Rich does (a live display or a test puts another in
    place), through which no write fails once the terminal has closed: a command that outlives its terminal
    (`disown`, SIGHUP ignored) gets EIO for every write there, and a status line stopped it mid-run (exit 1, the run
    lost). Then what it prints goes nowhere (core.errors.leave_closed_terminal)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def _target(self) -> Any:
        stream = getattr(sys, self._name)
        return getattr(stream, "rich_proxied_file", stream)  # a live display's proxy prints through this console

    def __getattr__(self, attr: str) -> Any:
        if attr == "rich_proxied_file":
            raise AttributeError(attr)
        return getattr(self._target(), attr)

    def write(self, text: str) -> int:
        self._unless_closed(lambda target: target.write(text))
        return len(text)

    def flush(self) -> None:
        self._unless_closed(lambda target: target.flush())

    def _unless_closed(self, action: Callable[[Any], object]) -> None:
        try:
            action(self._target())
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            leave_closed_terminal()


class OutputClosed(BrokenPipeError):
    """The reader of this process's output has gone (`| head`)."""


class _Output(Console):
    def on_broken_pipe(self) -> None:
        """A reader of the output that stopped reading (`neuronscope show … | head`): nothing more is printed, and
        the command ends with status 0 (cli.main catches the error; Rich's own exits with 1)."""
        self.quiet = True
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the exit's flush would fail again)
        raise OutputClosed


class _Errors(Console):
    def on_broken_pipe(self) -> None:
        """A reader of the errors and progress that has gone (`neuronscope collect … 2>&1 | tee log`, where Ctrl-C
        stops tee too): nothing more is printed there, and the command goes on to the status its work deserves (130
        for that Ctrl-C; Rich's own would exit with 1 at the first line that could not be written)."""
        self.quiet = True
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())


out = _Output(file=cast(IO[str], _Stream("stdout")), highlight=False)
err = _Errors(file=cast(IO[str], _Stream("stderr")), highlight=False, soft_wrap=True)  # one error = one line
#: This process's name before every line it prints, where a launcher runs several processes in one terminal and
#: another one shows the progress (`speak_as`); None where this process speaks for itself.
_rank: str | None = None


@contextmanager
def terminate_as_interrupt(last: bool = False) -> Iterator[None]:
    """SIGTERM and SIGHUP taken as Ctrl-C is while a command runs (SIGTERM: a scheduler preempting or cancelling a
    job or ending its time, `kill`, torchrun stopping its ranks; SIGHUP: the terminal closed, as when an SSH
    connection drops): they raise Terminated where they land, so a job commits what landed and is marked
    interrupted, a collection saves its state, and the command exits 130 rather than dying on the spot. A signal the
    process ignores (`nohup` ignores SIGHUP), or handles itself, stays so; off the main thread nothing changes.
    `last`: the command is the process's, which only ends after it: the signals are ignored from then on, as nothing
    is left to stop (a launcher's SIGTERM again, once another rank stopped, killed a rank that had saved its state
    while it printed so or shut down, and it exited 143, not 130)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    taken = [number for number in STOP_SIGNALS if signal.getsignal(number) == signal.SIG_DFL]
    for number in taken:
        signal.signal(number, terminate)
    try:
        yield
    finally:
        for number in taken:
            signal.signal(number, signal.SIG_IGN if last else signal.SIG_DFL)


def speak_as(label: str | None) -> None:
    """Several processes of one launch share this terminal (torchrun's ranks) and another one shows the progress:
    this one's status lines, progress bars and skipped files are left out, and its results, warnings and errors are
    printed with `label` before them (None: back to speaking for itself)."""
    global _rank
    _rank = label


def say(line: Text | str) -> None:
    """A line on stderr that every process prints (an error, a result), with this process's label where it has
    one (speak_as)."""
    err.print(Text(f"{_rank}: ") + line if _rank else line)


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (the problem and where the help is) instead of a usage block, and every
    argument that starts with a minus and a digit read as a value: `show -1/5` (the last layer), `--scale -1e3`
    (argparse before Python 3.13 took them for options)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"-\.?\d")  # (what Python 3.13's argparse has)

    def error(self, message: str) -> NoReturn:
        err.print(Text("error: ", style="bold red") + Text(f"{message} (see `{self.prog} --help`)"))
        sys.exit(2)


#: What the suffixes of numbers on the command line multiply by.
SUFFIXES = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9}


#: The largest number any option takes (a store's BIGINT): a larger one is an error naming the range.
MOST = 2**63 - 1


def number(least: int, most: int = MOST,
           otherwise: str = "is not a whole number (write 10000000 or 10M)") -> Callable[[str], int]:
    """An argparse type: a whole number from `least` to `most`, written plainly or with a k, M or G suffix (10M,
    2.5k); anything else is a one-line error naming the range (or, for what is no whole number, `otherwise`)."""

    def parse(text: str) -> int:
        found = re.fullmatch(r"(-?\d+(?:\.\d+)?)([kMG]?)", text.strip().replace("_", "").replace(",", ""))
        scaled = Decimal(found.group(1)) * SUFFIXES[found.group(2)] if found else Decimal("NaN")
        if not scaled.is_finite() or scaled != scaled.to_integral_value():
            raise argparse.ArgumentTypeError(f"{text!r} {otherwise}")
        value = int(scaled)
        if not least <= value <= most:
            allowed = f"from {least:,} to {most:,}" if most < MOST else f"at least {least:,} (and below 2^63)"
            raise argparse.ArgumentTypeError(f"{value:,} is out of range: it must be {allowed}")
        return value

    return parse


#: An argparse type: a run's id.
run_id = number(1, otherwise="is not a run id: write one of the numbers `neuronscope info` lists")


def real(least: float, most: float) -> Callable[[str], float]:
    """An argparse type: a finite number from `least` to `most` (nan and inf are refused, in one line)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number (write 4 or 0.5)") from None
        if not least <= value <= most:  # also false for nan
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be a number from {least:g} to {most:g}")
        return value

    return parse


def batch_size(text: str) -> int | None:
    """An argparse type: excerpts per forward pass, or `auto` (None: the collector sizes it from free memory)."""
    if text.strip().lower() == "auto":
        return None
    return number(1, 65_536, "is not a batch size: write a number of excerpts (64) or auto")(text)


def duration(text: str) -> float | None:
    """An argparse type: seconds from `90s`, `20m`, `1.5h` or a plain number of seconds; `off` is None."""
    if text.strip().lower() == "off":
        return None
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smh]?)", text.strip())
    if not found:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: write 90s, 20m, 1h or off")
    seconds = float(found.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[found.group(2)]
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is no interval: write one longer than 0 (90s, 20m, 1h), or off")
    return seconds


def interactive() -> bool:
    """Whether a person is at a terminal: stdin and stdout are TTYs and this is not CI (the app may open)."""
    return sys.stdin.isatty() and sys.stdout.isatty() and not os.environ.get("CI")


# -- progress ----------------------------------------------------------------------------------------

@contextmanager
def progress_bars() -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress display driven by core's progress(stage, done, total) callbacks. When stderr is not a
    terminal (a batch job's log, nohup), plain `label: done/total` lines are printed too, at most one per
    $NEURONSCOPE_PROGRESS_SECONDS (default 10) per stage, so a log shows how far a long job got. None from a process
    that another one speaks for (speak_as)."""
    if _rank:
        yield lambda _stage, _done, _total: None
        return
    import time

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskID,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    labels = {"collect": "collecting excerpts", "write": "writing layers", "merge": "merging layers",
              "tokenize": "tokenizing corpus (tokens)", "neurons": "explaining and scoring neurons",
              "planning": "counting calls", "import": "importing neurons", "export": "exporting neurons",
              "related": "related tokens and neurons (layers)", "resume": "resumed from a checkpoint (excerpts)",
              "checkpoint": "last checkpoint (excerpts)", "shards": "the other tasks' shards written",
              "stop": "saving, then stopping (Ctrl-C: now)",
              "compile": "compiling the CPU passes (once per machine, about a minute)"}
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    tasks: dict[str, TaskID] = {}
    plain = not err.is_terminal
    every = float(os.environ.get("NEURONSCOPE_PROGRESS_SECONDS", "10"))
    last: dict[str, float] = {}
    bar = Progress(*columns, console=err, transient=False, disable=not err.is_terminal and bool(os.environ.get("CI")))

    def update(stage: str, done: int, total: int) -> None:
        if not tasks:
            bar.start()  # lazily: a command that fails before any progress prints nothing extra
        if stage not in tasks:
            tasks[stage] = bar.add_task(labels.get(stage, stage), total=total or None, rate="")
        task = tasks[stage]
        bar.update(task, completed=done, total=total or None)  # total 0: unknown, the bar pulses
        speed = bar.tasks[int(task)].speed  # tasks are never removed: ids are list positions
        if speed:
            bar.update(task, rate=f"{speed:,.1f}/s")
        now = time.monotonic()
        if plain and (now - last.get(stage, -1e9) >= every or (total and done >= total)):
            last[stage] = now
            label = labels.get(stage, stage)
            err.print(f"{label}: {done:,}/{total:,}" if total else f"{label}: {done:,}" if done else label)

    try:
        yield update
    finally:
        if tasks:
            bar.stop()


class Skipped:
    """Reports inputs left out (corpus files that are not text, release files that cannot be read): the first
    `shown` as one line each with the reason, then a count of the rest, so a large folder cannot flood the
    terminal and nothing is dropped silently."""

    def __init__(self, shown: int = 20) -> None:
        self.shown = shown
        self.count = 0
        self.replaced_bytes = self.replaced_files = 0

    def __call__(self, path: object, reason: str) -> None:
        from neuronscope.tui.render import visible

        self.count += 1
        if self.count <= self.shown and not _rank:
            err.print(Text("skipped ", style="yellow") + Text(f"{visible(str(path))}: {visible(reason)}"))

    def replaced(self, _path: object, count: int) -> None:
        """A corpus file read with `count` invalid UTF-8 bytes replaced (counted for `finish`)."""
        self.replaced_bytes += count
        self.replaced_files += 1

    def finish(self) -> None:
        """The count of those not shown, and of the invalid bytes replaced."""
        if _rank:
            return
        if self.count > self.shown:
            err.print(Text(f"... and {self.count - self.shown:,} more files skipped", style="yellow"))
        if self.replaced_bytes:
            files = f"{self.replaced_files:,} file{'s' if self.replaced_files > 1 else ''}"
            err.print(Text(f"replaced {self.replaced_bytes:,} invalid UTF-8 byte{'s' if self.replaced_bytes > 1 else ''}"
                           f" with U+FFFD in {files} (--strict-utf8 refuses such files)", style="yellow"))


def plain_lines(lines: Iterable[str]) -> None:
    """Lines on stdout as they are, for scripts (Rich would turn tabs into spaces), inert text only: a reader that
    stops reading ends the command as `out` does."""
    try:
        for line in lines:
            out.file.write(line + "\n")
        out.file.flush()
    except BrokenPipeError:
        out.on_broken_pipe()


def status(message: str) -> None:
    """A dim one-line status message on stderr (none from a process that another one speaks for: speak_as)."""
    if not _rank:
        err.print(Text(message, style="dim"))


def summary(message: str) -> None:
    """A dim one-line status message that every process of a launch prints: what it did."""
    say(Text(message, style="dim"))


def warning(message: str) -> None:
    """A yellow one-line warning on stderr, control characters shown escaped (it may quote a path)."""
    from neuronscope.tui.render import visible

    say(Text(visible(message), style="yellow"))
