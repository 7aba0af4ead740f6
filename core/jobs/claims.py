"""Which of a job's blocks of neurons this process works on: each block is claimed before it starts, so several
processes on one store (neuronscope.core.store.spool) split a job between them, none doing what another did."""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence

from neuronscope.core.ids import NeuronId
from neuronscope.core.store import Store


class Blocks:
    """A job's blocks still to do, in the job's order; each neuron of a block right after its partner (its cycle
    backwards), so the partner's explanation, which its shuffled control needs, is on its way or done when it is
    asked for. A block stays claimed until all its neurons are committed (or the job ends)."""

    def __init__(self, store: Store, job_id: int, neurons: Sequence[NeuronId], cycles: Sequence[Sequence[int]],
                 todo: Iterable[int], since: datetime.datetime) -> None:
        self.store, self.job_id, self.neurons, self.since = store, job_id, neurons, since
        pending = set(todo)
        chunks = [(number, [i for i in reversed(cycle) if i in pending]) for number, cycle in enumerate(cycles)]
        self.waiting = [(number, chunk) for number, chunk in chunks if chunk]
        self.held: dict[int, int] = {}  # block -> this process's claim
        self.open: dict[int, set[NeuronId]] = {}  # block -> its neurons not committed yet
        self.block_of: dict[NeuronId, int] = {}

    @property
    def finished(self) -> bool:
        """Whether every block has been handed out."""
        return not self.waiting

    def next(self) -> list[int]:
        """The next block this process could claim, less what other processes finished meanwhile: neuron indexes;
        empty when no block can be claimed now (`finished`, or the rest are held by others: ask again later)."""
        k = 0
        while k < len(self.waiting):
            number, chunk = self.waiting[k]
            claim = self.store.claim(self.job_id, number)
            if claim is None:
                k += 1
                continue
            del self.waiting[k]
            if self.store.shared is not None:
                self.store.refresh()
                settled = self.store.settled(self.job_id, [self.neurons[i] for i in chunk], self.since)
                chunk = [i for i in chunk if self.neurons[i] not in settled]
            if not chunk:
                self.store.release(claim)
                continue
            self.held[number] = claim
            self.open[number] = {self.neurons[i] for i in chunk}
            self.block_of.update((self.neurons[i], number) for i in chunk)
            return chunk
        return []

    def committed(self, neurons: Iterable[NeuronId]) -> None:
        """These neurons are in the store: release the blocks they complete."""
        for neuron in neurons:
            number = self.block_of.pop(neuron, None)
            if number is None:
                continue
            left = self.open[number]
            left.discard(neuron)
            if not left:
                del self.open[number]
                self.store.release(self.held.pop(number))

    def release_all(self) -> None:
        for claim in self.held.values():
            self.store.release(claim)
        self.held.clear()
        self.open.clear()
        self.block_of.clear()
