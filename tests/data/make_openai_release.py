"""Writes tests/data/openai-release: a 2-layer, 3-neuron slice in the file layout of OpenAI's GPT-2 XL neuron release
(core/release.py describes it), with hand-made content. Run from the repository root:

    python tests/data/make_openai_release.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

ROOT = Path("tests/data/openai-release")
WORDS = [" the", " cat", " sat", " on", " mat", ".", " Until", " since", " dog", " ran", "\n", " café", " 2023", ","]
#: (layer, neuron, the token it fires on)
NEURONS = ((0, 3, " cat"), (0, 7, " Until"), (1, 0, " 2023"))

rng = random.Random(7)


def record(tokens: list[str], activations: list[float]) -> dict[str, Any]:
    return {"dataclass_name": "ActivationRecord", "tokens": tokens, "activations": activations}


def sequence(peak_token: str, peak: float, n: int = 8) -> tuple[list[str], list[float]]:
    tokens = [rng.choice(WORDS) for _ in range(n)]
    activations = [round(rng.uniform(-0.15, 0.2), 4) for _ in range(n)]
    i = rng.randrange(n)
    tokens[i], activations[i] = peak_token, peak
    return tokens, activations


def neuron_id(layer: int, neuron: int) -> dict[str, Any]:
    return {"dataclass_name": "NeuronId", "layer_index": layer, "neuron_index": neuron}


def scored(text: str, good: bool, valid: list[tuple[list[str], list[float]]]) -> dict[str, Any]:
    """An explanation scored on the valid sequences: `good` simulates them exactly (up to scale)."""
    sequences = []
    for tokens, activations in valid:
        expected = [max(0.0, round(10 * a / 5.0, 3) if good else round(rng.uniform(0, 3), 3)) for a in activations]
        sequences.append({
            "dataclass_name": "ScoredSequenceSimulation",
            "simulation": {"dataclass_name": "SequenceSimulation", "tokens": tokens, "expected_activations": expected,
                           "activation_scale": "simulated_normalized_activations",
                           "distribution_values": [[e] for e in expected],
                           "distribution_probabilities": [[1.0] for _ in expected], "uncalibrated_simulation": None},
            "true_activations": activations, "ev_correlation_score": 0.5, "rsquared_score": None,
            "absolute_dev_explained_score": None})
    return {"dataclass_name": "ScoredExplanation", "explanation": text, "scored_simulation": {
        "dataclass_name": "ScoredSimulation", "scored_sequence_simulations": sequences,
        "ev_correlation_score": 0.97 if good else 0.12, "rsquared_score": 0.9 if good else -0.4,
        "absolute_dev_explained_score": 0.8 if good else 0.05}}


def tokens_and_weights(sign: float) -> dict[str, Any]:
    strengths = sorted((sign * round(rng.uniform(0.1, 2), 3) for _ in range(3)), key=lambda v: -abs(v))
    return {"dataclass_name": "TokensAndWeights", "tokens": rng.sample(WORDS, 3), "strengths": strengths}


def write(part: str, layer: int, name: str, obj: dict[str, Any]) -> None:
    folder = ROOT / part / str(layer)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(obj) + ("\n" if name.endswith(".jsonl") else ""))


def main() -> None:
    for layer, neuron, token in NEURONS:
        top = [sequence(token, round(5.0 - 0.3 * k, 3)) for k in range(8)]
        randoms = [sequence(rng.choice(WORDS), round(rng.uniform(0, 0.5), 3)) for _ in range(6)]
        bins = [[sequence(rng.choice(WORDS), round(rng.uniform(0.5 * b, 0.5 * b + 0.5), 3)) for _ in range(2)]
                for b in range(3)]
        write("collated-activations", layer, f"{neuron}.json", {
            "dataclass_name": "NeuronRecord", "neuron_id": neuron_id(layer, neuron),
            "random_sample": [record(*r) for r in randoms],
            "random_sample_by_quantile": [[record(*r) for r in b] for b in bins],
            "quantile_boundaries": [0.0, 0.5, 1.0, 1.5], "mean": 0.021, "variance": 0.09, "skewness": 6.5,
            "kurtosis": 80.25, "most_positive_activation_records": [record(*r) for r in top]})
        # Scored on top records 2 and 6 and random 1 and 4; layer 1 on a sequence no record holds instead of random 4
        # (the release's valid split can hold such sequences).
        valid = [top[2], top[6], randoms[1],
                 randoms[4] if layer == 0 else ([" no", " record", " holds", " this"], [0.0, 0.1, 2.5, 0.0])]
        write("explanations", layer, f"{neuron}.jsonl", {
            "dataclass_name": "NeuronSimulationResults", "neuron_id": neuron_id(layer, neuron),
            "scored_explanations": [scored(f"the token{token!r} [bold]", False, valid),
                                    scored(f"the word \"{token.strip()}\"", True, valid)]})
        write("related-tokens/weight-based", layer, f"{neuron}.json", {
            "dataclass_name": "WeightBasedSummaryOfNeuron", "input_positive": tokens_and_weights(1),
            "input_negative": tokens_and_weights(-1), "output_positive": tokens_and_weights(1),
            "output_negative": tokens_and_weights(-1)})
        write("related-tokens/activation-based", layer, f"{neuron}.json", {
            "dataclass_name": "TokenLookupTableSummaryOfNeuron", "tokens": [token, " mat"],
            "average_activations": [4.1, 0.3]})
        upstream = None if layer == 0 else {
            "top_positive_neurons": ["0_3", "0_7"], "top_positive_weights": [0.52, 0.11],
            "top_negative_neurons": ["0_5"], "top_negative_weights": [-0.33]}
        downstream = None if layer == 1 else {
            "top_positive_neurons": ["1_0"], "top_positive_weights": [0.41],
            "top_negative_neurons": ["1_2", "1_9"], "top_negative_weights": [-0.2, -0.05]}
        write("related-neurons/weight-based", layer, f"{neuron}.json", {"c_fc": upstream, "c_proj": downstream})


if __name__ == "__main__":
    main()
