"""`neuronscope import-openai`: a local copy of (part of) OpenAI's GPT-2 XL neuron release into a run of the store.

Files are read one neuron at a time (neuronscope.core.interop.release parses them) and written in batches, each one
transaction that holds its neurons whole: records, statistics, related lists and explanations, with the job's state
of each. The run is 'importing' until every file has been read; rerunning the same command finds the run by its
folder and skips the neurons it already holds, so an interrupted import resumes where it stopped. A malformed or
missing file is reported through `problem` and skipped; it never stops the import. A neuron with a skipped file is
recorded as failed in the import's job (written with what its other files hold, when its record file was readable),
and the next import of the folder reads it again, replacing what the run holds of it in one transaction. The run's
layers and width are those of the neurons it holds (a skipped neuron file defines neither).

A folder that our own export wrote carries neuronscope/ beside the layout (neuronscope.core.interop.sidecar): the
run's model, revision, dtype and settings (quantile levels included) are taken from it, and who wrote each
explanation. Without it (OpenAI's release) the model is GPT-2 XL and the quantile levels are unknown: numbered.

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

import json
import multiprocessing
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING

from neuronscope.core.errors import NeuronscopeError, caused_by_interrupt
from neuronscope.core.ids import NeuronId
from neuronscope.core.interop.convert import ExcerptPool, neuron_records, results, stats
from neuronscope.core.interop.release import (
    ACTIVATIONS,
    EXPLANATIONS,
    LOOKUP_TOKENS,
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
from neuronscope.core.interop.sidecar import EXPLAINERS, RUN_FILE, Authorship, ExportedRun, parse_authorship, read_run
from neuronscope.core.records import CollectSettings, ImportedNeuron, RunInfo
from neuronscope.core.results import NeuronResult

if TYPE_CHECKING:
    from neuronscope.core.store import Store

#: The revision imported runs record (the release has one version).
RELEASE_REVISION = "openai-2023"
#: Neurons written per transaction.
BATCH = 200
DEFAULT_MODEL = "gpt2-xl"
#: An imported run's corpus: this and the release folder (one run per folder and model).
CORPUS_PREFIX = "openai-release:"


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
    failed: int = 0
    """Neurons with a file skipped, recorded as failed in the import's job: the next import of the folder reads
    them again."""
    retried: int = 0
    """Neurons of `imported` that the run held already, imported again because a file of theirs had been skipped."""
    partial: int = 0
    """Neurons of `failed` that were imported all the same, without what their skipped files hold."""


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


def is_import(run: RunInfo) -> bool:
    """Whether a run was made by import-openai."""
    return run.corpus.startswith(CORPUS_PREFIX)


def import_path(run: RunInfo) -> str:
    """The release folder an imported run was read from."""
    return run.corpus.removeprefix(CORPUS_PREFIX)


def levels_unknown(run: RunInfo) -> bool:
    """Whether an imported run's quantile levels are unknown (a release without our run.json, such as OpenAI's):
    its excerpt-max edges are then labelled by their index, 0, 1, 2, ..."""
    levels = run.settings.quantiles
    return is_import(run) and len(levels) > 1 and levels == tuple(float(i) for i in range(len(levels)))


def _settings(files: list[tuple[int, int, Path]], exported: ExportedRun | None) -> CollectSettings:
    """The run's settings: those of the run an export came from (less its bottom records, which the layout has no
    place for), else as the first readable neuron file shows them (record counts and length). The release does not
    say at which quantiles of the excerpt maxima its bins' boundaries lie, so they are numbered 0, 1, 2, ... (as
    many as the bins' edges or the boundaries, whichever is more) rather than guessed."""
    if exported is not None:
        return replace(exported.settings, bottom_k=0)
    for _, _, file in files[:20]:
        try:
            n = parse_neuron_record(read_json(file))
        except ReleaseError:
            continue
        bins = len(n.quantile)
        quantiles = tuple(float(b) for b in range(max(bins + 1, len(n.boundaries))))
        return CollectSettings(length=len(n.top[0].tokens), top_k=len(n.top), bottom_k=0, random_k=len(n.random),
                               quantile_k=len(n.quantile[0]) if bins else 0, quantiles=quantiles)
    return CollectSettings(bottom_k=0)


