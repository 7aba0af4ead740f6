"""What a unit does to the output (core/models/interventions.py, `neuronscope effects` and `steer`), on the planted
model, whose layer-0 neuron 0 fires on ' the' and is exactly zero everywhere else."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, copy_store, run_cli

from neuronscope.core.ids import NeuronId
from neuronscope.core.models.interventions import effects, intervening, steer
from neuronscope.core.models.loading import load_subject

pytestmark = pytest.mark.usefixtures("neuronscope_env")
UNIT = NeuronId(0, 0)


@pytest.fixture(scope="module")
def planted(planted_model: Path):  # type: ignore[no-untyped-def]
    return load_subject(str(planted_model), device="cpu", dtype="float32")


def _run(subject, text: str, ablate: bool):  # type: ignore[no-untyped-def]
    ids = torch.tensor([subject.tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        if not ablate:
            return ids[0].tolist(), subject.model(input_ids=ids, output_hidden_states=True)
        with intervening(subject, UNIT, torch.zeros_like):
            return ids[0].tolist(), subject.model(input_ids=ids, output_hidden_states=True)


def test_ablating_a_planted_neuron_changes_exactly_what_its_wiring_says(planted) -> None:  # type: ignore[no-untyped-def]
    """Zeroing it changes nothing on a text without ' the'; on one with it, the residual after layer 0 moves by
    exactly -activation x its output weights at that token and nowhere else, and the next-token logits move at that
    token and after it, never before."""
    _, plain = _run(planted, "We saw a cat and a dog", ablate=False)
    _, ablated = _run(planted, "We saw a cat and a dog", ablate=True)
    assert torch.equal(plain.logits, ablated.logits)

    ids, plain = _run(planted, "We saw a cat, the dog ran off", ablate=False)
    _, ablated = _run(planted, "We saw a cat, the dog ran off", ablate=True)
    at = ids.index(planted.tokenizer.encode(" the", add_special_tokens=False)[0])
    seen: list[torch.Tensor] = []
    with intervening(planted, UNIT, lambda x: seen.append(x.clone()) or x), torch.inference_mode():
        planted.model(input_ids=torch.tensor([ids]))
    activation = seen[0][0, at]
    assert activation > 1.0 and torch.count_nonzero(seen[0]) == 1
    moved = ablated.hidden_states[1][0] - plain.hidden_states[1][0]  # after layer 0, [T, hidden]
    wiring = -activation * planted.projections[0].weight[:, 0]
    torch.testing.assert_close(moved[at], wiring, rtol=1e-4, atol=1e-3)
    assert torch.count_nonzero(moved[:at]) == 0 and torch.count_nonzero(moved[at + 1:]) == 0
    changed = (ablated.logits[0] - plain.logits[0]).abs().amax(-1)
    assert (changed[:at] == 0).all() and (changed[at:] > 0).all()


def test_effects_measures_where_the_unit_fires(planted) -> None:  # type: ignore[no-untyped-def]
    ids = [planted.tokenizer(t, add_special_tokens=False)["input_ids"][:6] for t in
           ("so the cat sat down", "and the dog ran off", "but the bird flew up")]
    found = effects(planted, UNIT, torch.tensor(ids).numpy(), ablate_to=0.0, amplify_to=1000.0, top=4)
    assert found.excerpts == 3 and found.positions == 3  # one ' the' each
    ablated, amplified = found.shifts
    assert len(ablated.raised) == len(ablated.lowered) == 4 and ablated.mean_abs_change > 0
    assert ablated.raised[0].change > 0 > ablated.lowered[0].change
    assert ablated.raised[0].change >= ablated.raised[-1].change
    # Zeroing a unit that fires nowhere in the excerpts measured would change nothing: here the positions are its.
    quiet = effects(planted, NeuronId(0, 1), torch.tensor(ids).numpy(), ablate_to=0.0, amplify_to=0.0)
    assert quiet.positions == 0  # neuron 1 fires on ' a' only


def test_steer_with_scale_zero_is_the_plain_continuation(planted) -> None:  # type: ignore[no-untyped-def]
    plain, steered = steer(planted, UNIT, "We saw the cat and", 0.0, 10)
    assert plain == steered and plain
    plain, pushed = steer(planted, UNIT, "We saw the cat and", 1000.0, 10)
    assert pushed != plain


def test_effects_and_steer_through_the_cli(planted_store: Path, tmp_path: Path) -> None:
    planted_store = copy_store(planted_store, tmp_path, "effects.duckdb")  # effects writes into it
    result = run_cli(["effects", "0/0", "--store", planted_store, "--top", "3", "--excerpts", "4"])
    assert result.code == 0, result.err
    assert "ablated to zero (+0)" in result.out and "amplified to 4 x its max" in result.out
    assert "raised most" in result.out and "lowered most" in result.out
    shown = run_cli(["show", "0/0", "--store", planted_store])  # saved: the neuron's related tokens list them
    assert shown.code == 0 and "ablated −" in shown.out and "amplified +" in shown.out
    result = run_cli(["steer", "0/0", "--prompt", "We saw \x1b[2J the", "--scale", "2", "--tokens", "5",
                      "--store", planted_store])
    assert result.code == 0, result.err
    assert "plain" in result.out and "L0/N0 + 2 x its max" in result.out and "\x1b" not in result.out
    assert_one_line_error(run_cli(["effects", "7/0", "--store", planted_store]), "has no unit L7/N0")
    assert_one_line_error(run_cli(["steer", "0/0", "--prompt", "", "--scale", "1", "--store", planted_store]),
                          "the prompt has no tokens")
