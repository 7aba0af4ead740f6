"""Output-centric explanations and their steering score (core/explanation/output.py, `--output-centric` jobs), on the
planted model with its planted neurons' outputs wired too: layer-0 neuron 0 (fires on ' the') writes the unembedding
direction of one token, neuron 1 (fires on ' a') another's, and the later layers write nothing, so amplifying either
makes the model say its token."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from neuronscope.core.explanation.output import OutputView, output_lookup, output_prompt, steering_score
from neuronscope.core.llm.baseline import BaselineBackend
from neuronscope.core.store import Store

pytestmark = pytest.mark.usefixtures("neuronscope_env")


@pytest.fixture(scope="module")
def wired(planted_model: Path, corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """(a store collected from the planted model with neurons 0 and 1 wired to say a token each, those tokens)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("wired") / "model"
    shutil.copytree(planted_model, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    words = [w for w in (" red", "old") if len(tok.encode(w, add_special_tokens=False)) == 1]  # the vocabulary is tiny
    assert len(words) == 2, "the tiny vocabulary lacks one of the chosen words as a single token"
    with torch.no_grad():
        for neuron, word in enumerate(words[:2]):
            row = model.lm_head.weight[tok.encode(word, add_special_tokens=False)[0]]
            model.model.layers[0].mlp.down_proj.weight[:, neuron] = 3.0 * row / row.norm()
        for layer in model.model.layers[1:]:  # later layers write nothing, so the wired direction reaches the output
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    model.save_pretrained(folder)
    store = folder.parent / "wired.duckdb"
    result = run_cli(["collect", "--model", folder, "--corpus", corpus_dir, "--store", store, "--length", "16",
                      "--top-k", "16", "--bottom-k", "4", "--random-k", "10", "--quantile-k", "1", "--dtype", "float32",
                      "--device", "cpu"])
    assert result.code == 0, result.err
    return store, words[:2]


def _output(store: Path, layer: int, neuron: int, role: str) -> list:  # type: ignore[type-arg]
    with Store.open(store, read_only=True) as s:
        return [e for e in s.explanations(s.run().run_id, layer, neuron) if e.role == role]


def test_a_wired_neuron_is_explained_by_what_it_makes_the_model_say(wired: tuple[Path, list[str]],
                                                                     tmp_path: Path) -> None:
    source, words = wired
    store = tmp_path / "s.duckdb"
    shutil.copy(source, store)
    result = run_cli(["run", "0/0", "0/1", "--explainer", "baseline", "--output-centric", "--store", store],
                     timeout=300)
    assert result.code == 0, result.err
    for neuron, word in enumerate(words):
        (output,) = _output(store, 0, neuron, "output")
        assert json.dumps(word) in output.text, output.text  # the promoted token, named
        steering = output.score("steer", "steering")
        assert steering.value >= 0.9 and steering.ci_low > 0.6, steering
        (shuffled,) = _output(store, 0, neuron, "output-shuffled")
        assert shuffled.source == (0, 1 - neuron)
        assert json.dumps(words[1 - neuron]) in shuffled.text
        assert shuffled.score("steer", "steering").value < 0.7  # the other neuron's token is not what this one says
        # the input-centric explanation and its headline are as without --output-centric
        (candidate,) = [e for e in _output(store, 0, neuron, "candidate")]
        assert candidate.selected and candidate.score().value >= 0.9
    show = run_cli(["show", "0/0", "--store", store])
    assert show.code == 0, show.err
    assert "baseline (output)" in show.out and "shuffled control (output)" in show.out
    assert "steering" in show.out

    # score --output-centric reads the stored output explanation and scores it again, in a job of its own
    again = run_cli(["score", "0/0", "0/1", "--explainer", "baseline", "--output-centric", "--store", store],
                    timeout=300)
    assert again.code == 0, again.err
    assert len(_output(store, 0, 0, "output")) == 2


def test_explain_output_centric_stores_the_explanation_without_a_score(wired: tuple[Path, list[str]],
                                                                       tmp_path: Path) -> None:
    source, words = wired
    store = tmp_path / "s.duckdb"
    shutil.copy(source, store)
    result = run_cli(["explain", "0/0", "--explainer", "baseline", "--output-centric", "--store", store], timeout=300)
    assert result.code == 0, result.err
    (output,) = _output(store, 0, 0, "output")
    assert json.dumps(words[0]) in output.text and not output.splits and not output.selected
    dry = run_cli(["run", "0/0", "--explainer", "baseline", "--output-centric", "--dry-run", "--store", store])
    assert dry.code == 0, dry.err
    # Scoring needs the neuron's own output-centric explanation: one explained only from its input fails, saying so.
    assert run_cli(["explain", "0/1", "--explainer", "baseline", "--store", store], timeout=300).code == 0
    missing = run_cli(["score", "0/1", "--explainer", "baseline", "--output-centric", "--store", store], timeout=300)
    assert missing.code == 3 and "has no pos output-centric explanation by baseline" in missing.err, missing.err


def test_steering_score_is_chance_when_steering_changes_nothing() -> None:
    """Identical continuations: each steered one rated as its plain twin, AUROC 0.5; a rater that finds the
    explanation's token only in the steered continuations gives more."""
    same = (("the", " cat", " sat"), ("a", " dog"))
    view = OutputView(((" cat", 2.0), (" mat", 0.5)), ((" the", -1.0),), same, same)
    flat = steering_score(BaselineBackend(), "quotes", output_lookup(view), view, seed=0).get("steering")
    assert flat.value == 0.5 and flat.n == 4
    steered = OutputView(view.raised, view.lowered, (("the", " end"), ("a", " dog")), same)
    full = steering_score(BaselineBackend(), "quotes", output_lookup(steered), steered, seed=0).get("steering")
    assert full.value > 0.7


def test_output_prompt_shows_tokens_inertly() -> None:
    view = OutputView((("[bold]x[/bold]\x1b[31m", 1.5), ("\n", 0.2)), (), (), ())
    prompt = output_prompt(view)
    assert "\x1b" not in prompt.user and "\\n" in prompt.user and "[bold]x[/bold]" in prompt.user
    assert prompt.examples[0][0] == ("[bold]x[/bold]\x1b[31m", "\n")
    assert np.isclose(prompt.examples[0][1][0], 9.0)
