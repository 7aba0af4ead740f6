"""What a job with `output` set (--output-centric) does beside the input-centric explanation, for one neuron: the
unit's effect on the next token when it is pushed up (over the excerpts it is explained from) and its steered
continuations of its held-out excerpts' beginnings, from the run's subject model (loaded once per job,
used by one thread at a time), then the output-centric explanation and, for score and run jobs, its steering score
beside the shuffled and baseline controls (neuronscope.core.explanation.output). A mixin of
neuronscope.core.jobs.engine.Job, beside neuronscope.core.jobs.neuron_work.NeuronWork."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from neuronscope.core.errors import NeuronError
from neuronscope.core.explanation.output import (
    OUTPUT_ROLES,
    PROMPT_TOKENS,
    SHOWN_TOKENS,
    STEER_SCALE,
    STEER_TOKENS,
    OutputView,
    output_lookup,
    output_prompt,
    scored_output,
)
from neuronscope.core.explanation.splits import NeuronSplits
from neuronscope.core.ids import NeuronId
from neuronscope.core.llm.base import Backend, LLMError
from neuronscope.core.llm.baseline import BaselineBackend
from neuronscope.core.records import ActivationRecord, RunInfo
from neuronscope.core.results import ScoredExplanation

if TYPE_CHECKING:
    from neuronscope.core.jobs.settings import JobSettings
    from neuronscope.core.models.sparse import SparseCoder
    from neuronscope.core.models.subject import Subject
    from neuronscope.core.store import Store

#: Loads a run's subject model and, for a run of sparse-coder latents, its coder.
SubjectFactory = Callable[[RunInfo], "tuple[Subject, SparseCoder | None]"]


class OutputWork:
    """Per neuron: its OutputView (made once per job, also for the neuron it is the shuffled partner of) and its
    output-centric explanations (the job's settings, run, backends and dry-run state are set by Job)."""

    run_info: RunInfo
    settings: JobSettings
    explainer_name: str
    simulator_name: str
    _tally: Any
    backend: Callable[[str], Backend]
    simulator: Callable[[], Backend]
    _reader: Callable[[], Store]
    _splits: Callable[..., NeuronSplits]

    def _init_output(self, subject_factory: SubjectFactory | None) -> None:
        self._subject_factory = subject_factory
        self._subject: tuple[Subject, SparseCoder | None] | None = None
        self._subject_lock = threading.Lock()  # hooks are global to the model: one intervention at a time
        self._views: dict[NeuronId, OutputView] = {}

    def _load_subject(self) -> tuple[Subject, SparseCoder | None]:
        """The run's subject (and coder), loaded at the first use (call with the subject lock held)."""
        if self._subject is None:
            if self._subject_factory is None:
                from neuronscope.core.models.loading import run_subject

                self._subject = run_subject(self.run_info)
            else:
                self._subject = self._subject_factory(self.run_info)
        return self._subject

    def _view(self, neuron: NeuronId, splits: NeuronSplits) -> OutputView:
        """What the neuron does to the output: effects over its train excerpts, continuations of its test excerpts'
        beginnings. A dry run loads no model: its stand-in has no tokens and the prompts as continuations."""
        prompts = [e for e in splits.test if e.tokens]
        length = min(PROMPT_TOKENS, max(1, min(len(e.tokens) for e in prompts) // 2)) if prompts else 0
        if self._tally is not None:
            stand_in = tuple(tuple(e.tokens[:length]) for e in prompts)
            return OutputView((), (), stand_in, stand_in)
        with self._subject_lock:
            if neuron in self._views:
                return self._views[neuron]
            if not prompts or splits.scale_max <= 0:
                raise NeuronError(f"{neuron} does not fire in its {self.settings.tail} tail's excerpts: "
                                  "nothing to amplify")
            from neuronscope.core.models.interventions import continuations, steering_effect

            subject, coder = self._load_subject()
            ids = self._reader().excerpts(self.run_info.run_id, [e.excerpt_id for e in splits.train + splits.test])
            if not all(ids[e.excerpt_id][0] for e in splits.train + splits.test):
                raise NeuronError(f"run {self.run_info.run_id} holds its excerpts as text alone (an import), not the "
                                  "token ids that steering runs through the model: use a run that collect made")
            sign = 1.0 if self.settings.tail == "pos" else -1.0
            peak = sign * splits.scale_max
            pushed = steering_effect(subject, neuron, np.array([ids[e.excerpt_id][0] for e in splits.train]),
                                     STEER_SCALE * peak, top=SHOWN_TOKENS, coder=coder)
            plain, steered = continuations(subject, neuron, np.array([ids[e.excerpt_id][0][:length] for e in prompts]),
                                           STEER_SCALE * peak, STEER_TOKENS, coder)
            view = self._views[neuron] = OutputView(
                tuple((s.token, s.change) for s in pushed.raised),
                tuple((s.token, s.change) for s in pushed.lowered),
                tuple(tuple(subject.token_strings(row)) for row in plain),
                tuple(tuple(subject.token_strings(row)) for row in steered))
            return view

    def _output_text(self, neuron: NeuronId, splits: NeuronSplits, partner: bool = False) -> str:
        """The neuron's output-centric explanation: the explainer's, or for score jobs the stored one (a partner
        without one lends its promoted tokens, as its lookup lends an input-centric one)."""
        if self.settings.kind == "score":
            texts = self._reader().candidate_texts(self.run_info.run_id, *neuron, tail=self.settings.tail,
                                                   explainer=self.explainer_name, role=OUTPUT_ROLES["candidate"])
            if texts:
                return texts[0]
            if not partner:
                raise NeuronError(f"{neuron} has no {self.settings.tail} output-centric explanation by "
                                  f"{self.explainer_name}: run `neuronscope explain --output-centric` first")
            return output_lookup(self._view(neuron, splits))
        explainer = self.backend(self.settings.explainer)
        return explainer.explain(output_prompt(self._view(neuron, splits)), 1, self.settings.seed)[0]

    def _output(self, neuron: NeuronId, splits: NeuronSplits, seed: int, partner: NeuronId | None,
                records: Mapping[NeuronId, list[ActivationRecord]]) -> list[ScoredExplanation]:
        """The output-centric explanation, and for score and run jobs its steering score beside the shuffled (another
        neuron's output explanation, when there is a partner) and baseline controls."""
        text = self._output_text(neuron, splits)
        if self.settings.kind == "explain":
            return [ScoredExplanation(text=text, explainer=self.explainer_name, role=OUTPUT_ROLES["candidate"])]
        view = self._view(neuron, splits)
        simulator, mode = self.simulator(), self.settings.simulation
        out = [scored_output(simulator, mode, text, view, explainer=self.explainer_name, role="candidate", seed=seed)]
        if partner is not None:
            try:
                other = self._output_text(partner, self._splits(partner, records), partner=True)
            except (LLMError, NeuronError):
                other = None  # the partner's own failure is recorded against it; this neuron goes without
            if other is not None:
                out.append(scored_output(simulator, mode, other, view, explainer=self.explainer_name, role="shuffled",
                                         seed=seed, source=partner))
        if not (self.explainer_name == "baseline" and self.settings.simulator == "baseline"):
            out.append(scored_output(BaselineBackend(), mode, output_lookup(view), view, explainer="baseline",
                                     role="baseline", seed=seed))
        return out
