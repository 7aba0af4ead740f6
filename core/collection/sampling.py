"""Streaming, bounded, mergeable samplers for activation records (torch, on the subject's device).

Every sampler is a `SmallestK`: per group (a neuron, or a neuron and a cell of excerpt maxima) it
keeps the k entries with the smallest (key, excerpt id). Top-k uses key = -max, bottom-k key = min,
random samples a hash of (seed, layer, neuron, excerpt) — so the result is a deterministic function
of the set of excerpts seen, whatever their order or sharding, and two samplers merge exactly.
Memory is groups x k x length, independent of the corpus size.

There are three ways to offer candidates. `offer` (any groups) and `offer_blocks` (a block of candidates for every
group) filter them against each group's worst kept entry first and merge only the groups that changed, but they read
sizes back to the host (nonzero, unique, int(...)) a dozen times, and on a GPU every such read waits for all queued
work; `offer` merges shards and checkpoints. On a CPU, a collection's batches go to one compiled pass over blocks of
units instead (cpu_update.py: a heap per group, kept in `heap`). `merge` + `taken` are the fixed-shape way, for GPUs:
`merge` updates every group's keys and extremes with dense tensors of known shapes and says which slots take which
candidates, reading nothing back; `taken` then lists the incoming rows, given their number, which the caller reads
once per batch, late enough that the GPU never waits (accumulate.py). Once few candidates pass, `narrow` hands `merge`
only each unit's first few passing ones; the caller offers any it left out once it has read how many there were. All
ways keep exactly the same entries.

Any way, an offer updates keys and extremes and returns what it admitted as `Taken` (storage rows and the
candidates' positions): the caller copies the activation rows, for all its samplers at once, from a batch laid out
as it knows best. Samplers may share one storage of activation rows for that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

EMPTY = torch.iinfo(torch.int64).max
#: offer_blocks merges whole blocks unless fewer than 1 in this many candidates pass.
SPARSE_BLOCKS = 8
_MASK63 = (1 << 63) - 1
INF_BITS = 0x7F800000  # float32 +inf; bits above it (sign aside) are NaNs
NAN_BITS = 0x7FC00000  # the NaN composite uses


_MUL1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # splitmix64 multipliers, as signed int64
_MUL2 = 0x94D049BB133111EB - (1 << 64)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 (multiplications wrap; shifts made logical)."""
    x = (x ^ ((x >> 30) & (_MASK63 >> 29))) * _MUL1
    x = (x ^ ((x >> 27) & (_MASK63 >> 26))) * _MUL2
    return x ^ ((x >> 31) & (_MASK63 >> 30))


