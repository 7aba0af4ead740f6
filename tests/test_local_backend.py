"""The local backend: one-pass expected values against the full logits, batching and padding, seeded
sampling, the call log as a cache, and a real packaged instruct model end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from neuronscope.core.llm.base import CallLog, make_backend
from neuronscope.core.llm.prompt_ids import packed_simulation_ids, simulation_ids
from neuronscope.core.llm.prompts import Example, explain_prompt
from neuronscope.core.records import TOP

pytestmark = pytest.mark.usefixtures("neuronscope_env")

EXCERPTS = [("The", " lighthouse", " keeper", " climbed"), (" spring", "\n", " river"), ("[/INST]", " a", "\t", "b", " c")]


@pytest.fixture(scope="module")
def tiny_backend(tiny_model: Path):  # type: ignore[no-untyped-def]
    return make_backend(f"local:{tiny_model}", device="cpu", dtype="float32")


def test_expected_values_match_the_full_softmax(tiny_backend) -> None:  # type: ignore[no-untyped-def]
    tok = tiny_backend.lm.tokenizer
    tiny_backend.pack_ids = 10_000
    try:
        (packed,) = tiny_backend._simulation_prompts("closing brackets", EXCERPTS)  # every excerpt in one prompt
        got = tiny_backend.simulate("closing brackets", EXCERPTS)
    finally:
        tiny_backend.pack_ids = 4096
    assert packed == packed_simulation_ids(tok, "closing brackets", EXCERPTS, max_ids=10_000)[0]
    with torch.inference_mode():
        logits = tiny_backend.lm.model(input_ids=torch.tensor([packed.ids])).logits[0]  # [pos, vocab]
    digits = logits[:, tiny_backend.digits]  # [pos, 10]: the whole vocabulary's logits, then the digit columns
    for tokens, slots, values in zip(EXCERPTS, packed.slots, got):
        assert len(values) == len(tokens) == len(slots) and ((values >= 0) & (values <= TOP)).all()
        for slot, value in zip(slots, values):
            probs = torch.softmax(digits[slot - 1], dim=-1)
            expected = float((probs * torch.arange(TOP + 1)).sum())
            assert value == pytest.approx(expected, abs=1e-4)


def test_packing_batching_and_padding_do_not_change_values(tiny_backend) -> None:  # type: ignore[no-untyped-def]
    tiny_backend.pack_ids = 1  # one excerpt per prompt: prompts of different lengths, padded in one batch
    try:
        batched = tiny_backend.simulate("rivers", EXCERPTS)
        tiny_backend.batch_size = 1
        single = [tiny_backend.simulate("rivers", [t])[0] for t in EXCERPTS]
    finally:
        tiny_backend.batch_size, tiny_backend.pack_ids = 8, 4096
    tok = tiny_backend.lm.tokenizer
    for tokens, a, b in zip(EXCERPTS, batched, single):
        np.testing.assert_allclose(a, b, atol=1e-4)
        prompt = simulation_ids(tok, "rivers", tokens)  # and each equals its own unpacked prompt
        with torch.inference_mode():
            logits = tiny_backend.lm.model(input_ids=torch.tensor([prompt.ids])).logits[0]
        probs = torch.softmax(logits[torch.tensor(prompt.slots) - 1][:, tiny_backend.digits], dim=-1)
        np.testing.assert_allclose(a, (probs @ torch.arange(TOP + 1.0)).numpy(), atol=1e-4)


def test_calls_are_logged_and_cached(tiny_backend) -> None:  # type: ignore[no-untyped-def]
    log = CallLog()
    tiny_backend.bind(log)
    example = Example(1, "top", ("a", " b", " c"), np.array([0.0, 2.0, 1.0], np.float32))
    prompt = explain_prompt([example], tiny_backend.count_tokens, tiny_backend.context_tokens())
    first = tiny_backend.explain(prompt, n=3, seed=7)
    assert len(first) == 3 and log.new_calls == 1
    assert tiny_backend.explain(prompt, n=3, seed=7) == first and log.new_calls == 1 and log.cache_hits == 1
    tiny_backend.simulate("x", EXCERPTS)
    tiny_backend.simulate("x", EXCERPTS)
    assert log.new_calls == 2 and log.cache_hits == 2
    fresh = CallLog()
    tiny_backend.bind(fresh)  # a new log: the same seed samples the same texts again
    assert tiny_backend.explain(prompt, n=3, seed=7) == first and fresh.new_calls == 1
    assert fresh.used_tokens > 0


@pytest.mark.slow
def test_packaged_instruct_model_explains_and_simulates() -> None:
    backend = make_backend("local:qwen-0.5b")
    tokens = ("The", " cat", " sat", " on", " the", " mat", " and", " the", " cat", " slept", ".")
    values = np.zeros(len(tokens), np.float32)
    values[[1, 8]] = 5.0
    examples = [Example(i, "top", tokens, values) for i in range(3)]
    prompt = explain_prompt(examples, backend.count_tokens, backend.context_tokens())
    text = backend.explain(prompt)[0]
    assert text and "\n" not in text
    predicted = backend.simulate('the word "cat"', [tokens])[0]
    assert predicted.shape == (len(tokens),) and ((predicted >= 0) & (predicted <= TOP)).all()
    # The simulator reads the explanation: "cat" gets more than the other tokens on average.
    cat = predicted[[1, 8]].mean()
    rest = np.delete(predicted, [1, 8]).mean()
    assert cat > rest, (predicted, text)
