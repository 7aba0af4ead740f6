"""Prompts for the explainer and the simulator: pure functions of records, explanations and tokenizers.

The explainer sees what a small model can take in: the tokens the neuron fires on most (by peak value, with
how often), then each train excerpt's window around its peak with the firing tokens marked <<like this>>. Our
few-shot examples (data/fewshot/*.json) are windows of real neurons of our own SmolLM2 runs, outside the
neurons bench/quality.py measures, with explanations we wrote.

The simulator gets activations on a 0-9 integer scale (negatives clipped, divided by the largest value shown,
floored): in one forward pass a simulator can only read single-token numbers, and "10" is two tokens
for Llama, Qwen and Gemma tokenizers. The simulator prompt lists an excerpt as `token<TAB>?` lines; the `?` is
the slot where the simulator's digit distribution is read. `simulation_text` gives that prompt as text with the
slots' character offsets, for servers that tokenize themselves; neuronscope.core.llm.prompt_ids builds it from
token ids piece by piece, for a model loaded here.
"""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import numpy as np

from neuronscope.core.records import TOP

#: Placeholder written where the simulator's prediction is read.
SLOT = "?"
#: A token counts as firing, for the explainer, at this share of its excerpt's peak or more; it is marked <<so>>.
MARK_SHARE = 0.4
#: Tokens shown around an excerpt's peak, before and after it: the context a small explainer can take in.
CONTEXT_BEFORE, CONTEXT_AFTER = 12, 3
#: Most tokens in the explainer's list of the tokens the neuron fires on most.
LISTED_TOKENS = 8

EXPLAIN_SYSTEM = (
    "You study one neuron inside a language model. You get the tokens it fires on most, then short excerpts of "
    "text in which every token it fires on is marked <<like this>>. Say in one short phrase what it responds to, "
    "then quote the tokens from the list that it fires on strongly (at most 6), strongest first, exactly as listed "
    "(spaces included). When it responds to a kind of token or a context rather than to particular words, name "
    "that and quote the listed examples. No preamble."
)

#: The explanation whose simulation is subtracted for the `contrast` score: what a simulator predicts from the text
#: alone, without being told anything about the neuron.
NEUTRAL_EXPLANATION = "nothing in particular"

SIMULATE_SYSTEM = (
    "A neuron inside a language model has been described in one sentence. Predict how strongly it fires on "
    "each token of a new excerpt, from 0 (silent) to 9 (its strongest). Most tokens get 0; only tokens that "
    "match the description get high values. Each line is a token, a tab, then its value; unknown values are "
    "written as ?."
)


@dataclass(frozen=True)
class Example:
    """One excerpt as the LLM stages see it: tokens and the target activation at each."""

    excerpt_id: int
    """Excerpt id in the run."""
    kind: str
    """top or random (the record kind it came from; 'top' covers the negative tail's bottom records)."""
    tokens: tuple[str, ...]
    """Subject token strings."""
    target: np.ndarray
    """The tail's activation at each token (max(a, 0) or max(-a, 0)), float32 [tokens]."""


@dataclass(frozen=True)
class ExplainPrompt:
    """A chat prompt asking for one explanation."""

    system: str
    """Instructions."""
    shots: tuple[tuple[str, str], ...]
    """Few-shot (user, assistant) turns."""
    user: str
    """The neuron's listing."""
    shown: int
    """Excerpts that fit the explainer's context."""
    examples: tuple[tuple[tuple[str, ...], tuple[float, ...]], ...] = ()
    """The shown excerpts as (tokens, activations on the continuous 0-9 scale), for non-LLM explainers."""

    def messages(self) -> list[dict[str, str]]:
        """OpenAI-style chat messages."""
        out = [{"role": "system", "content": self.system}]
        for question, answer in self.shots:
            out += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        out.append({"role": "user", "content": self.user})
        return out

    def text(self) -> str:
        """All message contents, for token counting and logs."""
        return "\n\n".join(m["content"] for m in self.messages())


def show_token(token: str) -> str:
    """A token as one visible, inert line fragment: newlines, tabs and other control characters escaped."""
    if token.isprintable():  # nothing to escape (most tokens): isprintable is False for every category below
        return token
    out = []
    for ch in token:
        if ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") and ch != " ":
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def on_scale(values: np.ndarray, scale_max: float) -> np.ndarray:
    """Activations on the continuous 0..TOP scale (clipped at 0)."""
    if not scale_max > 0:
        return np.zeros(len(values), np.float64)
    return np.clip(np.asarray(values, np.float64) / scale_max * TOP, 0, TOP)


def listing(tokens: Sequence[str], digits: Sequence[int | str]) -> str:
    """`token<TAB>value` lines."""
    return "\n".join(f"{show_token(t)}\t{d}" for t, d in zip(tokens, digits))


@cache
def fewshot(name: str) -> Any:
    """A few-shot file of data/fewshot/, parsed."""
    return json.loads(resources.files("neuronscope.data").joinpath("fewshot", f"{name}.json").read_text(encoding="utf-8"))


