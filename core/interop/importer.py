"""`neuronscope import-openai`: a local copy of (part of) OpenAI's GPT-2 XL neuron release into a run of the store.

Files are read one neuron at a time (neuronscope.core.interop.release parses them) and written in batches, each one
transaction that holds its neurons whole: records, statistics, related lists and explanations. The run is
'importing' until every file has been read; rerunning the same command finds the run by its folder and skips the
neurons it already holds, so an interrupted import resumes where it stopped. A malformed or missing file is reported
through `problem` and skipped; it never stops the import. The run's layers and width are those of the neurons it
holds (a skipped file defines neither); the import's job counts the neurons done (held) and failed (unreadable) of
its files.

What the release has and a collection would compute differently:
- The release has no excerpt ids: records with the same tokens share one excerpt (a resumed import, or one of
  more layers of the same folder, reuses the excerpts the run holds), stored with token strings and no token ids.
- Statistics: the release's moments; max and min over the records; selectivity as a collection defines it, with the
  median excerpt maximum taken from the random sample; token count and density are unknown (0 and NaN).
- Explanations are the release's candidates for the positive tail, the best by its published score selected. Their
  per-sequence simulations (0-10 scale, stored on our 0-9 scale) are scored again by
  neuronscope.core.explanation.score on the same sequences, so they carry our intervals and top/random split; the
  release's own number is kept as the `published` method.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from neuronscope.core.errors import NeuronscopeError, caused_by_interrupt
from neuronscope.core.explanation.score import score
from neuronscope.core.ids import NeuronId
from neuronscope.core.interop.release import (
    ACTIVATIONS,
    EXPLANATIONS,
    LOOKUP_TOKENS,
    RELEASE_SCALE,
    WEIGHT_NEURONS,
    WEIGHT_TOKENS,
    ReleaseError,
    ReleaseExplanation,
    ReleaseNeuron,
    neuron_files,
    parse_explanations,
    parse_lookup_tokens,
    parse_neuron_record,
    parse_related_neurons,
    parse_weight_tokens,
    read_json,
    release_path,
)
from neuronscope.core.records import TOP, ActivationRecord, CollectSettings, ImportedNeuron, NeuronStats
from neuronscope.core.results import NeuronResult, Score, ScoredExplanation, Simulation, SplitScores

if TYPE_CHECKING:
    from neuronscope.core.store import Store

#: How imported explanations and their simulations are named.
RELEASE_EXPLAINER = "openai-release"
#: The revision imported runs record (the release has one version).
RELEASE_REVISION = "openai-2023"
#: Neurons written per transaction.
BATCH = 200
DEFAULT_MODEL = "gpt2-xl"


class ReleaseImportError(NeuronscopeError):
    """A problem with the import as a whole (no release at the path, a store problem): one line."""


@dataclass(frozen=True)
class ImportReport:
    """What an import did."""

    run_id: int
    """The run the neurons went into."""
    imported: int
    """Neurons written by this call."""
    present: int
    """Neurons skipped because the run already held them."""
    problems: int
    """Files reported and skipped."""
    complete: bool
    """Every neuron file was read (False when interrupted)."""


def release_root(path: Path) -> Path:
    """The release folder: `path` itself when it holds collated-activations/, else ReleaseImportError naming the fix."""
    if not path.exists():
        raise ReleaseImportError(f"no folder at {path}: pass the folder that holds the release's {ACTIVATIONS}/")
    if not path.is_dir():
        raise ReleaseImportError(f"{path} is a file: pass the folder that holds the release's {ACTIVATIONS}/")
    if (path / ACTIVATIONS).is_dir():
        return path
    if path.name == ACTIVATIONS:
        return path.parent
    raise ReleaseImportError(f"{path} has no {ACTIVATIONS}/ folder: pass the folder of the release that holds "
                             f"{ACTIVATIONS}/L/N.json (and explanations/, related-tokens/, related-neurons/)")


def _selectivity(n: ReleaseNeuron) -> float:
    if not n.random or not n.variance > 0:
        return math.nan
    top = np.mean([max(e.activations) for e in n.top])
    median = np.median([max(e.activations) for e in n.random])
    return float((top - median) / math.sqrt(n.variance))


def _stats(n: ReleaseNeuron) -> NeuronStats:
    every = [a for group in (n.top, n.random, *n.quantile) for e in group for a in e.activations]
    return NeuronStats(layer=n.layer, index=n.neuron, count=0, mean=n.mean, variance=n.variance, skewness=n.skewness,
                       kurtosis=n.kurtosis, max=max(every), min=min(every), density=math.nan,
                       selectivity=_selectivity(n), quantile_edges=n.boundaries)


def _settings(files: list[tuple[int, int, Path]]) -> CollectSettings:
    """The run's settings as the first readable neuron file shows them (record counts and length)."""
    for _, _, file in files[:20]:
        try:
            n = parse_neuron_record(read_json(file))
        except ReleaseError:
            continue
        bins = len(n.quantile)
        quantiles = CollectSettings().quantiles
        if len(quantiles) != bins + 1:
            quantiles = tuple(float(b) for b in range(bins + 1))
        return CollectSettings(length=len(n.top[0].tokens), top_k=len(n.top), bottom_k=0, random_k=len(n.random),
                               quantile_k=len(n.quantile[0]) if bins else 0, quantiles=quantiles)
    return CollectSettings(bottom_k=0)


