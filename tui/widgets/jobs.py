"""Explain/score jobs run from the app: each in a named thread worker on its own store cursor, one row per job
with a ProgressBar. Progress reaches the UI as messages, at most about ten a second per job; a neuron that
lands (scored or failed) posts `Landed` so the table can show it at once."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.widgets import Label, ProgressBar

from neuronscope.core.ids import NeuronId
from neuronscope.core.jobs.engine import JobSettings, Selection

#: Seconds between progress messages of one job (the last one always goes through).
PROGRESS_INTERVAL = 0.1
_numbers = itertools.count(1)


@dataclass
class JobHandle:
    """A job started from the app: what it does, and the event that stops it."""

    settings: JobSettings
    neurons: tuple[NeuronId, ...]
    label: str
    number: int = field(default_factory=lambda: next(_numbers))
    stop: threading.Event = field(default_factory=threading.Event)
    state: str = "starting"
    done: int = 0
    total: int = 0
    failures: list[tuple[NeuronId, str]] = field(default_factory=list)
    concurrency: int | None = None
    """Requests in flight (None: NEURONSCOPE_CONCURRENCY, else the backends' default)."""
    updates: int = 0
    """Progress messages posted (at most about 1 / PROGRESS_INTERVAL a second)."""
    store: Any = None
    """Its worker's cursor of the app's store, once the worker runs."""

    @property
    def running(self) -> bool:
        return self.state in ("starting", "running", "stopping")

    @property
    def paused(self) -> bool:
        """Whether it has paused for another process's write (its cursor closed until the store is back)."""
        return self.store is not None and self.store.paused


class JobRow(Horizontal):
    """One job: what it does, a progress bar, and its state."""

    DEFAULT_CSS = """
    JobRow { height: 1; }
    JobRow > .job-label { width: 1fr; }
    JobRow > ProgressBar { width: auto; }
    JobRow > ProgressBar Bar { width: 16; }
    JobRow > .job-state { width: 24; padding-left: 1; }
    """

    def __init__(self, handle: JobHandle) -> None:
        super().__init__(id=f"job-{handle.number}")
        self.handle = handle

    def compose(self) -> ComposeResult:
        yield Label(Text(self.handle.label, no_wrap=True, overflow="ellipsis"), classes="job-label")
        yield ProgressBar(total=max(len(self.handle.neurons), 1), show_eta=False)
        yield Label(Text(self.handle.state), classes="job-state")

    def show(self, message: str | None = None) -> None:
        handle = self.handle
        self.query_one(ProgressBar).update(total=max(handle.total, 1), progress=handle.done)
        text = message or handle.state
        if handle.failures:
            text += f", {len(handle.failures)} failed"
        self.query_one(".job-state", Label).update(Text(text, no_wrap=True, overflow="ellipsis"))


class JobsPanel(VerticalScroll):
    """The jobs of this session, newest last; hidden until the first one starts."""

    DEFAULT_CSS = """
    JobsPanel { height: auto; max-height: 4; display: none; border-top: solid $primary; }
    JobsPanel.active { display: block; }
    """

    @dataclass
    class Progress(Message):
        """A job's counts changed, or it has news (`message`, e.g. loading models) to show instead."""

        handle: JobHandle
        message: str | None = None

    @dataclass
    class Landed(Message):
        """A neuron of a job was written (error '' when it succeeded)."""

        handle: JobHandle
        neuron: NeuronId
        error: str

    @dataclass
    class Finished(Message):
        """A job ended: complete, partial, interrupted (cancelled), stopped, or failed with `error`."""

        handle: JobHandle
        error: str = ""

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002 - Textual's name
        super().__init__(id=id)
        self.handles: list[JobHandle] = []

    @property
    def running(self) -> list[JobHandle]:
        return [h for h in self.handles if h.running]

    def start(self, store: Any, run: Any, handle: JobHandle, backend_options: dict[str, Any]) -> None:
        """Add a row and run the job in a thread worker (it writes beside the store: neuronscope.core.store.spool)."""
        self.handles.append(handle)
        self.add_class("active")
        self.mount(JobRow(handle))
        self.call_after_refresh(self.scroll_end, animate=False)
        self._run(store, run, handle, backend_options)

    def cancel_newest(self) -> JobHandle | None:
        """Ask the newest running job to stop before its next LLM call."""
        for handle in reversed(self.handles):
            if handle.running and not handle.stop.is_set():
                handle.stop.set()
                handle.state = "stopping"
                self._row(handle).show("stopping…")
                return handle
        return None

    def cancel_all(self) -> None:
        while self.cancel_newest() is not None:
            pass

    def _row(self, handle: JobHandle) -> JobRow:
        return self.query_one(f"#job-{handle.number}", JobRow)

    @work(thread=True, group="jobs", exit_on_error=False)
    def _run(self, store: Any, run: Any, handle: JobHandle, backend_options: dict[str, Any]) -> None:
        from neuronscope.core.jobs.engine import Job
        from neuronscope.core.llm.base import make_backend
        from neuronscope.core.models.loading import run_subject

        worker_store = handle.store = store.for_thread()
        last = 0.0

        def progress(stage: str, done: int, total: int) -> None:
            nonlocal last
            if stage.startswith("waiting"):  # paused for another process's write: said until it goes on
                self.post_message(self.Progress(handle, "" if done else stage))
                return
            handle.done, handle.total = done, total
            now = time.monotonic()
            if now - last >= PROGRESS_INTERVAL or done >= total:
                last = now
                handle.updates += 1
                self.post_message(self.Progress(handle))

        def landed(neuron: NeuronId, error: str) -> None:
            neuron = NeuronId(*neuron)  # the engine may pass a plain (layer, neuron) tuple
            if error:
                handle.failures.append((neuron, error))
            self.post_message(self.Landed(handle, neuron, error))

        def status(message: str) -> None:
            self.post_message(self.Progress(handle, message))

        job = None
        try:
            job = Job(worker_store, run, handle.settings, Selection(neurons=handle.neurons),
                      backend_factory=lambda spec: make_backend(spec, status=status, **backend_options),
                      subject_factory=lambda run: run_subject(run, status=status, **backend_options))
            handle.state = "running"
            self.post_message(self.Progress(handle, "loading models…"))
            report = job.run(progress=progress, stop=handle.stop, landed=landed, concurrency=handle.concurrency)
            handle.state = "cancelled" if report.state == "interrupted" else report.state
            handle.done, handle.total = report.done, report.total  # a job found complete reports no progress
            self.post_message(self.Finished(handle, report.message if report.state == "stopped" else ""))
        except Exception as exc:  # noqa: BLE001 - every failure reaches the user in the error modal
            from neuronscope.core.store.schema import storage_failure

            handle.state = "failed"
            shown = storage_failure(exc, worker_store.path) or exc  # a full disk or damaged store: what to do
            self.post_message(self.Finished(handle, str(shown).splitlines()[0] if str(shown) else type(exc).__name__))
        finally:
            if job is not None:
                job.close()
            worker_store.close()

    def on_jobs_panel_progress(self, message: Progress) -> None:
        self._row(message.handle).show(message.message or f"{message.handle.state} "
                                                          f"{message.handle.done}/{message.handle.total}")

    def on_jobs_panel_finished(self, message: Finished) -> None:
        handle = message.handle
        self._row(handle).show(f"{handle.state} {handle.done}/{handle.total}")


def job_label(settings: JobSettings, neurons: tuple[NeuronId, ...], scope: str) -> str:
    """What a job row says, e.g. `run L3/N7 · baseline` or `score 12 neurons (marked) · local:qwen-1.5b`."""
    what = str(neurons[0]) if len(neurons) == 1 else f"{len(neurons):,} neurons ({scope})"
    backends = settings.explainer if settings.kind == "explain" or settings.simulator == settings.explainer \
        else f"{settings.explainer} → {settings.simulator}"
    return f"{'explain' if settings.kind == 'run' else settings.kind} {what} · {backends}"

