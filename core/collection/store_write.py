"""The store write of a collection or a merge: finished layers summarised and inserted, then the excerpts their
records use and the run's completion, in one transaction; and the store left to other processes while a
collection's pass runs (`aside`)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from neuronscope.core.collection.collect import CollectError, Progress
from neuronscope.core.records import CollectSettings
from neuronscope.core.store import Store

if TYPE_CHECKING:
    from neuronscope.core.collection.checkpoint import Checkpoints
    from neuronscope.core.layerdata import LayerResult


def write_run(
    store: Store,
    run_id: int,
    results: Iterable[LayerResult],
    n_layers: int,
    settings: CollectSettings,
    *,
    n_excerpts: int,
    excerpts: Callable[[np.ndarray], Iterable[tuple[np.ndarray, np.ndarray, list[list[str]]]]],
    progress: Progress,
) -> None:
    """Summarise finished layers and write them, their excerpts and the run's completion at once. `excerpts(wanted)`
    gives the wanted excerpts (sorted ids) as chunks of (ids, token ids, token strings), so that memory stays bounded
    however many there are.

    A layer is taken from `results`, summarised and its rows built in a second thread while the one before it is
    inserted: the store's inserts run on one core, and so did the rest (taking a SmolLM2 layer's state, its rows
    quantised, was a quarter of it). The results' progress reports come from that thread."""
    from concurrent.futures import ThreadPoolExecutor

    from neuronscope.core.collection.summarize import summarize
    from neuronscope.core.store.rows import layer_tables

    def take(taken: Iterator[LayerResult]) -> tuple[np.ndarray, Any] | None:
        result = next(taken, None)
        if result is None:
            return None
        summary = summarize(result, settings)
        kept = (result.samples[kind].ids.ravel() for kind in ("top", "bottom", "random"))
        used = np.concatenate([*kept, summary.quantile.ids.ravel()])
        return used[used >= 0], layer_tables(run_id, result, summary)

    with store.transaction(), ThreadPoolExecutor(1, thread_name_prefix="neuronscope-write") as pool:
        wanted = np.zeros(0, np.int64)
        taken = iter(results)
        pending = pool.submit(take, taken)
        for i in itertools.count(1):
            prepared = pending.result()
            if prepared is None:
                break
            pending = pool.submit(take, taken)  # the next layer, while this one is inserted
            used, tables = prepared
            store.insert_layer(*tables)
            wanted = np.union1d(wanted, used)
            progress("write", i, n_layers)
        written = 0
        for ids, token_ids, strings in excerpts(wanted):
            store.write_excerpts(run_id, ids, token_ids, strings)
            written += len(ids)
        if written != len(wanted):
            raise CollectError(f"{len(wanted) - written:,} of the excerpts the records use are missing from the shard "
                               "states: they are damaged; collect those shards again")
        store.finish_run(run_id, n_excerpts)


@contextmanager
def aside(store: Store, checkpoints: Checkpoints | None, n: int, waiting: Callable[[str], None] | None
           ) -> Iterator[None]:
    """The store closed while the block (the pass) runs, so that other processes may read it and jobs write beside
    it meanwhile (its run shows as running), then opened for writing again: waiting as long as another process
    holds it, the pass's end first saved as a checkpoint where checkpoints are on."""
    store.set_aside()
    if checkpoints is not None:  # the state kept before a wait, which Ctrl-C or kill would otherwise cost
        checkpoints.keep_finished = lambda: not taken_back(store)
    yield
    store.take_back(lambda pid: waiting(_holder(store, pid, checkpoints, n)) if waiting else None)


def reopen(store: Store, waiting: Callable[[str], None] | None) -> None:
    """A store set aside while the model loaded, open again for the collection's start: for writing where it is
    free, else read-only beside the processes that have it open (`waiting` is told whose), the run registered at the
    write."""
    from neuronscope.core.store.runs import named_process

    holder = store.reopen()
    if holder is not None and waiting is not None:
        waiting(f"{store.path} is open in {named_process(holder)}: the collection registers its run when it writes "
                "the store")


def taken_back(store: Store) -> bool:
    """Whether the store set aside is open again, without waiting (False while another process holds it, or when
    it cannot be opened: the write will say why)."""
    from neuronscope.core.store.schema import StoreError

    try:
        return store.take_back()
    except StoreError:
        return False


def _holder(store: Store, pid: int | None, checkpoints: Checkpoints | None, n: int) -> str:
    """What a collection waiting for its store says: who holds it, and what stopping the wait would cost."""
    from neuronscope.core.store.runs import named_process

    if checkpoints is not None and checkpoints.held == n:
        kept = f"its state is in {checkpoints.folder}, so stopping now loses nothing: the same command writes it later"
    else:
        kept = "stopping now loses the pass: " + ("checkpoints are off" if checkpoints is None else
                                                   "its checkpoint could not be written")
    return f"the collection is done; it writes {store.path} once {named_process(pid)} closes it ({kept})"
