"""Rating prompts: questions a small model answers better than per-token numbers (delphi's detection and fuzzing),
asked of whole excerpts and answered with one digit each, 0-9, all of a split's excerpts in one prompt.

- detection: does the neuron fire anywhere in this excerpt?
- fuzzing: are the tokens marked with << >> the ones the neuron fires on?
- token: does the neuron fire on this token (quoted, out of context)? The `tokens` simulation (neuronscope.core.explanation.simulation) rates
  every distinct token of a split this way, so a small model judges each token against the explanation instead
  of writing numbers for a listing it mostly reads past.

A local model reads every rating from one forward pass (the expected digit at each `Rating:` slot, as the
one-pass simulation does); so does a server that echoes prompt logprobs (`packed_rating_text`: one echoed prompt,
no answer generated); a chat server writes them. Excerpt text is untrusted: it is shown through
`show_token` (control characters escaped) and encoded as text, never as control tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from neuronscope.core.llm.prompt_ids import PackedPrompt, bos_ids, chat_opening_ids, encode_text
from neuronscope.core.llm.prompts import SLOT, PackedText, fewshot, pack_text, show_token

TASKS = ("detect", "fuzz", "token")
MARK_OPEN, MARK_CLOSE = "<<", ">>"

_INSTRUCTIONS = {
    "detect": (
        "A neuron inside a language model has been described in one sentence. For each excerpt below, rate "
        "from 0 to 9 how strongly the neuron fires anywhere in it: 0 when nothing in the excerpt matches the "
        "description, 9 when it clearly contains what the description names."
    ),
    "fuzz": (
        "A neuron inside a language model has been described in one sentence. In each excerpt below some tokens "
        "are marked <<like this>>. Rate from 0 to 9 whether the marked tokens are the ones the neuron fires on: "
        "0 when they have nothing to do with the description, 9 when they are exactly what it names."
    ),
    "token": (
        "A neuron inside a language model has been described in one sentence. For each token below, rate from 0 "
        "to 9 how strongly the neuron fires on it: 0 when the token has nothing to do with the description, 9 "
        "when it is exactly what the description names."
    ),
}


@dataclass(frozen=True)
class Item:
    """One excerpt to rate: its tokens, and for fuzzing which of them are marked."""

    tokens: tuple[str, ...]
    """The excerpt's tokens."""
    marks: tuple[bool, ...] = ()
    """Per token, whether it is marked (fuzzing); empty for detection."""

    def line(self, task: str) -> str:
        """The item as the prompt shows it: `Token: "x"` for the token task, else `Excerpt: ...`."""
        return f'Token: "{self.text()}"' if task == "token" else f"Excerpt: {self.text()}"

    def text(self) -> str:
        """The excerpt as one inert line, marked tokens inside << >>."""
        out = []
        for i, token in enumerate(self.tokens):
            shown = show_token(token)
            out.append(f"{MARK_OPEN}{shown}{MARK_CLOSE}" if self.marks and self.marks[i] else shown)
        return "".join(out)


def instructions(task: str) -> str:
    """The task's instructions; ValueError for an unknown task."""
    if task not in _INSTRUCTIONS:
        raise ValueError(f"unknown rating task {task!r}: use one of {', '.join(TASKS)}")
    return _INSTRUCTIONS[task]


def _head(task: str, explanation: str, label: str = "Rating: ") -> str:
    """One worked example (its ratings written after `label`), then the explanation to rate against."""
    shot = fewshot("rate")[task]
    lines = [f"Description: {shot['explanation']}"]
    for text, rating in shot["items"]:
        lines.append(f"{Item((text,)).line(task)}\n{label}{rating}")
    return "\n".join(lines) + f"\n\nDescription: {show_token(explanation.strip())}\n"


def rating_text(task: str, explanation: str, items: Sequence[Item]) -> str:
    """The whole prompt as text, every rating a `?` (servers fill them in as `Rating: 7` lines)."""
    body = "".join(f"{item.line(task)}\nRating: {SLOT}\n" for item in items)
    return instructions(task) + "\n\n" + _head(task, explanation) + body


def rating_messages(task: str, explanation: str, items: Sequence[Item]) -> list[dict[str, str]]:
    """The prompt as chat messages: the answer is one `Rating: d` line per excerpt, in order."""
    body = _head(task, explanation) + "".join(f"{item.line(task)}\nRating: {SLOT}\n" for item in items)
    return [{"role": "system", "content": instructions(task) + " Answer with one line `Rating: d` per item, in "
                                                             "order, and nothing else."},
            {"role": "user", "content": body}]


def _prefix(tokenizer: Any, task: str, explanation: str) -> list[int]:
    head = _head(task, explanation)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": instructions(task)}, {"role": "user", "content": "Rate them."}]
        return chat_opening_ids(tokenizer, messages) + encode_text(tokenizer, head)
    return bos_ids(tokenizer) + encode_text(tokenizer, instructions(task) + "\n\n" + head)


def packed_rating_ids(tokenizer: Any, task: str, explanation: str, items: Sequence[Item],
                      max_ids: int = 4096) -> list[PackedPrompt]:
    """Items packed in order into as few prompts of at most max_ids ids as they fit, the instructions once per
    prompt; each item has one slot, the `?` after its `Rating: `."""
    head = _prefix(tokenizer, task, explanation)
    label, slot, newline = (encode_text(tokenizer, s) for s in ("\nRating: ", SLOT, "\n"))
    out: list[PackedPrompt] = []
    ids: list[int] = []
    slots: list[tuple[int, ...]] = []
    for item in items:
        block = encode_text(tokenizer, item.line(task)) + label
        if slots and len(ids) + len(block) + len(slot) + len(newline) > max_ids:
            out.append(PackedPrompt(tuple(ids), tuple(slots)))
            slots = []
        if not slots:
            ids = list(head)
        ids += block
        slots.append((len(ids),))
        ids += slot + newline
    if slots:
        out.append(PackedPrompt(tuple(ids), tuple(slots)))
    return out


#: What precedes a rating's slot in the echo prompt: a tab, so the slot and each example's digit are tokens of their
#: own whatever the server's tokenizer (a space would merge into " 7" in most BPE vocabularies).
ECHO_LABEL = "Rating:\t"


def packed_rating_text(task: str, explanation: str, items: Sequence[Item], max_tokens: int,
                       count_tokens: Callable[[str], int]) -> list[PackedText]:
    """The rating prompt as text for servers that echo prompt logprobs: instructions and example once, then per
    item its line and `Rating:<TAB>?`, packed in order into as few prompts of at most about `max_tokens` tokens
    as they fit; each item has one slot, its `?`."""
    head = instructions(task) + "\n\n" + _head(task, explanation, ECHO_LABEL)
    blocks = []
    for item in items:
        line = f"{item.line(task)}\n{ECHO_LABEL}"
        blocks.append((f"{line}{SLOT}\n", (len(line),), count_tokens(item.line(task)) + 5))
    return pack_text(head, blocks, max_tokens, count_tokens, separator="")
