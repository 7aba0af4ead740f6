"""Reading OpenAI-compatible answers: choices and message texts, token usage, echoed prompt logprobs at slot
offsets, `token<TAB>digit` answer lines and the chat logprobs of the digits they hold. Pure functions of the
decoded JSON; `spec` only names the backend in one-line LLMErrors."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from neuronscope.core.llm.base import LLMError
from neuronscope.core.records import TOP

DIGITS = tuple(str(d) for d in range(TOP + 1))
#: A line of a simulation answer: anything, a tab (or spaces), one digit, optional trailing spaces.
VALUE_LINE = re.compile(r"^(.*?)(?:\t| +)([0-9])[ \t]*$")


def one_line(text: Any, limit: int = 200) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def expected(dist: dict[str, float]) -> float:
    """Expected digit of a {digit string: logprob} distribution, renormalised; 0 when empty."""
    if not dist:
        return 0.0
    top = max(dist.values())
    weights = {d: math.exp(lp - top) for d, lp in dist.items()}
    total = sum(weights.values())
    return sum(int(d) * w for d, w in weights.items()) / total


def expected_all(tops: Sequence[Any]) -> list[float]:
    """`expected(digit_dist(top))` of many top_logprobs entries at once: for an echo's hundreds of slots, one
    lookup per digit and one numpy pass instead of a Python loop over every entry."""
    try:
        rows = np.array([[top.get(d, -math.inf) for d in DIGITS] for top in tops], np.float64).reshape(len(tops), 10)
    except (AttributeError, TypeError, ValueError):  # a list entry (chat), or a value that is not a number
        return [expected(digit_dist(top)) for top in tops]
    rows[~np.isfinite(rows)] = -math.inf
    peak = rows.max(axis=1, keepdims=True)
    weights = np.exp(rows - np.where(np.isfinite(peak), peak, 0.0))
    total = weights.sum(axis=1)
    values = np.divide(weights @ np.arange(10.0), total, out=np.zeros(len(tops)), where=total > 0)
    return [float(v) for v in values]


def digit_dist(top: Any) -> dict[str, float]:
    """The digit entries of one top_logprobs entry: a {token: logprob} dict (completions) or a list of
    {token, logprob} objects (chat)."""
    items: Any
    if isinstance(top, dict):  # the digits looked up, not every entry scanned: an echo has one per slot
        items = [(d, top[d]) for d in DIGITS if d in top]
    elif isinstance(top, list):
        items = ((e.get("token"), e.get("logprob")) for e in top if isinstance(e, dict))
    else:
        return {}
    out: dict[str, float] = {}
    for token, lp in items:
        if token in DIGITS and isinstance(lp, (int, float)) and math.isfinite(lp):
            out[token] = max(out.get(token, -math.inf), float(lp))
    return out


def choices(spec: str, data: dict[str, Any], what: str) -> list[dict[str, Any]]:
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, dict) for c in choices):
        raise LLMError(f"{spec}: the {what} answer has no choices")
    return choices


def usage(data: dict[str, Any], prompt_estimate: int, completion_estimate: int) -> tuple[int, int]:
    usage = data.get("usage")
    if isinstance(usage, dict):
        p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(p, int) and isinstance(c, int):
            return p, c
    return prompt_estimate, completion_estimate


def message_text(spec: str, choice: dict[str, Any], what: str) -> str:
    message = choice.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        raise LLMError(f"{spec}: the {what} answer lacks choices[].message.content")
    return content


def echo_logprobs(spec: str, data: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """(text_offset, top_logprobs) of an echo answer."""
    logprobs = choices(spec, data, "echo")[0].get("logprobs")
    offsets = logprobs.get("text_offset") if isinstance(logprobs, dict) else None
    tops = logprobs.get("top_logprobs") if isinstance(logprobs, dict) else None
    if not isinstance(offsets, list) or not isinstance(tops, list) or len(offsets) != len(tops):
        raise LLMError(f"{spec}: the echo answer lacks logprobs.text_offset and top_logprobs "
                       f"(does the server support echo with logprobs? try mode chat-logprobs)")
    return offsets, tops


def read_echo(spec: str, data: dict[str, Any], text: str, slots: Sequence[int], shift: int) -> list[float]:
    offsets, tops = echo_logprobs(spec, data)
    index = token_starts(offsets)
    found = []
    for k, slot in enumerate(slots):
        i = index.get(slot)
        if i is None:
            near = text[max(0, slot - 8): slot + 3]
            raise LLMError(f"{spec}: the echo does not match the prompt: no token starts at the slot of "
                           f"token {k + 1} (character {slot}, {near!r}); the server tokenised the prompt "
                           f"differently (use mode chat-logprobs)")
        entry = i - shift
        top = tops[entry] if 0 <= entry < len(tops) else None
        if top is None:
            raise LLMError(f"{spec}: the echo has no top_logprobs for the slot of token {k + 1}")
        found.append(top)
    return expected_all(found)


def token_starts(offsets: Sequence[Any]) -> dict[int, int]:
    """Character offset -> index of the first token that starts there."""
    # built from the end, so the first token at an offset is the one kept
    return {off: i for i, off in zip(range(len(offsets) - 1, -1, -1), reversed(offsets)) if type(off) is int}


def value_lines(spec: str, answer: str, count: int) -> list[tuple[int, str]]:
    """(character offset, digit) of the value on each answer line; LLMError unless one per token."""
    found: list[tuple[int, str]] = []
    pos = 0
    for line in answer.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        match = VALUE_LINE.match(body)
        if match and body.strip() and not body.lstrip().startswith("```"):
            found.append((pos + match.start(2), match.group(2)))
        pos += len(line)
    if len(found) != count:
        raise LLMError(f"{spec}: the simulation answer has {len(found)} value lines for {count} tokens "
                       f"(answer began {one_line(answer, 60)!r})")
    return found


def read_chat_logprobs(spec: str, choice: dict[str, Any], count: int) -> tuple[str, list[float]]:
    """The answer (as the logprob tokens spell it) and the expected value at each digit written."""
    logprobs = choice.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list) or not content or not all(isinstance(t, dict) for t in content):
        raise LLMError(f"{spec}: the simulation answer has no logprobs (the server ignores logprobs; "
                       f"use mode chat-digits)")
    pieces = [t.get("token") if isinstance(t.get("token"), str) else "" for t in content]
    answer = "".join(pieces)
    owner: list[int] = []  # character offset -> index of the logprob token covering it
    starts: list[int] = []  # index of a logprob token -> its character offset
    for i, piece in enumerate(pieces):
        starts.append(len(owner))
        owner += [i] * len(piece)
    values = []
    for offset, digit in value_lines(spec, answer, count):
        i = owner[offset]
        token = pieces[i]
        start = offset - starts[i]  # where the digit sits inside its token
        pre, post = token[:start], token[start + 1:]
        dist: dict[str, float] = {}
        tops = content[i].get("top_logprobs")
        for entry in tops if isinstance(tops, list) else []:
            t, lp = (entry.get("token"), entry.get("logprob")) if isinstance(entry, dict) else (None, None)
            if (isinstance(t, str) and len(t) == len(token) and t.startswith(pre) and t.endswith(post)
                    and t[start] in DIGITS and isinstance(lp, (int, float)) and math.isfinite(lp)):
                dist[t[start]] = max(dist.get(t[start], -math.inf), float(lp))
        if digit not in dist:
            own = content[i].get("logprob")
            dist[digit] = float(own) if isinstance(own, (int, float)) and math.isfinite(own) else 0.0
        values.append(expected(dist))
    return answer, values
