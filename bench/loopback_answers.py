"""What bench/loopback_server.py answers: explanations quoting the prompt's tokens, digits for simulation slots, and
echoed prompts with top logprobs, tokenised as tests/fake_openai.py tokenises. Standard library only."""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

#: The toy tokenizer of tests/fake_openai.py: words, single digits, every other character on its own.
TOKEN = re.compile(r"[A-Za-z]+|[0-9]|.|\n", re.S)
#: The slot the client reads a digit distribution at.
SLOT = "?"
DIGITS = tuple(str(d) for d in range(10))
#: A listed token in an explainer prompt: `"tok" (9, 3x)`.
LISTED = re.compile(r'"((?:[^"\\]|\\.)*)" \(\d+, \d+x\)')
QUOTED = re.compile(r'"([^"\n]*)"')


def tokens_of(text: str) -> list[str]:
    return TOKEN.findall(text)


def _logprobs(probs: dict[str, float]) -> dict[str, float]:
    return {t: math.log(p) for t, p in probs.items()}


def digit_probs(level: int) -> dict[str, float]:
    """A distribution over the digits peaked at `level`."""
    weights = [math.exp(-abs(d - level)) for d in range(10)]
    total = sum(weights)
    return {str(d): w / total for d, w in enumerate(weights)}


#: Digit distributions by peak, as logprobs (built once; the echo lists the same objects many times).
DIGIT_LOGPROBS = [_logprobs(digit_probs(level)) for level in range(10)]


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def quotes_in(text: str) -> set[str]:
    return {q.strip().casefold() for q in QUOTED.findall(text) if q.strip()}


def _level(token: str, quotes: set[str], salt: int) -> int:
    """The digit a line's token gets: high when the description quotes it, else low, varied by a hash."""
    if token.strip().casefold() in quotes:
        return 8 + salt % 2
    return salt % 3 if salt % 7 == 0 else 0


def explanation_for(prompt: str, salt: int) -> str:
    """A short explanation quoting one or two tokens the explainer's prompt lists (or words of it)."""
    question = prompt.rsplit("Tokens it fires on most", 1)[-1]
    listed = [t for t in dict.fromkeys(LISTED.findall(question)) if t.strip()]
    if not listed:
        listed = [w for w in dict.fromkeys(re.findall(r"[A-Za-z]+", question))][:8] or ["the"]
    h = _hash(prompt) + salt
    first = listed[h % len(listed)]
    if len(listed) > 1 and (h >> 8) % 2:
        second = listed[(h // len(listed) + 1) % len(listed)]
        if second != first:
            return f'the words "{first}" and "{second}"'
    return f'the word "{first}"'


def _chat_piece(token: str, logprob: float, tops: dict[str, float] | None) -> dict[str, Any]:
    listed = tops if tops is not None else {token: logprob}
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in listed.items()]}


SIM_LINE = re.compile(r"^([^\n]*)\t\?$", re.M)
RATING_LINE = re.compile(r"^(?:Token|Excerpt): ([^\n]*)\nRating: \?$", re.M)


def _filled(user: str, quotes: set[str]) -> list[tuple[str, int]] | None:
    """(answer line before its digit, digit) for every slot of a chat simulation (`token<TAB>?` lines, answered
    with the same lines filled in) or rating (`Rating: ?` lines, answered with `Rating: d` lines); None if none."""
    lines = SIM_LINE.findall(user)
    if lines:
        return [(f"{t}\t", _level(t, quotes, _hash(t) + i)) for i, t in enumerate(lines)]
    items = RATING_LINE.findall(user)
    if items:
        out = []
        for i, item in enumerate(items):
            token = item[1:-1] if item.startswith('"') and item.endswith('"') else item
            level = _level(token, quotes, _hash(item) + i)
            if not level and any(q in item.casefold() for q in quotes):
                level = 7
            out.append(("Rating: ", level))
        return out
    return None