def _excerpt_key(tokens: tuple[str, ...]) -> bytes:
    return hashlib.blake2b(json.dumps(tokens).encode(), digest_size=16).digest()  # unambiguous for any tokens


class ExcerptPool:
    """Excerpt ids by content: a sequence that several records hold (the release draws every neuron's records from
    one set of sequences) is stored once. A resumed import first tells the pool the excerpts the run holds
    (`known`), so its records point at those instead of storing them again."""

    def __init__(self, next_id: int) -> None:
        self.next_id = next_id
        self._ids: dict[bytes, int] = {}
        self.new: dict[int, tuple[str, ...]] = {}
        """Excerpts first seen since the last `take_new`."""

    def known(self, excerpt_id: int, tokens: tuple[str, ...]) -> None:
        """An excerpt the store already holds (written by an earlier session of the import)."""
        self._ids.setdefault(_excerpt_key(tokens), excerpt_id)

    def id_of(self, tokens: tuple[str, ...]) -> int:
        key = _excerpt_key(tokens)
        found = self._ids.get(key)
        if found is None:
            found = self._ids[key] = self.next_id
            self.new[found] = tokens
            self.next_id += 1
        return found

    def take_new(self) -> dict[int, tuple[str, ...]]:
        new, self.new = self.new, {}
        return new


def _records(n: ReleaseNeuron, pool: ExcerptPool) -> tuple[ActivationRecord, ...]:
    groups = [("top", -1, n.top), ("random", -1, n.random)]
    groups += [("quantile", b, bin_) for b, bin_ in enumerate(n.quantile)]
    out = []
    ranks: dict[str, int] = {}
    for kind, bin_, excerpts in groups:
        for e in excerpts:
            rank = ranks.get(kind, 0)
            ranks[kind] = rank + 1
            out.append(ActivationRecord(kind=kind, rank=rank, excerpt_id=pool.id_of(e.tokens), tokens=e.tokens,
                                        activations=e.activations, bin=bin_, exact_max=max(e.activations),
                                        exact_min=min(e.activations)))
    return tuple(out)


def _results(n: ReleaseNeuron, records: tuple[ActivationRecord, ...], explanations: list[ReleaseExplanation],
             pool: ExcerptPool) -> tuple[NeuronResult, tuple[ActivationRecord, ...]]:
    """The release's explanations as our results, and records of kind 'scored' for the sequences their simulations
    cover that no record holds (so every simulation's true activations stay in the store)."""
    by_tokens = {r.tokens: r for r in records}
    weakest_top = min((r.max for r in records if r.kind == "top"), default=math.inf)
    scale_max = max((r.max for r in records if r.kind == "top"), default=0.0)
    scored: list[ActivationRecord] = []
    out = []
    best = max(range(len(explanations)), key=lambda i: (np.nan_to_num(explanations[i].score, nan=-2.0), -i),
               default=0)
    for i, e in enumerate(explanations):
        sims, kinds, targets, predictions = [], [], [], []
        for s in e.sequences:
            record = by_tokens.get(s.tokens)
            if record is None:
                record = ActivationRecord(kind="scored", rank=len(scored), excerpt_id=pool.id_of(s.tokens),
                                          tokens=s.tokens, activations=s.true, exact_max=max(s.true),
                                          exact_min=min(s.true))
                scored.append(record)
                by_tokens[s.tokens] = record
            strong = record.kind == "top" or (record.kind == "scored" and record.max >= weakest_top)
            kind = "top" if strong else "random"
            predicted = tuple(v * TOP / RELEASE_SCALE for v in s.expected)
            sims.append(Simulation(record.excerpt_id, kind, "test", predicted))
            kinds.append(kind)
            targets.append(np.maximum(np.asarray(s.true, np.float64), 0.0))
            predictions.append(np.asarray(predicted, np.float64))
        seed = n.layer * 100_003 + n.neuron
        ours = list(score(kinds, targets, predictions, scale_max=scale_max, seed=seed).values()) if sims else []
        published = Score("published", e.score, math.nan, math.nan, sum(len(s.tokens) for s in e.sequences),
                          "" if math.isfinite(e.score) else "undefined")
        out.append(ScoredExplanation(
            text=e.text, explainer=RELEASE_EXPLAINER, role="candidate", sample=i, selected=i == best,
            simulations=tuple(sims), splits=(SplitScores("test", RELEASE_EXPLAINER, (*ours, published)),)))
    return NeuronResult(n.layer, n.neuron, "pos", tuple(out)), tuple(scored)


