"""Explain and score jobs over many neurons: choose, run resumably and concurrently, persist, plan.

A job is identified by its parameters (run, kind, backends by name without their servers, tail, samples, split
sizes, seed, controls, neuron list): running the same command again finds the job and does only the neurons it
has not finished (failed neurons are retried).

Many neurons are in flight at once: each runs in a worker thread (`concurrency` of them), and the call log's
limiter caps the LLM requests in flight across all of them, so a batching server (vLLM, llama.cpp --parallel) or
the local backend's batcher is fed. Results do not depend on concurrency or completion order: every neuron's
seed derives from the job's seed and the neuron, and its shuffled partner comes from a fixed permutation of the
job's neurons. The same request from two threads at once (a neuron's explanation and its neighbour's shuffled
control) is made once (`Backend.call`).

The store stays off the hot path: the main thread reads the records of the next neurons in bulk, and commits what
landed (neurons' results, failures and the LLM calls made) in one transaction at most every COMMIT_SECONDS; no
commit grows with the job. Every call is also kept in memory until its commit and serves as a cache, so an
interrupted neuron's calls are not paid twice. A token budget stops the job cleanly.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np

from neuronscope.core.choices import (
    JOB_KINDS,
    ORDERS,
    SCORERS,
    SIMULATIONS,
    TAILS,
)
from neuronscope.core.errors import Interrupted, NeuronError, caused_by_interrupt, interruption
from neuronscope.core.ids import NeuronId, layers_text
from neuronscope.core.jobs.claims import Blocks
from neuronscope.core.jobs.landing import COMMIT_SECONDS, SEGMENT_SECONDS, JobCancelled, Landed, Landing, StoreCallLog
from neuronscope.core.jobs.neuron_work import NeuronWork
from neuronscope.core.jobs.output_work import OutputWork, SubjectFactory
from neuronscope.core.jobs.selection import JobError, Selection
from neuronscope.core.jobs.settings import JobReport, JobSettings, Plan, env_concurrency, parse_controls
from neuronscope.core.llm.base import (
    Backend,
    BudgetExceeded,
    CallLog,
    LLMError,
    make_backend,
    pricing_backends,
    spec_name,
)
from neuronscope.core.llm.recording import LookupOnlyLog, RecordingBackend, Tally
from neuronscope.core.records import ActivationRecord, RunInfo
from neuronscope.core.results import NeuronResult
from neuronscope.core.store import Store
from neuronscope.core.store.shared import now

if TYPE_CHECKING:
    from neuronscope.core.explanation.embedding import Embedder

Progress = Callable[[str, int, int], None]


#: A job stops when this many neurons in a row fail with the same systematic cause (a bad key, an unreachable
#: server, an unknown model): every further neuron would fail alike.
FAIL_FAST = 3


class JobStopped(JobError):
    """A job stopped early because a systematic failure hit FAIL_FAST neurons in a row; the same command resumes it."""


#: Neurons are shuffled into partners, and their records read in one query ahead of their start, in blocks of
#: this many consecutive neurons of the job.
BLOCK = 256
#: How often a job on a shared store folds its spool into the store (neuronscope.core.store.shared), and the
#: longest interval it backs off to while other processes keep it from folding.
SETTLE_SECONDS, SETTLE_MAX_SECONDS = 300.0, 3600.0
#: How long a job waits for the other processes in the store to step aside for its fold (they finish the neurons
#: they are on first); then it gives up asking, and they open the store again.
FOLD_WAIT_SECONDS = 60.0
#: Neurons running at once per request allowed in flight (and as many more wait their turn, started).
THREADS_PER_REQUEST = 2
#: Requests in flight when neither --concurrency, NEURONSCOPE_CONCURRENCY nor the backends say otherwise.
DEFAULT_CONCURRENCY = 8


class Job(NeuronWork, OutputWork):
    """One job over one run. Build it, then `plan()` or `run()`."""

    def __init__(self, store: Store, run: RunInfo, settings: JobSettings, selection: Selection, *,
                 backend_factory: Callable[[str], Backend] | None = None,
                 subject_factory: SubjectFactory | None = None) -> None:
        if settings.kind not in JOB_KINDS:
            raise JobError(f"unknown job kind {settings.kind!r}")
        if settings.tail not in TAILS:
            raise JobError(f"--tail must be one of {', '.join(TAILS)}")
        if settings.samples < 1:
            raise JobError("--samples must be at least 1")
        if settings.simulation not in SIMULATIONS:
            raise JobError(f"unknown simulation {settings.simulation!r}: use one of {', '.join(SIMULATIONS)}")
        unknown = [name for name in settings.scorers if name not in SCORERS]
        if unknown:
            raise JobError(f"unknown scorer {unknown[0]!r}: use {', '.join(SCORERS)}")
        if selection.order not in ORDERS:
            raise JobError(f"cannot order by {selection.order!r}: use one of {', '.join(ORDERS)}")
        if run.status != "complete":
            raise JobError(f"run {run.run_id} is {run.status}: explain neurons of a complete run")
        self.control_share = parse_controls(settings.controls)
        self.store, self.run_info, self.settings = store, run, settings
        #: How results name the backends: their specs without servers.
        self.explainer_name, self.simulator_name = spec_name(settings.explainer), spec_name(settings.simulator)
        self.neurons = self._resolve(selection)
        if not self.neurons:
            raise JobError("no neuron matches the selection: widen --layers or --where")
        self.partners = self._partners()
        self._factory = backend_factory or make_backend
        self._backends: dict[str, Backend] = {}
        self._backend_lock = threading.Lock()
        self._embedder: Embedder | None = None
        self.log: CallLog = CallLog()
        self._readers = threading.local()
        self._opened: list[Store] = []
        #: The dry run's tally while `plan()` runs: backends come wrapped in RecordingBackends then.
        self._tally: Tally | None = None
        #: What the dry run's neurons so far would have stored (the store gives the partner's newest explanation).
        self._planned: dict[NeuronId, NeuronResult] = {}
        self._init_output(subject_factory)
        identity = {**asdict(settings), "explainer": self.explainer_name, "simulator": self.simulator_name}
        for name, default in (("controls", "all"), ("output", False), ("author", "")):
            if identity[name] == default:
                del identity[name]  # as jobs were named before the setting was added
        params = {"run_id": run.run_id, **identity, "neurons": [list(n) for n in self.neurons]}
        self.params = json.dumps(params, sort_keys=True)
        self.key = hashlib.sha256(self.params.encode()).hexdigest()

    def _resolve(self, selection: Selection) -> tuple[NeuronId, ...]:
        if selection.neurons:
            missing = [n for n in selection.neurons if n[0] not in self.run_info.layers
                       or not 0 <= n[1] < self.run_info.neurons_per_layer]
            if missing:
                layer, neuron = missing[0]
                raise JobError(f"run {self.run_info.run_id} has no neuron {NeuronId(layer, neuron)}: it has layers "
                               f"{layers_text(self.run_info.layers)} of {self.run_info.neurons_per_layer} neurons")
            return tuple(dict.fromkeys(NeuronId(*n) for n in selection.neurons))
        return tuple(self.store.choose_neurons(self.run_info.run_id, layers=selection.layers, order=selection.order,
                                               where=selection.where, limit=selection.limit, seed=self.settings.seed))

    def _blocks(self) -> list[range]:
        """The job's neurons (indexes) in blocks of BLOCK; a last block of one neuron joins the one before."""
        starts = list(range(0, len(self.neurons), BLOCK))
        if len(starts) > 1 and len(self.neurons) - starts[-1] < 2:
            starts.pop()
        return [range(a, b) for a, b in zip(starts, starts[1:] + [len(self.neurons)])]

    def _cycles(self) -> list[list[int]]:
        """Per block, its neurons (indexes) in one cycle through a permutation fixed by the seed."""
        rng = np.random.default_rng(self.settings.seed)
        return [[block[i] for i in rng.permutation(len(block))] for block in self._blocks()]

    def _partners(self) -> dict[NeuronId, NeuronId]:
        """Each neuron's shuffled partner: the next in its block's cycle, so each neuron is the partner of exactly
        one other, whatever order they finish in, and a block's records hold its partners'. A lone neuron gets a
        random other neuron of the run."""
        if len(self.neurons) > 1:
            return {self.neurons[i]: self.neurons[cycle[(k + 1) % len(cycle)]]
                    for cycle in self._cycles() for k, i in enumerate(cycle)}
        others = [n for n in self.store.choose_neurons(self.run_info.run_id, layers=None, order="random", where=(),
                                                       limit=2, seed=self.settings.seed) if n != self.neurons[0]]
        return {self.neurons[0]: others[0]} if others else {}

    # -- backends -------------------------------------------------------------------------------------
    def backend(self, spec: str) -> Backend:
        """A backend by spec, built once per job (explainer and simulator share a model when the spec matches);
        in a dry run, wrapped to tally its calls instead of making them."""
        with self._backend_lock:
            if spec not in self._backends:
                self._backends[spec] = self._factory(spec)
            backend = self._backends[spec]
            backend.bind(self.log)
        return backend if self._tally is None else RecordingBackend(backend, self._tally)

    def embedder(self) -> Embedder | None:
        """The embedding model, loaded once, when the embedding scorer is asked for (never in a dry run)."""
        if self._tally is not None:
            return None
        with self._backend_lock:
            if "embedding" in self.settings.scorers and self._embedder is None:
                from neuronscope.core.explanation.embedding import Embedder, EmbeddingError

                try:
                    self._embedder = Embedder.load()
                except EmbeddingError as err:
                    raise JobError(str(err)) from None
        return self._embedder

    def concurrency(self, requested: int | None = None) -> int:
        """Requests in flight: `requested` (--concurrency), else NEURONSCOPE_CONCURRENCY, else the least that the
        job's backends ask for (a local GPU server takes many, a paid API few)."""
        if requested is not None:
            if requested < 1:
                raise JobError("--concurrency must be at least 1")
            return requested
        env = env_concurrency()
        if env is not None:
            return env
        asked = [getattr(b, "default_concurrency", None) for b in self._backends.values()]
        return min([a for a in asked if a], default=DEFAULT_CONCURRENCY)

    def close(self) -> None:
        """Release the backends' models and connections."""
        for backend in self._backends.values():
            backend.close()
        self._backends.clear()
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        self._subject = None

    def prepare(self) -> None:
        """Load the backends the job needs (so a bad model fails before any neuron starts)."""
        self._llm_backends()
        if self.settings.kind != "explain":
            self.embedder()
        if self.settings.output:
            with self._subject_lock:
                self._load_subject()

    def _llm_backends(self) -> None:
        """Build the explainer and simulator the job calls (what `prepare` and a dry run's `plan` both need first)."""
        if self._uses_explainer and self.settings.explanation is None:
            self.backend(self.settings.explainer)
        if self.settings.kind != "explain" and self.settings.simulator_asked:
            self.backend(self.settings.simulator)

    # -- running --------------------------------------------------------------------------------------
    def pending(self, job_id: int | None) -> list[int]:
        """Indexes of the neurons a (new or resumed) job still has to do."""
        states = self.store.job_neuron_states(job_id) if job_id is not None else {}
        return [i for i, n in enumerate(self.neurons) if states.get(n, ("", ""))[0] != "done"]

    def run(self, *, progress: Progress | None = None, max_tokens: int | None = None,
            stop: threading.Event | None = None, landed: Landed | None = None,
            concurrency: int | None = None) -> JobReport:
        """Run (or resume) the job, `concurrency` requests in flight (see `concurrency()`); Ctrl-C or `stop` (checked
        before every LLM call) leaves it interrupted and resumable, with what landed and the calls made committed."""
        progress = progress or (lambda *_: None)
        if not self.store.read_only:
            self.store.mark_stale_jobs()
        found = self.store.find_job(self.key)
        if found and found[1] == "complete":
            return self._report(found[0], "complete", CallLog(), "")
        since = now()  # neurons another process fails from now on are its to retry, not this one's
        job_id = found[0] if found else self.store.create_job(self.run_info.run_id, self.settings.kind, self.params,
                                                               self.key, len(self.neurons))
        self.store.set_job_state(job_id, "running")
        cancel = threading.Event()  # set by `stop`, the budget, a systematic failure or Ctrl-C: workers stop at their next call
        log = self.log = StoreCallLog(self.store, job_id, max_tokens, cancel)
        log.index()
        states = self.store.job_neuron_states(job_id)
        todo = [i for i, n in enumerate(self.neurons) if states.get(n, ("", ""))[0] != "done"]
        retried = {n for n, (state, _) in states.items() if state == "failed"}
        del states
        if todo:
            self.prepare()
        requests = self.concurrency(concurrency)
        log.set_concurrency(requests)
        landing = Landing(self.store, job_id, self.run_info.run_id, log, retried, landed,
                          every=COMMIT_SECONDS if self.store.shared is None else SEGMENT_SECONDS)
        done = len(self.neurons) - len(todo)
        progress("neurons", done, len(self.neurons))
        state, message = "running", ""
        streak, cause = 0, ""  # neurons in a row that failed with the same systematic cause
        # A job opens with FAIL_FAST neurons in flight, and falls back to as many as it takes to stop after a
        # systematic failure, until a neuron lands without one: a dead server or a bad key costs FAIL_FAST neurons'
        # requests, not a full window's.
        probing = True
        blocks = Blocks(self.store, job_id, self.neurons, self._cycles(), todo, since)
        # A job on a shared store folds its spool into it now and then, so the spool stays small for readers who
        # come later: it drains, asks the other processes in the store to step aside, and folds when they have (a
        # job drains first, the app closes the store for the moment); when one does not, it goes on, and tries
        # again after twice as long.
        sharing = self.store.shared is not None and self.store.owner is None
        settle_every = SETTLE_SECONDS
        settle_at = time.monotonic() + settle_every if sharing else float("inf")
        chunk: list[int] = []  # the block being started, and its records
        records: dict[NeuronId, list[ActivationRecord]] = {}
        inflight: dict[Future[NeuronResult], int] = {}
        # More neurons run than requests may be in flight: a neuron waiting for its partner's explanation (made by
        # the partner's own thread) or busy between requests holds no request slot, and another takes it. One
        # request in flight runs one neuron at a time, a serial job.
        threads = requests if requests == 1 else THREADS_PER_REQUEST * requests
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="neuronscope-job")
        abandoned = 0  # requests a second Ctrl-C gave up waiting for
        try:
            while True:
                if stop is not None and stop.is_set() and state == "running":
                    state, message = "interrupted", "cancelled"
                    cancel.set()
                window = max(FAIL_FAST - streak, 1) if probing else threads + requests
                aside = self.store.shared is not None and self.store.fold_asked()  # for a fold or a write (in the app too)
                # to fold the spool, or let another fold it: start nothing until all have landed
                draining = aside or time.monotonic() >= settle_at
                while state == "running" and len(inflight) < window and not draining:
                    if not chunk:
                        chunk = blocks.next()
                        if not chunk:
                            break
                        records = self._prefetch(chunk)
                    take = chunk[:window - len(inflight)]
                    chunk = chunk[len(take):]
                    inflight.update({pool.submit(self.process, i, records): i for i in take})
                if inflight:
                    finished, _ = wait(inflight, timeout=COMMIT_SECONDS, return_when=FIRST_COMPLETED)
                elif draining:
                    finished = set()
                    if landing.commit():
                        progress("neurons", done + landing.count, len(self.neurons))
                        blocks.committed(landing.last_committed)
                    self._close_readers()
                    if aside:
                        self._step_aside(progress, lambda: stop is not None and stop.is_set())
                    elif self.store.resettle(wait=FOLD_WAIT_SECONDS):
                        settle_every = SETTLE_SECONDS
                    else:
                        settle_every = min(2 * settle_every, SETTLE_MAX_SECONDS)
                    log.index()  # a fold moved the spool's calls into the store's table
                    settle_at = time.monotonic() + settle_every
                elif blocks.finished or state != "running":
                    break
                else:  # the blocks left are another process's for now: theirs are done when it lets them go
                    finished = set()
                    time.sleep(COMMIT_SECONDS)
                for future in finished:
                    neuron = self.neurons[inflight.pop(future)]
                    try:
                        result = future.result()
                    except (LLMError, NeuronError) as err:
                        landing.fail(neuron, str(err))
                        same = getattr(err, "systematic", "")
                        streak, cause = (streak + 1 if same == cause else 1, same) if same else (0, "")
                        probing = bool(same)
                        if streak >= FAIL_FAST and state == "running":
                            state, message = "failed", f"{FAIL_FAST} neurons in a row failed the same way ({cause}): {err}"
                            cancel.set()
                    except BudgetExceeded as err:
                        if state == "running":
                            state, message = "stopped", str(err)
                            cancel.set()
                        continue
                    except JobCancelled:
                        continue
                    else:
                        landing.done(result)
                        streak, cause, probing = 0, "", False
                if landing.commit_if_due():  # progress counts committed neurons: what a kill -9 would keep
                    progress("neurons", done + landing.count, len(self.neurons))
                    blocks.committed(landing.last_committed)
            if landing.commit():
                progress("neurons", done + landing.count, len(self.neurons))
        except BaseException as err:
            cancel.set()  # workers stop at their next call; the requests in flight are waited for (a second Ctrl-C
            try:          # stops waiting), so their answers are logged and the neurons they finish land
                pool.shutdown(wait=True, cancel_futures=True)
            except KeyboardInterrupt:
                abandoned = sum(not f.done() for f in inflight)
            for future in [f for f in inflight if f.done() and not f.cancelled() and f.exception() is None]:
                landing.done(future.result())
            interrupted = caused_by_interrupt(err)
            try:
                landing.commit()  # what landed before Ctrl-C or the failure is kept
            finally:
                if not self.store.paused:  # (closed: a job in the app that quit while another process wrote)
                    self.store.set_job_state(job_id, "interrupted", interruption(err) if interrupted
                                             else f"stopped by {type(err).__name__}: {err}")
            if interrupted:
                given_up = f" ({abandoned:,} neurons' requests in flight given up)" if abandoned else ""
                halt = Interrupted(f"job {job_id}: {done + landing.count:,} of {len(self.neurons):,} neurons done and "
                                   f"kept{given_up}; the same command goes on from there")
                halt.abandoned = bool(abandoned)
                raise halt from err
            raise
        finally:
            pool.shutdown(wait=not abandoned, cancel_futures=True)
            blocks.release_all()
            self._close_readers()
        if state == "failed":
            self.store.set_job_state(job_id, "failed", message)
            raise JobStopped(f"job {job_id} stopped: {message} — fix that, then run the same command to resume")
        if state == "running":
            state = "partial" if landing.any_failed() else "complete"
        self.store.set_job_state(job_id, state, message)
        return self._report(job_id, state, log, message)

    def _report(self, job_id: int, state: str, log: CallLog, message: str) -> JobReport:
        states = self.store.job_neuron_states(job_id)
        return JobReport(job_id=job_id, state=state, done=sum(s == "done" for s, _ in states.values()),
                         failed={n: e for n, (s, e) in states.items() if s == "failed"}, total=len(self.neurons),
                         new_calls=log.new_calls, cache_hits=log.cache_hits, tokens=log.used_tokens, message=message)

    def plan(self, progress: Progress | None = None, tally: Tally | None = None) -> Plan:
        """Count the calls and tokens the job would spend, without calling any model or writing anything: the
        neurons still to do go through `process()` as in `run()`, every backend wrapped in a RecordingBackend
        (neuronscope.core.llm.recording) that tallies the requests the real one would send and answers from the call
        log where it can, else with stand-ins. The embedding model is not loaded (it calls no LLM). Backends are
        built as `prepare()` builds them, first, so one that cannot be built fails the plan as it fails the run;
        but within `pricing_backends` (an openai model needs no API key to be priced), and those built only for
        pricing are dropped after. `tally`, when given, is counted into (it tells the calls the log holds now from
        the repeats of new calls, which Plan.cached adds up)."""
        found = self.store.find_job(self.key)
        todo = [] if found and found[1] == "complete" else self.pending(found[0] if found else None)
        tally = tally if tally is not None else Tally()
        self.log, self._tally = LookupOnlyLog(StoreCallLog(self.store, None)), tally
        self._planned.clear()
        try:
            with pricing_backends():
                if todo:
                    self._llm_backends()
                for step, index in enumerate(todo):
                    try:
                        self._planned[self.neurons[index]] = self.process(index)
                    except (LLMError, NeuronError):
                        pass  # the real run records the failure against the neuron and goes on
                    if progress:
                        progress("planning", step + 1, len(todo))
        finally:
            self.log, self._tally = CallLog(), None
            self._planned.clear()
            with self._backend_lock:
                priced = [spec for spec, backend in self._backends.items() if backend.pricing_only]
                closing = [self._backends.pop(spec) for spec in priced]
            for backend in closing:
                backend.close()
        return Plan(len(todo), tally.calls, tally.cached, tally.prompt_tokens, tally.completion_tokens, tally.cost)


def run_job(store: Store, run: RunInfo, settings: JobSettings, selection: Selection, **options: Any) -> JobReport:
    """Build and run a job in one call (tests and scripts)."""
    factory, subjects = options.pop("backend_factory", None), options.pop("subject_factory", None)
    job = Job(store, run, settings, selection, backend_factory=factory, subject_factory=subjects)
    try:
        return job.run(**options)
    finally:
        job.close()
