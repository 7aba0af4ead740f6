"""The explainer prompt (core/prompts.py): firing tokens listed and marked in windows around each excerpt's peak,
trimming to a budget, hostile tokens kept inert, the chat roles."""

from __future__ import annotations

import numpy as np
import pytest

from neuronscope.core.llm.prompts import (
    CONTEXT_AFTER,
    CONTEXT_BEFORE,
    EXPLAIN_SYSTEM,
    LISTED_TOKENS,
    MARK_SHARE,
    Example,
    _explain_listing,
    explain_prompt,
    fewshot,
    firing,
    marked_window,
    on_scale,
    show_token,
)
from neuronscope.core.records import TOP

# -- explainer prompt ----------------------------------------------------------------------------------------

def test_on_scale() -> None:
    assert on_scale(np.array([-1.0, 0.0, 0.5, 1.0, 2.0]), 1.0).tolist() == [0.0, 0.0, 4.5, 9.0, 9.0]
    assert on_scale(np.array([1.0, 2.0]), 0.0).tolist() == [0.0, 0.0]


def example(i: int, tokens: list[str], target: list[float], kind: str = "top") -> Example:
    return Example(i, kind, tuple(tokens), np.asarray(target, np.float32))


def windows(user: str) -> list[str]:
    """The numbered excerpt lines of a user turn."""
    return [line.split(". ", 1)[1] for line in user.split("Excerpts:\n", 1)[1].split("\n\n")[0].split("\n")]


def listed(user: str) -> str:
    return user.split("\n", 1)[0].removeprefix("Tokens it fires on most (strength 0-9, how often): ")


def words(text: str) -> int:
    return len(text.split())


def make_examples(n: int = 6, length: int = 12) -> list[Example]:
    rng = np.random.default_rng(1)
    return [example(i, [f" w{i}_{j}" for j in range(length)], list(rng.random(length) * (i + 1)))
            for i in range(n)]


def test_firing_is_a_share_of_the_excerpts_peak() -> None:
    values = np.array([0.0, 0.39, 0.4, 1.0, -2.0])
    assert firing(values).tolist() == [False, False, True, True, False]
    assert MARK_SHARE == 0.4
    assert firing(np.zeros(3)).tolist() == [False] * 3 and firing(np.array([-1.0])).tolist() == [False]


def test_marked_window_centres_on_the_peak() -> None:
    tokens = [f" t{i}" for i in range(40)]
    values = np.zeros(40)
    values[20], values[22], values[5] = 4.0, 2.0, 1.0  # 5 is below MARK_SHARE of the peak
    text = marked_window(tokens, values)
    start, stop = 20 - CONTEXT_BEFORE, 20 + CONTEXT_AFTER + 1
    expected = "".join(f"<<{t}>>" if i in (20, 22) else t for i, t in enumerate(tokens[start:stop], start))
    assert text == "..." + expected + "..."
    # At the edges nothing is cut, so no dots.
    assert marked_window(tokens[:3], np.array([0.0, 1.0, 0.0])) == " t0<< t1>> t2"
    # A token holding only a character's first bytes ('') marks the character it begins; the explainer's list of
    # firing tokens names the character, never '' (nor what an excerpt cut inside a character ends with).
    split, fires = [" a", "", "中", " b", ""], np.array([0.0, 5.0, 1.0, 0.0, 4.0])
    assert marked_window(split, fires) == " a<<中>> b"
    assert _explain_listing([(split, fires)], 5.0).startswith('Tokens it fires on most (strength 0-9, how often): '
                                                              '"中" (9, 1x)\n')


def test_explain_prompt_lists_firing_tokens_and_marked_windows() -> None:
    examples = [example(0, [" the", " cat", " sat"], [0.0, 9.0, 0.0]),
                example(1, [" a", " cat", " and", " dog"], [0.0, 3.0, 0.0, 4.5]),
                example(2, [" nothing", " here"], [0.0, 0.0]),
                example(3, [" dog", "!"], [6.0, 0.0])]
    prompt = explain_prompt(examples, words, 10**6)
    assert prompt.system == EXPLAIN_SYSTEM and prompt.shown == 4
    assert prompt.user.endswith("What does this neuron respond to?")
    # By peak value (on the 0-9 scale of the largest), then count; the silent excerpt is left out of both.
    assert listed(prompt.user) == '" cat" (9, 2x), " dog" (6, 2x)'
    assert windows(prompt.user) == [" the<< cat>> sat", " a<< cat>> and<< dog>>", "<< dog>>!"]
    scale = 9.0
    assert [(list(t), list(v)) for t, v in prompt.examples] == [
        (list(e.tokens), pytest.approx(on_scale(e.target, scale).tolist())) for e in examples]
    assert max(max(v) for _, v in prompt.examples) == pytest.approx(TOP)


