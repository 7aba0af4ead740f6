"""Prompts as token ids, for a model loaded in this process (neuronscope.core.llm.local, rating): the simulation
prompt built piece by piece, so every slot's position is exact whatever the tokenizer merges, and untrusted text
always encoded as text, never as control tokens. The prompts' words are neuronscope.core.llm.prompts'."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from neuronscope.core.llm.prompts import SIMULATE_SYSTEM, SLOT, show_token, simulation_head
from neuronscope.core.records import TOP


@dataclass(frozen=True)
class SimulationIds:
    """A simulation prompt as token ids, with the position of every slot token."""

    ids: tuple[int, ...]
    """Prompt token ids."""
    slots: tuple[int, ...]
    """Index in `ids` of each token's slot; the prediction is read from the logits one position earlier."""


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Ids of untrusted text, as text: strings that spell a control token (`<|im_end|>`, `<bos>`) stay plain
    text, and a SentencePiece dummy prefix (Llama-2, Mistral) is not added in front of a piece, so pieces
    encoded one by one read exactly like the same text encoded whole."""
    if not text:
        return []

    def encode(piece: str) -> list[int]:
        return list(tokenizer.encode(piece, add_special_tokens=False, split_special_tokens=True))

    # Encoded behind a newline, which takes any dummy prefix instead, then the newline's ids dropped. Where the
    # newline merges into the text (a text starting with a newline), the text is encoded on its own.
    anchor, both = encode("\n"), encode("\n" + text)
    if both[: len(anchor)] == anchor and len(both) > len(anchor):
        return both[len(anchor):]
    return encode(text)


def bos_ids(tokenizer: Any) -> list[int]:
    """The beginning-of-sequence id when the tokenizer puts one in front of every text (Gemma, Llama), else []."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    probe = tokenizer.encode("a")
    return [bos] if probe and probe[0] == bos else []


def chat_opening_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Ids of a chat up to the assistant's answer. The template's own markers become control tokens, while every
    message's content is encoded as text (`encode_text`), so untrusted content cannot close a turn."""
    marks = [f"\x00{i}\x00" for i in range(len(messages))]
    stand_ins = [{"role": m["role"], "content": mark} for m, mark in zip(messages, marks)]
    try:
        rendered = tokenizer.apply_chat_template(stand_ins, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template without a system role: fold the instructions into the first turn
        folded = [dict(m) for m in messages[1:]]
        folded[0]["content"] = messages[0]["content"] + "\n\n" + folded[0]["content"]
        return chat_opening_ids(tokenizer, folded)
    ids: list[int] = []
    rest = str(rendered)
    for mark, message in zip(marks, messages):
        template_part, _, rest = rest.partition(mark)
        ids += list(tokenizer.encode(template_part, add_special_tokens=False)) + encode_text(tokenizer, message["content"])
    ids += list(tokenizer.encode(rest, add_special_tokens=False))
    if not ids or ids[0] not in bos_ids(tokenizer):  # templates that do not write <bos> themselves
        ids = bos_ids(tokenizer) + ids
    return ids


def simulation_prefix(tokenizer: Any, explanation: str) -> list[int]:
    """Ids of everything before the first slot line: the chat template's turn opening when the
    tokenizer has one (the lines are then the assistant's answer), else the plain-text header."""
    head = simulation_head(explanation)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": SIMULATE_SYSTEM}, {"role": "user", "content": "Fill in the values."}]
        return chat_opening_ids(tokenizer, messages) + encode_text(tokenizer, head)
    return bos_ids(tokenizer) + encode_text(tokenizer, SIMULATE_SYSTEM + "\n\n" + head)


def simulation_ids(tokenizer: Any, explanation: str, tokens: Sequence[str],
                   prefix: Sequence[int] | None = None) -> SimulationIds:
    """The prompt built from ids piece by piece: prefix, then per token its text, a tab, the slot, a newline."""
    ids = list(prefix if prefix is not None else simulation_prefix(tokenizer, explanation))
    tab, slot, newline = _pieces(tokenizer)
    slots = []
    for token in tokens:
        ids += encode_text(tokenizer, show_token(token)) + tab
        slots.append(len(ids))
        ids += slot + newline
    return SimulationIds(tuple(ids), tuple(slots))


@dataclass(frozen=True)
class PackedPrompt:
    """Several excerpts in one simulation prompt: the prefix once, then each excerpt's lines after a blank line."""

    ids: tuple[int, ...]
    """Prompt token ids."""
    slots: tuple[tuple[int, ...], ...]
    """Per excerpt, the index in `ids` of each token's slot."""


def packed_simulation_ids(tokenizer: Any, explanation: str, excerpts: Sequence[Sequence[str]],
                          max_ids: int = 4096, prefix: Sequence[int] | None = None) -> list[PackedPrompt]:
    """Excerpts packed, in order, into as few prompts of at most max_ids ids as they fit (an excerpt longer
    than that gets a prompt of its own), so the shared instructions are read once per prompt, not per excerpt."""
    head = list(prefix if prefix is not None else simulation_prefix(tokenizer, explanation))
    blank = encode_text(tokenizer, "\n")
    out: list[PackedPrompt] = []
    ids: list[int] = []
    slots: list[tuple[int, ...]] = []
    for tokens in excerpts:
        block = simulation_ids(tokenizer, explanation, tokens, prefix=[])
        if slots and len(ids) + len(blank) + len(block.ids) > max_ids:
            out.append(PackedPrompt(tuple(ids), tuple(slots)))
            slots = []
        if not slots:
            ids = list(head)
        else:
            ids += blank
        slots.append(tuple(len(ids) + s for s in block.slots))
        ids += block.ids
    if slots:
        out.append(PackedPrompt(tuple(ids), tuple(slots)))
    return out


def _pieces(tokenizer: Any) -> tuple[list[int], list[int], list[int]]:
    return encode_text(tokenizer, "\t"), encode_text(tokenizer, SLOT), encode_text(tokenizer, "\n")


def digit_ids(tokenizer: Any) -> list[int]:
    """The single token id of each digit 0..TOP; ValueError if a digit is not one token."""
    out = []
    for d in range(TOP + 1):
        ids = encode_text(tokenizer, str(d))
        if len(ids) != 1:
            raise ValueError(f"the digit {d} is {len(ids)} tokens in this tokenizer")
        if ids[0] == getattr(tokenizer, "unk_token_id", None):
            raise ValueError(f"the digit {d} is not in this tokenizer's vocabulary")
        out.append(ids[0])
    return out
