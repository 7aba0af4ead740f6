"""A batch folded into an accumulator on a CPU: the activations read in place where they can be, the samplers' heaps
kept between batches, and cpu_kernels.py's three compiled passes (statistics, records, rows) run on torch's thread
count. Imported when a CPU collection starts (it imports numba), which first has them compiled (compile_passes)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from numba import config as numba_config
from numba import get_num_threads, set_num_threads

from neuronscope.core.collection.cpu_kernels import copy_rows, offers
from neuronscope.core.collection.cpu_statistics import statistics
from neuronscope.core.collection.sampling import excerpt_hash
from neuronscope.core.errors import caused_by_interrupt

if TYPE_CHECKING:
    from neuronscope.core.collection.accumulate import Accumulator
    from neuronscope.core.records import CollectSettings

_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def update(acc: Accumulator, acts: torch.Tensor, excerpt_ids: torch.Tensor) -> None:
    """Fold a batch into a CPU accumulator's state: acts [B, length, units] (any strides) in any float dtype,
    excerpt_ids [B] int64. Updates the power sums, extremes and histogram, counts the cells, and offers the batch to
    the samplers "top", "bottom", "random" (groups: units) and "cell" (groups: unit x cell of the candidate's max,
    offered the "random" composites), whose keys, extremes and activation rows (acc.rows) change in place. Not the
    count."""
    settings, rows = acc.settings, acc.rows
    bf16 = acts.dtype == torch.bfloat16  # its bits are float32's upper half: widened as they are read
    whole, first = _contiguous(acts)
    vals = whole.view(torch.int16) if bf16 else whole.float().view(torch.int32)
    raw = whole if whole.dtype == rows.dtype else whole.to(rows.dtype)
    bits = _BITS[rows.element_size()]
    threads = min(torch.get_num_threads(), numba_config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
    if get_num_threads() != threads:
        set_num_threads(threads)
    try:
        state = []
        for kind in ("top", "bottom", "random", "cell"):
            sampler = acc.samplers[kind]
            fresh = sampler.heap is None
            if fresh:
                groups = sampler.comp.shape[0]
                sampler.heap = (np.empty(sampler.comp.shape, np.int64), np.empty(sampler.comp.shape, np.int32),
                                np.empty(groups, np.int32), np.empty(groups, np.int64))
            state.append((sampler.comp.numpy(), *sampler.heap, fresh, sampler.ext.numpy(), sampler.base))
        ids = excerpt_ids.to(torch.int64)
        reduced, bins = statistics(vals.numpy(), bf16, first, settings.skip_positions, settings.hist_stride)
        listed = offers(reduced, bins, raw.shape[1] - first - settings.skip_positions,  # type: ignore[call-arg]
                        ids.numpy(), excerpt_hash(ids).numpy(), acc._unit_hash.numpy(), acc.sums.numpy(),
                        acc.max.numpy(), acc.min.numpy(), acc.min_excerpt_max.numpy(), acc.hist.numpy(),
                        acc.cell_counts.numpy(), *state[0], *state[1], *state[2], *state[3])
        copy_rows(raw.view(bits).numpy(), first, rows.view(bits).numpy(), *listed)
    except BaseException as err:  # a batch stopped part-way: a heap it left half-built is rebuilt from the keys
        for sampler in acc.samplers.values():
            sampler.heap = None
        # A Ctrl-C that Python notices in numba's boxing callback comes out as a SystemError caused by it.
        if isinstance(err, SystemError) and caused_by_interrupt(err):
            raise KeyboardInterrupt from err
        raise


def _contiguous(acts: torch.Tensor) -> tuple[torch.Tensor, int]:
    """acts [B, length, units] as a C-contiguous [B, first + length, units] tensor and `first`, the positions before
    acts' own (the compiled loops vectorise only over contiguous values): a hook's activations with the model's
    prefix positions sliced off are read in place; other strides are copied."""
    batch, length, units = acts.shape
    if acts.is_contiguous():
        return acts, 0
    whole = acts.stride(0) // max(units, 1)
    first = whole - length
    if (acts.stride(2) == 1 and acts.stride(1) == units and acts.stride(0) == whole * units and first > 0
            and acts.storage_offset() >= first * units):
        return acts.as_strided((batch, whole, units), (whole * units, units, 1),
                               acts.storage_offset() - first * units), first
    return acts.contiguous(), 0


def compile_passes(settings: CollectSettings, dtype: torch.dtype, report: Callable[[str, int, int], None],
                   after: float = 2.0) -> None:
    """Has numba compile the passes a CPU collection in `dtype` runs, or load them from its cache, by folding one
    excerpt of two units into a throwaway accumulator: a first collection on a machine compiles for about a minute
    (68 s against 9 s cached, a 64-excerpt collect on a 2-core Xeon), and its bar would sit at 0 meanwhile. The
    fold runs on a second thread; if it is still running after `after` seconds, the stage "compile" is reported
    (0 of 0, a pulsing bar) and, once it is over, 1 of 1. Loading from the cache takes well under a second."""
    from neuronscope.core.collection.accumulate import Accumulator

    acc = Accumulator((0,), 2, settings, dtype, torch.device("cpu"), fixed=False)
    acts = torch.randn(1, settings.length, 2).to(dtype)
    failed: list[BaseException] = []

    def fold() -> None:
        try:
            acc.update(acts, torch.zeros(1, dtype=torch.int64))
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            failed.append(err)

    thread = threading.Thread(target=fold, name="compile CPU passes", daemon=True)  # daemon: Ctrl-C does not wait
    thread.start()
    try:
        thread.join(after)
        slow = thread.is_alive()
        if slow:
            report("compile", 0, 0)
        thread.join()
    except KeyboardInterrupt as err:  # (Ctrl-C, SIGTERM)
        # The thread may still be in numba's native code: a process that exits normally around it aborted now and
        # then ("terminate called without an active exception", SIGABRT in CI), so the CLI ends this one at once.
        err.abandoned = True  # type: ignore[attr-defined]
        raise
    if failed:
        raise failed[0]
    if slow:
        report("compile", 1, 1)
