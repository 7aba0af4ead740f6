"""Collection: one streaming, batched pass of a subject model over excerpts into a store run, or into a shard state
(core/collection/state.py) that `merge` (core/collection/merge.py) combines with the other parts.

Memory is bounded by neurons x records x length (see neuronscope.core.collection.accumulate); the corpus only streams
through. The run is registered as 'running' first (or, where other processes have the store open then, at the write)
and all its data lands in one transaction at the end, so an interrupted collection never looks complete. Between the two
the store is closed, so that a pass of hours does not keep the app, `info` or jobs off it; the write waits for any of
them that holds it then. A stop request (Ctrl-C, SIGTERM,
SIGHUP) during the pass saves its state and stops (core/collection/stopping.py); during that write, the collection's
last step, it lets the write finish, since what stopping would save is what it writes (a second Ctrl-C stops at once).
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from neuronscope.core.collection.checkpoint import Checkpoints, identity
from neuronscope.core.collection.stopping import Stopped, StopRequests
from neuronscope.core.errors import NeuronscopeError, Terminated, caused_by_interrupt, interruption
from neuronscope.core.records import CollectSettings
from neuronscope.core.store import Store

if TYPE_CHECKING:
    from pathlib import Path

    from neuronscope.core.collection.accumulate import Accumulator
    from neuronscope.core.collection.excerpts import Excerpts
    from neuronscope.core.layerdata import LayerResult
    from neuronscope.core.models.sparse import SparseCoder
    from neuronscope.core.models.subject import Subject

#: progress(stage, done, total): stage is "compile", "collect", "resume", "checkpoint", "stop" (saving the state
#: before a stop request is obeyed), "write" or "merge".
Progress = Callable[[str, int, int], None]


class CollectError(NeuronscopeError):
    """A collection problem, as one line naming the problem and the fix."""


@dataclass(frozen=True)
class CollectResult:
    """What a collection produced."""

    run_id: int | None
    """The run written (or found); None for a shard state."""
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
    progress: Progress | None = None,
    reuse: bool = True,
    checkpoints: Checkpoints | None = None,
    sparse: SparseCoder | None = None,
    waiting: Callable[[str], None] | None = None,
) -> CollectResult:
    """Collect every neuron of `layers` over `excerpts` into a new run of `store` (with `sparse`, that coder's
    latents at its layer instead); with `checkpoints`, from the last checkpoint of this collection if there is one,
    writing one whenever due (the caller clears them once the run is safely in the store). The store is closed
    during the pass, for other processes to use, and its write waits for whoever holds it then (`waiting` is told, in
    one line, whom). A `store` open read-only (other processes had it open) gets the run when it is written."""
    from neuronscope.core.collection.store_write import aside, reopen, write_run

    report = progress or (lambda _stage, _done, _total: None)
    n = _count(excerpts)
    units = units_of(sparse)
    reopen(store, waiting)
    if reuse:
        found = store.find_complete_run(subject.revision, excerpts.corpus, settings, layers, "", units)
        if found is not None:
            return CollectResult(found.run_id, found.n_excerpts, found.n_neurons, 0.0, reused=True)
    started = time.perf_counter()
    register = partial(_register, store, subject, excerpts.corpus, settings, [(layers, _width(subject, sparse), units)])
    runs = [] if store.read_only else register()
    try:
        key = identity(subject.revision, excerpts.corpus, settings, layers, "", units,
                       excerpt_ids=excerpts.excerpt_ids)
        with aside(store, checkpoints, n, waiting):
            results = accumulate(subject, excerpts, layers, settings, batch_size, key, checkpoints, report, sparse)
        runs = runs or register()
        with StopRequests():
            write_run(store, runs[0], results, len(layers), settings, n_excerpts=n,
                      excerpts=lambda wanted: _excerpt_chunks(subject, excerpts, wanted), progress=report)
    except BaseException as err:
        _record_failure(store, runs, err)
        if (saved := _saved_whole(checkpoints, n, err)) is None:
            raise
        raise saved from err
    return CollectResult(runs[0], n, len(layers) * _width(subject, sparse), time.perf_counter() - started)


def _register(store: Store, subject: Subject, corpus: str, settings: CollectSettings,
              parts: list[tuple[tuple[int, ...], int, str]]) -> list[int]:
    """The runs of a collection registered as running, one per (layers, width, units) part, the runs of processes
    gone marked first. A collection into a store that other processes had open (read-only) registers them once it
    has the store for its write."""
    store.mark_stale_runs()
    return [store.create_run(model=subject.name, revision=subject.revision, corpus=corpus, settings=settings,
                             layers=chosen, neurons_per_layer=width, dtype=_dtype(subject), shard="", units=kind)
            for chosen, width, kind in parts]


def collect_beside(
    store: Store,
    subject: Subject,
    excerpts: Excerpts,
    *,
    layers: tuple[int, ...],
    settings: CollectSettings,
    sparse: SparseCoder,
    batch_size: int = 32,
    progress: Progress | None = None,
    reuse: bool = True,
    checkpoints: Checkpoints | None = None,
    waiting: Callable[[str], None] | None = None,
) -> tuple[CollectResult, CollectResult]:
    """The MLP neurons of `layers` and a sparse coder's latents from the same forward passes: two runs of `store`,
    each the run `collect` writes for them alone (a run already there is reused, and only the other collected)."""
    from neuronscope.core.collection.store_write import aside, reopen, taken_back, write_run

    report = progress or (lambda _stage, _done, _total: None)
    n = _count(excerpts)
    units = units_of(sparse)
    reopen(store, waiting)
    alone = {"settings": settings, "batch_size": batch_size, "progress": progress, "checkpoints": checkpoints,
             "waiting": waiting}
    found = [store.find_complete_run(subject.revision, excerpts.corpus, settings, chosen, "", kind) if reuse else None
             for chosen, kind in ((layers, ""), ((sparse.layer,), units))]
    if found[0] is not None or found[1] is not None:
        reused = [CollectResult(f.run_id, f.n_excerpts, f.n_neurons, 0.0, reused=True) if f else None for f in found]
        return (reused[0] or collect(store, subject, excerpts, layers=layers, **alone),  # type: ignore[arg-type]
                reused[1] or collect(store, subject, excerpts, layers=(sparse.layer,), sparse=sparse,  # type: ignore[arg-type]
                                     **alone))
    started = time.perf_counter()
    register = partial(_register, store, subject, excerpts.corpus, settings,
                       [(layers, subject.n_neurons, ""), ((sparse.layer,), sparse.width, units)])
    runs = [] if store.read_only else register()
    try:
        key = identity(subject.revision, excerpts.corpus, settings, layers, "", "", sparse.layer, units,
                       excerpt_ids=excerpts.excerpt_ids)
        with aside(store, checkpoints, n, waiting):
            results = accumulate(subject, excerpts, (sparse.layer,), settings, batch_size, key, checkpoints, report,
                                 sparse, beside=layers)
        runs = runs or register()
        chunks = partial(_excerpt_chunks, subject, excerpts)
        with StopRequests():
            write_run(store, runs[0], itertools.islice(results, len(layers)), len(layers), settings, n_excerpts=n,
                      excerpts=chunks, progress=report)
            write_run(store, runs[1], (replace(result, layer=sparse.layer) for result in results), 1, settings,
                      n_excerpts=n, excerpts=chunks, progress=report)
    except BaseException as err:
        if runs and taken_back(store):  # (the runs' statuses are read from it)
            _record_failure(store, [run_id for run_id in runs if store.run(run_id).status != "complete"], err)
        if (saved := _saved_whole(checkpoints, n, err)) is None:
            raise
        raise saved from err
    seconds = time.perf_counter() - started
    return (CollectResult(runs[0], n, len(layers) * subject.n_neurons, seconds),
            CollectResult(runs[1], n, sparse.width, seconds))


def _record_failure(store: Store, runs: Sequence[int], err: BaseException) -> None:
    """Mark unfinished runs interrupted (Ctrl-C, SIGTERM) or failed, with why (where the store can be opened: a
    run it cannot record shows as interrupted once this process is gone)."""
    from neuronscope.core.collection.store_write import taken_back

    if not runs or not taken_back(store):
        return
    interrupted = caused_by_interrupt(err)
    for run_id in runs:
        store.fail_run(run_id, "interrupted" if interrupted else "failed",
                       interruption(err) if interrupted else f"{type(err).__name__}: {err}")


def _saved_whole(checkpoints: Checkpoints | None, n: int, err: BaseException) -> Stopped | None:
    """An interrupt while the store was written, after a pass whose end was saved as a checkpoint (a pass longer
    than the interval): where it is, as a stop in the pass says (the same command only writes the store)."""
    if checkpoints is None or checkpoints.held != n or isinstance(err, Stopped) or not caused_by_interrupt(err):
        return None
    return Stopped(_state_in(checkpoints, n, n))


def _state_in(checkpoints: Checkpoints, saved: int, n: int) -> str:
    return (f"the collection's state after {saved:,} of {n:,} excerpts is in {checkpoints.folder}: the same command "
            "goes on from there")


def units_of(sparse: SparseCoder | None) -> str:
    """What a run records as its units: '' for MLP neurons, else the coder's source and hook point."""
    from neuronscope.core.models.sparse import units_text

    return "" if sparse is None else units_text(sparse)


