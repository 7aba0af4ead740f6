"""Per-layer streaming state of a collection: record samplers, moments, histogram; merge and finalise.

Memory per layer is neurons x (top_k + bottom_k + random_k + CELLS x CELL_K) x length activations,
whatever the corpus size. Everything here is a deterministic function of the set of excerpts
offered, so shards merge into exactly what one run would have kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from neuronscope.core.collection.sampling import (
    EMPTY,
    Moves,
    SmallestK,
    Taken,
    composite,
    hash_keys,
    narrow,
    per_cell,
    unit_hash,
)
from neuronscope.core.collection.token_stats import cell_bins, compute_token_stats
from neuronscope.core.layerdata import CELL_K, CELLS, HIST_EDGES, LayerResult, Samples
from neuronscope.core.records import CollectSettings

#: A layer key at or above this is a sparse coder's latents at layer key - LATENT_KEY, collected beside the MLP
#: neurons of the same layer in one pass (neuronscope.core.collection.collect.collect_beside). Sampling hashes the
#: real layer, so the latents keep the records a collection of them alone keeps.
LATENT_KEY = 1_000_000
#: The narrowest a fixed-shape merge gets: the candidates it takes per unit and batch once few pass.
MIN_WIDTH = 8


@dataclass(frozen=True)
class _Pending:
    """A fixed-shape update's queued work, settled at the next update."""

    moves: dict[str, Moves]
    counts: torch.Tensor
    """Read back, per sampler: rows moving, candidates passing, placed, the most passing in a unit."""
    event: Any
    """What reading `counts` waits for (None on a CPU)."""
    acts: torch.Tensor
    left: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    """Per narrowed merge: the passing mask, the placed positions and the composites, for an overflow's offer."""
    cell_of: torch.Tensor
    extremes: torch.Tensor