def chat_answer(body: dict[str, Any]) -> tuple[list[str], list[list[dict[str, Any]] | None], int]:
    """(texts of the choices, their logprob contents, prompt tokens) for a chat request."""
    messages = body.get("messages") or []
    contents = [str(m.get("content") or "") for m in messages if isinstance(m, dict)]
    user = next((str(m.get("content") or "") for m in reversed(messages)
                 if isinstance(m, dict) and m.get("role") == "user"), "")
    prompt_tokens = sum(len(tokens_of(c)) for c in contents)
    with_logprobs = bool(body.get("logprobs"))
    n = max(1, int(body.get("n") or 1))
    seed = int(body.get("seed") or 0)
    description = user.rsplit("Description: ", 1)[-1].split("\n", 1)[0] if "Description: " in user else ""
    quotes = quotes_in(description)
    lines = _filled(user, quotes)
    if lines is not None:
        pieces: list[tuple[str, dict[str, float] | None]] = []
        for prefix, level in lines:
            pieces += [(t, None) for t in tokens_of(prefix)]
            pieces += [(str(level), DIGIT_LOGPROBS[level]), ("\n", None)]
        text = "".join(t for t, _ in pieces)
        content = [_chat_piece(t, tops[t] if tops else 0.0, tops) for t, tops in pieces] if with_logprobs else None
        return [text] * n, [content] * n, prompt_tokens
    if "Answer with one digit" in user:
        content = [_chat_piece("7", DIGIT_LOGPROBS[7]["7"], DIGIT_LOGPROBS[7])] if with_logprobs else None
        return ["7"] * n, [content] * n, prompt_tokens
    prompt = "\n".join(contents)
    texts = [explanation_for(prompt, seed + i) for i in range(n)]
    if with_logprobs:
        return texts, [[_chat_piece(t, 0.0, None) for t in tokens_of(x)] for x in texts], prompt_tokens
    return texts, [None] * n, prompt_tokens


def _entries(dist: dict[str, float]) -> str:
    """A top_logprobs dict as JSON, without its braces."""
    return json.dumps(dist, ensure_ascii=False)[1:-1]


#: Pieces of echo answers, serialised once: the entries of a token's own dict by token, of the digit distributions.
_OWN: dict[str, str] = {}
_DIGIT_ENTRIES = [_entries(d) for d in DIGIT_LOGPROBS]
_FORCED = {d: _entries({d: math.log(0.9), "\n": math.log(0.1)}) for d in DIGITS}
_PADS: dict[int, str] = {}


def _own(token: str) -> str:
    entries = _OWN.get(token)
    if entries is None:
        entries = _entries({token: 0.0})
        if len(_OWN) < 100_000:
            _OWN[token] = entries
    return entries


def _pad(k: int) -> str:
    if k not in _PADS:
        _PADS[k] = "".join(f', "<filler {j}>": -20.0' for j in range(k))
    return _PADS[k]


def echo_answer(body: dict[str, Any], pad_top: bool) -> tuple[str, int]:
    """(the logprobs object as JSON, prompt tokens) of an echo request. Serialised by hand from cached pieces: the
    answer is the bulk of the server's work, and json.dumps of thousands of small dicts costs more than the rest."""
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt else ""
    prompt = str(prompt)
    asked = int(body.get("logprobs") or 0) if pad_top else 0
    tokens = tokens_of(prompt)
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    # where each `Description: ` line starts, so a slot finds the explanation it is read under
    heads = [m.start() for m in re.finditer("Description: ", prompt)]
    head_index, quotes = -1, set[str]()
    tops = ["null"]
    last = len(tokens) - 1
    for i in range(1, len(tokens)):
        t = tokens[i]
        before = tokens[i - 1]
        if t == SLOT and before == "\t" and i < last and tokens[i + 1] == "\n":
            start = prompt.rfind("\n", 0, offsets[i]) + 1
            line_token = prompt[start:offsets[i] - 1]  # the line's token, less the tab
            k = head_index
            while k + 1 < len(heads) and heads[k + 1] < start:
                k += 1
            if k != head_index:
                head_index = k
                quotes = quotes_in(prompt[heads[k]:prompt.find("\n", heads[k])])
            entries, n = _DIGIT_ENTRIES[_level(line_token, quotes, _hash(line_token))], 10
        elif before == "\t" and t in DIGITS:
            entries, n = _FORCED[t], 2
        else:
            entries, n = _own(t), 1
        tops.append("{" + entries + (_pad(asked - n) if asked > n else "") + "}")
    tops.append('{"\\n": 0.0}')
    text = json.dumps(tokens + ["\n"], ensure_ascii=False)
    logprobs = (f'{{"tokens": {text}, "text_offset": {json.dumps(offsets + [len(prompt)])}, '
                f'"token_logprobs": [null{", 0.0" * len(tokens)}], "top_logprobs": [{", ".join(tops)}]}}')
    return logprobs, len(tokens)