def _width(subject: Subject, sparse: SparseCoder | None) -> int:
    return subject.n_neurons if sparse is None else sparse.width


def collect_shard(
    folder: Path,
    subject: Subject,
    excerpts: Excerpts,
    *,
    shard: tuple[int, int],
    layers: tuple[int, ...],
    settings: CollectSettings,
    batch_size: int = 32,
    progress: Progress | None = None,
    reuse: bool = True,
    checkpoints: Checkpoints | None = None,
    sparse: SparseCoder | None = None,
) -> CollectResult:
    """Collect part `shard` = (i, n) of a collection (`excerpts` cut with that shard) into a shard state at `folder`
    (core/collection/state.py), for `merge`; a complete state of this same part is reused unless `reuse` is off."""
    from neuronscope.core.collection.state import ShardMeta, read_meta, write_shard

    report = progress or (lambda _stage, _done, _total: None)
    n = len(excerpts.excerpt_ids)  # (a shard of more shards than excerpts has none: an empty state merges)
    part, units = f"{shard[0]}/{shard[1]}", units_of(sparse)
    key = identity(subject.revision, excerpts.corpus, settings, layers, part, units, excerpt_ids=excerpts.excerpt_ids)
    n_neurons = len(layers) * _width(subject, sparse)
    meta = ShardMeta(model=subject.name, revision=subject.revision, corpus=excerpts.corpus, settings=settings,
                     layers=layers, neurons_per_layer=_width(subject, sparse), dtype=_dtype(subject),
                     index=shard[0], count=shard[1], n_excerpts=n, identity=key, units=units)
    found = read_meta(folder) if reuse else None
    if found is not None and found.identity == key:
        return CollectResult(None, n, n_neurons, 0.0, reused=True)
    if found is not None:  # a finished shard of hours is not replaced by a changed command unasked
        what = " and ".join(found.differences(meta)) or "excerpts (a corpus file changed, or --max-tokens)"
        raise CollectError(f"{folder} holds shard {part} of another collection, with other {what}: merge it or move it "
                           "away first, or pass --force to replace it")
    started = time.perf_counter()
    results = accumulate(subject, excerpts, layers, settings, batch_size, key, checkpoints, report, sparse)
    with StopRequests():
        write_shard(folder, meta, _reporting(results, len(layers), report), excerpts.token_ids, excerpts.excerpt_ids,
                    subject.token_strings)
    return CollectResult(None, n, n_neurons, time.perf_counter() - started)