def firing(values: np.ndarray) -> np.ndarray:
    """Which tokens of an excerpt fire, for the explainer: MARK_SHARE of the excerpt's peak or more (none when
    the excerpt never fires)."""
    values = np.asarray(values, np.float64)
    peak = values.max(initial=0.0)
    return values >= MARK_SHARE * peak if peak > 0 else np.zeros(len(values), bool)


def shown_at(tokens: Sequence[str], i: int) -> int:
    """The token that shows position i: i itself, or for a token holding only a character's first bytes ('',
    Subject.token_strings) the token after it that completes the character."""
    while i + 1 < len(tokens) and tokens[i] == "":
        i += 1
    return i


def marked_window(tokens: Sequence[str], values: np.ndarray, centre: int | None = None) -> str:
    """The excerpt around its peak (or `centre`; CONTEXT_BEFORE tokens before it, CONTEXT_AFTER after) as one
    inert line, firing tokens inside << >> (a firing '' marks the character it begins), cut ends shown as ..."""
    fires = firing(values)
    peak = int(np.argmax(values)) if centre is None else centre
    start, stop = max(0, peak - CONTEXT_BEFORE), min(len(tokens), peak + CONTEXT_AFTER + 1)
    marked = {shown_at(tokens, i) for i in np.flatnonzero(fires).tolist()}
    text = "".join(f"<<{show_token(t)}>>" if i in marked else show_token(t)
                   for i, t in enumerate(tokens[start:stop], start) if t)
    return ("..." if start else "") + text + ("..." if stop < len(tokens) else "")


def _explain_listing(excerpts: Sequence[tuple[Sequence[str], np.ndarray]], scale_max: float) -> str:
    """The user turn for a set of excerpts: the firing tokens by peak value (on the 0-9 scale of scale_max, with how
    often each fired), then each firing excerpt's marked window."""
    count: Counter[str] = Counter()
    peak: dict[str, float] = {}
    windows: list[str] = []
    for tokens, values in excerpts:
        values = np.asarray(values, np.float64)
        if not values.max(initial=0.0) > 0:
            continue
        for i in np.flatnonzero(firing(values)).tolist():
            token = tokens[shown_at(tokens, i)]
            if not token:  # the excerpt ends inside a character
                continue
            count[token] += 1
            peak[token] = max(peak.get(token, 0.0), float(values[i]))
        windows.append(f"{len(windows) + 1}. {marked_window(tokens, values)}")
    listed = sorted(count, key=lambda t: (-peak[t], -count[t], t))[:LISTED_TOKENS]
    strength = dict(zip(listed, on_scale(np.array([peak[t] for t in listed]), scale_max).round().astype(int).tolist()))
    head = ", ".join(f'"{show_token(t)}" ({strength[t]}, {count[t]}x)' for t in listed) or "none"
    return (f"Tokens it fires on most (strength 0-9, how often): {head}\n\nExcerpts:\n" + "\n".join(windows)
            + "\n\nWhat does this neuron respond to?")


@cache
def explain_shots() -> tuple[tuple[str, str], ...]:
    """The explainer's few-shot turns (question, answer), built once."""
    return tuple(
        (_explain_listing([(s["tokens"], np.asarray(s["values"], np.float64)) for s in shot["excerpts"]], TOP),
         shot["explanation"])
        for shot in fewshot("explain")
    )


def explain_prompt(examples: Sequence[Example], count_tokens: Callable[[str], int], budget: int) -> ExplainPrompt:
    """The explainer prompt for a neuron's train excerpts, trimmed (last excerpts first) to `budget` tokens
    as counted by the explainer's own tokenizer; at least one excerpt is always shown."""
    scale_max = max((float(np.max(e.target)) for e in examples if len(e.target)), default=0.0)
    shots = explain_shots()
    scaled = tuple((tuple(e.tokens), tuple(float(v) for v in on_scale(e.target, scale_max))) for e in examples)
    n = len(examples)
    while True:
        user = _explain_listing([(e.tokens, e.target) for e in examples[:n]], scale_max)
        prompt = ExplainPrompt(EXPLAIN_SYSTEM, shots, user, n, scaled[:n])
        if n <= 1 or count_tokens(prompt.text()) <= budget:
            return prompt
        n -= 1


#: Held-out excerpts shown to the explainer when it revises an explanation: those simulated worst.
REVISION_MISSES = 3


def revision_prompt(prompt: ExplainPrompt, explanation: str,
                    misses: Sequence[tuple[Sequence[str], np.ndarray, np.ndarray]]) -> ExplainPrompt:
    """The explainer's prompt again, with its first explanation and the held-out excerpts that explanation's
    simulation got most wrong, as (tokens, target, predicted): the firing tokens marked where the excerpt fires,
    else the window where the simulation wrongly expected it to."""
    lines = []
    for i, (tokens, target, predicted) in enumerate(misses, 1):
        if firing(target).any():
            lines.append(f"{i}. {marked_window(tokens, target)}")
        else:
            centre = int(np.argmax(predicted))
            lines.append(f"{i}. {marked_window(tokens, np.zeros(len(tokens)), centre)} (it fires on nothing here)")
    question = "What does this neuron respond to?"
    user = (prompt.user.removesuffix(question) + f'A first answer was: "{show_token(explanation.strip())}". It '
            "predicted these other excerpts worst (tokens the neuron fires on marked):\n" + "\n".join(lines)
            + "\n\nWhat does this neuron respond to? Answer better, in one short phrase.")
    return ExplainPrompt(prompt.system, prompt.shots, user, prompt.shown, prompt.examples)


