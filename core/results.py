"""What explain/score jobs produce for a neuron, and what `show` and the tables read back."""

from __future__ import annotations

from dataclasses import dataclass, field

from neuronscope.core.ids import NeuronId
from neuronscope.core.records import ActivationRecord, NeuronStats


@dataclass(frozen=True)
class Score:
    """One score of one simulation."""

    method: str
    """all, top, random or r2."""
    value: float
    """The score (0 when undefined, with a flag)."""
    ci_low: float
    """Lower end of the 95% bootstrap interval."""
    ci_high: float
    """Upper end of the 95% bootstrap interval."""
    n: int
    """Tokens scored."""
    flags: str = ""
    """Comma-separated: constant_prediction, constant_target, no_tokens."""


@dataclass(frozen=True)
class Simulation:
    """Predicted activations (0-9 scale) on one held-out excerpt."""

    excerpt_id: int
    """Excerpt id in the run."""
    kind: str
    """top or random."""
    split: str
    """select or test."""
    predicted: tuple[float, ...]
    """Expected value at every token."""


@dataclass(frozen=True)
class SplitScores:
    """Every method's score of one explanation on one split."""

    split: str
    """select or test."""
    simulator: str
    """Backend spec of the simulator."""
    scores: tuple[Score, ...]
    """One per method of neuronscope.core.explanation.score.METHODS."""

    def get(self, method: str = "all") -> Score | None:
        """The score of one method."""
        return next((s for s in self.scores if s.method == method), None)


@dataclass(frozen=True)
class ScoredExplanation:
    """One explanation of a neuron with its simulations and scores."""

    text: str
    """The explanation."""
    explainer: str
    """Backend spec that wrote it ('user' for a user's sentence)."""
    role: str
    """candidate, shuffled, baseline or user."""
    sample: int = 0
    """Index among the k candidates."""
    selected: bool = False
    """The candidate chosen on the select split (or the only one)."""
    source: NeuronId | None = None
    """The neuron the explanation was written for, when it is another neuron's."""
    simulations: tuple[Simulation, ...] = ()
    """Predictions per held-out excerpt."""
    splits: tuple[SplitScores, ...] = ()
    """Scores per split."""
    tail: str = "pos"
    """pos or neg: the tail it explains."""
    job: int | None = field(default=None, compare=False)
    """The job that stored it (None where unknown): a job's shuffled control and token baseline control the
    explanations of the same job and tail."""

    def score(self, split: str = "test", method: str = "all") -> Score | None:
        """One score, if it was measured."""
        for s in self.splits:
            if s.split == split:
                return s.get(method)
        return None


@dataclass(frozen=True)
class NeuronResult:
    """Everything one job wrote for one neuron (persisted in one transaction)."""

    layer: int
    """Layer."""
    neuron: int
    """Neuron index."""
    tail: str
    """pos or neg."""
    explanations: tuple[ScoredExplanation, ...] = field(default=())
    """Candidates, controls and user sentences."""


@dataclass(frozen=True)
class NeuronSummary:
    """One line of the ranked table: a neuron's selected explanation and its controls on the test split."""

    layer: int
    """Layer."""
    neuron: int
    """Neuron index."""
    tail: str
    """pos or neg."""
    text: str
    """The selected explanation."""
    explainer: str
    """Who wrote it."""
    score: Score | None
    """Its headline score (test split, all)."""
    shuffled: Score | None
    """The shuffled control's score on the same records."""
    baseline: Score | None
    """The token-lookup baseline's score on the same records."""
    selectivity: float = 0.0
    """The neuron's selectivity statistic."""

    @property
    def beats_shuffled(self) -> bool:
        """True when the interval of the score lies above the shuffled control's score."""
        return self.score is not None and self.shuffled is not None and self.score.ci_low > self.shuffled.value


@dataclass(frozen=True)
class NeuronRow:
    """One line of the neuron browser: a neuron's statistics and its newest selected explanation."""

    layer: int
    """Layer."""
    neuron: int
    """Neuron index."""
    explanation: str
    """The newest selected explanation of the pos tail ('' if none)."""
    score: float | None
    """Its test-split 'all' score (None if not measured)."""
    ci_low: float | None
    """Lower end of the score's 95% interval."""
    ci_high: float | None
    """Upper end of the score's 95% interval."""
    max_act: float
    """Largest activation seen."""
    density: float
    """Fraction of tokens with a positive activation."""
    selectivity: float
    """The selectivity statistic."""
    human: bool = False
    """Whether the explanation is a person's own (role user), not a model's."""
    tags: tuple[str, ...] = ()
    """The tags people gave it, sorted (notes alone are not tags)."""
    noted: bool = False
    """Whether someone wrote a note on it."""


@dataclass(frozen=True)
class NeuronBundle:
    """Everything the store holds on one neuron, read in bulk for exports."""

    stats: NeuronStats
    """Statistics."""
    records: tuple[ActivationRecord, ...]
    """Every record (any kind), by kind then rank."""
    explanations: dict[str, tuple[ScoredExplanation, ...]]
    """Per tail, newest job first."""
    related_tokens: dict[str, list[tuple[str, float]]]
    """Related-token lists."""
    related_neurons: dict[str, list[tuple[int, int, float]]]
    """Related-neuron lists."""


@dataclass(frozen=True)
class Tag:
    """A person's tag or note on a neuron."""

    layer: int
    """Layer."""
    neuron: int
    """Neuron index."""
    tag: str
    """The tag (e.g. good, wrong, unclear, polysemantic, or the person's own word); '' for a note alone."""
    note: str
    """The note ('' for none)."""
    author: str
    """Who wrote it ($USER, or --author)."""
    created_at: str
    """When, as YYYY-MM-DD HH:MM."""
