"""One error family: every error a user is meant to read derives from NeuronscopeError, which the CLI catches as
one line with exit status 2 (no hand-kept list of error classes to forget)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import neuronscope.core
import neuronscope.tui
from neuronscope.core.errors import InputError, NeuronError, NeuronscopeError, out_of_memory

#: Exceptions that are control flow, never shown: each is caught where it is raised.
SIGNALS = {"JobCancelled", "BudgetExceeded", "_StopForward", "NotText", "DryRunCall", "OutputClosed"}
#: Interrupts (Ctrl-C saying what was saved, SIGTERM): KeyboardInterrupts, which the CLI shows as such, exit status 130.
INTERRUPTS = {"Interrupted", "Stopped", "Terminated"}


def _our_exception_classes() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for package in (neuronscope.core, neuronscope.tui):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            module = importlib.import_module(info.name)
            for name, obj in vars(module).items():
                if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                    found[f"{info.name}.{name}"] = obj
    return found


def test_every_error_class_is_a_neuronscope_error() -> None:
    classes = _our_exception_classes()
    assert len(classes) >= 15  # the walk found the stage errors
    strays = [name for name, cls in classes.items()
              if not issubclass(cls, NeuronscopeError) and name.rsplit(".", 1)[1] not in SIGNALS | INTERRUPTS]
    assert strays == []
    assert all(issubclass(cls, KeyboardInterrupt) for name, cls in classes.items()
               if name.rsplit(".", 1)[1] in INTERRUPTS)
    assert {InputError, NeuronError} <= set(classes.values())
    assert {name.rsplit(".", 1)[1] for name in classes} >= SIGNALS | INTERRUPTS  # no stale allowance


def test_the_cli_turns_any_of_them_into_one_line(capsys) -> None:  # type: ignore[no-untyped-def]
    """A bad neuron address is an InputError raised deep in core; main() prints it as one line and returns 2."""
    from neuronscope.tui.cli import main

    assert main(["show", "twelve/3", "--store", "/nonexistent/never-opened.duckdb"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cannot read the neuron 'twelve/3'")


def test_running_out_of_memory_is_one_line_with_what_to_do() -> None:
    """A GPU's memory (torch's OutOfMemoryError) or this machine's (a MemoryError, here numpy's own) running out is
    one line saying which, and what to pass or free; anything else is not taken for it."""
    import numpy as np
    import torch

    gpu = out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                               "capacity of 79.19 GiB of which 1.20 GiB is free."))
    assert str(gpu) == ("the GPU ran out of memory (CUDA out of memory): pass a smaller --batch-size, or free the GPU "
                        "(nvidia-smi lists what holds it), then run the same command again; a collection goes on from "
                        "its last checkpoint")
    with pytest.raises(MemoryError) as refused:
        np.empty(1 << 62, np.uint8)
    assert str(out_of_memory(refused.value)).startswith("this machine ran out of memory (Unable to allocate 4.00 EiB for an array with shape ")
    assert out_of_memory(RuntimeError("out of memory")) is None


def test_an_interrupt_duckdb_noticed_is_an_interrupt() -> None:
    """Ctrl-C or SIGTERM during a DuckDB query: DuckDB stops the query and raises its own RuntimeError in place of the
    KeyboardInterrupt, which the CLI showed as an internal error with exit 1 (seen stopping a collection while it
    wrote its store). It is an interrupt, recorded for the signal that caused it."""
    import os
    import signal
    import threading

    import duckdb

    from neuronscope.core.errors import Terminated, caused_by_interrupt, interruption, terminate

    con = duckdb.connect()  # (a query of a connection made in the same expression notices no signal at all)
    before = signal.signal(signal.SIGTERM, terminate)
    try:
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        # About 12 s of work on two cores, uninterrupted. (DuckDB 2.0.1 noticed a signal within milliseconds in
        # ranges of up to 8 billion rows here, but only at the end of one of 16 or 50 billion: 50 to 160 s.)
        with pytest.raises(RuntimeError) as stopped:
            con.execute("SELECT count(*) FROM range(4000000000) t(x) WHERE x % 7 = 3").fetchall()
        timer.join()
        assert caused_by_interrupt(stopped.value), stopped.value
        assert interruption(stopped.value).startswith("stopped by SIGTERM")
    finally:
        signal.signal(signal.SIGTERM, before)
        Terminated.received = None
    assert not caused_by_interrupt(RuntimeError("Query failed")) and interruption(stopped.value).startswith(
        "interrupted by the user")


def test_only_the_first_stop_signal_raises() -> None:
    """SIGTERM or SIGHUP once a command is stopping (a launcher passing SIGTERM on to the other ranks, a shell its
    hangup) is noted, not raised: it would cut short what the command keeps on its way out."""
    import signal

    from neuronscope.core.errors import Terminated, terminate

    try:
        with pytest.raises(Terminated):
            terminate(signal.SIGTERM, None)
        terminate(signal.SIGTERM, None)
        terminate(signal.SIGHUP, None)
        assert Terminated.received == "SIGTERM"
    finally:
        Terminated.received = None