# -- simulation ---------------------------------------------------------------------------------------

def simulation_head(explanation: str) -> str:
    """Everything before the excerpt's lines: one worked example, then the explanation to simulate."""
    shot = fewshot("simulate")
    return (
        f"Description: {shot['explanation']}\n{listing(shot['tokens'], shot['values'])}\n\n"
        f"Description: {show_token(explanation.strip())}\n"
    )


@dataclass(frozen=True)
class SimulationText:
    """A simulation prompt as text, with the character offset of every slot."""

    text: str
    """The prompt."""
    slots: tuple[int, ...]
    """Offset in `text` of each token's `?`."""


def simulation_text(explanation: str, tokens: Sequence[str]) -> SimulationText:
    """The prompt as plain text (completion servers): instructions, example, explanation, slot lines."""
    text = SIMULATE_SYSTEM + "\n\n" + simulation_head(explanation)
    slots = []
    for token in tokens:
        text += show_token(token) + "\t"
        slots.append(len(text))
        text += SLOT + "\n"
    return SimulationText(text, tuple(slots))


def simulation_lines(shown: Sequence[str]) -> tuple[str, tuple[int, ...]]:
    """An excerpt's `token<TAB>?` lines as text, with the character offset of every slot in them; `shown`: its
    tokens through show_token."""
    parts: list[str] = []
    slots: list[int] = []
    pos = 0
    for token in shown:
        parts += (token, "\t" + SLOT + "\n")
        slots.append(pos + len(token) + 1)
        pos += len(token) + len(SLOT) + 2
    return "".join(parts), tuple(slots)


@dataclass(frozen=True)
class PackedText:
    """Several excerpts in one prompt as text (servers that tokenize themselves): the shared head once, then
    each excerpt's block."""

    text: str
    """The prompt."""
    slots: tuple[tuple[int, ...], ...]
    """Per excerpt, the character offset in `text` of each of its slots."""
    tokens: int
    """The prompt's length in tokens, as estimated when packing."""


def pack_text(head: str, blocks: Sequence[tuple[str, Sequence[int], int]], max_tokens: int,
              count_tokens: Callable[[str], int], separator: str = "\n") -> list[PackedText]:
    """Blocks (text, slot offsets in that text, estimated tokens) packed in order behind `head` into as few
    prompts of at most about `max_tokens` tokens as they fit; a block longer than that gets a prompt of its own.
    Consecutive blocks of one prompt are joined by `separator`."""
    head_tokens = count_tokens(head)
    gap = count_tokens(separator) if separator else 0
    out: list[PackedText] = []
    parts: list[str] = []
    slots: list[tuple[int, ...]] = []
    pos = tokens = 0
    for text, offsets, cost in blocks:
        if slots and tokens + gap + cost > max_tokens:
            out.append(PackedText("".join(parts), tuple(slots), tokens))
            slots = []
        if not slots:
            parts, pos, tokens = [head], len(head), head_tokens
        elif separator:
            parts.append(separator)
            pos, tokens = pos + len(separator), tokens + gap
        slots.append(tuple(pos + o for o in offsets))
        parts.append(text)
        pos, tokens = pos + len(text), tokens + cost
    if slots:
        out.append(PackedText("".join(parts), tuple(slots), tokens))
    return out


def packed_simulation_text(explanation: str, excerpts: Sequence[Sequence[str]], max_tokens: int,
                           count_tokens: Callable[[str], int]) -> list[PackedText]:
    """The text simulation prompt (`simulation_text`) with several excerpts: instructions and example once, then
    each excerpt's lines after a blank line, packed into as few prompts of at most about `max_tokens` tokens (as
    `count_tokens` estimates them: each line as its token's text plus three) as they fit. A prompt holding one
    excerpt is exactly `simulation_text`'s."""
    head = SIMULATE_SYSTEM + "\n\n" + simulation_head(explanation)
    blocks = []
    for tokens in excerpts:
        shown = [show_token(t) for t in tokens]
        text, slots = simulation_lines(shown)
        blocks.append((text, slots, sum(count_tokens(t) for t in shown) + 3 * len(shown)))
    return pack_text(head, blocks, max_tokens, count_tokens)


def simulation_messages(explanation: str, tokens: Sequence[str]) -> list[dict[str, str]]:
    """The prompt as chat messages, for servers that only offer chat: the answer is the filled-in lines."""
    body = simulation_head(explanation) + listing(tokens, [SLOT] * len(tokens))
    return [
        {"role": "system", "content": SIMULATE_SYSTEM + " Answer with the same lines, every ? replaced by a digit, "
                                                        "and nothing else."},
        {"role": "user", "content": body},
    ]
