"""`neuronscope export`: a run of the store as files other tools read.

- `parquet`: a folder of Parquet files: `neurons.parquet` (statistics, each neuron's newest selected positive-tail
  explanation and its test score), `explanations.parquet` (every explanation, one row per score),
  `related.parquet` (each neuron's related-token and related-neuron lists, one row per list), `tags.parquet` (a
  person's tags and notes) and `lists.parquet` (named lists of neurons: the app's marks, lists saved under a name).
- `jsonl`: one JSON object per line and neuron, in the schema JSONL_SCHEMA documents (README, "OpenAI's GPT-2 XL release, Parquet and JSONL").
- `openai`: the layout of OpenAI's GPT-2 XL release (neuronscope.core.interop.release), so tools written for it read our runs:
  collated-activations/, explanations/ (the positive tail's candidates and user sentences with test-split
  simulations, expected activations on the release's 0-10 scale), related-tokens/ and related-neurons/ where the
  run has them, and our own neuronscope/ folder (neuronscope.core.interop.sidecar: the run's model and settings, who
  wrote each explanation) that readers of the release ignore.

Numbers are written with the digits the store has (neuronscope.core.interop.numbers): float32 values as their
shortest float32 text, activations (int8 codes in the store) to 4 significant digits of their record's peak. Each
export takes the whole run or the neurons of some layers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from neuronscope.core.choices import COLLECTED_KINDS, TAILS
from neuronscope.core.errors import NeuronscopeError
from neuronscope.core.ids import NeuronId
from neuronscope.core.interop.numbers import activations, float32, scaled, shortest32
from neuronscope.core.interop.release import (
    ACTIVATIONS,
    EXPLANATIONS,
    LOOKUP_TOKENS,
    RELEASE_SCALE,
    TOKEN_LISTS,
    WEIGHT_NEURONS,
    WEIGHT_TOKENS,
    Excerpt,
    ReleaseExplanation,
    ReleaseNeuron,
    SequenceSimulation,
    explanations_json,
    lookup_tokens_json,
    neuron_record_json,
    related_neurons_json,
    release_path,
    weight_tokens_json,
)
from neuronscope.core.interop.sidecar import EXPLAINERS, RUN_FILE, Authorship, authorship_json, run_json
from neuronscope.core.records import TOP, ActivationRecord
from neuronscope.core.results import NeuronBundle, ScoredExplanation
from neuronscope.core.staging import staged as staged_path

if TYPE_CHECKING:
    from neuronscope.core.store import Store

Progress = Callable[[str, int, int], None]

#: The JSONL export's fields, one object per neuron (the README's export section shows it in full).
JSONL_SCHEMA = {
    "layer": "int", "neuron": "int", "unit": "neuron (an MLP neuron) | latent (a sparse coder's latent)",
    "stats": "{count, mean, variance, skewness, kurtosis, max, min, density, selectivity, quantile_edges}",
    "records": "[{kind, rank, bin, tokens, activations}]",
    "explanations": "[{tail, role, explainer, sample, selected, text, source, scores: [{split, simulator, method, "
                    "value, ci_low, ci_high, n, flags}]}]",
    "related_tokens": "{list: [[token, value]]}", "related_neurons": "{list: [[layer, neuron, weight]]}",
    "tags": "[{tag, note, author, created_at}] (a person's tags and notes, oldest first; tag '' for a note alone)",
    "lists": "[name] (the saved lists the neuron is on: 'marked' is the app's marks)",
}


class ExportError(NeuronscopeError):
    """An export that cannot be written: one line naming the fix."""


@contextmanager
def _staged(out: Path, *, folder: bool) -> Iterator[Path]:
    """Where to write `out`: a hidden sibling, renamed onto `out` only once the export is complete, so a failure, a
    full disk or Ctrl-C leaves no partial file (and a retry is not refused because one exists)."""
    if out.exists() and (not out.is_dir() if folder else out.is_dir()):
        raise ExportError(f"{out} exists and is a {'file' if folder else 'folder'}: pass another --out")
    if folder and out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is a folder that is not empty: pass a new or empty folder as --out")
    if not folder and out.exists():
        raise ExportError(f"{out} exists: pass a new file as --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staged = staged_path(out, "partial")  # (what a process killed meanwhile left there goes)
        if folder:
            staged.mkdir()
    except OSError as err:
        raise ExportError(f"cannot create {out} ({err.strerror or err}): pass another --out") from None
    try:
        yield staged
        os.replace(staged, out)  # a folder replaces an empty folder; a file takes a name nothing holds
    except BaseException:
        if staged.is_dir():
            shutil.rmtree(staged, ignore_errors=True)
        else:
            staged.unlink(missing_ok=True)
        raise


def _clean(value: float | None) -> float | None:
    """JSON has no NaN: unknown numbers are null."""
    return value if value is not None and math.isfinite(value) else None


def export_parquet(store: Store, run_id: int, out: Path, layers: Sequence[int] | None = None) -> dict[str, int]:
    """Write the Parquet files (of every layer of the run, or of `layers`); rows per file."""
    import pyarrow.parquet as pq

    counts = {}
    with _staged(out, folder=True) as staged:
        for name, table in store.export_tables(run_id, layers).items():
            pq.write_table(table, staged / f"{name}.parquet")
            counts[name] = table.num_rows
    return counts


#: Neurons read per bulk query.
CHUNK = 256


def bundles(store: Store, run_id: int, neurons: Sequence[NeuronId] | None = None,
            progress: Progress | None = None) -> Iterator[NeuronBundle]:
    """Every neuron of a run (or those named), read a chunk of consecutive neurons at a time."""
    chosen = store.run_neurons(run_id) if neurons is None else sorted(neurons)
    wanted = set(chosen)
    done = 0
    for layer in sorted({layer for layer, _ in chosen}):
        indices = [n for l_, n in chosen if l_ == layer]
        while indices:  # a range of at most CHUNK neuron indices at a time, so a sparse choice reads little
            part = [n for n in indices if n < indices[0] + CHUNK]
            indices = indices[len(part):]
            for bundle in store.neuron_bundles(run_id, layer, part[0], part[-1]):
                if (layer, bundle.stats.index) in wanted:
                    yield bundle
            done += len(part)
            if progress:
                progress("export", done, len(chosen))


def _explanation_json(tail: str, e: ScoredExplanation) -> dict[str, Any]:
    return {"tail": tail, "role": e.role, "explainer": e.explainer, "sample": e.sample, "selected": e.selected,
            "text": e.text, "source": list(e.source) if e.source else None,
            "scores": [{"split": s.split, "simulator": s.simulator, "method": x.method, "value": _clean(x.value),
                        "ci_low": _clean(x.ci_low), "ci_high": _clean(x.ci_high), "n": x.n, "flags": x.flags}
                       for s in e.splits for x in s.scores]}


def layer_neurons(store: Store, run_id: int, layers: Sequence[int] | None) -> list[NeuronId] | None:
    """The neurons of a run in some layers (None: every neuron)."""
    if layers is None:
        return None
    wanted = set(layers)
    return [n for n in store.run_neurons(run_id) if n.layer in wanted]


def _token_lists(lists: dict[str, list[tuple[str, float]]]) -> dict[str, list[tuple[str, float]]]:
    """Related-token lists with their float32 values written short."""
    return {name: list(zip([t for t, _ in entries], _floats([v for _, v in entries])))
            for name, entries in lists.items()}


def _neuron_lists(lists: dict[str, list[tuple[int, int, float]]]) -> dict[str, list[tuple[int, int, float]]]:
    """Related-neuron lists with their float32 weights written short."""
    return {name: [(a, b, v) for (a, b, _), v in zip(entries, _floats([w for *_, w in entries]))]
            for name, entries in lists.items()}


def _floats(values: Sequence[float]) -> list[float]:
    """float32 values as shortest32 writes them (None, for a value that is not finite, is JSON's null)."""
    return cast(list[float], shortest32(values))


def export_jsonl(store: Store, run_id: int, out: Path, progress: Progress | None = None,
                 neurons: Sequence[NeuronId] | None = None) -> int:
    """Write one line per neuron (of every neuron of the run, or of `neurons`); the number of neurons."""
    n = 0
    unit = "latent" if store.run(run_id).latents else "neuron"
    tags: dict[tuple[int, int], list[dict[str, str]]] = {}
    for t in store.tags(run_id):
        tags.setdefault((t.layer, t.neuron), []).append(
            {"tag": t.tag, "note": t.note, "author": t.author, "created_at": t.created_at})
    lists: dict[tuple[int, int], list[str]] = {}
    for name, *_ in sorted(store.saved_lists(run_id)):
        for member in store.list_neurons(run_id, name) or ():
            lists.setdefault(member, []).append(name)
    with _staged(out, folder=False) as staged, staged.open("w", encoding="utf-8") as f:
        for b in bundles(store, run_id, neurons, progress):
            line = {
                "layer": b.stats.layer, "neuron": b.stats.index, "unit": unit,
                "stats": {"count": b.stats.count,
                          **{k: _clean(getattr(b.stats, k)) for k in ("mean", "variance", "skewness", "kurtosis")},
                          **{k: float32(getattr(b.stats, k)) for k in ("max", "min", "density", "selectivity")},
                          "quantile_edges": _floats(b.stats.quantile_edges)},
                "records": [{"kind": r.kind, "rank": r.rank, "bin": r.bin, "tokens": list(r.tokens),
                             "activations": activations(r.activations)}
                            for r in b.records if r.kind in COLLECTED_KINDS],
                "explanations": [_explanation_json(tail, e) for tail in TAILS for e in b.explanations.get(tail, ())],
                "related_tokens": _token_lists(b.related_tokens),
                "related_neurons": _neuron_lists(b.related_neurons),
                "tags": tags.get((b.stats.layer, b.stats.index), []),
                "lists": lists.get((b.stats.layer, b.stats.index), []),
            }
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
            n += 1
    return n


def _excerpt(r: ActivationRecord) -> Excerpt:
    """A record as the release writes it, its activations at the store's precision."""
    return Excerpt(r.tokens, tuple(cast(list[float], activations(r.activations))))


def _release_explanations(b: NeuronBundle) -> tuple[list[ReleaseExplanation], list[Authorship]]:
    """The positive tail's candidates and user sentences that have test-split simulations, as the release writes
    them (the release's own published score when the explanation came from it, else our test-split r), and who
    wrote each (the release's files have no field for it)."""
    by_id = {r.excerpt_id: r for r in b.records}
    out, authors = [], []
    for e in b.explanations.get("pos", ()):
        sims = [s for s in e.simulations if s.split == "test" and s.excerpt_id in by_id]
        if e.role not in ("candidate", "user") or not sims:
            continue
        scores = {x.method: x.value for s in e.splits if s.split == "test" for x in s.scores}
        out.append(ReleaseExplanation(
            e.text, scores.get("published", scores.get("all", math.nan)), scores.get("r2", math.nan), math.nan,
            tuple(SequenceSimulation(tokens=by_id[s.excerpt_id].tokens,
                                     expected=tuple(cast(list[float], scaled(s.predicted, RELEASE_SCALE / TOP))),
                                     true=_excerpt(by_id[s.excerpt_id]).activations, score=math.nan)
                  for s in sims)))
        simulator = next((s.simulator for s in e.splits if s.split == "test"), "")
        authors.append(Authorship(e.explainer, e.role, e.sample, e.selected, simulator))
    return out, authors


def export_openai(store: Store, run_id: int, out: Path, progress: Progress | None = None,
                  neurons: Sequence[NeuronId] | None = None) -> int:
    """Write the release layout (of every neuron of the run, or of `neurons`) and our files beside it; the number of
    neurons."""
    run = store.run(run_id)
    with _staged(out, folder=True) as staged:
        def write(part: str, layer: int, neuron: int, obj: Any) -> None:
            path = release_path(staged, part, layer, neuron)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(obj, ensure_ascii=False) + ("\n" if part == EXPLANATIONS else ""),
                            encoding="utf-8")

        (staged / RUN_FILE).parent.mkdir(parents=True)
        (staged / RUN_FILE).write_text(json.dumps(run_json(run), ensure_ascii=False, indent=1) + "\n",
                                       encoding="utf-8")
        run_bins = len(run.settings.quantiles) - 1
        n = 0
        for b in bundles(store, run_id, neurons, progress):
            layer, neuron, stats = b.stats.layer, b.stats.index, b.stats
            # Every bin of the run, an empty one too: a bin's place says its quantile levels.
            bins = max([run_bins, *(r.bin + 1 for r in b.records if r.kind == "quantile")])
            record = ReleaseNeuron(
                layer, neuron,
                top=tuple(_excerpt(r) for r in b.records if r.kind == "top"),
                random=tuple(_excerpt(r) for r in b.records if r.kind == "random"),
                quantile=tuple(tuple(_excerpt(r) for r in b.records if r.kind == "quantile" and r.bin == i)
                               for i in range(bins)),
                boundaries=tuple(_floats(stats.quantile_edges)), mean=stats.mean, variance=stats.variance,
                skewness=stats.skewness, kurtosis=stats.kurtosis)
            write(ACTIVATIONS, layer, neuron, neuron_record_json(record))
            # Every neuron gets its explanations file, empty when it has none: the release has one for every
            # neuron, and an importer reports a missing one.
            explanations, authors = _release_explanations(b)
            write(EXPLANATIONS, layer, neuron, explanations_json(layer, neuron, explanations))
            if authors:
                write(EXPLAINERS, layer, neuron, authorship_json(authors))
            tokens = _token_lists(b.related_tokens)
            if any(name in tokens for name in TOKEN_LISTS[:4]):  # the weight-based lists
                write(WEIGHT_TOKENS, layer, neuron, weight_tokens_json(tokens))
            if "lookup" in tokens:
                write(LOOKUP_TOKENS, layer, neuron, lookup_tokens_json(tokens["lookup"]))
            if b.related_neurons:
                write(WEIGHT_NEURONS, layer, neuron, related_neurons_json(_neuron_lists(b.related_neurons)))
            n += 1
    return n


#: The files `compare --out` writes, by suffix.
COMPARISON_FORMATS = (".csv", ".parquet", ".jsonl")


def export_comparison(rows: Sequence[dict[str, object]], out: Path) -> None:
    """Write a comparison's paired neurons (dicts of one shape) as CSV, Parquet or JSONL, by `out`'s suffix; whole or
    not at all."""
    import pyarrow as pa

    suffix = out.suffix.lower()
    if suffix not in COMPARISON_FORMATS:
        raise ExportError(f"cannot write {out.name!r}: end --out with {', '.join(COMPARISON_FORMATS)}")
    with _staged(out, folder=False) as staged:
        if suffix == ".jsonl":
            with staged.open("w", encoding="utf-8") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            return
        table = pa.Table.from_pylist(list(rows))
        if suffix == ".csv":
            import pyarrow.csv as pcsv

            pcsv.write_csv(table, staged)
        else:
            import pyarrow.parquet as pq

            pq.write_table(table, staged)