@dataclass(frozen=True)
class _Read:
    """One neuron's files, parsed: its record (None when that file is unusable), explanations, related lists, and
    the files that were malformed or missing."""

    record: ReleaseNeuron | None
    explanations: list[ReleaseExplanation]
    tokens: dict[str, list[tuple[str, float]]]
    related: dict[str, list[tuple[int, int, float]]]
    problems: list[tuple[Path, str]]


def _read_neuron(root: Path, parts: tuple[str, ...], layer: int, neuron: int, file: Path) -> _Read:
    """Read and parse one neuron's files (in a worker process when the import has several); never raises for a
    file's content."""
    problems: list[tuple[Path, str]] = []
    try:
        record = parse_neuron_record(read_json(file))
        if (record.layer, record.neuron) != (layer, neuron):
            raise ReleaseError(f"it holds neuron {record.layer}/{record.neuron}, not {layer}/{neuron}")
    except ReleaseError as err:
        return _Read(None, [], {}, {}, [(file, str(err))])
    explanations: list[ReleaseExplanation] = []
    tokens: dict[str, list[tuple[str, float]]] = {}
    related: dict[str, list[tuple[int, int, float]]] = {}
    for part in parts:  # the parts the folder has must hold a file for every neuron
        path = release_path(root, part, layer, neuron)
        try:
            if not path.exists():
                raise ReleaseError("missing")
            obj = read_json(path)
            if part == EXPLANATIONS:
                ident, found = parse_explanations(obj)
                if ident != (layer, neuron):
                    raise ReleaseError(f"it holds neuron {ident[0]}/{ident[1]}, not {layer}/{neuron}")
                explanations = found
            elif part == WEIGHT_TOKENS:
                tokens.update(parse_weight_tokens(obj))
            elif part == LOOKUP_TOKENS:
                tokens["lookup"] = parse_lookup_tokens(obj)
            else:
                related = parse_related_neurons(obj)
        except ReleaseError as err:
            problems.append((path, str(err)))
    return _Read(record, explanations, tokens, related, problems)


