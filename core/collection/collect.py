"""Collection: one streaming, batched pass of a subject model over excerpts into a store run.

Memory is bounded by neurons x records x length (see neuronscope.core.collection.accumulate); the corpus only streams
through. The run is registered as 'running' first and all its data lands in one transaction at the
end, so an interrupted collection never looks complete.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from neuronscope.core.collection.checkpoint import Checkpoints, identity
from neuronscope.core.errors import NeuronscopeError
from neuronscope.core.records import CollectSettings
from neuronscope.core.store import Store, StoreError

if TYPE_CHECKING:
    from neuronscope.core.collection.excerpts import Excerpts
    from neuronscope.core.layerdata import LayerResult
    from neuronscope.core.models.subject import Subject

#: progress(stage, done, total): stage is "collect", "write" or "merge".
Progress = Callable[[str, int, int], None]


class CollectError(NeuronscopeError):
    """A collection problem, as one line naming the problem and the fix."""


@dataclass(frozen=True)
class CollectResult:
    """What a collection produced."""

    run_id: int
    """The run written (or found)."""
    n_excerpts: int
    """Excerpts processed."""
    n_neurons: int
    """Neurons stored."""
    seconds: float
    """Wall time of the pass and the write."""
    reused: bool = False
    """True when an identical complete run already existed and nothing was recomputed."""


def parse_shard(text: str | None) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n; None -> (0, 1)."""
    if not text:
        return (0, 1)
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not int(match.group(1)) < int(match.group(2)):
        raise CollectError(f"invalid shard {text!r}: write i/n with 0 <= i < n, e.g. --shard 0/4")
    return int(match.group(1)), int(match.group(2))