@dataclass(frozen=True)
class _Read:
    """One neuron's files, parsed: its record (None when that file is unusable), explanations, related lists, and
    the files that were malformed or missing."""

    record: ReleaseNeuron | None
    explanations: list[ReleaseExplanation]
    tokens: dict[str, list[tuple[str, float]]]
    related: dict[str, list[tuple[int, int, float]]]
    problems: list[tuple[Path, str]]
    authors: list[Authorship]


def _read_neuron(root: Path, parts: tuple[str, ...], layer: int, neuron: int, file: Path) -> _Read:
    """Read and parse one neuron's files (in a worker process when the import has several); never raises for a
    file's content."""
    problems: list[tuple[Path, str]] = []

    def part_of(path: Path) -> str:
        return path.parent.parent.relative_to(root).as_posix()

    try:
        record = parse_neuron_record(read_json(file))
        if (record.layer, record.neuron) != (layer, neuron):
            raise ReleaseError(f"it holds neuron {record.layer}/{record.neuron}, not {layer}/{neuron}")
    except ReleaseError as err:
        return _Read(None, [], {}, {}, [(file, str(err))], [])
    explanations: list[ReleaseExplanation] = []
    tokens: dict[str, list[tuple[str, float]]] = {}
    related: dict[str, list[tuple[int, int, float]]] = {}
    authors: list[Authorship] = []
    for part in parts:  # the parts the folder has must hold a file for every neuron (ours: for every one explained)
        path = release_path(root, part, layer, neuron)
        try:
            if part == EXPLAINERS:  # (not when the explanations file was skipped: that is the problem)
                if (path.exists() or explanations) and not any(part_of(p) == EXPLANATIONS for p, _ in problems):
                    authors = _authors(path, explanations)
                continue
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
    return _Read(record, explanations, tokens, related, problems, authors)


def _authors(path: Path, explanations: list[ReleaseExplanation]) -> list[Authorship]:
    """Who wrote a neuron's explanations, from our explainers file (one entry per explanation)."""
    if not path.exists():
        raise ReleaseError(f"missing (its explanations file lists {len(explanations)})")
    authors = parse_authorship(read_json(path))
    if len(authors) != len(explanations):
        raise ReleaseError(f"it names {len(authors)} explanations, its explanations file lists {len(explanations)}")
    return authors


