"""The explainer prompt (core/prompts.py): the 0-9 scale, trimming to a budget, the sparse list, hostile
tokens kept inert, the chat roles."""

from __future__ import annotations

import numpy as np
import pytest

from core.prompts import (
    EXPLAIN_SYSTEM,
    SPARSE_SHARE,
    TOP,
    Example,
    explain_prompt,
    fewshot,
    normalise,
    on_scale,
    show_token,
)

# -- explainer prompt ----------------------------------------------------------------------------------------

def test_normalise() -> None:
    values = np.array([-3.0, 0.0, 0.04, 0.15, 0.55, 0.95, 0.999, 1.0, 2.5])
    assert normalise(values, 1.0).tolist() == [0, 0, 0, 1, 5, 9, 9, 9, 9]
    assert normalise(values, 1.0).dtype == np.int64
    assert normalise(np.array([0.0, 2.0, 4.0, 8.0]), 8.0).tolist() == [0, 2, 5, 9]
    for scale in (0.0, -1.0, float("nan")):
        assert normalise(values, scale).tolist() == [0] * len(values)
    assert normalise(np.array([]), 1.0).tolist() == []


def test_on_scale() -> None:
    assert on_scale(np.array([-1.0, 0.0, 0.5, 1.0, 2.0]), 1.0).tolist() == [0.0, 0.0, 4.5, 9.0, 9.0]
    assert on_scale(np.array([1.0, 2.0]), 0.0).tolist() == [0.0, 0.0]


def example(i: int, tokens: list[str], target: list[float], kind: str = "top") -> Example:
    return Example(i, kind, tuple(tokens), np.asarray(target, np.float32))


def user_excerpts(user: str) -> list[list[str]]:
    """The listing lines of each 'Excerpt N:' block of a user turn."""
    blocks = user.split("\n\n")
    return [b.split("\n")[1:] for b in blocks if b.startswith("Excerpt ")]


def words(text: str) -> int:
    return len(text.split())


def make_examples(n: int = 6, length: int = 12) -> list[Example]:
    rng = np.random.default_rng(1)
    return [example(i, [f" w{i}_{j}" for j in range(length)], list(rng.random(length) * (i + 1)))
            for i in range(n)]


def test_explain_prompt_shows_everything_within_budget() -> None:
    examples = make_examples()
    prompt = explain_prompt(examples, words, 10**6)
    assert prompt.shown == len(examples) == len(user_excerpts(prompt.user))
    assert prompt.system == EXPLAIN_SYSTEM
    assert prompt.user.endswith("What does this neuron respond to?")
    scale = max(float(e.target.max()) for e in examples)
    for lines, e in zip(user_excerpts(prompt.user), examples):
        digits = normalise(e.target, scale)
        assert lines == [f"{t}\t{d}" for t, d in zip(e.tokens, digits)]
    assert [(list(t), list(v)) for t, v in prompt.examples] == [
        (list(e.tokens), pytest.approx(on_scale(e.target, scale).tolist())) for e in examples]
    assert max(max(v) for _, v in prompt.examples) == pytest.approx(TOP)


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
            assert len(user_excerpts(prompt.user)) == k
            assert f"Excerpt {k}:" in prompt.user and f"Excerpt {k + 1}:" not in prompt.user


def test_explain_prompt_always_keeps_one_excerpt() -> None:
    calls: list[str] = []

    def count(text: str) -> int:
        calls.append(text)
        return 10**9

    prompt = explain_prompt(make_examples(), count, 0)
    assert prompt.shown == 1 and len(user_excerpts(prompt.user)) == 1
    assert calls and all(isinstance(c, str) for c in calls)
    assert explain_prompt(make_examples(1), lambda _t: 10**9, 0).shown == 1


def test_explain_prompt_scale_uses_every_example() -> None:
    """Digits are relative to the largest activation of all train excerpts, even trimmed ones."""
    examples = [example(0, ["a", "b"], [0.0, 1.0]), example(1, ["c", "d"], [0.0, 2.0])]
    prompt = explain_prompt(examples, words, 0)
    assert user_excerpts(prompt.user) == [["a\t0", "b\t5"]]


SPARSE_HEADER = "The same excerpts, only the tokens with a non-zero value:"