class Accumulator:
    """Streaming state for several layers of F neurons each, updated together.

    The layers' activations are concatenated into one unit axis (unit u = layer layers[u // F],
    neuron u % F), so every batch costs one round of tensor operations however many layers there
    are: on a GPU, kernel launches rather than arithmetic would otherwise dominate.
    """

    def __init__(
        self, layers: tuple[int, ...], neurons: int, settings: CollectSettings, dtype: torch.dtype,
        device: torch.device, fixed: bool | None = None,
    ) -> None:
        self.layers, self.neurons, self.settings = tuple(layers), neurons, settings
        #: Fixed-shape updates that never wait for the device (the default on a GPU; see sampling.py).
        self.fixed = device.type == "cuda" if fixed is None else fixed
        #: Batches folded in by the CPU's compiled passes (cpu_update.py) rather than by torch.
        self.cpu_passes = device.type == "cpu" and not self.fixed
        self._pending: _Pending | None = None
        #: Per sampler, how many passing candidates of a unit the next fixed-shape merge takes (the whole block first).
        self._widths = dict.fromkeys(("top", "bottom", "random", "cell"), 1 << 62)
        units = self.units = len(self.layers) * neurons
        length = settings.length
        shapes = {"top": (units, settings.top_k), "bottom": (units, settings.bottom_k),
                  "random": (units, settings.random_k), "cell": (units * CELLS, CELL_K)}
        slots = sum(g * k for g, k in shapes.values())
        #: Where torch copies the rows (a GPU; a CPU with fixed shapes), they are kept as the store keeps them, int8
        #: codes and a scale each (`scales`), quantised as they are copied: half a bf16 row's memory, which on a GPU
        #: is what a model's records cost (11.6 GB bf16 for Llama-3.1-8B's 458,752 neurons). The CPU's compiled copy
        #: keeps the subject's dtype: quantising there cost more than twice the copy (bench/README.md).
        self.scales = None if self.cpu_passes else torch.zeros(slots, device=device)
        #: Every sampler's activation rows, in one storage: a batch's rows are copied in at once.
        self.rows = torch.zeros((slots, length), dtype=dtype if self.scales is None else torch.int8, device=device)
        self.samplers, base = {}, 0
        for kind, (groups, k) in shapes.items():
            self.samplers[kind] = SmallestK(groups, k, length, dtype, device, self.rows, base, self.scales)
            base += groups * k
        self.sums = torch.zeros((5, units), dtype=torch.float64, device=device)
        self.count = 0
        self.max = torch.full((units,), -float("inf"), device=device)
        self.min = torch.full((units,), float("inf"), device=device)
        self.min_excerpt_max = torch.full((units,), float("inf"), device=device)
        self.hist = torch.zeros(units * (len(HIST_EDGES) + 1), dtype=torch.int64, device=device)
        self.cell_counts = torch.zeros(units * CELLS, dtype=torch.int64, device=device)
        self._units = torch.arange(units, device=device)
        self._hist_offsets = (self._units * (len(HIST_EDGES) + 1)).int()  # unit u's histogram starts here
        self._cell_base = self._units[:, None] * CELLS  # [units, 1]: unit u's first cell group
        self._unit_layer = torch.tensor([layer % LATENT_KEY for layer in self.layers],
                                        device=device).repeat_interleave(neurons)  # [units]
        self._unit_neuron = self._units % neurons  # [units]
        self._unit_hash = unit_hash(settings.seed, self._unit_layer, self._unit_neuron)  # [units]

    # -- streaming ---------------------------------------------------------------------------
    def update(
        self, acts: torch.Tensor, excerpt_ids: torch.Tensor, token_stats: Callable[..., Any] | None = None
    ) -> None:
        """Fold in one batch.  acts: [B, T, units] in the subject's dtype (the layers' activations
        concatenated in order); excerpt_ids: [B] int64.

        `token_stats` is compute_token_stats or its compiled form (token_stats_fn). On a CPU (unless fixed), the
        batch is folded in by cpu_update.py's compiled passes instead, statistics, records and rows (`token_stats`
        unused: those passes took 4.0-4.3 ms a SmolLM2 layer and batch against 5 for torch.compile's kernel and
        the same record passes). With
        fixed-shape updates, the batch's activation rows are copied into the samplers at the next update (or when
        results are taken): by then the caller has queued the next batch's forward pass, so reading how many rows
        there are to copy does not leave the GPU idle. `acts` is kept alive until then."""
        skip = self.settings.skip_positions
        excerpt_ids = excerpt_ids.to(self.max.device)
        self.count += acts.shape[0] * (acts.shape[1] - skip)
        if self.cpu_passes:
            _cpu_update(self, acts, excerpt_ids)
            return
        counted = acts[:, skip:, :] if skip else acts  # statistics and record ranking leave out the first positions
        stats = (token_stats or compute_token_stats)(counted, excerpt_ids, self._unit_hash, self.settings.hist_stride,
                                                     self._hist_offsets)
        sums, batch_max, batch_min, batch_min_excerpt_max, hist_index, extremes, top, bottom, random, cell_of = stats
        self.sums += sums
        torch.maximum(self.max, batch_max, out=self.max)
        torch.minimum(self.min, batch_min, out=self.min)
        torch.minimum(self.min_excerpt_max, batch_min_excerpt_max, out=self.min_excerpt_max)
        self._count_into(self.hist, hist_index.reshape(-1))
        cells = self._cell_base + cell_of  # [units, B]: group (unit, cell of the excerpt max)
        self._count_into(self.cell_counts, cells.reshape(-1))
        if self.fixed:
            self._settle()  # the previous batch's rows
            self._pending = self._merge_fixed(acts, {"top": top, "bottom": bottom, "random": random, "cell": random},
                                              cell_of, extremes)
            return
        taken = [self.samplers[kind].offer_blocks(comp, extremes)
                 for kind, comp in (("top", top), ("bottom", bottom), ("random", random))]
        taken.append(self.samplers["cell"].offer(cells.reshape(-1), random.reshape(-1), extremes))
        self._copy_rows(taken, acts)

    def _merge_fixed(self, acts: torch.Tensor, offered: dict[str, torch.Tensor], cell_of: torch.Tensor,
                     extremes: torch.Tensor) -> _Pending:
        """Every sampler's fixed-shape merge of a batch (candidate p = unit * B + excerpt b), queued with nothing read
        back. A sampler merges the whole block while many candidates pass (a run's first batches); then only each
        unit's first `width` passing ones (sampling.narrow), the width set from the previous batch's most passing in
        a unit, with room to spare: few enter the lists late in a run, and a merge's cost is its width."""
        batch = acts.shape[0]
        source = self._units[:, None] * batch + torch.arange(batch, device=acts.device)  # [units, B]
        moves, left, numbers = {}, {}, []
        for kind, cand in offered.items():
            sampler = self.samplers[kind]
            cells = cell_of if kind == "cell" else None
            if sampler.k == 0:
                passing = torch.zeros_like(cand, dtype=torch.bool)
            elif cells is None:
                passing = cand < sampler.worst()[:, None]
            else:
                passing = cand < sampler.worst().view(self.units, CELLS).gather(1, cells)
            width, passed = self._widths[kind], passing.sum()
            if width < batch:
                block_source, placed = narrow(passing, width)
                left[kind] = (passing, block_source, cand)
                safe = block_source.clamp(max=passing.numel() - 1)
                block = torch.where(block_source < passing.numel(), cand.view(-1)[safe], EMPTY)
                block_cells = cells.reshape(-1)[safe] if cells is not None else None
            else:
                block, block_source, block_cells, placed = cand, source, cells, passed
            if cells is not None:
                cell_cand, cell_source = per_cell(block, block_cells, CELLS, CELL_K)
                moves[kind] = sampler.merge(cell_cand, block_source.view(-1)[cell_source], extremes)
            else:
                moves[kind] = sampler.merge(block, block_source, extremes)
            numbers += [moves[kind].count, passed, placed, passing.sum(1).amax()]
        counts = torch.stack(numbers)
        event = None
        if counts.is_cuda:  # copied back while the next forward pass runs; waited for at the next update
            host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
            host.copy_(counts, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(counts.device))
            counts = host
        return _Pending(moves, counts, event, acts, left, cell_of, extremes)

    def _settle(self) -> None:
        """Copy the last fixed-shape update's activation rows into the samplers; offer the candidates a narrowed
        merge left out (an overflow: more passed in a unit than its width); set the next widths."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        if pending.event is not None:
            pending.event.synchronize()
        numbers = pending.counts.tolist()
        taken, overflow = [], []
        for i, (kind, moves) in enumerate(pending.moves.items()):
            count, passing, placed, most = numbers[4 * i : 4 * i + 4]
            taken.append(self.samplers[kind].taken(moves, count))
            self._widths[kind] = max(MIN_WIDTH, 1 << (2 * most - 1).bit_length()) if most else MIN_WIDTH
            if kind in pending.left and passing > placed:
                overflow.append(kind)
        self._copy_rows(taken, pending.acts)
        if overflow:  # after the rows just copied: these offers may evict some of them
            self._copy_rows([self._offer_left(kind, *pending.left[kind], pending.cell_of, pending.extremes)
                             for kind in overflow], pending.acts)

    def _offer_left(self, kind: str, passing: torch.Tensor, placed: torch.Tensor, cand: torch.Tensor,
                    cell_of: torch.Tensor, extremes: torch.Tensor) -> Taken:
        """Offer the passing candidates a narrowed merge did not place (reading sizes back: overflows are rare).
        Offered after the merge, they meet the lists it left: exactly the entries one merge of all would keep."""
        rest = passing.reshape(-1).clone()
        placed = placed.reshape(-1)
        rest[placed[placed < rest.numel()]] = False
        pos = rest.nonzero().squeeze(1)
        unit = pos // passing.shape[1]
        group = unit * CELLS + cell_of.reshape(-1)[pos] if kind == "cell" else unit
        taken = self.samplers[kind].offer(group, cand.reshape(-1)[pos], extremes[pos])
        return Taken(taken.slots, pos[taken.positions])

    def _copy_rows(self, taken: list[Taken], acts: torch.Tensor) -> None:
        """Copy the admitted candidates' activations (candidate p = unit * B + excerpt b: acts[b, :, unit]) into the
        samplers' rows, every sampler's at once, reading the batch in its own order (excerpt, then unit): in the
        samplers' order (unit, then excerpt) every token of a row is a cache line of its own, three times slower.
        When most of the batch is taken (its first batches), from one copy with tokens innermost instead."""
        slots = torch.cat([t.slots for t in taken])
        positions = torch.cat([t.positions for t in taken])
        if positions.numel() == 0:
            return
        batch, units = acts.shape[0], self.units
        key = (positions % batch) * units + positions // batch  # excerpt-major
        if positions.numel() * 2 > batch * units:
            rows = acts.transpose(1, 2).reshape(batch * units, -1).index_select(0, key)
        else:
            key, order = torch.sort(key)
            slots = slots[order]
            rows = acts[key // units, :, key % units]
        if self.scales is None:
            self.rows.index_copy_(0, slots, rows.to(self.rows.dtype))
        else:
            scales, codes = quantize_rows(rows)
            self.rows.index_copy_(0, slots, codes)
            self.scales.index_copy_(0, slots, scales)

    def _count_into(self, counts: torch.Tensor, index: torch.Tensor) -> None:
        """counts[i] += occurrences of i in index. bincount reads the largest index back to the host, so not on a GPU;
        there, atomic adds: scatter_add_ counted a GPT-2 XL layer's 26M histogram entries of a batch in 0.40 ms on
        an H200, where an accumulating index_put_ (which sorts its index first) took 5.8 ms."""
        if self.fixed:
            counts.scatter_add_(0, index.long(), torch.ones((), dtype=counts.dtype, device=counts.device).expand(len(index)))
        else:
            counts += torch.bincount(index, minlength=counts.numel())

    def absorb(self, other: LayerResult) -> None:
        """Merge another state of one of this accumulator's layers into it (a shard's, or a checkpoint's): exact."""
        self._settle()
        if other.layer not in self.layers:
            raise ValueError(f"absorb merges a layer of this accumulator ({self.layers}), not {other.layer}")
        dev, f = self.max.device, self.neurons
        first = self.layers.index(other.layer) * f
        at = slice(first, first + f)
        self.sums[:, at] += torch.from_numpy(other.sums).to(dev)
        self.count += other.count
        self.max[at] = torch.maximum(self.max[at], torch.from_numpy(other.max).to(dev))
        self.min[at] = torch.minimum(self.min[at], torch.from_numpy(other.min).to(dev))
        self.min_excerpt_max[at] = torch.minimum(self.min_excerpt_max[at], torch.from_numpy(other.min_excerpt_max).to(dev))
        nb = len(HIST_EDGES) + 1
        self.hist[at.start * nb : at.stop * nb] += torch.from_numpy(other.histogram.reshape(-1)).to(dev)
        self.cell_counts[at.start * CELLS : at.stop * CELLS] += torch.from_numpy(other.cell_counts.reshape(-1)).to(dev)
        for kind in ("top", "bottom", "random", "cell"):
            sample = other.samples[kind]
            k = sample.ids.shape[1]
            neuron = torch.arange(f, device=dev).repeat_interleave(k)
            ids = torch.from_numpy(sample.ids).to(dev).reshape(-1)
            scales = torch.from_numpy(sample.scales).to(dev).reshape(-1)  # int8 to the device
            codes = torch.from_numpy(sample.codes).to(dev).reshape(-1, self.settings.length)
            maxes = torch.from_numpy(sample.maxes).to(dev).reshape(-1)
            mins = torch.from_numpy(sample.mins).to(dev).reshape(-1)
            extremes = torch.stack([maxes, mins], 1)
            group = neuron + at.start
            if kind == "top":
                key = -maxes
            elif kind == "bottom":
                key = mins
            else:
                key = hash_keys(self.settings.seed, other.layer % LATENT_KEY, neuron, ids)
                if kind == "cell":
                    group = group * CELLS + cell_bins(maxes)
            sel = (ids >= 0).nonzero().squeeze(1)
            taken = self.samplers[kind].offer(group[sel], composite(key[sel], ids[sel]), extremes[sel])
            chosen = sel[taken.positions]
            if self.scales is None:
                self.rows.index_copy_(0, taken.slots,
                                      dequantize_rows(scales[chosen], codes[chosen]).to(self.rows.dtype))
            else:  # kept as they come
                self.rows.index_copy_(0, taken.slots, codes[chosen])
                self.scales.index_copy_(0, taken.slots, scales[chosen])

    # -- results -----------------------------------------------------------------------------
    def results(self) -> Iterator[LayerResult]:
        """Each layer's state as numpy arrays (for the store, or a later merge), in layer order."""
        self._settle()
        f, nb = self.neurons, len(HIST_EDGES) + 1
        for i, layer in enumerate(self.layers):
            at = slice(i * f, (i + 1) * f)
            samples = {}
            for kind, sampler in self.samplers.items():
                per = CELLS if kind == "cell" else 1
                ids, acts, ext, scales = sampler.sorted(slice(at.start * per, at.stop * per))
                width, length = ids.shape[1] * per, acts.shape[2]
                if scales is None:  # on the device: a quarter of float32's bytes leave it
                    scales, codes = quantize_rows(acts.reshape(-1, length))
                else:
                    codes = acts
                ext_np = ext.reshape(f, width, 2).cpu().numpy()
                samples[kind] = Samples(ids.reshape(f, width).cpu().numpy(), scales.reshape(f, width).cpu().numpy(),
                                        codes.reshape(f, width, length).cpu().numpy(), ext_np[..., 0], ext_np[..., 1])
            yield LayerResult(
                layer=layer,
                sums=self.sums[:, at].cpu().numpy(),
                count=self.count,
                max=self.max[at].cpu().numpy(),
                min=self.min[at].cpu().numpy(),
                min_excerpt_max=self.min_excerpt_max[at].cpu().numpy(),
                histogram=self.hist[at.start * nb : at.stop * nb].reshape(f, nb).cpu().numpy(),
                cell_counts=self.cell_counts[at.start * CELLS : at.stop * CELLS].reshape(f, CELLS).cpu().numpy(),
                samples=samples,
            )


