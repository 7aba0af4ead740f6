"""The file layout of OpenAI's 2023 GPT-2 XL neuron release, read and written: pure functions of parsed JSON, no
store access (neuronscope.core.interop.importer and neuronscope.core.interop.export move the data).

A release folder holds, per neuron (layer L, index N):

- `collated-activations/L/N.json`: a NeuronRecord: `neuron_id` {layer_index, neuron_index}, `most_positive_activation_records`,
  `random_sample`, `random_sample_by_quantile` (one list per quantile bin, or null), `quantile_boundaries` (or null) and
  the moments `mean`, `variance`, `skewness`, `kurtosis` (NaN when unknown). Every record is an ActivationRecord:
  `tokens` (strings) and `activations` (floats), one per token.
- `explanations/L/N.jsonl`: one line, a NeuronSimulationResults: `scored_explanations`, each an `explanation` and a
  `scored_simulation` with the pooled `ev_correlation_score` (the correlation score), `rsquared_score`,
  `absolute_dev_explained_score` and `scored_sequence_simulations`: per sequence the `simulation` (`tokens`,
  `expected_activations` on a 0-10 scale, `activation_scale`, `distribution_values`, `distribution_probabilities`)
  and the `true_activations`.
- `related-tokens/weight-based/L/N.json`: `input_positive`, `input_negative`, `output_positive`, `output_negative`,
  each {tokens, strengths}.
- `related-tokens/activation-based/L/N.json`: {tokens, average_activations}, highest first.
- `related-neurons/weight-based/L/N.json`: `c_fc` (upstream neurons, through this neuron's input weights) and
  `c_proj` (downstream, through its output weights), each null or {top_positive_neurons, top_positive_weights,
  top_negative_neurons, top_negative_weights} with neurons written "layer_neuron".

The release's JSON carries a `dataclass_name` in every object; readers here ignore it, writers add it so the
release's own loader reads our files. Anything that does not have this shape raises ReleaseError naming the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neuronscope.core.errors import NeuronscopeError
from neuronscope.core.ids import NeuronId

ACTIVATIONS = "collated-activations"
EXPLANATIONS = "explanations"
WEIGHT_TOKENS = "related-tokens/weight-based"
LOOKUP_TOKENS = "related-tokens/activation-based"
WEIGHT_NEURONS = "related-neurons/weight-based"
#: The lists of related tokens, as the release names them ('lookup' is the activation-based table).
TOKEN_LISTS = ("input_positive", "input_negative", "output_positive", "output_negative", "lookup")
#: The lists of related neurons: upstream through the neuron's input weights (c_fc), downstream through its output.
NEURON_LISTS = ("upstream_positive", "upstream_negative", "downstream_positive", "downstream_negative")
_NEURON_SIDES = {"upstream": "c_fc", "downstream": "c_proj"}
#: The release's simulations are on a 0-10 scale; ours on 0-9.
RELEASE_SCALE = 10.0


class ReleaseError(NeuronscopeError, ValueError):
    """A file that is not in the release's format: one line naming the field."""


@dataclass(frozen=True)
class Excerpt:
    """One activation record: tokens and the neuron's activation at each."""

    tokens: tuple[str, ...]
    """Token strings."""
    activations: tuple[float, ...]
    """One activation per token."""


@dataclass(frozen=True)
class ReleaseNeuron:
    """A NeuronRecord."""

    layer: int
    """Layer index."""
    neuron: int
    """Neuron index in the layer."""
    top: tuple[Excerpt, ...]
    """Most positive records, strongest first."""
    random: tuple[Excerpt, ...]
    """Uniform random records."""
    quantile: tuple[tuple[Excerpt, ...], ...]
    """Random records per quantile bin, lowest bin first."""
    boundaries: tuple[float, ...]
    """The quantile bins' boundaries."""
    mean: float
    """Moments of the neuron's activations (NaN when the file has none)."""
    variance: float
    skewness: float
    kurtosis: float


@dataclass(frozen=True)
class SequenceSimulation:
    """One scored sequence of a release explanation."""

    tokens: tuple[str, ...]
    """Token strings."""
    expected: tuple[float, ...]
    """Simulated activation per token, on the release's 0-10 scale."""
    true: tuple[float, ...]
    """The neuron's activations."""
    score: float
    """The sequence's own correlation score (NaN when undefined)."""


@dataclass(frozen=True)
class ReleaseExplanation:
    """One scored explanation."""

    text: str
    """The explanation."""
    score: float
    """Correlation of the simulation with the activations, pooled over the sequences (NaN when undefined)."""
    rsquared: float
    """R² of the simulation (NaN when absent)."""
    absolute_dev: float
    """Absolute deviation explained (NaN when absent)."""
    sequences: tuple[SequenceSimulation, ...]
    """The scored sequences."""


