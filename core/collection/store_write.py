"""The store write of a collection or a merge: finished layers summarised and inserted, then the excerpts their
records use and the run's completion, in one transaction."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from neuronscope.core.collection.collect import CollectError, Progress
from neuronscope.core.records import CollectSettings
from neuronscope.core.store import Store

if TYPE_CHECKING:
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
