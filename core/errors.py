"""One error family. Every problem a user can fix, or must be told about, is a `NeuronscopeError`: the CLI
and the app catch the base class and show its message as one line (exit status 2), so a new error class
needs no registration anywhere. Each stage keeps its own subclass beside its code (CorpusError,
StoreError, LLMError, ...); the ones no stage owns are here."""

from __future__ import annotations

import errno
import os
import signal


class NeuronscopeError(Exception):
    """A problem stated in one line that names what happened and what to do."""


class InputError(NeuronscopeError):
    """Bad input from the user: an option, a neuron address, a layer range, a file argument."""


class NeuronError(NeuronscopeError):
    """One neuron cannot be explained or scored for a reason that is not an LLM failure (too few records, no
    stored explanation): recorded against the neuron, the job goes on."""


class Interrupted(KeyboardInterrupt):
    """An interrupt whose message says what was kept and how to go on; the CLI shows it as it is (exit 130)."""

    abandoned: bool = False
    """Threads were left running (a second Ctrl-C stopped waiting for a job's requests in flight; the CPU passes'
    compile, cpu_update.compile_passes, sets it on a plain KeyboardInterrupt): the process ends without waiting for
    them."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, taken as Ctrl-C is (neuronscope.tui.cli). SIGTERM: a scheduler preempting or cancelling a
    job or ending its time, `kill`, torchrun stopping its ranks. SIGHUP: the terminal closed (an SSH connection
    dropped with the command running in it). What landed is kept and the same command goes on from there."""

    received: str | None = None
    """Which of them came to this process first ("SIGTERM" or "SIGHUP"; `note`): what a run or job records, also
    where a library put another error in place of the interrupt."""

    @classmethod
    def note(cls, number: int) -> None:
        """`number` came (one of STOP_SIGNALS). After SIGHUP every write to the closed terminal fails (EIO), and the
        failure of a progress bar or of the last line would stop the state being saved: what this process prints
        there goes nowhere instead."""
        cls.received = cls.received or signal.Signals(number).name
        if number == signal.SIGHUP:
            leave_closed_terminal()


#: The signals taken as Ctrl-C is (Terminated).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def terminate(number: int, _frame: object) -> None:
    """A handler of STOP_SIGNALS: raise Terminated where the first one lands. One that comes once the command is
    stopping already is only noted, so that what it keeps on the way out (a job's requests in flight, its commit) is
    kept: no person is asking again (Ctrl-C is how one does). A shell passes its own hangup on to the commands it
    ran, and launchers send SIGTERM to the other ranks once one has stopped (torchrun, srun --kill-on-bad-exit)."""
    stopping = Terminated.received is not None
    Terminated.note(number)
    if not stopping:
        raise Terminated


def leave_closed_terminal() -> None:
    """Point stdout and stderr at /dev/null where they are a terminal that has closed (a write to it fails with
    EIO; a file, a pipe or a terminal still open keeps them)."""
    for fd in (1, 2):
        try:
            os.write(fd, b"")
        except OSError as exc:
            if exc.errno == errno.EIO:
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, fd)
                os.close(null)


def interruption(err: BaseException) -> str:
    """What a run or job records as the reason it stopped, for an interrupt (`caused_by_interrupt`)."""
    if Terminated.received == "SIGHUP":
        return ("stopped by SIGHUP (its terminal closed, as when an SSH connection drops: run long commands in tmux "
                "or screen, or under nohup)")
    if Terminated.received or isinstance(err, Terminated):
        return "stopped by SIGTERM (a scheduler's preemption, cancel or time limit, or kill)"
    return "interrupted by the user (Ctrl-C)"


def caused_by_interrupt(err: BaseException | None) -> bool:
    """Whether `err` is a KeyboardInterrupt or was raised from one: a Ctrl-C that Python notices inside a C
    extension's callback (numba boxes a compiled function's results through one) comes out as a SystemError whose
    cause is the interrupt. DuckDB, noticing one while a query runs, stops the query and raises its own error with
    nothing attached."""
    for _ in range(16):  # a cause chain is short; a cyclic one must not hang the error path
        if err is None or isinstance(err, KeyboardInterrupt):
            return err is not None
        if type(err) is RuntimeError and str(err) == DUCKDB_INTERRUPTED:
            return True
        err = err.__cause__
    return False


#: What DuckDB's Python client raises (a plain RuntimeError) when a signal's handler raised during a query.
DUCKDB_INTERRUPTED = "Query interrupted"


def out_of_memory(err: BaseException) -> NeuronscopeError | None:
    """A GPU's or this machine's memory running out, as one line with what to do (None for anything else): torch's
    OutOfMemoryError (recognised by name, so that torch is not imported for it) or Python's MemoryError."""
    detail = " ".join(str(err).split()).split(". ")[0] or type(err).__name__
    if type(err).__name__ == "OutOfMemoryError" and type(err).__module__.split(".")[0] == "torch":
        return NeuronscopeError(f"the GPU ran out of memory ({detail}): pass a smaller --batch-size, or free the GPU "
                                "(nvidia-smi lists what holds it), then run the same command again; a collection goes "
                                "on from its last checkpoint")
    if isinstance(err, MemoryError):
        return NeuronscopeError(f"this machine ran out of memory ({detail}): pass a smaller --batch-size, or free "
                                "memory, then run the same command again; a collection goes on from its last checkpoint")
    return None
