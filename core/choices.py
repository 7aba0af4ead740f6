"""Every closed set of choices, declared once: a Literal type, its values in order, and its default. The job
engine checks against these, the store keys its SQL by them, and the CLI builds argparse's `choices` from them."""

from __future__ import annotations

from typing import Literal, get_args

Tail = Literal["pos", "neg"]
#: pos: the positive tail, explained from the top records and scored against max(a, 0); neg: the negative tail,
#: from the bottom records against max(-a, 0).
TAILS: tuple[Tail, ...] = get_args(Tail)

RecordKind = Literal["top", "bottom", "random", "quantile", "scored"]
#: Kinds of activation records: what collection keeps per neuron, and `scored` (sequences an imported explanation
#: was scored on, which no other record holds).
RECORD_KINDS: tuple[RecordKind, ...] = get_args(RecordKind)
#: The kinds a collection keeps.
COLLECTED_KINDS: tuple[RecordKind, ...] = ("top", "bottom", "random", "quantile")

Order = Literal["selectivity", "kurtosis", "max", "min", "density", "random"]
#: Orders of neurons, each with the one direction it has everywhere (`top`, `explain`/`score`/`run`, the app).
ORDERS: dict[Order, str] = {
    "selectivity": "most selective first", "kurtosis": "highest kurtosis first", "max": "largest maximum first",
    "min": "most negative minimum first", "density": "sparsest first", "random": "a shuffle fixed by the seed",
}
DEFAULT_ORDER: Order = "selectivity"
#: The orders (of ORDERS and of the app's sorts) that put the smallest values first; every other one puts the
#: largest first.
ASCENDING = frozenset({"layer", "min", "density"})

SimulationMode = Literal["quotes", "tokens", "lines"]
#: How explanations are simulated (neuronscope.core.explanation.simulation).
SIMULATIONS: tuple[SimulationMode, ...] = get_args(SimulationMode)
DEFAULT_SIMULATION: SimulationMode = "quotes"

Scorer = Literal["detection", "fuzzing", "embedding"]
#: Scorers beside simulation (neuronscope.core.explanation.scorers).
SCORERS: tuple[Scorer, ...] = get_args(Scorer)

Role = Literal["candidate", "shuffled", "baseline", "user", "output", "output-shuffled", "output-baseline"]
#: Explanation roles: the explainer's own candidates, another neuron's explanation scored on this neuron's records
#: (the shuffled control), the token-lookup baseline, and a user's sentence; then the same three of output-centric
#: explanations (what the unit makes the model say, neuronscope.core.explanation.output).
ROLES: tuple[Role, ...] = get_args(Role)

JobKind = Literal["explain", "score", "run"]
JOB_KINDS: tuple[JobKind, ...] = get_args(JobKind)

ExportFormat = Literal["parquet", "jsonl", "openai"]
EXPORT_FORMATS: tuple[ExportFormat, ...] = get_args(ExportFormat)

#: The explainer and simulator when none is named: the packaged Qwen2.5-Coder-1.5B-Instruct.
DEFAULT_BACKEND = "local:qwen-1.5b"


def order_help(orders: tuple[str, ...] | None = None, default: str = DEFAULT_ORDER) -> str:
    """`--order`'s help: every order with its direction, and the default."""
    names = orders or tuple(ORDERS)
    return "; ".join(f"{o}: {ORDERS[o]}" for o in names if o in ORDERS) + f" (default: {default})"  # type: ignore[index]
