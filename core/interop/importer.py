"""`neuronscope import-openai`: a local copy of (part of) OpenAI's GPT-2 XL neuron release into a run of the store.

Files are read one neuron at a time (neuronscope.core.interop.release parses them) and written in batches, each one transaction that
holds its neurons whole: records, statistics, related lists and explanations. The run is 'importing' until every
file has been read; rerunning the same command finds the run by its folder and skips the neurons it already
holds, so an interrupted import resumes where it stopped. A malformed or missing file is reported through
`problem` and skipped; it never stops the import.

What the release has and a collection would compute differently:
- The release has no excerpt ids: records with the same tokens share one excerpt (within an import session),
  stored with token strings and no token ids.
- Statistics: the release's moments; max and min over the records; selectivity as a collection defines it, with the
  median excerpt maximum taken from the random sample; token count and density are unknown (0 and NaN).
- Explanations are the release's candidates for the positive tail, the best by its published score selected. Their
  per-sequence simulations (0-10 scale, stored on our 0-9 scale) are scored again by neuronscope.core.explanation.score on the same
  sequences, so they carry our intervals and top/random split; the release's own number is kept as the
  `published` method.
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
        return CollectSettings(length=len(n.top[0].tokens), top_k=len(n.top), bottom_k=0, random_k=len(n.random),
                               quantile_k=len(n.quantile[0]) if bins else 0,
                               quantiles=quantiles if len(quantiles) == bins + 1 else tuple(float(b) for b in range(bins + 1)))
    return CollectSettings(bottom_k=0)


class ExcerptPool:
    """Excerpt ids by content: a sequence that several records hold (the release draws every neuron's records from
    one set of sequences) is stored once. Within one import session; a resumed import starts a new pool."""

    def __init__(self, next_id: int) -> None:
        self.next_id = next_id
        self._ids: dict[bytes, int] = {}
        self.new: dict[int, tuple[str, ...]] = {}
        """Excerpts first seen since the last `take_new`."""

    def id_of(self, tokens: tuple[str, ...]) -> int:
        key = hashlib.blake2b(json.dumps(tokens).encode(), digest_size=16).digest()  # unambiguous for any tokens
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
    groups = [("top", -1, n.top), ("random", -1, n.random)] + [("quantile", b, bin_) for b, bin_ in enumerate(n.quantile)]
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
            kind = "top" if record.kind == "top" or (record.kind == "scored" and record.max >= weakest_top) else "random"
            predicted = tuple(v * TOP / RELEASE_SCALE for v in s.expected)
            sims.append(Simulation(record.excerpt_id, kind, "test", predicted))
            kinds.append(kind)
            targets.append(np.maximum(np.asarray(s.true, np.float64), 0.0))
            predictions.append(np.asarray(predicted, np.float64))
        ours = list(score(kinds, targets, predictions, scale_max=scale_max, seed=n.layer * 100_003 + n.neuron).values()) \
            if sims else []
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
    found_layers = {f[0] for f in files}
    width = max(f[1] for f in files) + 1
    run_id = store.find_run(model, corpus)
    if run_id is None:
        run_id = store.create_run(model=model, revision=RELEASE_REVISION, corpus=corpus, settings=_settings(files),
                                  layers=tuple(sorted(found_layers)), neurons_per_layer=width, dtype="float32")
    else:  # a resumed import, or more layers of the same folder
        run = store.run(run_id)
        store.set_run_shape(run_id, tuple(sorted(found_layers | set(run.layers))), max(width, run.neurons_per_layer))
    store.set_run_status(run_id, "importing")
    key = f"import:{run_id}"
    job = store.find_job(key)
    job_id = job[0] if job else store.create_job(run_id, "import", json.dumps({"path": str(root)}), key, len(files))
    present = set(store.run_neurons(run_id)) & {(layer, neuron) for layer, neuron, _ in files}
    pool = ExcerptPool(store.next_excerpt_id(run_id))
    problems = written = 0

    def report(file: Path, message: str) -> None:
        nonlocal problems
        problems += 1
        if problem:
            problem(file, message)

    parts = tuple(p for p in (EXPLANATIONS, WEIGHT_TOKENS, LOOKUP_TOKENS, WEIGHT_NEURONS) if (root / p).is_dir())
    todo = [(layer, neuron, file) for layer, neuron, file in files if (layer, neuron) not in present]
    pending: list[tuple[ImportedNeuron, NeuronResult]] = []

    def flush(done: int) -> None:
        nonlocal written
        if pending:
            store.import_neurons(run_id, job_id, pool.take_new(), [n for n, _ in pending], [r for _, r in pending])
            written += len(pending)
            pending.clear()
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
        for done, read in enumerate(reads, len(present) + 1):
            for file, message in read.problems:
                report(file, message)
            if read.record is None:
                continue
            records = _records(read.record, pool)
            result, scored = _results(read.record, records, read.explanations, pool)
            pending.append((ImportedNeuron(_stats(read.record), records + scored, read.tokens, read.related), result))
            if len(pending) >= batch:
                flush(done)
        flush(len(files))
    except BaseException as err:
        if not caused_by_interrupt(err):  # (a Ctrl-C during a DuckDB write comes out as DuckDB's error)
            raise
        pending.clear()  # the batch in hand is dropped whole; a rerun reads it again
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