def _ignore_interrupts() -> None:
    """Worker processes leave Ctrl-C to the importing process, which stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _seed(store: Store, run_id: int, pool: ExcerptPool) -> None:
    """Tell the pool the excerpts the run holds (an earlier session of the import wrote them), so this session's
    records with the same tokens share them."""
    for excerpt_id, tokens in store.excerpt_texts(run_id):
        pool.known(excerpt_id, tokens)


def import_release(store: Store, path: Path, *, model: str = DEFAULT_MODEL, layers: tuple[int, ...] | None = None,
                   batch: int = BATCH, workers: int = 1, progress: Callable[[str, int, int], None] | None = None,
                   problem: Callable[[Path, str], None] | None = None) -> ImportReport:
    """Import a release folder into the store (resuming a run of the same folder); see the module docstring. With
    `workers` above 1, that many processes read and parse the files while this one writes."""
    root = release_root(path)
    files = [f for f in neuron_files(root, ACTIVATIONS) if layers is None or f[0] in layers]
    if not files:
        raise ReleaseImportError(f"{root / ACTIVATIONS} holds no L/N.json neuron files"
                                 + (f" in layers {', '.join(map(str, layers))}" if layers else ""))
    corpus = f"openai-release:{root.resolve()}"
    run_id = store.find_run(model, corpus)
    if run_id is None:  # shaped by the file names until neurons are written, then by those (`reshape`)
        run_id = store.create_run(model=model, revision=RELEASE_REVISION, corpus=corpus, settings=_settings(files),
                                  layers=tuple(sorted({f[0] for f in files})),
                                  neurons_per_layer=max(f[1] for f in files) + 1, dtype="float32")
    store.set_run_status(run_id, "importing")
    held = store.run_neurons(run_id)  # a resumed import, or more layers of the same folder
    held_layers, held_width = {n.layer for n in held}, max((n.neuron + 1 for n in held), default=0)
    # One job per folder and choice of layers, so its total is the count of its files.
    key = f"import:{run_id}" + (f":layers {','.join(map(str, sorted(set(layers))))}" if layers is not None else "")
    job = store.find_job(key)
    if job:
        job_id = job[0]
        store.set_job_state(job_id, "running")
    else:
        job_id = store.create_job(run_id, "import", json.dumps({"path": str(root), "layers": layers}), key, len(files))
    states = store.job_neuron_states(job_id)
    failed_before = {n for n, (state, _) in states.items() if state == "failed"}
    present = set(held) & {(layer, neuron) for layer, neuron, _ in files}
    pool = ExcerptPool(store.next_excerpt_id(run_id))
    problems = written = 0

    def report(file: Path, message: str) -> None:
        nonlocal problems
        problems += 1
        if problem:
            problem(file, message)

    def mark(done: list[NeuronId], failed: dict[NeuronId, str]) -> None:
        """The job's states of neurons written (done) and of unreadable ones (failed), in a transaction after the
        neurons' own: a neuron written but not marked (Ctrl-C between the two) is marked by the next session."""
        if done or failed:
            store.save_batch(job_id, run_id, [NeuronResult(layer, neuron, "pos") for layer, neuron in done], failed,
                             retried=failed_before & {*done, *failed})

    def reshape(neurons: list[NeuronId]) -> None:
        """The run's layers and width: those of the neurons it holds (a skipped file defines neither)."""
        nonlocal held_width
        held_layers.update(n.layer for n in neurons)
        held_width = max([held_width, *(n.neuron + 1 for n in neurons)])
        if held_layers:
            store.set_run_shape(run_id, tuple(sorted(held_layers)), held_width)

    parts = tuple(p for p in (EXPLANATIONS, WEIGHT_TOKENS, LOOKUP_TOKENS, WEIGHT_NEURONS) if (root / p).is_dir())
    todo = [(layer, neuron, file) for layer, neuron, file in files if (layer, neuron) not in present]
    pending: list[tuple[ImportedNeuron, NeuronResult]] = []
    failing: dict[NeuronId, str] = {}

    def flush(done: int) -> None:
        nonlocal written
        neurons = [NeuronId(n.stats.layer, n.stats.index) for n, _ in pending]
        if pending:
            store.import_neurons(run_id, job_id, pool.take_new(), [n for n, _ in pending], [r for _, r in pending])
            written += len(pending)
            pending.clear()
        mark(neurons, failing)
        failing.clear()
        reshape(neurons)
        if progress:
            progress("import", done, len(files))

    executor = None
    reads: Iterator[_Read] = (_read_neuron(root, parts, *item) for item in todo)
    if workers > 1 and len(todo) > batch:
        executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_ignore_interrupts)
        layer_ids, neuron_ids, paths = zip(*todo)
        reads = executor.map(_read_neuron, repeat(root), repeat(parts), layer_ids, neuron_ids, paths, chunksize=16)
    try:
        _seed(store, run_id, pool)
        mark(sorted(n for n in present if states.get(n, ("", ""))[0] != "done"), {})
        for done, ((layer, neuron, _), read) in enumerate(zip(todo, reads), len(present) + 1):
            for file, message in read.problems:
                report(file, message)
            if read.record is None:
                failing[NeuronId(layer, neuron)] = read.problems[0][1]
            else:
                records = _records(read.record, pool)
                result, scored = _results(read.record, records, read.explanations, pool)
                pending.append((ImportedNeuron(_stats(read.record), records + scored, read.tokens, read.related),
                                result))
            if len(pending) + len(failing) >= batch:
                flush(done)
        flush(len(files))
    except BaseException as err:
        if not caused_by_interrupt(err):  # (a Ctrl-C during a DuckDB write comes out as DuckDB's error)
            raise
        pending.clear()  # the batch in hand is dropped whole; a rerun reads it again
        failing.clear()
        store.set_job_state(job_id, "interrupted")
        return ImportReport(run_id, written, len(present), problems, False)
    finally:
        if executor:
            executor.shutdown(wait=False, cancel_futures=True)
    if written + len(present) == 0:
        store.set_job_state(job_id, "failed", "no neuron file could be read")
        store.fail_run(run_id, "failed", "no neuron file of the release could be read")
        raise ReleaseImportError(f"none of the {len(files):,} neuron files under {root / ACTIVATIONS} could be read "
                                 "(each is listed above with its reason): fix or replace them, then run the same "
                                 "command again")
    store.set_job_state(job_id, "complete")
    store.set_run_status(run_id, "complete", n_excerpts=store.next_excerpt_id(run_id))
    return ImportReport(run_id, written, len(present), problems, True)
