"""What a job is asked to do (JobSettings, which with its neurons is its identity), what it reports when it ends
(JobReport) and what a dry run counts (Plan), with the parsing of --controls and NEURONSCOPE_CONCURRENCY
(neuronscope.core.jobs.engine runs jobs)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from neuronscope.core.choices import DEFAULT_BACKEND, DEFAULT_SIMULATION, JobKind, Scorer, SimulationMode, Tail
from neuronscope.core.errors import InputError
from neuronscope.core.explanation.scorers import RATED
from neuronscope.core.explanation.splits import SplitSizes
from neuronscope.core.ids import NeuronId
from neuronscope.core.jobs.selection import JobError


def parse_controls(text: str) -> float:
    """`all` (1.0), `none` (0.0) or `sample:F`: the share of a job's neurons that get the shuffled control and the
    neutral (contrast) simulation."""
    if text in ("all", "none"):
        return 1.0 if text == "all" else 0.0
    kind, _, share = text.partition(":")
    try:
        value = float(share) if kind == "sample" else -1.0
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise JobError(f"--controls {text!r}: use all, none or sample:F with F a fraction of neurons in (0, 1], "
                       "e.g. sample:0.1")
    return value


def env_concurrency() -> int | None:
    """NEURONSCOPE_CONCURRENCY, if set; InputError when it is not a positive integer."""
    text = os.environ.get("NEURONSCOPE_CONCURRENCY")
    if not text:
        return None
    if not text.strip().isdigit() or int(text) < 1:
        raise InputError(f"NEURONSCOPE_CONCURRENCY={text!r} is not a positive integer: set it to e.g. 64, or unset it")
    return int(text)


@dataclass(frozen=True)
class JobSettings:
    """What a job does to each neuron; with the neuron list, its identity."""

    kind: JobKind = "run"
    """explain (candidates only), score (stored candidates or a given sentence) or run (both)."""
    explainer: str = DEFAULT_BACKEND
    """Backend spec of the explainer."""
    simulator: str = DEFAULT_BACKEND
    """Backend spec of the simulator."""
    tail: Tail = "pos"
    """pos: explain max(a, 0) from top records; neg: max(-a, 0) from bottom records."""
    samples: int = 1
    """Candidate explanations per neuron (best of k on the select split)."""
    sizes: SplitSizes = field(default_factory=SplitSizes)
    """Excerpts per split."""
    seed: int = 0
    """Seed for sampled explanations and bootstrap intervals."""
    explanation: str | None = None
    """A person's own explanation to score (kind score): stored with role user, beside its controls."""
    author: str = ""
    """Who wrote `explanation`: it is stored as explainer `user:AUTHOR` ('' : `user`)."""
    scorers: tuple[Scorer, ...] = ()
    """Scorers beside simulation on the test split (detection, fuzzing, embedding)."""
    simulation: SimulationMode = DEFAULT_SIMULATION
    """How explanations are simulated (quotes, tokens, lines; see neuronscope.core.explanation.simulation)."""
    revise: bool = False
    """Also revise the first candidate from the select excerpts it simulated worst (run jobs)."""
    controls: str = "all"
    """Which neurons get the shuffled control and the neutral (contrast) simulation: all, none or sample:F (a
    fraction F of the job's neurons, chosen by the seed). The token-lookup baseline costs no call: every neuron gets it."""
    output: bool = False
    """Also an output-centric explanation (what the unit makes the model say, from the promoted and suppressed next
    tokens) and, for score and run jobs, its steering score (neuronscope.core.explanation.output)."""

    @property
    def simulator_asked(self) -> bool:
        """Whether the simulator model is asked anything: the quotes mode reads an explanation itself; the rated
        scorers (detection, fuzzing) and output-centric scores ask it."""
        return self.simulation != "quotes" or any(name in RATED for name in self.scorers) or self.output


@dataclass(frozen=True)
class JobReport:
    """How a job ended."""

    job_id: int
    """The job's id."""
    state: str
    """complete, partial (some neurons failed), stopped (budget) or interrupted."""
    done: int
    """Neurons finished (in this and earlier sessions of the job)."""
    failed: dict[NeuronId, str]
    """Neurons that failed, with their errors."""
    total: int
    """Neurons in the job."""
    new_calls: int
    """LLM calls made in this session."""
    cache_hits: int
    """LLM calls answered from the log."""
    tokens: int
    """Tokens spent in this session."""
    message: str = ""
    """Why it stopped early, if it did."""


@dataclass(frozen=True)
class Plan:
    """A dry run's count of what a job would spend."""

    neurons: int
    """Neurons still to do."""
    calls: int
    """New LLM calls."""
    cached: int
    """Calls the log would answer (held now, or made earlier in the same job)."""
    prompt_tokens: int
    """Prompt tokens of the new calls (estimated from stand-ins where explanations are not known yet)."""
    completion_tokens: int
    """Completion tokens (at most)."""
    cost: float | None
    """Dollars, where every backend's price is known."""
