"""Explain and score jobs over many neurons: choose, run resumably, persist, plan.

A job is identified by its parameters (run, kind, backends, tail, samples, split sizes, seed, neuron
list): running the same command again finds the job and does only the neurons it has not finished
(failed neurons are retried). Each neuron is written in one transaction after all its LLM calls;
every call is logged in `llm_calls` the moment it returns and serves as a cache, so an interrupted
neuron's calls are not paid twice. A token budget stops the job cleanly between calls.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from neuronscope.core.choices import (
    DEFAULT_BACKEND,
    DEFAULT_SIMULATION,
    JOB_KINDS,
    ORDERS,
    SCORERS,
    SIMULATIONS,
    TAILS,
    JobKind,
    Scorer,
    SimulationMode,
    Tail,
)
from neuronscope.core.errors import NeuronError
from neuronscope.core.explanation.explain import controls, lookup_of, prompt_for, revise, score_candidates
from neuronscope.core.explanation.splits import NeuronSplits, SplitSizes, split_records
from neuronscope.core.ids import NeuronId, layers_text
from neuronscope.core.jobs.selection import JobError, Selection
from neuronscope.core.llm.base import Backend, BudgetExceeded, CallLog, LLMError, make_backend
from neuronscope.core.llm.recording import LookupOnlyLog, RecordingBackend, Tally
from neuronscope.core.records import Call, RunInfo
from neuronscope.core.results import NeuronResult, ScoredExplanation
from neuronscope.core.store import Store

if TYPE_CHECKING:
    from neuronscope.core.explanation.embedding import Embedder

Progress = Callable[[str, int, int], None]


#: A job stops when this many neurons in a row fail with the same systematic cause (a bad key, an unreachable
#: server, an unknown model): every further neuron would fail alike.
FAIL_FAST = 3


class JobStopped(JobError):
    """A job stopped early because a systematic failure hit FAIL_FAST neurons in a row; the same command resumes it."""


class JobCancelled(Exception):
    """Raised at the next LLM call once a job's stop event is set (so a cancel need not wait for a whole neuron)."""


#: Called after each neuron of a job lands: the neuron and its error ('' when it succeeded).
Landed = Callable[[NeuronId, str], None]


@dataclass(frozen=True)
class JobSettings:
    """What a job does to each neuron; with the neuron list, its identity."""

    kind: JobKind = "run"
    """explain (candidates only), score (stored candidates or a given sentence) or run (both)."""
    explainer: str = DEFAULT_BACKEND
    """Backend spec of the explainer."""
    simulator: str = DEFAULT_BACKEND
    """Backend spec of the simulator."""
    tail: Tail = "pos"
    """pos: explain max(a, 0) from top records; neg: max(-a, 0) from bottom records."""
    samples: int = 1
    """Candidate explanations per neuron (best of k on the select split)."""
    sizes: SplitSizes = field(default_factory=SplitSizes)
    """Excerpts per split."""
    seed: int = 0
    """Seed for sampled explanations and bootstrap intervals."""
    explanation: str | None = None
    """A user's own sentence to score (kind score)."""
    scorers: tuple[Scorer, ...] = ()
    """Scorers beside simulation on the test split (detection, fuzzing, embedding)."""
    simulation: SimulationMode = DEFAULT_SIMULATION
    """How explanations are simulated (quotes, tokens, lines; see neuronscope.core.explanation.simulation)."""
    revise: bool = False
    """Also revise the first candidate from the select excerpts it simulated worst (run jobs)."""


@dataclass(frozen=True)
class JobReport:
    """How a job ended."""

    job_id: int
    """The job's id."""
    state: str
    """complete, partial (some neurons failed), stopped (budget) or interrupted."""
    done: int
    """Neurons finished (in this and earlier sessions of the job)."""
    failed: dict[NeuronId, str]
    """Neurons that failed, with their errors."""
    total: int
    """Neurons in the job."""
    new_calls: int
    """LLM calls made in this session."""
    cache_hits: int
    """LLM calls answered from the log."""
    tokens: int
    """Tokens spent in this session."""
    message: str = ""
    """Why it stopped early, if it did."""


@dataclass(frozen=True)
class Plan:
    """A dry run's count of what a job would spend."""

    neurons: int
    """Neurons still to do."""
    calls: int
    """New LLM calls."""
    cached: int
    """Calls the log would answer (held now, or made earlier in the same job)."""
    prompt_tokens: int
    """Prompt tokens of the new calls (estimated from stand-ins where explanations are not known yet)."""
    completion_tokens: int
    """Completion tokens (at most)."""
    cost: float | None
    """Dollars, where every backend's price is known."""


