"""The app's job actions: explain and score jobs on the shown, marked, filtered or current neurons (`e`, `x`, a
person's own explanation), cancelling them (`c`), their results and failures as they land, and quitting once they
stop; a mixin of neuronscope.tui.app.NeuronscopeApp, which provides the store, the run, the table and the jobs
panel."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import replace
from typing import Any

from rich.text import Text

from neuronscope.core.errors import STOP_SIGNALS, leave_closed_terminal
from neuronscope.core.ids import NeuronId
from neuronscope.core.jobs.engine import JobSettings
from neuronscope.core.jobs.neuron_work import needs_explanation
from neuronscope.tui.render import visible
from neuronscope.tui.screens.modals import MessageScreen
from neuronscope.tui.screens.neuron import NeuronScreen
from neuronscope.tui.widgets.jobs import JobHandle, JobsPanel, job_label

#: A job on more neurons than this asks first.
CONFIRM_ABOVE = 50


class JobActions:
    """What NeuronscopeApp needs for these actions is declared here; the app provides it."""

    store: Any
    run_info: Any
    author: str
    settings: JobSettings
    backend_options: dict[str, object]
    concurrency: int | None
    quitting: bool
    stopped_by: str | None
    _signals_before: dict[int, Any]
    _dirty: set[NeuronId]
    table: Any
    jobs: Any
    screen: Any
    notify: Any
    push_screen: Any
    refresh_bindings: Any
    exit: Any
    call_later: Any
    current_neuron: Any
    _reload_landed: Any
    when_back: Any

    def _job_scope(self) -> tuple[tuple[NeuronId, ...], str, int]:
        """The neurons a job acts on, in words, and how many of them the filter hides (marks outlive a filter)."""
        if isinstance(self.screen, NeuronScreen):
            return (self.screen.position,), "shown", 0
        table, query = self.table, self.table.query_spec
        listed = table.read(lambda reader: reader.neuron_keys(self.run_info.run_id, query)) if query.filtered else None
        if table.marked:
            return tuple(sorted(table.marked)), "marked", 0 if listed is None else len(table.marked - set(listed))
        if listed is not None:
            return tuple(listed), "filtered", 0
        current = self.current_neuron()
        return ((current,) if current else ()), "cursor", 0

    def action_job(self, kind: str) -> None:
        neurons, scope, hidden = self._job_scope()
        if not neurons:
            return
        settings = replace(self.settings, kind=kind)
        if len(neurons) <= CONFIRM_ABOVE and not hidden:
            self.start(settings, neurons, scope)
            return
        verb = "explain and score" if kind == "run" else kind
        question = MessageScreen(f"{verb} {len(neurons):,} {scope} neurons?", [
            *([Text(f"{hidden:,} of them are hidden by the filter (marks are kept across filters; "
                    "M unmarks them all)")] if hidden else []),
            Text(f"explainer {settings.explainer}, simulator {settings.simulator}"),
            Text("The job runs in the background; c cancels it, and the same job started again resumes it.")],
            question=True)
        self.push_screen(question, lambda yes: self.start(settings, neurons, scope) if yes else None)

    def score_own(self, neuron: NeuronId, text: str) -> None:
        """Store a person's own explanation of a neuron and score it in the background, as `score --explanation`
        does (the same job, so either resumes the other)."""
        settings = replace(self.settings, kind="score", explanation=text, author=self.author, output=False)
        self.start(settings, (neuron,), "yours")
        self.notify(f"scoring your explanation of {neuron} with {settings.simulator}", markup=False)

    def start(self, settings: JobSettings, neurons: tuple[NeuronId, ...], scope: str) -> None:
        """Start a job in a worker (it writes beside the store, which other processes may have open too)."""
        count = f"{len(neurons):,} neuron{'s' if len(neurons) != 1 else ''}"
        if self.when_back(f"the job on {count} starts", lambda: self.start(settings, neurons, scope)):
            return
        handle = JobHandle(settings, neurons, job_label(settings, neurons, scope), concurrency=self.concurrency)
        self.jobs.start(self.store, self.run_info, handle, dict(self.backend_options))
        self.refresh_bindings()

    def action_cancel(self) -> None:
        handle = self.jobs.cancel_newest()
        if handle is not None:
            self.notify(f"stopping {handle.label} before its next LLM call; the same job started again resumes it")
        self.refresh_bindings()

    def on_jobs_panel_landed(self, message: JobsPanel.Landed) -> None:
        self._dirty.add(message.neuron)
        if message.error:
            self.notify(f"{message.neuron} failed: {visible(message.error)}", severity="error", markup=False)

    def on_jobs_panel_finished(self, message: JobsPanel.Finished) -> None:
        handle = message.handle
        self._reload_landed()
        self.refresh_bindings()
        if self.quitting and not self.jobs.running:
            self.exit()
            return
        problems = [Text(f"{neuron}: ", style="bold") + Text(error) for neuron, error in handle.failures[:20]]
        if len(handle.failures) > 20:
            problems.append(Text(f"… and {len(handle.failures) - 20} more"))
        if message.error:
            problems.insert(0, Text(message.error))
        if problems:
            title = f"{handle.label}: {handle.state}" + (
                f", {len(handle.failures)} neuron{'s' if len(handle.failures) != 1 else ''} failed"
                if handle.failures else "")
            unexplained = all(needs_explanation(error) for _, error in handle.failures)
            problems.append(Text("Those neurons have nothing to score yet: explain them (e) or write your own (w), "
                                 "then score again (x)." if handle.failures and unexplained else
                                 "Start the same job again to retry the failed neurons.", style="dim"))
            self.push_screen(MessageScreen(title, problems))
        elif handle.state == "complete":
            self.notify(f"{handle.label}: complete")

    async def action_quit(self) -> None:
        if not self.jobs.running:
            self.exit()
            return
        if self.quitting:
            self.notify("still waiting for the current LLM calls; the store stays consistent either way")
            return
        self.quitting = True
        self.jobs.cancel_all()
        self.notify("stopping jobs after their current LLM call, then quitting; they resume when started again")

    def quit_on_signals(self, on: bool) -> None:
        """While the app runs (`on`), SIGTERM (`kill`, a scheduler's cancel or time limit) and SIGHUP (the terminal
        closed: an SSH connection dropped) quit it as q does: its jobs stop after their current LLM call, and the
        terminal is given back as it was (dying on the spot left it in the app's screen and modes; a closed one
        takes nothing more). A signal the process ignores stays ignored. Off, the handlers from before come back. Where
        the event loop cannot take signals, nothing changes."""
        try:
            loop = asyncio.get_running_loop()
            for number in STOP_SIGNALS:
                if not on:
                    if loop.remove_signal_handler(number):
                        signal.signal(number, self._signals_before.pop(number, None) or signal.SIG_DFL)
                elif signal.getsignal(number) is not signal.SIG_IGN:  # one ignored stays so (`nohup`)
                    self._signals_before[number] = signal.getsignal(number)
                    loop.add_signal_handler(number, self._stop_on, number)
        except (RuntimeError, NotImplementedError, ValueError):  # not the main thread, or no signals here
            pass

    def _stop_on(self, number: int) -> None:
        if number == signal.SIGHUP:
            leave_closed_terminal()
        if self.stopped_by is None:  # (a shell passes its own hangup on: once is enough)
            self.stopped_by = signal.Signals(number).name
            self.call_later(self.action_quit)