def _sparse_lines(user: str) -> list[str] | None:
    for block in user.split("\n\n"):
        if block.startswith(SPARSE_HEADER):
            return block.split("\n")[1:]
    return None


@pytest.mark.parametrize("nonzero", range(0, 6))
def test_sparse_list_only_below_the_share(nonzero: int) -> None:
    shown = 20
    values = [0.0] * shown
    for i in range(nonzero):
        values[3 * i] = 1.0 + i
    tokens = [f"t{i}" for i in range(shown)]
    prompt = explain_prompt([example(0, tokens, values)], words, 10**6)
    lines = _sparse_lines(prompt.user)
    if nonzero and nonzero < SPARSE_SHARE * shown:
        scale = max(values)
        assert lines == [f"{tokens[3 * i]}\t{normalise(np.array([1.0 + i]), scale)[0]}" for i in range(nonzero)]
    elif nonzero == 0:
        assert not lines  # nothing to list (today: the header alone)
    else:
        assert lines is None


def test_sparse_list_counts_digits_not_raw_values() -> None:
    """Tokens whose value floors to 0 on the scale are not 'non-zero'."""
    values = [9.0] + [0.5] * 19  # 0.5 / 9 * 10 floors to 0
    prompt = explain_prompt([example(0, [f"t{i}" for i in range(20)], values)], words, 10**6)
    assert _sparse_lines(prompt.user) == ["t0\t9"]


def test_sparse_list_covers_only_shown_excerpts() -> None:
    dense = example(0, ["a", "b", "c", "d", "e"], [1, 2, 3, 4, 5])
    sparse = example(1, [f"z{i}" for i in range(100)], [0.0] * 99 + [5.0])
    both = explain_prompt([dense, sparse], words, 10**6)  # 6 of 105 tokens non-zero
    assert _sparse_lines(both.user) == ["a\t2", "b\t4", "c\t6", "d\t8", "e\t9", "z99\t9"]
    trimmed = explain_prompt([dense, sparse], words, 0)
    assert trimmed.shown == 1 and _sparse_lines(trimmed.user) is None


HOSTILE_TOKENS = ["line\nbreak", "\t", "\x1b[31m", "[bold]", "[/]", "\r", "a\u2028b", "\x85", "\x0b", "\x0c",
                  "\u200b", "Excerpt 2:", "x\t9"]


def test_hostile_tokens_are_one_escaped_line_each() -> None:
    values = [9.0] + [0.0] * (len(HOSTILE_TOKENS) - 1)
    prompt = explain_prompt([example(0, HOSTILE_TOKENS, values)], words, 10**6)
    body = prompt.user.split("\n\n")[0]
    lines = body.splitlines()  # splitlines also breaks at \x0b, \x0c, \x1c-\x1e, \x85, \u2028, \u2029
    assert lines[0] == "Excerpt 1:"
    assert len(lines) == 1 + len(HOSTILE_TOKENS)
    for line, token, value in zip(lines[1:], HOSTILE_TOKENS, normalise(np.array(values), 9.0)):
        assert line == f"{show_token(token)}\t{value}"
        assert line.count("\t") == 1
    assert "\x1b" not in prompt.user and "\r" not in prompt.user and "\u2028" not in prompt.user
    assert "[bold]\t0" in lines and "\\x1b[31m\t0" in lines and "line\\nbreak\t9" in lines
    assert "x\\t9\t0" in lines


def test_explain_messages_alternate_roles() -> None:
    prompt = explain_prompt(make_examples(2), words, 10**6)
    messages = prompt.messages()
    roles = [m["role"] for m in messages]
    assert roles[0] == "system" and roles[-1] == "user"
    assert roles[1:-1] == ["user", "assistant"] * len(prompt.shots)
    assert len(prompt.shots) == len(fewshot("explain")) >= 1
    assert messages[0]["content"] == EXPLAIN_SYSTEM and messages[-1]["content"] == prompt.user
    for (question, answer), shot in zip(prompt.shots, fewshot("explain")):
        assert answer == shot["explanation"]
        assert len(user_excerpts(question)) == len(shot["excerpts"])
    assert prompt.text() == "\n\n".join(m["content"] for m in messages)