class StoreCallLog(CallLog):
    """The call log in the store: lookups read `llm_calls`, every new call is appended at once."""

    def __init__(self, store: Store, job_id: int | None, max_tokens: int | None = None,
                 stop: threading.Event | None = None) -> None:
        super().__init__(max_tokens)
        self.store = store
        self.job_id = job_id
        self.stop = stop
        self._write = threading.Lock()

    def lookup(self, key: str) -> str | None:
        if self.stop is not None and self.stop.is_set():
            raise JobCancelled("cancelled")
        with self._write:
            return self.store.lookup_call(key)

    def save(self, key: str, call: Call) -> None:
        with self._write:
            self.store.save_call(key, call, self.job_id)


class Job:
    """One job over one run. Build it, then `plan()` or `run()`."""

    def __init__(self, store: Store, run: RunInfo, settings: JobSettings, selection: Selection, *,
                 backend_factory: Callable[[str], Backend] | None = None) -> None:
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
        self.store, self.run_info, self.settings = store, run, settings
        self.neurons = self._resolve(selection)
        if not self.neurons:
            raise JobError("no neuron matches the selection: widen --layers or --where")
        self._factory = backend_factory or make_backend
        self._backends: dict[str, Backend] = {}
        self._embedder: Embedder | None = None
        self.log: CallLog = CallLog()
        self._partner_texts: dict[NeuronId, str] = {}
        #: The dry run's tally while `plan()` runs: backends come wrapped in RecordingBackends then.
        self._tally: Tally | None = None
        #: What the dry run's neurons so far would have stored (the store gives the partner's newest explanation).
        self._planned: dict[NeuronId, NeuronResult] = {}
        params = {"run_id": run.run_id, **asdict(settings), "neurons": [list(n) for n in self.neurons]}
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

    # -- backends -------------------------------------------------------------------------------------
    def backend(self, spec: str) -> Backend:
        """A backend by spec, built once per job (explainer and simulator share a model when the spec matches);
        in a dry run, wrapped to tally its calls instead of making them."""
        if spec not in self._backends:
            self._backends[spec] = self._factory(spec)
        backend = self._backends[spec]
        backend.bind(self.log)
        return backend if self._tally is None else RecordingBackend(backend, self._tally)

    def embedder(self) -> Embedder | None:
        """The embedding model, loaded once, when the embedding scorer is asked for (never in a dry run)."""
        if self._tally is not None:
            return None
        if "embedding" in self.settings.scorers and self._embedder is None:
            from neuronscope.core.explanation.embedding import Embedder, EmbeddingError

            try:
                self._embedder = Embedder.load()
            except EmbeddingError as err:
                raise JobError(str(err)) from None
        return self._embedder

    def close(self) -> None:
        """Release the backends' models and connections."""
        for backend in self._backends.values():
            backend.close()
        self._backends.clear()
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None

    def prepare(self) -> None:
        """Load the backends the job needs (so a bad model fails before any neuron starts)."""
        if self._uses_explainer and self.settings.explanation is None:
            self.backend(self.settings.explainer)
        if self.settings.kind != "explain":
            self.backend(self.settings.simulator)
            self.embedder()

    @property
    def _uses_explainer(self) -> bool:
        return self.settings.kind in ("explain", "run")

    # -- per neuron ---------------------------------------------------------------------------------
    def _splits(self, neuron: NeuronId) -> NeuronSplits:
        records = self.store.records(self.run_info.run_id, neuron[0], neuron[1],
                                     kinds=("top", "bottom", "random"))
        splits = split_records(records, self.settings.tail, self.settings.sizes)
        if not splits.train or not splits.test:
            raise NeuronError(f"{neuron} has too few records for the {self.settings.tail} tail")
        return splits

    def _partner(self, index: int) -> NeuronId | None:
        if len(self.neurons) > 1:
            return self.neurons[(index + 1) % len(self.neurons)]
        others = [n for n in self.store.choose_neurons(self.run_info.run_id, layers=None, order="random", where=(),
                                                       limit=2, seed=self.settings.seed) if n != self.neurons[0]]
        return others[0] if others else None

    def _partner_text(self, partner: NeuronId) -> str:
        """Another neuron's explanation: the explainer's first candidate for it (a cached call when the partner is in
        the job), or for score jobs its newest stored explanation, else its lookup explanation."""
        if partner not in self._partner_texts:
            splits = self._splits(partner)
            if self._uses_explainer:
                explainer = self.backend(self.settings.explainer)
                text = explainer.explain(prompt_for(explainer, splits), self.settings.samples, self.settings.seed)[0]
            else:
                # A dry run stores nothing: there, what this job would have stored for the partner by now.
                landed = self._planned.get(partner)
                found = landed.explanations if landed else self.store.explanations(self.run_info.run_id, *partner,
                                                                                    tail=self.settings.tail)
                # the explainer's own explanation: a user sentence may be this job's own, scored on every neuron
                stored = [e for e in found if e.role == "candidate" and e.selected]
                text = stored[0].text if stored else lookup_of(splits)
            self._partner_texts[partner] = text
        return self._partner_texts[partner]

    def _candidates(self, neuron: NeuronId, splits: NeuronSplits) -> tuple[list[str], str, str]:
        """(texts, explainer, role) to score or store."""
        s = self.settings
        if s.kind == "score" and s.explanation is not None:
            return [s.explanation], "user", "user"
        if s.kind == "score":
            texts = self.store.candidate_texts(self.run_info.run_id, *neuron, tail=s.tail, explainer=s.explainer)
            if not texts:
                raise NeuronError(f"{neuron} has no {s.tail} explanation by {s.explainer}: "
                               "run `neuronscope explain` first, or pass --explanation")
            return texts, s.explainer, "candidate"
        explainer = self.backend(s.explainer)
        return explainer.explain(prompt_for(explainer, splits), s.samples, s.seed), s.explainer, "candidate"

    def _seed(self, neuron: NeuronId) -> int:
        """A neuron's seed for bootstraps and decoys: the job's seed mixed with its position."""
        return self.settings.seed * 1_000_003 + neuron[0] * 100_003 + neuron[1]

    def process(self, index: int) -> NeuronResult:
        """Explain and/or score one neuron (all LLM calls; nothing written)."""
        neuron = self.neurons[index]
        splits = self._splits(neuron)
        texts, explainer, role = self._candidates(neuron, splits)
        seed = self._seed(neuron)
        if self.settings.kind == "explain":
            out = tuple(ScoredExplanation(text=t, explainer=explainer, role=role, sample=i, selected=i == 0)
                        for i, t in enumerate(texts))
            return NeuronResult(neuron[0], neuron[1], self.settings.tail, out)
        simulator = self.backend(self.settings.simulator)
        scorers, embedder = self.settings.scorers, self.embedder()
        mode = self.settings.simulation
        revised = None
        if self.settings.revise and self.settings.kind == "run":
            explainer_backend = self.backend(self.settings.explainer)
            revised = revise(explainer_backend, simulator, splits, prompt_for(explainer_backend, splits), texts[0],
                             simulation=mode, seed=self.settings.seed)
        scored = score_candidates(simulator, splits, texts + ([revised] if revised else []), explainer=explainer,
                                  role=role, seed=seed, simulation=mode, scorers=scorers, embedder=embedder)
        if revised:
            scored[-1] = replace(scored[-1], explainer=f"{explainer} (revised)")
        partner = self._partner(index)
        extra = controls(simulator, splits, partner=partner, seed=seed, explainer=explainer, simulation=mode,
                         scorers=scorers, embedder=embedder,
                         partner_text=(lambda: self._partner_text(partner)) if partner else None)  # type: ignore[arg-type]
        return NeuronResult(neuron[0], neuron[1], self.settings.tail, tuple(scored + extra))

    # -- running --------------------------------------------------------------------------------------
    def pending(self, job_id: int | None) -> list[int]:
        """Indexes of the neurons a (new or resumed) job still has to do."""
        states = self.store.job_neuron_states(job_id) if job_id is not None else {}
        return [i for i, n in enumerate(self.neurons) if states.get(n, ("", ""))[0] != "done"]

    def run(self, *, progress: Progress | None = None, max_tokens: int | None = None,
            stop: threading.Event | None = None, landed: Landed | None = None) -> JobReport:
        """Run (or resume) the job; Ctrl-C or `stop` (checked before every LLM call) leaves it interrupted and
        resumable, with the calls already made in the log."""
        progress = progress or (lambda *_: None)
        if not self.store.read_only:
            self.store.mark_stale_jobs()
        found = self.store.find_job(self.key)
        if found and found[1] == "complete":
            return self._report(found[0], "complete", CallLog(), "")
        job_id = found[0] if found else self.store.create_job(self.run_info.run_id, self.settings.kind, self.params,
                                                               self.key, len(self.neurons))
        self.store.set_job_state(job_id, "running")
        log = self.log = StoreCallLog(self.store, job_id, max_tokens, stop)
        todo = self.pending(job_id)
        if todo:
            self.prepare()
        done = len(self.neurons) - len(todo)
        progress("neurons", done, len(self.neurons))
        state, message = "running", ""
        streak, cause = 0, ""  # neurons in a row that failed with the same systematic cause
        try:
            for index in todo:
                if stop is not None and stop.is_set():
                    state, message = "interrupted", "cancelled"
                    break
                neuron = self.neurons[index]
                error = ""
                try:
                    result = self.process(index)
                except (LLMError, NeuronError) as err:
                    error = str(err)
                    self.store.fail_neuron(job_id, *neuron, error)
                    same = getattr(err, "systematic", "")
                    streak, cause = (streak + 1 if same == cause else 1, same) if same else (0, "")
                else:
                    self.store.save_neuron(job_id, self.run_info.run_id, result)
                    streak, cause = 0, ""
                if landed is not None:
                    landed(neuron, error)
                done += 1
                progress("neurons", done, len(self.neurons))
                if streak >= FAIL_FAST:
                    message = f"{FAIL_FAST} neurons in a row failed the same way ({cause}): {error}"
                    self.store.set_job_state(job_id, "failed", message)
                    raise JobStopped(f"job {job_id} stopped: {message} — fix that, then run the same command to "
                                     "resume")
            else:
                failed = self.store.job_neuron_states(job_id)
                state = "partial" if any(s == "failed" for s, _ in failed.values()) else "complete"
        except BudgetExceeded as err:
            state, message = "stopped", str(err)
        except JobCancelled:
            state, message = "interrupted", "cancelled"
        except JobStopped:
            raise
        except BaseException:
            self.store.set_job_state(job_id, "interrupted", "stopped by the user or a fatal error")
            raise
        self.store.set_job_state(job_id, state, message)
        return self._report(job_id, state, log, message)

    def _report(self, job_id: int, state: str, log: CallLog, message: str) -> JobReport:
        states = self.store.job_neuron_states(job_id)
        return JobReport(job_id=job_id, state=state, done=sum(s == "done" for s, _ in states.values()),
                         failed={n: e for n, (s, e) in states.items() if s == "failed"}, total=len(self.neurons),
                         new_calls=log.new_calls, cache_hits=log.cache_hits, tokens=log.used_tokens, message=message)

    def plan(self, progress: Progress | None = None) -> Plan:
        """Count the calls and tokens the job would spend, without calling any model or writing anything: the
        neurons still to do go through `process()` as in `run()`, every backend wrapped in a RecordingBackend
        (neuronscope.core.llm.recording) that tallies the requests the real one would send and answers from the call
        log where it can, else with stand-ins. The embedding model is not loaded (it calls no LLM)."""
        found = self.store.find_job(self.key)
        todo = [] if found and found[1] == "complete" else self.pending(found[0] if found else None)
        tally = Tally()
        self.log, self._tally = LookupOnlyLog(StoreCallLog(self.store, None)), tally
        self._partner_texts.clear()
        self._planned.clear()
        try:
            for step, index in enumerate(todo):
                try:
                    self._planned[self.neurons[index]] = self.process(index)
                except (LLMError, NeuronError):
                    pass  # the real run records the failure against the neuron and goes on
                if progress:
                    progress("planning", step + 1, len(todo))
        finally:
            self.log, self._tally = CallLog(), None
            self._partner_texts.clear()  # stand-ins, not the explanations a run would get
            self._planned.clear()
        return Plan(len(todo), tally.calls, tally.cached, tally.prompt_tokens, tally.completion_tokens, tally.cost)


def run_job(store: Store, run: RunInfo, settings: JobSettings, selection: Selection, **options: Any) -> JobReport:
    """Build and run a job in one call (tests and scripts)."""
    factory = options.pop("backend_factory", None)
    job = Job(store, run, settings, selection, backend_factory=factory)
    try:
        return job.run(**options)
    finally:
        job.close()