def quantize_rows(rows: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """layerdata.quantize on the rows' device: rows [n, T] -> (scales [n] float32, codes [n, T] int8), the same
    float32 operations (an IEEE division, rounding half to even), so the same codes on every device. A chunk of
    rows at a time, in place on a float32 copy of it (on a CPU, 32,768 rows: 9 times as fast as whole-tensor
    operations; on a GPU, a million, few kernel launches)."""
    n, length = rows.shape
    chunk = chunk or (1 << 15 if rows.device.type == "cpu" else 1 << 20)
    scales = torch.empty(n, device=rows.device)
    codes = torch.empty((n, length), dtype=torch.int8, device=rows.device)
    for start in range(0, n, chunk):
        part = rows[start : start + chunk]
        high = part.abs().amax(1).float()  # exact in bf16
        scales[start : start + chunk] = high
        values = part.to(torch.float32, copy=True)
        values.div_(torch.where(high > 0, high, 1.0)[:, None]).mul_(127.0).round_().clamp_(-127, 127)
        codes[start : start + chunk] = values.nan_to_num_(0.0)  # NaN (an infinity over its scale): code 0
    return scales, codes


def dequantize_rows(scales: torch.Tensor, codes: torch.Tensor, chunk: int = 1 << 15) -> torch.Tensor:
    """layerdata.dequantize on the codes' device, a chunk of rows at a time: scales [n], codes [n, T] int8 -> float32
    [n, T], the same float32 operations, so the same values (the extreme codes exactly +-scale)."""
    out = torch.empty(codes.shape, device=codes.device)
    for start in range(0, len(codes), chunk):
        part, scale = codes[start : start + chunk], scales[start : start + chunk, None]
        out[start : start + chunk] = torch.where(part.abs() == 127, part.sign() * scale, part * (scale / 127.0))
    return out


class LayerAccumulator(Accumulator):
    """The state of a single layer (merges, tests)."""

    def __init__(
        self, layer: int, neurons: int, settings: CollectSettings, dtype: torch.dtype, device: torch.device,
        fixed: bool | None = None,
    ) -> None:
        super().__init__((layer,), neurons, settings, dtype, device, fixed)
        self.layer = layer

    def result(self) -> LayerResult:
        """The layer's state as numpy arrays."""
        return next(self.results())


def _cpu_update(*args: Any) -> None:
    """cpu_update.update, imported when first used (it imports numba)."""
    from neuronscope.core.collection.cpu_update import update

    update(*args)


def compile_cpu_passes(*args: Any) -> None:
    """cpu_update.compile_passes, imported when first used (it imports numba)."""
    from neuronscope.core.collection.cpu_update import compile_passes

    compile_passes(*args)