def test_explain_prompt_lists_at_most_the_strongest_tokens() -> None:
    tokens = [f" w{i}" for i in range(20)]
    prompt = explain_prompt([example(0, tokens, [10.0 + i for i in range(20)])], words, 10**6)
    names = [f'" w{i}" ({round((10 + i) / 29 * TOP)}, 1x)' for i in range(19, 19 - LISTED_TOKENS, -1)]
    assert listed(prompt.user) == ", ".join(names)
    assert listed(explain_prompt([example(0, ["a"], [0.0])], words, 10**6).user) == "none"


def test_explain_prompt_trims_from_the_end_to_the_budget() -> None:
    examples = make_examples()
    counted: list[str] = []

    def count(text: str) -> int:
        counted.append(text)
        return 10**9

    smallest = explain_prompt(examples, count, 0)  # measures the prompts for 6, 5, ..., 2 excerpts
    assert smallest.shown == 1 and len(counted) == len(examples) - 1
    sizes = [words(smallest.text())] + [words(t) for t in reversed(counted)]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    for k in range(1, len(examples) + 1):
        for budget in (sizes[k - 1], (sizes[k] - 1) if k < len(examples) else 10**6):
            prompt = explain_prompt(examples, words, budget)
            assert prompt.shown == k, (k, budget)
            assert words(prompt.text()) <= budget
            assert [t for t, _ in prompt.examples] == [e.tokens for e in examples[:k]]
            assert len(windows(prompt.user)) == k


def test_explain_prompt_always_keeps_one_excerpt() -> None:
    prompt = explain_prompt(make_examples(), lambda _t: 10**9, 0)
    assert prompt.shown == 1 and len(windows(prompt.user)) == 1
    assert explain_prompt(make_examples(1), lambda _t: 10**9, 0).shown == 1


HOSTILE_TOKENS = ["line\nbreak", "\t", "\x1b[31m", "[bold]", "[/]", "\r", "a\u2028b", "\x85", "\x0b", "\x0c",
                  "\u200b", "2. ", "<<x>>"]


def test_hostile_tokens_stay_in_one_escaped_line() -> None:
    values = [9.0] + [0.0] * (len(HOSTILE_TOKENS) - 1)
    prompt = explain_prompt([example(0, HOSTILE_TOKENS, values)], words, 10**6)
    body = prompt.user.split("Excerpts:\n", 1)[1].split("\n\nWhat does", 1)[0]
    assert body.splitlines() == [body]  # one line, even by splitlines' wider idea of a line break
    assert body == "1. <<line\\nbreak>>" + "".join(show_token(t) for t in HOSTILE_TOKENS[1:CONTEXT_AFTER + 1]) + "..."
    assert listed(prompt.user) == '"line\\nbreak" (9, 1x)'
    everything = explain_prompt([example(0, HOSTILE_TOKENS, [0.0] * 12 + [9.0])], words, 10**6).user
    for raw in ("\x1b", "\r", "\u2028", "\x85", "\x0b", "\x0c", "\u200b"):
        assert raw not in everything
    assert "[bold][/]" in everything and "\\x1b[31m" in everything


def test_explain_messages_alternate_roles() -> None:
    prompt = explain_prompt(make_examples(2), words, 10**6)
    messages = prompt.messages()
    roles = [m["role"] for m in messages]
    assert roles[0] == "system" and roles[-1] == "user"
    assert roles[1:-1] == ["user", "assistant"] * len(prompt.shots)
    assert len(prompt.shots) == len(fewshot("explain")) >= 3
    assert messages[0]["content"] == EXPLAIN_SYSTEM and messages[-1]["content"] == prompt.user
    for (question, answer), shot in zip(prompt.shots, fewshot("explain")):
        assert answer == shot["explanation"]
        assert len(windows(question)) == len(shot["excerpts"])
        assert '"' in answer  # our shots quote the words they name
    assert prompt.text() == "\n\n".join(m["content"] for m in messages)