def collect(
    store: Store,
    subject: Subject,
    excerpts: Excerpts,
    *,
    layers: tuple[int, ...],
    settings: CollectSettings,
    batch_size: int = 32,
    shard: tuple[int, int] = (0, 1),
    progress: Progress | None = None,
    reuse: bool = True,
    checkpoints: Checkpoints | None = None,
) -> CollectResult:
    """Collect every neuron of `layers` over `excerpts` into a new run of `store`; with `checkpoints`, from the
    last checkpoint of this collection if there is one, writing one whenever due (the caller clears them once
    the run is safely in the store)."""
    import torch

    from neuronscope.core.collection.accumulate import Accumulator

    report = progress or (lambda _stage, _done, _total: None)
    shard_text = f"{shard[0]}/{shard[1]}" if shard[1] > 1 else ""
    n = len(excerpts.excerpt_ids)
    if n == 0:
        raise CollectError("this shard of the corpus has no excerpts: use fewer shards or a larger corpus")
    if reuse:
        found = store.find_complete_run(subject.revision, excerpts.corpus, settings, layers, shard_text)
        if found is not None:
            return CollectResult(found.run_id, found.n_excerpts, found.n_neurons, 0.0, reused=True)
    started = time.perf_counter()
    store.mark_stale_runs()
    run_id = store.create_run(
        model=subject.name, revision=subject.revision, corpus=excerpts.corpus, settings=settings, layers=layers,
        neurons_per_layer=subject.n_neurons, dtype=str(subject.dtype).replace("torch.", ""), shard=shard_text,
    )
    try:
        # On a GPU, layers are updated together (fewer kernel launches); on a CPU one at a time,
        # which measured faster here (cache locality beats fewer calls).
        budget = 1 << 28 if subject.device.type == "cuda" else 0
        groups = layer_groups(layers, subject.n_neurons, batch_size * settings.length, budget)
        accs = [Accumulator(group, subject.n_neurons, settings, subject.dtype, subject.device) for group in groups]
        token_stats = _token_stats_fn(subject.device, (n // batch_size) * len(groups))
        key = identity(subject.revision, excerpts.corpus, settings, layers, shard_text, excerpt_ids=excerpts.excerpt_ids)
        resumed = checkpoints.load(key) if checkpoints is not None else None
        if resumed is not None:
            for acc in accs:
                for layer in acc.layers:
                    acc.absorb(resumed.layers[layer])
            report("resume", resumed.done, n)
        report("collect", resumed.done if resumed else 0, n)
        for start in range(resumed.done if resumed else 0, n, batch_size):
            ids = torch.from_numpy(excerpts.token_ids[start : start + batch_size].astype(np.int64))
            eids = torch.from_numpy(excerpts.excerpt_ids[start : start + batch_size].astype(np.int64))
            acts = subject.activations(ids, layers)
            eids = eids.to(subject.device)
            for group, acc in zip(groups, accs):
                joined = acts[group[0]] if len(group) == 1 else torch.cat([acts[layer] for layer in group], 2)
                acc.update(joined, eids, token_stats if len(ids) == batch_size else None)
            del acts
            done = min(start + batch_size, n)
            report("collect", done, n)
            if checkpoints is not None and done < n and checkpoints.due():
                report("checkpoint", done, n)
                checkpoints.save(key, done, (result for acc in accs for result in acc.results()))

        def finished() -> Iterator[LayerResult]:
            while accs:  # a group's state is freed once its layers are written
                yield from accs.pop(0).results()

        results = finished()
        write_run(store, run_id, results, len(layers), settings, keep_cells=bool(shard_text), n_excerpts=n,
                  tokens=lambda wanted: _tokens_for(subject, excerpts, wanted), progress=report)
    except KeyboardInterrupt:
        store.fail_run(run_id, "interrupted", "interrupted by the user")
        raise
    except BaseException as err:
        store.fail_run(run_id, "failed", f"{type(err).__name__}: {err}")
        raise
    return CollectResult(run_id, n, len(layers) * subject.n_neurons, time.perf_counter() - started)


def layer_groups(layers: tuple[int, ...], neurons: int, tokens_per_batch: int, budget: int) -> list[tuple[int, ...]]:
    """Split layers into groups updated together, each group's joined batch [tokens, layers x
    neurons] within `budget` elements (a copy of that size is made per batch)."""
    per_group = max(1, budget // max(1, tokens_per_batch * neurons))
    return [layers[i : i + per_group] for i in range(0, len(layers), per_group)]


def write_run(
    store: Store,
    run_id: int,
    results: Iterable[LayerResult],
    n_layers: int,
    settings: CollectSettings,
    *,
    keep_cells: bool,
    n_excerpts: int,
    tokens: Callable[[np.ndarray], tuple[np.ndarray, list[list[str]]]],
    progress: Progress,
) -> None:
    """Summarise finished layers and write them, their excerpts and the run's completion at once."""
    from neuronscope.core.collection.summarize import summarize

    kinds = ("top", "bottom", "random") + (("cell",) if keep_cells else ())
    with store.transaction():
        wanted: set[int] = set()
        for i, result in enumerate(results):
            summary = summarize(result, settings)
            store.write_layer(run_id, result, summary, keep_cells=keep_cells)
            for kind in kinds:
                wanted.update(int(x) for x in np.unique(result.samples[kind].ids) if x >= 0)
            wanted.update(int(x) for x in np.unique(summary.quantile.ids) if x >= 0)
            progress("write", i + 1, n_layers)
        ids = np.array(sorted(wanted), dtype=np.int64)
        token_ids, strings = tokens(ids)
        store.write_excerpts(run_id, ids, token_ids, strings)
        store.finish_run(run_id, n_excerpts)


def _tokens_for(subject: Subject, excerpts: Excerpts, wanted: np.ndarray) -> tuple[np.ndarray, list[list[str]]]:
    pos = np.searchsorted(excerpts.excerpt_ids, wanted)
    token_ids = excerpts.token_ids[pos]
    return token_ids, [subject.token_strings(row) for row in token_ids]


_COMPILED: dict[str, Callable] = {}  # type: ignore[type-arg]


def _token_stats_fn(device, layer_batches: int):  # type: ignore[no-untyped-def]
    """The per-batch statistics kernel, compiled (fused) where that pays off: on a GPU, or for a CPU
    run long enough to repay the compile (about 20 s the first time in a process, faster once
    torch's on-disk cache has it). NEURONSCOPE_COMPILE=0/1 forces either way."""
    import os

    from neuronscope.core.collection.accumulate import compute_token_stats

    wanted = os.environ.get("NEURONSCOPE_COMPILE", "auto")
    if wanted == "0" or (wanted == "auto" and not (device.type == "cuda" or layer_batches >= 300)):
        return compute_token_stats
    if "stats" not in _COMPILED:
        import torch

        _COMPILED["stats"] = torch.compile(compute_token_stats, dynamic=False)

    def run(*args):  # type: ignore[no-untyped-def]
        if _COMPILED["stats"] is not compute_token_stats:
            try:
                return _COMPILED["stats"](*args)
            except Exception:  # noqa: BLE001 - no working compiler here: eager is correct, only slower
                _COMPILED["stats"] = compute_token_stats
        return compute_token_stats(*args)

    return run


def merge(out: Store, shards: list[Store], progress: Progress | None = None) -> CollectResult:
    """Combine the complete shard runs of several stores into one run equal to a single collection."""
    report = progress or (lambda _stage, _done, _total: None)
    started = time.perf_counter()
    runs = []
    for shard_store in shards:
        candidates = [r for r in shard_store.runs() if r.status == "complete" and r.shard]
        if not candidates:
            raise CollectError(f"{shard_store.path} has no complete shard run: collect it with --shard i/n first")
        runs.append(candidates[-1])
    first = runs[0]
    from neuronscope.core.collection.corpus import same_corpus

    for run in runs[1:]:
        if (run.model_revision, run.settings, run.layers) != (first.model_revision, first.settings, first.layers) or (
            not same_corpus(run.corpus, first.corpus)
        ):
            raise CollectError("shard stores differ in model, corpus, settings or layers: merge shards of one collection")
    total = int(first.shard.split("/")[1])
    have = sorted(int(r.shard.split("/")[0]) for r in runs)
    if have != list(range(total)) or any(int(r.shard.split("/")[1]) != total for r in runs):
        missing = sorted(set(range(total)) - set(have))
        detail = f"missing {', '.join(f'{i}/{total}' for i in missing)}" if missing else "a shard appears twice"
        raise CollectError(f"shards do not cover the corpus exactly ({detail}): pass every shard store once")
    import torch

    from neuronscope.core.collection.accumulate import LayerAccumulator

    settings = first.settings
    n_excerpts, n_neurons = sum(r.n_excerpts for r in runs), len(first.layers) * first.neurons_per_layer
    done = out.find_complete_run(first.model_revision, first.corpus, settings, first.layers, shard="")
    if done is not None and done.n_excerpts == n_excerpts:  # merged before: the same shards give the same run
        return CollectResult(done.run_id, n_excerpts, n_neurons, time.perf_counter() - started, reused=True)
    run_id = out.create_run(
        model=first.model, revision=first.model_revision, corpus=first.corpus, settings=settings,
        layers=first.layers, neurons_per_layer=first.neurons_per_layer, dtype=first.dtype, shard="",
    )
    try:
        def merged() -> Iterator[LayerResult]:
            for i, layer in enumerate(first.layers):
                acc = LayerAccumulator(layer, first.neurons_per_layer, settings, torch.float32, torch.device("cpu"))
                for shard_store, run in zip(shards, runs):
                    acc.absorb(shard_store.load_layer(run.run_id, layer, settings))
                report("merge", i + 1, len(first.layers))
                yield acc.result()

        excerpts: dict[int, tuple[list[int], list[str]]] = {}
        for shard_store, run in zip(shards, runs):
            excerpts.update(shard_store.excerpts(run.run_id))

        def tokens(wanted: np.ndarray) -> tuple[np.ndarray, list[list[str]]]:
            try:
                rows = [excerpts[int(e)] for e in wanted]
            except KeyError as err:
                raise StoreError(f"shard stores lack excerpt {err}: they are damaged; collect them again") from None
            return np.array([r[0] for r in rows], dtype=np.int32).reshape(len(rows), -1), [r[1] for r in rows]

        write_run(out, run_id, merged(), len(first.layers), settings, keep_cells=False, n_excerpts=n_excerpts,
                  tokens=tokens, progress=report)
    except BaseException as err:
        out.fail_run(run_id, "failed", f"{type(err).__name__}: {err}")
        raise
    return CollectResult(run_id, n_excerpts, n_neurons, time.perf_counter() - started)
