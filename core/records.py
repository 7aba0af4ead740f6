"""Domain records shared by every stage: plain frozen dataclasses, no behaviour beyond derived values."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from neuronscope.core.choices import RecordKind

#: Highest digit of the 0-TOP activation scale that prompts show and simulations predict: one token in every
#: tokenizer we use ("10" is two in Llama/Qwen/Gemma).
TOP = 9


@dataclass(frozen=True)
class CollectSettings:
    """Everything that decides what a collection writes; two runs are comparable iff these match."""

    length: int = 64
    """Tokens per excerpt."""
    top_k: int = 50
    """Top-activating excerpts kept per neuron."""
    bottom_k: int = 50
    """Most negative excerpts kept per neuron."""
    random_k: int = 20
    """Uniform random excerpts kept per neuron (independent per neuron)."""
    quantile_k: int = 5
    """Excerpts sampled per quantile bin."""
    quantiles: tuple[float, ...] = (0.0, 0.5, 0.9, 0.99, 0.999)
    """Bin edges, as quantiles of the excerpt-max distribution."""
    max_excerpts: int | None = None
    """Cap on excerpts sampled from the corpus (None: all)."""
    seed: int = 0
    """Seed for excerpt sampling and per-neuron random samples."""
    hist_stride: int = 8
    """Token activation histogram uses one token position in this many (1 = every token)."""
    skip_positions: int = 0
    """Positions at the start of every excerpt left out of the statistics and of the excerpt maxima and minima that
    rank its records (their activations are still kept and shown): a model's massive first-position activations."""


@dataclass(frozen=True)
class RunInfo:
    """One collection of one model over one corpus."""

    run_id: int
    """Store-wide id."""
    model: str
    """What the user named (packaged name, path or hub id)."""
    model_revision: str
    """Content hash or hub revision of the weights."""
    corpus: str
    """Stable description of the corpus, from neuronscope.core.collection.corpus.describe."""
    settings: CollectSettings
    """Collection settings."""
    layers: tuple[int, ...]
    """Layers collected."""
    neurons_per_layer: int
    """MLP width."""
    status: str
    """running, complete, interrupted or failed."""
    created_at: str
    """UTC timestamp, ISO format."""
    n_excerpts: int = 0
    """Excerpts seen."""
    shard: str = ""
    """'i/n' for a shard run, '' otherwise."""
    dtype: str = ""
    """Compute dtype of the subject."""
    error: str = ""
    """Why a failed run failed."""
    units: str = ""
    """'' for MLP neurons; for a sparse coder's latents, the coder (its source and hook point)."""

    @property
    def latents(self) -> bool:
        """Whether the run's units are a sparse coder's latents rather than MLP neurons."""
        return bool(self.units)

    @property
    def n_neurons(self) -> int:
        """Neurons collected in this run."""
        return len(self.layers) * self.neurons_per_layer


#: A neuron whose top records peak at their first position this often or more is flagged as a likely position
#: artefact (`show`, the app's filter).
FIRST_POSITION = 0.5


@dataclass(frozen=True)
class NeuronStats:
    """Per-neuron statistics over every token of the corpus (histogram: a subsample of tokens)."""

    layer: int
    """Layer."""
    index: int
    """Neuron index."""
    count: int
    """Tokens seen."""
    mean: float
    """Mean activation."""
    variance: float
    """Population variance."""
    skewness: float
    """Standardised third moment (0 for a constant neuron)."""
    kurtosis: float
    """Standardised fourth moment, not excess (3 for a normal distribution)."""
    max: float
    """Largest activation seen."""
    min: float
    """Most negative activation seen."""
    density: float
    """Share of tokens with activation > 0."""
    selectivity: float
    """(Mean of the top-k excerpt maxima - median excerpt maximum) / std of token activations."""
    histogram: tuple[int, ...] = field(default=(), repr=False)
    """Token counts per bin of neuronscope.core.layerdata.HIST_EDGES."""
    quantile_edges: tuple[float, ...] = ()
    """Excerpt-max values at the run's quantiles."""
    first_peak: float | None = None
    """Share of its top records whose peak is at their first position (after any skipped ones): a position artefact
    rather than a feature when large (None: collected before this was measured)."""


@dataclass(frozen=True)
class ActivationRecord:
    """One excerpt with the neuron's activation at every token."""

    kind: RecordKind
    """top, bottom, random, quantile, or scored (a sequence an imported explanation was scored on)."""
    rank: int
    """Position within its kind (0 = strongest for top/bottom)."""
    excerpt_id: int
    """Excerpt id within the run."""
    tokens: tuple[str, ...]
    """Token strings, decoded one by one."""
    activations: tuple[float, ...]
    """Activation at each token."""
    bin: int = -1
    """Quantile bin index for kind 'quantile', else -1."""
    exact_max: float = math.nan
    """The excerpt's largest activation at full precision (stored activations are int8 codes)."""
    exact_min: float = math.nan
    """The excerpt's most negative activation at full precision."""

    @property
    def max(self) -> float:
        """Largest activation in the excerpt (exact when known)."""
        if not math.isnan(self.exact_max):
            return self.exact_max
        return max(self.activations) if self.activations else math.nan

    @property
    def min(self) -> float:
        """Most negative activation in the excerpt (exact when known)."""
        if not math.isnan(self.exact_min):
            return self.exact_min
        return min(self.activations) if self.activations else math.nan


@dataclass(frozen=True)
class ImportedNeuron:
    """A neuron brought in from another tool's files (neuronscope.core.interop.importer): what a collection would have stored for it,
    and its related tokens and neurons."""

    stats: NeuronStats
    """Statistics (count 0 and NaN where the files have none)."""
    records: tuple[ActivationRecord, ...]
    """Its records, with excerpt ids of the run (records with the same tokens share one)."""
    related_tokens: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    """neuronscope.core.interop.release.TOKEN_LISTS name -> [(token, value)], strongest first."""
    related_neurons: dict[str, list[tuple[int, int, float]]] = field(default_factory=dict)
    """neuronscope.core.interop.release.NEURON_LISTS name -> [(layer, neuron, weight)], strongest first."""


@dataclass(frozen=True)
class Call:
    """One exchange with a model, as the audit log keeps it."""

    backend: str
    """Backend spec, e.g. `local:qwen-1.5b`."""
    model: str
    """Model name and revision as the backend knows it."""
    kind: str
    """explain or simulate."""
    prompt: str
    """The request: prompt text or JSON of messages and parameters."""
    response: str
    """The answer as text (JSON for structured answers)."""
    prompt_tokens: int
    """Tokens sent."""
    completion_tokens: int
    """Tokens generated."""
    latency_s: float
    """Wall time of the call."""
