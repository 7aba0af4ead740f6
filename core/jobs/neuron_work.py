"""What a job does for one neuron: read its records (prefetched a block at a time), explain it and score the
explanations with their controls, through the job's backends; nothing is written here (neuronscope.core.jobs.landing
commits). A mixin of neuronscope.core.jobs.engine.Job, which runs many neurons at once."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from neuronscope.core.errors import NeuronError
from neuronscope.core.explanation.explain import controls, lookup_of, prompt_for, revise, score_candidates
from neuronscope.core.explanation.splits import NeuronSplits, needed_ranks, split_records
from neuronscope.core.ids import NeuronId
from neuronscope.core.jobs.settings import JobSettings
from neuronscope.core.llm.base import Backend, Deferred
from neuronscope.core.records import ActivationRecord, RunInfo
from neuronscope.core.results import NeuronResult, ScoredExplanation
from neuronscope.core.store import Store

#: How a score job's neuron with nothing to score fails: a retry cannot mend it (`needs_explanation`).
NOTHING_TO_SCORE = "run `neuronscope explain` first, or pass --explanation"


def needs_explanation(error: str) -> bool:
    """Whether a neuron failed for want of an explanation to score (explaining it, not retrying, mends that)."""
    return NOTHING_TO_SCORE in error

if TYPE_CHECKING:
    from neuronscope.core.explanation.embedding import Embedder


class NeuronWork:
    """Per neuron: its records, candidates, partner and scores (the job's `store`, `run_info`, `settings`,
    `neurons`, `partners`, `control_share`, backends and dry-run state are set by Job)."""

    store: Store
    run_info: RunInfo
    settings: JobSettings
    neurons: tuple[NeuronId, ...]
    partners: dict[NeuronId, NeuronId]
    control_share: float
    explainer_name: str
    _readers: threading.local
    _opened: list[Store]
    _planned: dict[NeuronId, NeuronResult]
    backend: Callable[[str], Backend]
    embedder: Callable[[], Embedder | None]
    _output: Callable[..., list[ScoredExplanation]]

    def simulator(self) -> Backend:
        """The simulator; where it is asked nothing (JobSettings.simulator_asked), named only, loaded if something
        asks it after all (its model need not even be installed: `score --explanation` in the quotes mode)."""
        spec = self.settings.simulator
        return self.backend(spec) if self.settings.simulator_asked else Deferred(spec, lambda: self.backend(spec))

    @property
    def _uses_explainer(self) -> bool:
        return self.settings.kind in ("explain", "run")

    def _controlled(self, neuron: NeuronId) -> bool:
        """Whether a neuron gets the shuffled control and the contrast score (--controls)."""
        if self.control_share >= 1.0 or self.control_share <= 0.0:
            return self.control_share >= 1.0
        digest = hashlib.sha256(f"controls {self.settings.seed} {neuron.layer} {neuron.neuron}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.control_share

    def _reader(self) -> Store:
        """The store for reads in this thread (worker threads each get a cursor of their own)."""
        store = getattr(self._readers, "store", None)
        if store is None:
            store = self.store if threading.current_thread() is threading.main_thread() else self.store.for_thread()
            self._readers.store = store
            if store is not self.store:
                self._opened.append(store)
        return store

    def _close_readers(self) -> None:
        for reader in self._opened:
            reader.close()
        self._opened.clear()
        self._readers = threading.local()

    def _step_aside(self, progress: Callable[[str, int, int], None], stopped: Callable[[], bool]) -> None:
        """Close the store while another process folds the spool into it or writes it (a collection's write can take
        minutes): the writer's name is a stage of the progress meanwhile (`stopped`: Store.step_aside's)."""
        from neuronscope.core.store.runs import named_process

        waited: list[str] = []

        def waiting(pid: int) -> None:
            waited.append(f"waiting while {named_process(pid)} writes the store")
            progress(waited[-1], 0, 0)

        self.store.step_aside(waiting, stopped)
        for stage in waited:
            progress(stage, 1, 1)

    def _splits(self, neuron: NeuronId, records: Mapping[NeuronId, list[ActivationRecord]]) -> NeuronSplits:
        found = records.get(neuron)
        if found is None:
            found = self._reader().records(self.run_info.run_id, neuron[0], neuron[1], kinds=("top", "bottom", "random"))
        splits = split_records(found, self.settings.tail, self.settings.sizes)
        if not splits.train or not splits.test:
            raise NeuronError(f"{neuron} has too few records for the {self.settings.tail} tail")
        return splits

    def _partner_text(self, partner: NeuronId, records: Mapping[NeuronId, list[ActivationRecord]]) -> str:
        """Another neuron's explanation: the explainer's first candidate for it (the same request as the partner's
        own, so made once), or for score jobs its newest stored explanation, else its lookup explanation."""
        splits = self._splits(partner, records)
        if self._uses_explainer:
            explainer = self.backend(self.settings.explainer)
            return explainer.explain(prompt_for(explainer, splits), self.settings.samples, self.settings.seed)[0]
        # A dry run stores nothing: there, what this job would have stored for the partner by now.
        landed = self._planned.get(partner)
        found = landed.explanations if landed else self._reader().explanations(self.run_info.run_id, *partner,
                                                                                tail=self.settings.tail)
        # the explainer's own explanation: a user sentence may be this job's own, scored on every neuron
        stored = [e for e in found if e.role == "candidate" and e.selected]
        return stored[0].text if stored else lookup_of(splits)

    def _candidates(self, neuron: NeuronId, splits: NeuronSplits) -> tuple[list[str], str, str]:
        """(texts, explainer, role) to score or store."""
        s = self.settings
        if s.kind == "score" and s.explanation is not None:
            return [s.explanation], f"user:{s.author}" if s.author else "user", "user"
        if s.kind == "score":
            texts = self._reader().candidate_texts(self.run_info.run_id, *neuron, tail=s.tail,
                                                   explainer=self.explainer_name)
            if not texts:
                raise NeuronError(f"{neuron} has no {s.tail} explanation by {self.explainer_name}: {NOTHING_TO_SCORE}")
            return texts, self.explainer_name, "candidate"
        explainer = self.backend(s.explainer)
        return explainer.explain(prompt_for(explainer, splits), s.samples, s.seed), self.explainer_name, "candidate"

    def _seed(self, neuron: NeuronId) -> int:
        """A neuron's seed for bootstraps and decoys: the job's seed mixed with its position."""
        return self.settings.seed * 1_000_003 + neuron[0] * 100_003 + neuron[1]

    def process(self, index: int, records: Mapping[NeuronId, list[ActivationRecord]] | None = None) -> NeuronResult:
        """Explain and/or score one neuron (all LLM calls; nothing written). `records`: prefetched records of the
        neuron and its partner (others are read from the store)."""
        records = records or {}
        neuron = self.neurons[index]
        splits = self._splits(neuron, records)
        texts, explainer, role = self._candidates(neuron, splits)
        seed = self._seed(neuron)
        if self.settings.kind == "explain":
            out = [ScoredExplanation(text=t, explainer=explainer, role=role, sample=i, selected=i == 0)
                   for i, t in enumerate(texts)]
            if self.settings.output:
                out += self._output(neuron, splits, seed, None, records)
            return NeuronResult(neuron[0], neuron[1], self.settings.tail, tuple(out))
        simulator = self.simulator()
        scorers, embedder = self.settings.scorers, self.embedder()
        mode = self.settings.simulation
        controlled = self._controlled(neuron)
        revised = None
        if self.settings.revise and self.settings.kind == "run":
            explainer_backend = self.backend(self.settings.explainer)
            revised = revise(explainer_backend, simulator, splits, prompt_for(explainer_backend, splits), texts[0],
                             simulation=mode, seed=self.settings.seed)
        scored = score_candidates(simulator, splits, texts + ([revised] if revised else []), explainer=explainer,
                                  role=role, seed=seed, simulation=mode, scorers=scorers, embedder=embedder,
                                  with_contrast=controlled)
        if revised:
            scored[-1] = replace(scored[-1], explainer=f"{explainer} (revised)")
        partner = self.partners.get(neuron) if controlled else None
        extra = controls(simulator, splits, partner=partner, seed=seed, explainer=explainer, simulation=mode,
                         scorers=scorers, embedder=embedder, with_contrast=controlled,
                         partner_text=(lambda: self._partner_text(partner, records)) if partner else None)  # type: ignore[arg-type]
        if self.settings.output:
            extra += self._output(neuron, splits, seed, partner, records)
        return NeuronResult(neuron[0], neuron[1], self.settings.tail, tuple(scored + extra))

    def _prefetch(self, indexes: Sequence[int]) -> dict[NeuronId, list[ActivationRecord]]:
        """The records of these neurons and of their partners, in one read."""
        wanted = {self.neurons[i] for i in indexes}
        wanted |= {self.partners[n] for n in list(wanted) if n in self.partners}
        return self.store.records_many(self.run_info.run_id, sorted(wanted),
                                       needed_ranks(self.settings.tail, self.settings.sizes))  # type: ignore[arg-type]

