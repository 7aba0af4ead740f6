"""Merge: the shard states of one collection (`collect --shard`) into one store run, equal to a single collection.

It streams: a layer at a time (each shard's state of that layer absorbed in turn, then summarised and written), and
then the excerpts the records use, a chunk of one shard at a time. Memory is one layer's state and one chunk of
excerpts, however many shards or excerpts there are.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from neuronscope.core.collection.collect import CollectError, CollectResult, Progress
from neuronscope.core.collection.store_write import write_run
from neuronscope.core.store import Store

if TYPE_CHECKING:
    from neuronscope.core.collection.state import ShardMeta, ShardState
    from neuronscope.core.layerdata import LayerResult


def check_parts(metas: list[ShardMeta]) -> None:
    """CollectError unless the shards are every part of one collection, each once."""
    first = metas[0]
    for meta in metas[1:]:
        if differ := meta.differences(first):
            raise CollectError(f"shard {meta.index}/{meta.count} differs from shard {first.index}/{first.count} in its "
                               f"{' and '.join(differ)}: merge shards of one collection (collect that shard again "
                               "with the others' command)")
    total = first.count
    splits = sorted({meta.count for meta in metas})
    if len(splits) > 1:
        raise CollectError(f"shards of different splits ({', '.join(f'of {n}' for n in splits)}): pass the shard "
                           "states of one split, every i/n for one n")
    have = sorted(meta.index for meta in metas)
    if have != list(range(total)):
        missing = sorted(set(range(total)) - set(have))
        detail = f"missing {', '.join(f'{i}/{total}' for i in missing)}" if missing else "a shard appears twice"
        raise CollectError(f"shards do not cover the corpus exactly ({detail}): pass every shard state once")


def merge(out: Store, shards: list[ShardState], progress: Progress | None = None) -> CollectResult:
    """Combine every shard state of one collection into one run of `out`, equal to a single collection."""
    import torch

    from neuronscope.core.collection.accumulate import LayerAccumulator

    report = progress or (lambda _stage, _done, _total: None)
    started = time.perf_counter()
    if not shards:
        raise CollectError("no shard states to merge: pass the folders `collect --shard` wrote")
    metas = [shard.meta for shard in shards]
    check_parts(metas)
    first = metas[0]
    settings = first.settings
    n_excerpts, n_neurons = sum(m.n_excerpts for m in metas), len(first.layers) * first.neurons_per_layer
    done = out.find_complete_run(first.revision, first.corpus, settings, first.layers, shard="", units=first.units)
    if done is not None and done.n_excerpts == n_excerpts:  # merged before: the same shards give the same run
        return CollectResult(done.run_id, n_excerpts, n_neurons, time.perf_counter() - started, reused=True)
    run_id = out.create_run(
        model=first.model, revision=first.revision, corpus=first.corpus, settings=settings, layers=first.layers,
        neurons_per_layer=first.neurons_per_layer, dtype=first.dtype, shard="", units=first.units,
    )

    def merged() -> Iterator[LayerResult]:
        for i, layer in enumerate(first.layers):
            acc = LayerAccumulator(layer, first.neurons_per_layer, settings, torch.float32, torch.device("cpu"))
            for shard in shards:
                acc.absorb(shard.layer(layer))
            report("merge", i + 1, len(first.layers))
            yield acc.result()

    try:
        write_run(out, run_id, merged(), len(first.layers), settings, n_excerpts=n_excerpts, progress=report,
                  excerpts=lambda wanted: itertools.chain.from_iterable(s.excerpts(wanted) for s in shards))
    except BaseException as err:
        out.fail_run(run_id, "failed", f"{type(err).__name__}: {err}")
        raise
    return CollectResult(run_id, n_excerpts, n_neurons, time.perf_counter() - started)