def unit_hash(seed: int, layer: int | torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
    """The per-neuron half of hash_keys (computed once per collection)."""
    return _mix(neurons.to(torch.int64) * 0x9E3779B1 + (layer * 0x165667B1 + seed * 0x27D4EB2F + 0x5BD1E995))


def excerpt_hash(excerpt_ids: torch.Tensor) -> torch.Tensor:
    """The per-excerpt half of hash_keys (computed once per batch)."""
    return _mix(excerpt_ids.to(torch.int64) * 0x85EBCA77 + 0x2545F491)


def keys_from(units: torch.Tensor, excerpts: torch.Tensor) -> torch.Tensor:
    """Combine the two halves (they broadcast) into uniform keys in [0, 1), exact in float32."""
    x = (units ^ excerpts) * _MUL2
    return ((x >> 40) & ((1 << 24) - 1)).to(torch.float32).div_(float(1 << 24))


def hash_keys(seed: int, layer: int | torch.Tensor, neurons: torch.Tensor, excerpt_ids: torch.Tensor) -> torch.Tensor:
    """Uniform pseudo-random keys in [0, 1) of (neuron, excerpt) pairs; the tensors broadcast.
    A deterministic function of (seed, layer, neuron, excerpt id) alone, so samples merge."""
    return keys_from(unit_hash(seed, layer, neurons), excerpt_hash(excerpt_ids))


def composite(key: torch.Tensor, excerpt_id: torch.Tensor) -> torch.Tensor:
    """One int64 per entry whose order is the order of (key, excerpt id): float32 key bits made
    monotonic in the high half, the id (< 2^31) in the low half. A NaN key (an excerpt with a NaN activation) is
    one NaN, after +inf, whatever its bits (which differ between devices and kernels): the worst in any sampler."""
    bits = (key.to(torch.float32) + 0.0).contiguous().view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    bits = torch.where(bits & 0x7FFFFFFF > INF_BITS, NAN_BITS, bits)
    bits = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (bits.to(torch.int64) << 32) + excerpt_id.to(torch.int64)


def composite_ids(comp: torch.Tensor) -> torch.Tensor:
    """Excerpt ids back from composites; -1 for empty slots."""
    return torch.where(comp == EMPTY, torch.full_like(comp, -1), comp & 0xFFFFFFFF)


@dataclass(frozen=True)
class Taken:
    """What an offer admitted: the rows `slots` of the samplers' activation storage take the activations of the
    offered candidates at `positions` (the caller copies them)."""

    slots: torch.Tensor
    positions: torch.Tensor


@dataclass(frozen=True)
class Moves:
    """What a fixed-shape merge decided: which slots take a newcomer, and the newcomer's position."""

    moving: torch.Tensor
    """[groups, k] bool."""
    position: torch.Tensor
    """[groups, k] position among the offered candidates (0 where not moving)."""
    count: torch.Tensor
    """Scalar on the device: moving.sum()."""


def narrow(passing: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `width` passing candidates of each unit, for a fixed-shape merge of far fewer than the whole block:
    passing [units, B] bool -> (source [units, width], their positions u * B + b, units * B where a unit has fewer;
    placed, a device scalar: how many were placed). The others of a unit with more than `width` are left out: the
    caller offers them once it sees placed < passing.sum() (an overflow, rare by the choice of width)."""
    units, batch = passing.shape
    none = units * batch
    pos = torch.nonzero_static(passing.view(-1), size=units * width, fill_value=none).squeeze(1)  # ascending
    unit = pos // batch
    column = torch.arange(len(pos), device=pos.device) - torch.searchsorted(unit, unit)  # rank within its unit
    fits = (column < width) & (pos < none)
    source = torch.full((units * width + 1,), none, dtype=torch.int64, device=pos.device)
    source.scatter_(0, torch.where(fits, unit * width + column, units * width), pos)
    return source[:-1].view(units, width), fits.sum()


def per_cell(comp: torch.Tensor, cells: torch.Tensor, n_cells: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-shape candidates for groups (unit, cell) from B candidates per unit: comp and cells [units, B] ->
    (cand, source) [units * n_cells, k], each cell's k smallest composites of the batch (EMPTY where fewer) and their
    positions u * B + b. Candidates past a cell's k best can never be kept, so nothing is lost."""
    units, batch = comp.shape
    by_comp = torch.argsort(comp, dim=1)
    by_cell = torch.argsort(torch.gather(cells, 1, by_comp), dim=1, stable=True)
    order = torch.gather(by_comp, 1, by_cell)  # [units, B]: by cell, then by composite
    sorted_cells = torch.gather(cells, 1, order).contiguous()
    rank = torch.arange(batch, device=comp.device) - torch.searchsorted(sorted_cells, sorted_cells)
    column = torch.where(rank < k, sorted_cells * k + rank, torch.full_like(rank, n_cells * k))  # the last: discarded
    cand = torch.full((units, n_cells * k + 1), EMPTY, dtype=torch.int64, device=comp.device)
    cand.scatter_(1, column, torch.gather(comp, 1, order))
    source = torch.zeros_like(cand).scatter_(1, column, order + torch.arange(units, device=comp.device)[:, None] * batch)
    return cand[:, :-1].reshape(units * n_cells, k), source[:, :-1].reshape(units * n_cells, k)


#: Rows at most this wide are ranked by comparing every pair of entries (the cell sampler's: k + its k): torch.topk
#: takes a thread block per row, and most of a batch's bookkeeping time on a GPU went to that for 166k rows of 6.
PAIRWISE_WIDTH = 16


def _smallest_columns(values: torch.Tensor, k: int) -> torch.Tensor:
    """[rows, W] -> [rows, k]: per row, the columns of its k smallest values, in ascending column order. Among equal
    values (EMPTY slots only: composites are unique), which are taken is left open."""
    rows, width = values.shape
    if width > PAIRWISE_WIDTH:
        return torch.sort(torch.topk(values, k, dim=1, largest=False, sorted=False).indices, dim=1).values
    column = torch.arange(width, device=values.device)
    before = column[None, :] < column[:, None]  # [W, W]: column j before column i
    a, b = values[:, :, None], values[:, None, :]
    rank = ((b < a) | ((b == a) & before)).sum(2)  # [rows, W]: the entries ranked before each
    kept = rank < k
    place = (kept[:, None, :] & before).sum(2)  # [rows, W]: kept columns before each
    chosen = torch.zeros((rows, k + 1), dtype=torch.int64, device=values.device)
    chosen.scatter_(1, torch.where(kept, place, k), column.expand(rows, -1))
    return chosen[:, :k].contiguous()


class SmallestK:
    """Per group, the k entries with the smallest (key, excerpt id), each with its activations.

    Slots are unordered while streaming: a newcomer takes the slot of the entry it evicts, so
    only the rows of winners are written (call `sorted()` for the final order).
    """

    def __init__(
        self, groups: int, k: int, length: int, dtype: torch.dtype, device: torch.device,
        storage: torch.Tensor | None = None, base: int = 0, scales: torch.Tensor | None = None,
    ) -> None:
        """storage [rows, length]: activation rows shared with other samplers, this one's from row `base` on (by
        default its own); with `scales` [rows] beside it, the rows are int8 codes of those scales (quantize)."""
        self.k = k
        self.comp = torch.full((groups, k), EMPTY, dtype=torch.int64, device=device)  # [groups, k]
        self.storage = torch.zeros((groups * k, length), dtype=dtype, device=device) if storage is None else storage
        self.base = base
        self.acts = self.storage[base : base + groups * k].view(groups, k, length)  # [groups, k, length]
        self.scales = None if scales is None else scales[base : base + groups * k].view(groups, k)
        self.ext = torch.zeros((groups, k, 2), dtype=torch.float32, device=device)  # [groups, k, (max, min)]
        self._slot_index: torch.Tensor | None = None
        #: Each group's kept composites in max-heap order (the worst first), then its free slots' (EMPTY); the slot of
        #: each; how many are kept; and the worst kept of a full group (EMPTY until full): kept between batches by
        #: the CPU's compiled pass (cpu_update.py; 12 bytes a slot and 12 a group); None once anything else changed
        #: the keys.
        self.heap: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    def _nothing(self) -> Taken:
        none = torch.zeros(0, dtype=torch.int64, device=self.comp.device)
        return Taken(none, none)

    def offer(self, group: torch.Tensor, comp: torch.Tensor, extremes: torch.Tensor) -> Taken:
        """Offer candidates: flat group indices, composites and exact (max, min) extremes [n, 2] (kept beside
        activations that may be stored at lower precision). Returns the rows to copy, by position among these."""
        if self.k == 0 or comp.numel() == 0:
            return self._nothing()
        pos = (comp < self.comp.max(dim=1).values[group]).nonzero().squeeze(1)  # better than the group's worst
        return self._offer_passing(pos, group[pos], comp, extremes)

    def _offer_passing(self, pos: torch.Tensor, group: torch.Tensor, comp: torch.Tensor, extremes: torch.Tensor
                       ) -> Taken:
        """Merge the candidates at `pos` (those better than their group's worst entry; `group` theirs)."""
        if pos.numel() == 0:
            return self._nothing()
        if group.numel() > 1 and not bool((group[1:] >= group[:-1]).all()):
            order = torch.argsort(group, stable=True)
            pos, group = pos[order], group[order]
        # Lay the passing candidates out as rows of their groups, EMPTY-padded, then merge those rows.
        touched, counts = torch.unique_consecutive(group, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        row = torch.repeat_interleave(torch.arange(len(touched), device=group.device), counts)
        col = torch.arange(len(group), device=group.device) - starts[row]
        new = torch.full((len(touched), int(counts.max())), EMPTY, dtype=torch.int64, device=group.device)
        new[row, col] = comp[pos]
        new_pos = torch.full_like(new, -1)
        new_pos[row, col] = pos
        return self._merge_rows(touched, new, new_pos.view(-1), comp, extremes)

    def offer_blocks(self, comp: torch.Tensor, extremes: torch.Tensor) -> Taken:
        """Offer a block of candidates for every group: comp [groups, B] (candidate p = group * B + b, the
        position extremes and the returned rows take). While many pass (a run's first batches), the groups with a
        candidate better than their worst entry are merged each with its whole block (the others cannot be kept), so
        nothing is compacted; once few do, only those that pass are, as `offer` merges them."""
        if self.k == 0 or comp.numel() == 0:
            return self._nothing()
        passing = comp < self.comp.max(dim=1).values[:, None]  # [groups, B]
        if int(passing.sum()) * SPARSE_BLOCKS < comp.numel():
            pos = passing.view(-1).nonzero().squeeze(1)  # in group order
            return self._offer_passing(pos, pos // comp.shape[1], comp.view(-1), extremes)
        touched = passing.any(1).nonzero().squeeze(1)
        positions = torch.arange(comp.numel(), device=comp.device).view(comp.shape)
        if touched.numel() == comp.shape[0]:
            return self._merge_rows(None, comp, positions.view(-1), comp.view(-1), extremes)
        return self._merge_rows(touched, comp[touched], positions[touched].view(-1), comp.view(-1), extremes)

    def _merge_rows(
        self, touched: torch.Tensor | None, new: torch.Tensor, new_pos: torch.Tensor, comp: torch.Tensor,
        extremes: torch.Tensor,
    ) -> Taken:
        """Merge new [rows, W] composites (EMPTY for none; new_pos, flat, their positions among the offered
        candidates `comp`) into the groups `touched` (None: every group, in order)."""
        old = self.comp if touched is None else self.comp[touched]
        both = torch.cat([old, new], 1)  # [rows, k + W]
        chosen = torch.topk(both, self.k, dim=1, largest=False, sorted=False).indices
        kept = torch.zeros_like(both, dtype=torch.bool).scatter_(1, chosen, True)
        # Per row, as many old slots are freed as newcomers kept: pair them in row-major order.
        free_row, free_slot = (~kept[:, : self.k]).nonzero(as_tuple=True)
        incoming = kept[:, self.k :].reshape(-1).nonzero().squeeze(1)  # flat indices into new
        positions = new_pos[incoming]
        real = positions >= 0  # an EMPTY newcomer may be "kept" into an empty slot: nothing moves
        if not bool(real.all()):
            free_row, free_slot, positions = free_row[real], free_slot[real], positions[real]
        if positions.numel() == 0:
            return self._nothing()
        slots = (free_row if touched is None else touched[free_row]) * self.k + free_slot
        self.comp.view(-1).index_copy_(0, slots, comp.index_select(0, positions))
        self.heap = None
        self.ext.view(-1, 2).index_copy_(0, slots, extremes.index_select(0, positions))
        return Taken(slots + self.base, positions)

    def merge(self, cand: torch.Tensor, source: torch.Tensor, extremes: torch.Tensor) -> Moves:
        """Fixed-shape offer, with no read back to the host: `cand` [groups, W] composites (EMPTY for none) and
        `source` [groups, W] their positions among the offered candidates (any value where EMPTY); `extremes`
        [positions, 2] their exact (max, min). Keys and extremes are updated now; the slots that take a newcomer are
        returned, for `taken` to list."""
        k, width = self.k, cand.shape[1]
        both = torch.cat([self.comp, cand], 1)  # [groups, k + W]: column j < k is slot j, k + i is candidate i
        # The k kept columns in order: the slots that stay, then the kept newcomers in candidate order. (Scans and
        # sorts along rows as wide as the block cost milliseconds a batch on a GPU; these rows are k wide.)
        chosen = _smallest_columns(both, k)
        slot = self._slots(both.device)  # [groups, k]: 0 .. k - 1
        staying_before = torch.searchsorted(chosen, slot)  # per slot, how many slots below it stay
        freed = torch.gather(chosen, 1, staying_before.clamp(max=k - 1)) != slot
        # The r-th freed slot of a group (r = slot - staying_before) takes its r-th kept newcomer.
        staying = staying_before[:, -1:] + (~freed[:, -1:]).long()  # [groups, 1]
        column = (torch.gather(chosen, 1, (staying + slot - staying_before).clamp(max=k - 1)) - k).clamp(0, width - 1)
        incoming = torch.gather(cand, 1, column)
        position = torch.gather(source, 1, column)
        self.comp = torch.where(freed, incoming, self.comp)
        self.heap = None
        moving = freed & (incoming != EMPTY)  # an empty newcomer in an empty slot moves nothing
        safe = torch.where(moving, position, torch.zeros_like(position))
        self.ext = torch.where(moving[:, :, None], extremes[safe], self.ext)
        return Moves(moving, safe, moving.sum())

    def _slots(self, device: torch.device) -> torch.Tensor:
        """[groups, k]: each row 0 .. k - 1 (kept, as searchsorted wants its queries contiguous)."""
        if self._slot_index is None:
            self._slot_index = torch.arange(self.k, device=device).expand(self.comp.shape[0], -1).contiguous()
        return self._slot_index

    def worst(self) -> torch.Tensor:
        """[groups]: each group's worst kept composite (EMPTY while it has a free slot); k > 0."""
        return self.comp.amax(1)

    def taken(self, moves: Moves, count: int) -> Taken:
        """The rows a merge admitted, given their number (`count` = moves.count, read by the caller)."""
        slots = torch.nonzero_static(moves.moving.view(-1), size=count).squeeze(1)
        return Taken(slots + self.base, moves.position.view(-1)[slots])

    def sorted(self, groups: slice = slice(None)
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Excerpt ids (-1 empty), activations (codes where the rows are quantised), (max, min) and the scales (None
        where the rows are not quantised) of `groups` (all by default; a slice keeps the copy of the activations to
        those groups') with each group's entries in (key, id) order."""
        comp, acts, ext = self.comp[groups], self.acts[groups], self.ext[groups]
        order = torch.argsort(comp, dim=1)
        ids = composite_ids(torch.gather(comp, 1, order))
        # whole rows by index (a gather of single values through an expanded index took 4 times as long on a CPU)
        flat = (order + torch.arange(comp.shape[0], device=comp.device)[:, None] * self.k).view(-1)
        scales = None if self.scales is None else self.scales[groups].reshape(-1)[flat].view(order.shape)
        return (ids, acts.reshape(-1, acts.shape[2]).index_select(0, flat).view(acts.shape),
                ext.reshape(-1, 2).index_select(0, flat).view(ext.shape), scales)