# -- reading -------------------------------------------------------------------------------------------


def _field(obj: Any, name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict):
        raise ReleaseError(f"{where} is not a JSON object")
    if name not in obj:
        raise ReleaseError(f"{where} has no {name!r}")
    value = obj[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ReleaseError(f"{where}: {name!r} is not {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({list: "a list", dict: "an object", str: "a string", int: "an integer",
                        float: "a number"}.get(k, k.__name__) for k in kinds)


def _number(value: Any, where: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReleaseError(f"{where} is not a number")
    return float(value)


def _strings(values: Any, where: str) -> tuple[str, ...]:
    if not isinstance(values, list) or not set(map(type, values)) <= {str}:
        raise ReleaseError(f"{where} is not a list of strings")
    return tuple(values)


def _numbers(values: Any, where: str) -> tuple[float, ...]:
    """A list of numbers (null read as NaN); anything else (strings, booleans, nested lists) is refused."""
    if not isinstance(values, list):
        raise ReleaseError(f"{where} is not a list of numbers")
    kinds = set(map(type, values))
    if not kinds <= {int, float, type(None)}:
        raise ReleaseError(f"{where} is not a list of numbers")
    if type(None) in kinds:
        return tuple(math.nan if v is None else float(v) for v in values)
    return tuple(np.asarray(values, np.float64).tolist())


def _excerpt(obj: Any, where: str) -> Excerpt:
    tokens = _strings(_field(obj, "tokens", list, where), f"{where}.tokens")
    activations = _numbers(_field(obj, "activations", list, where), f"{where}.activations")
    if len(tokens) != len(activations):
        raise ReleaseError(f"{where} has {len(tokens)} tokens but {len(activations)} activations")
    if not tokens:
        raise ReleaseError(f"{where} has no tokens")
    if not np.isfinite(activations).all():
        raise ReleaseError(f"{where} has an activation that is not a finite number")
    return Excerpt(tokens, activations)


def _excerpt_list(items: Any, where: str) -> tuple[Excerpt, ...]:
    if not isinstance(items, list):
        raise ReleaseError(f"{where} is not a list")
    return tuple(_excerpt(r, f"{where}[{i}]") for i, r in enumerate(items))


def _excerpts(obj: Any, name: str, where: str) -> tuple[Excerpt, ...]:
    return _excerpt_list(_field(obj, name, list, where), f"{where}.{name}")


def neuron_id(obj: Any, where: str) -> NeuronId:
    """The neuron of an object's `neuron_id`."""
    ident = _field(obj, "neuron_id", dict, where)
    return NeuronId(_field(ident, "layer_index", int, f"{where}.neuron_id"),
                    _field(ident, "neuron_index", int, f"{where}.neuron_id"))


def parse_neuron_record(obj: Any, where: str = "NeuronRecord") -> ReleaseNeuron:
    """A NeuronRecord's content; ReleaseError when it does not have the release's shape."""
    layer, neuron = neuron_id(obj, where)
    top = _excerpts(obj, "most_positive_activation_records", where)
    random = _excerpts(obj, "random_sample", where)
    bins = obj.get("random_sample_by_quantile") or []  # null when the release did not track quantiles
    if not isinstance(bins, list):
        raise ReleaseError(f"{where}.random_sample_by_quantile is not a list")
    quantile = tuple(_excerpt_list(b, f"{where}.random_sample_by_quantile[{i}]") for i, b in enumerate(bins))
    boundaries_obj = obj.get("quantile_boundaries")
    boundaries = _numbers(boundaries_obj, f"{where}.quantile_boundaries") if boundaries_obj is not None else ()
    if not top:
        raise ReleaseError(f"{where} has no most_positive_activation_records")
    moments = [_number(obj.get(name), f"{where}.{name}") for name in ("mean", "variance", "skewness", "kurtosis")]
    return ReleaseNeuron(layer, neuron, top, random, quantile, boundaries, *moments)


def parse_explanations(obj: Any, where: str = "NeuronSimulationResults") -> tuple[NeuronId, list[ReleaseExplanation]]:
    """(neuron, scored explanations) of a NeuronSimulationResults."""
    ident = neuron_id(obj, where)
    out = []
    for i, item in enumerate(_field(obj, "scored_explanations", list, where)):
        at = f"{where}.scored_explanations[{i}]"
        text = _field(item, "explanation", str, at)
        scored = _field(item, "scored_simulation", dict, at)
        sequences = []
        for j, seq in enumerate(_field(scored, "scored_sequence_simulations", list, f"{at}.scored_simulation")):
            sat = f"{at}.scored_sequence_simulations[{j}]"
            sim = _field(seq, "simulation", dict, sat)
            tokens = _strings(_field(sim, "tokens", list, f"{sat}.simulation"), f"{sat}.simulation.tokens")
            expected = _numbers(_field(sim, "expected_activations", list, f"{sat}.simulation"),
                                f"{sat}.simulation.expected_activations")
            true = _numbers(_field(seq, "true_activations", list, sat), f"{sat}.true_activations")
            if not len(tokens) == len(expected) == len(true):
                raise ReleaseError(f"{sat} has {len(tokens)} tokens, {len(expected)} expected and {len(true)} true "
                                   "activations")
            sequences.append(SequenceSimulation(tokens, expected, true,
                                                _number(seq.get("ev_correlation_score"), f"{sat}.ev_correlation_score")))
        out.append(ReleaseExplanation(
            text, _number(scored.get("ev_correlation_score"), f"{at}.ev_correlation_score"),
            _number(scored.get("rsquared_score"), f"{at}.rsquared_score"),
            _number(scored.get("absolute_dev_explained_score"), f"{at}.absolute_dev_explained_score"),
            tuple(sequences)))
    return ident, out


def parse_weight_tokens(obj: Any, where: str = "WeightBasedSummaryOfNeuron") -> dict[str, list[tuple[str, float]]]:
    """The four weight-based token lists: name -> [(token, strength)]."""
    out = {}
    for name in TOKEN_LISTS[:4]:
        part = _field(obj, name, dict, where)
        tokens = _strings(_field(part, "tokens", list, f"{where}.{name}"), f"{where}.{name}.tokens")
        strengths = _numbers(_field(part, "strengths", list, f"{where}.{name}"), f"{where}.{name}.strengths")
        if len(tokens) != len(strengths):
            raise ReleaseError(f"{where}.{name} has {len(tokens)} tokens but {len(strengths)} strengths")
        out[name] = list(zip(tokens, strengths))
    return out


def parse_lookup_tokens(obj: Any, where: str = "TokenLookupTableSummaryOfNeuron") -> list[tuple[str, float]]:
    """The activation-based token list: [(token, average activation)], highest first."""
    tokens = _strings(_field(obj, "tokens", list, where), f"{where}.tokens")
    values = _numbers(_field(obj, "average_activations", list, where), f"{where}.average_activations")
    if len(tokens) != len(values):
        raise ReleaseError(f"{where} has {len(tokens)} tokens but {len(values)} average_activations")
    return list(zip(tokens, values))


def parse_related_neurons(obj: Any, where: str = "related neurons") -> dict[str, list[tuple[int, int, float]]]:
    """The related-neuron lists: name (NEURON_LISTS) -> [(layer, neuron, weight)]; a side the file leaves null is
    absent."""
    if not isinstance(obj, dict):
        raise ReleaseError(f"{where} is not a JSON object")
    out: dict[str, list[tuple[int, int, float]]] = {}
    for side, key in _NEURON_SIDES.items():
        part = obj.get(key)
        if part is None:
            continue
        for sign in ("positive", "negative"):
            at = f"{where}.{key}"
            names = _strings(_field(part, f"top_{sign}_neurons", list, at), f"{at}.top_{sign}_neurons")
            weights = _numbers(_field(part, f"top_{sign}_weights", list, at), f"{at}.top_{sign}_weights")
            if len(names) != len(weights):
                raise ReleaseError(f"{at} has {len(names)} {sign} neurons but {len(weights)} weights")
            entries = []
            for name, weight in zip(names, weights):
                layer, _, index = name.partition("_")
                if not (layer.isdigit() and index.isdigit()):
                    raise ReleaseError(f"{at}.top_{sign}_neurons: {name!r} is not layer_neuron")
                entries.append((int(layer), int(index), weight))
            out[f"{side}_{sign}"] = entries
    return out


def read_json(path: Path) -> Any:
    """A release file's JSON (the first non-empty line of a .jsonl); ReleaseError for unreadable or invalid files."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ReleaseError(f"cannot read it ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ReleaseError("it is not UTF-8 text") from None
    if path.suffix == ".jsonl":
        text = next((line for line in text.splitlines() if line.strip()), "")
    if not text.strip():
        raise ReleaseError("it is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ReleaseError(f"it is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None


def release_layers(root: Path, part: str) -> list[int]:
    """The layers of one part of a release: its `part/L/` folders, in order."""
    base = root / part
    return sorted(int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()) if base.is_dir() else []


def neuron_files(root: Path, part: str, suffix: str = ".json") -> Iterator[tuple[int, int, Path]]:
    """(layer, neuron, path) of every `part/L/N.suffix` file under a release root, by layer then neuron."""
    base = root / part
    for layer in release_layers(root, part):
        names = [p for p in (base / str(layer)).iterdir() if p.suffix == suffix and p.stem.isdigit()]
        for path in sorted(names, key=lambda p: int(p.stem)):
            yield layer, int(path.stem), path


def release_path(root: Path, part: str, layer: int, neuron: int) -> Path:
    """Where a neuron's file of one part lives under a release root."""
    return root / part / str(layer) / (f"{neuron}.jsonl" if part == EXPLANATIONS else f"{neuron}.json")


# -- writing -------------------------------------------------------------------------------------------


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _record(excerpt: Excerpt) -> dict[str, Any]:
    return {"dataclass_name": "ActivationRecord", "tokens": list(excerpt.tokens), "activations": list(excerpt.activations)}


def _ident(layer: int, neuron: int) -> dict[str, Any]:
    return {"dataclass_name": "NeuronId", "layer_index": layer, "neuron_index": neuron}


def neuron_record_json(n: ReleaseNeuron) -> dict[str, Any]:
    """A NeuronRecord as the release writes it (unknown moments as null: JSON has no NaN)."""
    return {
        "dataclass_name": "NeuronRecord",
        "neuron_id": _ident(n.layer, n.neuron),
        "random_sample": [_record(e) for e in n.random],
        "random_sample_by_quantile": [[_record(e) for e in bin_] for bin_ in n.quantile] if n.quantile else None,
        "quantile_boundaries": list(n.boundaries) if n.boundaries else None,
        "mean": _finite(n.mean), "variance": _finite(n.variance), "skewness": _finite(n.skewness),
        "kurtosis": _finite(n.kurtosis),
        "most_positive_activation_records": [_record(e) for e in n.top],
    }


def explanations_json(layer: int, neuron: int, explanations: Sequence[ReleaseExplanation]) -> dict[str, Any]:
    """A NeuronSimulationResults (one line of explanations/L/N.jsonl). Undefined scores are null."""
    def sequence(s: SequenceSimulation) -> dict[str, Any]:
        return {
            "dataclass_name": "ScoredSequenceSimulation",
            "simulation": {"dataclass_name": "SequenceSimulation", "tokens": list(s.tokens),
                           "expected_activations": list(s.expected),
                           "activation_scale": "simulated_normalized_activations",
                           "distribution_values": [[v] for v in s.expected],
                           "distribution_probabilities": [[1.0] for _ in s.expected],
                           "uncalibrated_simulation": None},
            "true_activations": list(s.true),
            "ev_correlation_score": _finite(s.score),
            "rsquared_score": None,
            "absolute_dev_explained_score": None,
        }

    return {
        "dataclass_name": "NeuronSimulationResults",
        "neuron_id": _ident(layer, neuron),
        "scored_explanations": [{
            "dataclass_name": "ScoredExplanation",
            "explanation": e.text,
            "scored_simulation": {
                "dataclass_name": "ScoredSimulation",
                "scored_sequence_simulations": [sequence(s) for s in e.sequences],
                "ev_correlation_score": _finite(e.score),
                "rsquared_score": _finite(e.rsquared),
                "absolute_dev_explained_score": _finite(e.absolute_dev),
            },
        } for e in explanations],
    }


def weight_tokens_json(lists: dict[str, list[tuple[str, float]]]) -> dict[str, Any]:
    """A WeightBasedSummaryOfNeuron."""
    out: dict[str, Any] = {"dataclass_name": "WeightBasedSummaryOfNeuron"}
    for name in TOKEN_LISTS[:4]:
        entries = lists.get(name, [])
        out[name] = {"dataclass_name": "TokensAndWeights", "tokens": [t for t, _ in entries],
                     "strengths": [v for _, v in entries]}
    return out


def lookup_tokens_json(entries: list[tuple[str, float]]) -> dict[str, Any]:
    """A TokenLookupTableSummaryOfNeuron."""
    return {"dataclass_name": "TokenLookupTableSummaryOfNeuron", "tokens": [t for t, _ in entries],
            "average_activations": [v for _, v in entries]}


def related_neurons_json(lists: dict[str, list[tuple[int, int, float]]]) -> dict[str, Any]:
    """The related-neurons file: c_fc (upstream) and c_proj (downstream), null for a side without entries."""
    out: dict[str, Any] = {}
    for side, key in _NEURON_SIDES.items():
        if f"{side}_positive" not in lists and f"{side}_negative" not in lists:
            out[key] = None
            continue
        part: dict[str, Any] = {}
        for sign in ("positive", "negative"):
            entries = lists.get(f"{side}_{sign}", [])
            part[f"top_{sign}_neurons"] = [f"{layer}_{neuron}" for layer, neuron, _ in entries]
            part[f"top_{sign}_weights"] = [w for _, _, w in entries]
        out[key] = part
    return out