def _ignore_interrupts() -> None:
    """Worker processes leave Ctrl-C to the importing process, which stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _seed(store: Store, run_id: int, pool: ExcerptPool) -> None:
    """Tell the pool the excerpts the run holds (an earlier session of the import wrote them), so this session's
    records with the same tokens share them."""
    for excerpt_id, tokens in store.excerpt_texts(run_id):
        pool.known(excerpt_id, tokens)


def release_metadata(root: Path) -> ExportedRun | None:
    """The run a release folder was exported from, when our export wrote it (None for OpenAI's release);
    ReleaseImportError for a run.json that cannot be read."""
    try:
        return read_run(root)
    except ReleaseError as err:
        raise ReleaseImportError(f"{root / RUN_FILE}: {err}: fix or delete that file (neuronscope's own, beside the "
                                 "release) and run the same command again") from None


def import_release(store: Store, path: Path, *, model: str | None = None, layers: tuple[int, ...] | None = None,
                   batch: int = BATCH, workers: int = 1, progress: Callable[[str, int, int], None] | None = None,
                   problem: Callable[[Path, str], None] | None = None) -> ImportReport:
    """Import a release folder into the store (resuming a run of the same folder); see the module docstring. The
    run's model is `model`, else the one our export's run.json names, else GPT-2 XL's. With `workers` above 1, that
    many processes read and parse the files while this one writes."""
    root = release_root(path)
    files = [f for f in neuron_files(root, ACTIVATIONS) if layers is None or f[0] in layers]
    if not files:
        raise ReleaseImportError(f"{root / ACTIVATIONS} holds no L/N.json neuron files"
                                 + (f" in layers {', '.join(map(str, layers))}" if layers else ""))
    exported = release_metadata(root)
    model = model or (exported.model if exported else DEFAULT_MODEL)
    same = exported is not None and exported.model == model  # (another --model: the export's revision is not its)
    corpus = f"{CORPUS_PREFIX}{root.resolve()}"
    run_id = store.find_run(model, corpus)
    if run_id is None:  # shaped by the file names until neurons are written, then by those (`reshape`)
        run_id = store.create_run(model=model, revision=exported.revision if same and exported else RELEASE_REVISION,
                                  corpus=corpus, settings=_settings(files, exported),
                                  layers=tuple(sorted({f[0] for f in files})),
                                  neurons_per_layer=max(f[1] for f in files) + 1,
                                  dtype=exported.dtype if exported else "float32",
                                  units=exported.units if exported else "")
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
    wanted = {(layer, neuron) for layer, neuron, _ in files}
    # Neurons held whose files were skipped (their last import recorded them failed) are read again and replaced.
    again = store.import_failures(run_id) & set(held) & wanted
    present = set(held) & wanted - again
    pool = ExcerptPool(store.next_excerpt_id(run_id))
    problems = written = failed = retried = partial = 0

    def report(file: Path, message: str) -> None:
        nonlocal problems
        problems += 1
        if problem:
            problem(file, message)

    def reshape(neurons: list[NeuronId]) -> None:
        """The run's layers and width: those of the neurons it holds (a skipped file defines neither)."""
        nonlocal held_width
        held_layers.update(n.layer for n in neurons)
        held_width = max([held_width, *(n.neuron + 1 for n in neurons)])
        if held_layers:
            store.set_run_shape(run_id, tuple(sorted(held_layers)), held_width)

    parts = tuple(p for p in (EXPLANATIONS, WEIGHT_TOKENS, LOOKUP_TOKENS, WEIGHT_NEURONS, EXPLAINERS)
                  if (root / p).is_dir())
    todo = [(layer, neuron, file) for layer, neuron, file in files if (layer, neuron) not in present]
    pending: list[tuple[ImportedNeuron, NeuronResult]] = []
    failing: dict[NeuronId, str] = {}

    def flush(done: int) -> None:
        """One transaction: the neurons read (those held replaced), and the job's states of them and of the
        neurons whose files were skipped (failed: the next import reads them again)."""
        nonlocal written, failed, retried, partial
        neurons = [NeuronId(n.stats.layer, n.stats.index) for n, _ in pending]
        if pending or failing:
            store.import_neurons(run_id, job_id, pool.take_new(), [n for n, _ in pending], [r for _, r in pending],
                                 failed=failing, retried=failed_before & {*neurons, *failing},
                                 replace=again & set(neurons), n_excerpts=pool.next_id)
        written += len(pending)
        failed += len(failing)
        retried += len(again & set(neurons))
        partial += len(set(failing) & set(neurons))
        pending.clear()
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
        # Neurons an older version wrote but did not mark (Ctrl-C between its two transactions).
        unmarked = sorted(n for n in present if states.get(n, ("", ""))[0] != "done")
        if unmarked:
            store.save_batch(job_id, run_id, [NeuronResult(layer, neuron, "pos") for layer, neuron in unmarked],
                             retried=failed_before & set(unmarked))
        for done, ((layer, neuron, _), read) in enumerate(zip(todo, reads), len(present) + 1):
            for file, message in read.problems:
                report(file, message)
            if read.problems:  # the neuron's first skipped file, as the job records why it failed
                file, message = read.problems[0]
                failing[NeuronId(layer, neuron)] = f"{file.relative_to(root).as_posix()}: {message}"
            if read.record is not None:  # written, with what its other files held
                records = neuron_records(read.record, pool)
                result, scored = results(read.record, records, read.explanations, pool, read.authors)
                pending.append((ImportedNeuron(stats(read.record), records + scored, read.tokens, read.related),
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
        return ImportReport(run_id, written, len(present), problems, False, failed, retried, partial)
    finally:
        if executor:
            executor.shutdown(wait=False, cancel_futures=True)
    if written + len(present) + len(again) == 0:
        store.set_job_state(job_id, "failed", "no neuron file could be read")
        store.fail_run(run_id, "failed", "no neuron file of the release could be read")
        raise ReleaseImportError(f"none of the {len(files):,} neuron files under {root / ACTIVATIONS} could be read "
                                 "(each is listed above with its reason): fix or replace them, then run the same "
                                 "command again")
    store.set_job_state(job_id, "complete")
    store.set_run_status(run_id, "complete", n_excerpts=store.next_excerpt_id(run_id))
    return ImportReport(run_id, written, len(present), problems, True, failed, retried, partial)