def _count(excerpts: Excerpts) -> int:
    n = len(excerpts.excerpt_ids)
    if n == 0:
        raise CollectError("this shard of the corpus has no excerpts: use fewer shards or a larger corpus")
    return n


def _dtype(subject: Subject) -> str:
    return str(subject.dtype).replace("torch.", "")


def _reporting(results: Iterable[LayerResult], n_layers: int, report: Progress) -> Iterator[LayerResult]:
    for i, result in enumerate(results):
        yield result
        report("write", i + 1, n_layers)


def accumulate(
    subject: Subject, excerpts: Excerpts, layers: tuple[int, ...], settings: CollectSettings, batch_size: int,
    key: str, checkpoints: Checkpoints | None, report: Progress, sparse: SparseCoder | None = None,
    beside: tuple[int, ...] = (),
) -> Iterator[LayerResult]:
    """The collection pass: every batch of excerpts through the subject and into the accumulators (from the last
    checkpoint of `key` when there is one). Returns, once the pass is over, each layer's state as it is taken (a
    group of layers' memory is freed once its states are). With `sparse` and `beside`, the MLP neurons of the
    `beside` layers are collected in the same forward passes as the coder's latents: their states come first, then
    the latents' under LATENT_KEY + its layer."""
    import torch

    from neuronscope.core.collection.accumulate import LATENT_KEY, Accumulator, compile_cpu_passes
    from neuronscope.core.collection.batching import GROUP_ELEMENTS, layer_groups
    from neuronscope.core.collection.token_stats import token_stats_fn
    from neuronscope.core.models.heap import keep_freed_memory
    from neuronscope.core.models.subject import to_device

    n = len(excerpts.excerpt_ids)
    # On a GPU, layers are updated together (fewer kernel launches); on a CPU one at a time (cache locality won).
    keys: list[tuple[tuple[int, ...], int]] = [(beside, subject.n_neurons)] if beside else []
    latent = sparse.layer if sparse is not None else -1
    if sparse is not None:
        if layers != (sparse.layer,):
            raise CollectError(f"a sparse coder's latents are at its layer {sparse.layer}, not layers {layers}")
        latent = LATENT_KEY + sparse.layer if beside else sparse.layer
        keys.append(((latent,), sparse.width))
    else:
        keys.append((layers, subject.n_neurons))

    def device(key: int) -> Any:
        return subject.layer_device(key % LATENT_KEY)

    groups: list[tuple[int, ...]] = []
    accs: list[Accumulator] = []
    fixed = {"0": False, "1": True}.get(os.environ.get("NEURONSCOPE_FIXED_SHAPES", ""))  # default: on a GPU
    for some, width in keys:
        for same_device in _by_device(device, some):
            for group in layer_groups(same_device, width, batch_size * settings.length,
                                      GROUP_ELEMENTS if device(same_device[0]).type == "cuda" else 0):
                groups.append(group)
                accs.append(Accumulator(group, width, settings, subject.dtype, device(group[0]), fixed))
    if sparse is not None:
        coder = sparse.on(subject.layer_device(sparse.layer))

        def read(ids: Any, each: Callable[[int, Any], None] | None = None) -> dict[int, Any]:
            if beside:
                acts, hidden = subject.activations_and_hidden(ids, beside, coder.layer, coder.point, each)
            else:
                acts, hidden = {}, subject.capture(ids, coder.layer, coder.point)
            acts[latent] = coder.encode(hidden).to(subject.dtype)
            return acts
    else:
        def read(ids: Any, each: Callable[[int, Any], None] | None = None) -> dict[int, Any]:
            return subject.activations(ids, layers, each)

    # On a CPU, the MLP neurons a layer at a time inside the forward pass; on a GPU, after it (queued work, joined
    # layers). A sparse coder's latents are updated after the pass either way.
    by_layer = {group[0]: acc for group, acc in zip(groups, accs) if group[0] < LATENT_KEY and group[0] != latent}
    if not all(len(group) == 1 and acc.max.device.type == "cpu" for group, acc in zip(groups, accs)):
        by_layer = {}
    if all(acc.max.device.type == "cpu" for acc in accs):
        keep_freed_memory()  # a batch's large temporaries reused, not faulted in afresh page by page
    if any(acc.cpu_passes for acc in accs):  # compiled (a minute, the first time) or loaded before the bar starts
        compile_cpu_passes(settings, subject.dtype, report)
    # CPU accumulators take their statistics in cpu_update.py (no kernel: torch.compile's import alone takes 1.5 s).
    token_stats = None if all(acc.cpu_passes for acc in accs) else token_stats_fn(
        subject.device, (n // batch_size) * batch_size * settings.length * sum(acc.units for acc in accs))
    resumed = checkpoints.load(key) if checkpoints is not None else None
    if resumed is not None:
        for acc in accs:
            for layer in acc.layers:
                acc.absorb(resumed.layers[layer])
        report("resume", resumed.done, n)
    saved = resumed.done if resumed else 0  # excerpts in the last checkpoint
    report("collect", saved, n)
    with StopRequests() as stop:  # Ctrl-C and SIGTERM taken at a batch's end, the state saved first
        for start in range(saved, n, batch_size):
            ids = torch.from_numpy(excerpts.token_ids[start : start + batch_size].astype(np.int64))
            eids = torch.from_numpy(excerpts.excerpt_ids[start : start + batch_size].astype(np.int64))
            stats = token_stats if len(ids) == batch_size else None
            def each(layer: int, layer_acts: Any, eids: Any = eids, stats: Any = stats) -> None:
                by_layer[layer].update(layer_acts, eids, stats)  # while its activations are still in the CPU's cache

            acts = read(ids, each if by_layer else None)
            if acts:
                on_device: dict[Any, Any] = {}
                for group, acc in zip(groups, accs):
                    if group[0] in by_layer:
                        continue
                    joined = acts[group[0]] if len(group) == 1 else torch.cat([acts[layer] for layer in group], 2)
                    if joined.device not in on_device:
                        on_device[joined.device] = to_device(eids, joined.device)
                    acc.update(joined, on_device[joined.device], stats)
                del acts
            done = min(start + batch_size, n)
            report("collect", done, n)
            if checkpoints is not None and checkpoints.due(finished=done == n) and checkpoints.save(
                    key, done, (result for acc in accs for result in acc.results())):
                saved = done
                report("checkpoint", done, n)
            if stop.signal is not None:  # (one that came during that checkpoint too)
                raise _stopped(checkpoints, key, accs, saved, done, n, report)
    return _drain(accs)


def _stopped(checkpoints: Checkpoints | None, key: str, accs: list[Accumulator], saved: int, done: int, n: int,
             report: Progress) -> KeyboardInterrupt:
    """What a stop request at a batch's end raises, once the state is saved where checkpoints are on and the last
    one does not hold it already."""
    plain = Terminated() if Terminated.received else KeyboardInterrupt()
    if checkpoints is None:
        return plain
    if done > saved:
        report("stop", done, n)
        if not checkpoints.save(key, done, (result for acc in accs for result in acc.results())):
            return plain
        saved = done
    return Stopped(_state_in(checkpoints, saved, n))


def _by_device(device: Callable[[int], Any], layers: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The layers in runs of the same device (one run unless a device map spread the model)."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and device(layer) == device(runs[-1][-1]):
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return [tuple(run) for run in runs]


def _drain(accs: list[Accumulator]) -> Iterator[LayerResult]:
    from neuronscope.core.models.heap import give_back_freed_memory

    while accs:  # a group's state is freed once its layers are taken
        yield from accs.pop(0).results()
    give_back_freed_memory()


def _excerpt_chunks(subject: Subject, excerpts: Excerpts,
                    wanted: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, list[list[str]]]]:
    from neuronscope.core.collection.state import EXCERPT_CHUNK

    for start in range(0, len(wanted), EXCERPT_CHUNK):
        ids = wanted[start : start + EXCERPT_CHUNK]
        token_ids = excerpts.token_ids[np.searchsorted(excerpts.excerpt_ids, ids)]
        yield ids, token_ids, [subject.token_strings(row) for row in token_ids]
