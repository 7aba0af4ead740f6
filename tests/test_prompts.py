"""Prompt builders (core/prompts.py) and splits (core/splits.py).

Simulator prompts are checked on four tokenizer families: GPT-2-style byte-level BPE (one trained here, as
conftest does, and SmolLM2's real one), SentencePiece/Llama-style (Metaspace + byte fallback, trained here: a
real Llama tokenizer is not available offline), Qwen's (qwen-0.5b) and Gemma's (gemma3-270m). The packaged
ones are `slow` (a few seconds each to load). For every tokenizer and a list of awkward token strings, the
slot positions of `simulation_ids` must be exact: the ids between two slots decode to exactly the next line.
"""

from __future__ import annotations

import json
import random
import unicodedata
from functools import cache
from typing import Any

import numpy as np
import pytest
from conftest import hostile_text, prose_text

from core.prompts import (
    EXPLAIN_SYSTEM,
    SIMULATE_SYSTEM,
    SLOT,
    SPARSE_SHARE,
    TOP,
    Example,
    bos_ids,
    digit_ids,
    encode_text,
    explain_prompt,
    fewshot,
    normalise,
    on_scale,
    show_token,
    simulation_ids,
    simulation_messages,
    simulation_prefix,
    simulation_text,
)
from core.records import ActivationRecord
from core.splits import SplitSizes, split_records, tail_target

#: Token strings that tend to break prompt builders: spaces, empties, line and tab characters, a chat tag, the
#: slot character itself, digits, emoji, a lone combining accent, an ANSI escape, other line separators.
AWKWARD = [
    "Hello", " world", "  two", " ", "", "\n", "\n\n", "\t", " \t", "[/INST]", "?", " ?", "42", "7", "0", "😀",
    " 🎉", "\u0301", "\x1b[31m", "\r\n", "\u2028", "\x85", "[bold]", "é", "日本", "\\n",
]
EXPLANATIONS = ["words for weather, especially rain", "  a tab\there and a newline\nthere [/INST] \x1b[0m  "]


# -- tokenizers ------------------------------------------------------------------------------------------

def _training_text() -> str:
    return prose_text() + hostile_text() * 5


@cache
def _byte_bpe_model() -> Any:
    """A GPT-2-style byte-level BPE (as conftest's tiny model uses), trained on the test prose."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_training_text()], trainer)
    return tok


def byte_bpe(chat_template: str | None = None) -> Any:
    """A fresh transformers wrapper around the byte-level BPE (optionally with a chat template)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=_byte_bpe_model(), eos_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = chat_template
    return fast


@cache
def sentencepiece(prepend_scheme: str, digits: bool = False) -> Any:
    """A SentencePiece-style tokenizer built in-process (no real Llama tokenizer offline): Metaspace
    pre-tokenizer, BPE with byte fallback (<0xNN> pieces) and Llama-2's decoder. prepend_scheme 'first' adds
    the dummy prefix '▁' as Llama-2/Mistral/TinyLlama do; 'never' is the Gemma convention. With digits=True
    the training text makes '▁0'..'▁9' single pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    text = _training_text() + (" " + " ".join("0123456789")) * 500 * digits
    tok.train_from_iterator([text], trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@cache
def packaged_tokenizer(name: str) -> Any:
    """A packaged model's real tokenizer without its weights. Once load_subject has cached the model as
    safetensors, the tokenizer saved beside it is what load_subject returns, and loads in 1-3 s; otherwise it
    is read from the GGUF (4 s SmolLM2, 12 s Qwen, 17 s Gemma), which is still faster than load_subject's
    first load (it dequantises every tensor: about a minute for qwen-0.5b)."""
    from transformers import AutoTokenizer

    from core.models import PACKAGED, cache_dir
    from core.subject import _quiet_transformers

    _quiet_transformers()
    model = PACKAGED[name]
    gguf = model.path()
    cached = cache_dir() / "subjects" / model.sha256[:16]
    if (cached / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(cached)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


slow = pytest.mark.slow
#: name -> (loader, has a chat template)
TOKENIZERS = {
    "byte-bpe": (byte_bpe, False),
    "sentencepiece-no-prefix": (lambda: sentencepiece("never"), False),
    "smollm2-135m": (lambda: packaged_tokenizer("smollm2-135m"), True),
    "qwen-0.5b": (lambda: packaged_tokenizer("qwen-0.5b"), True),
    "gemma3-270m": (lambda: packaged_tokenizer("gemma3-270m"), False),
}
FAST_NAMES = ("byte-bpe", "sentencepiece-no-prefix")


def _params(names: Any) -> list[Any]:
    return [pytest.param(n, id=n, marks=() if n in FAST_NAMES else slow) for n in names]


ALL = _params(TOKENIZERS)
CHAT = _params(n for n, (_, chat) in TOKENIZERS.items() if chat)
NO_CHAT = _params(n for n, (_, chat) in TOKENIZERS.items() if not chat)


@pytest.fixture
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return TOKENIZERS[request.param][0]()


def decode(tok: Any, ids: Any) -> str:
    return tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def encode(tok: Any, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False))


def explanation_line(explanation: str) -> str:
    return f"Description: {show_token(explanation.strip())}\n"


def special_ids(tok: Any) -> set[int]:
    """Ids of the tokenizer's control tokens (special added tokens: bos, eos, chat markers)."""
    return {i for i, t in tok.added_tokens_decoder.items() if t.special}


# -- simulation_ids: exact slots ---------------------------------------------------------------------------

@pytest.mark.parametrize("tokenizer", ALL, indirect=True)
@pytest.mark.parametrize("explanation", EXPLANATIONS, ids=["plain", "hostile"])
def test_slots_are_exact_for_awkward_tokens(tokenizer: Any, explanation: str) -> None:
    tok = tokenizer
    prompt = simulation_ids(tok, explanation, AWKWARD)
    ids, slots = prompt.ids, prompt.slots
    assert len(slots) == len(AWKWARD)
    assert list(slots) == sorted(set(slots))
    slot_id = encode(tok, SLOT)[0]
    assert all(ids[s] == slot_id for s in slots)
    assert decode(tok, [slot_id]) == SLOT
    # The prefix ends with the explanation line; the first token's text and a tab follow it.
    prefix = simulation_prefix(tok, explanation)
    assert list(ids[: len(prefix)]) == prefix
    assert decode(tok, prefix).endswith(explanation_line(explanation))
    assert decode(tok, ids[len(prefix): slots[0]]) == show_token(AWKWARD[0]) + "\t"
    # Between two slots: the slot, a newline, then exactly the next token's visible text and a tab.
    for k in range(1, len(AWKWARD)):
        between = decode(tok, ids[slots[k - 1]: slots[k]])
        assert between == SLOT + "\n" + show_token(AWKWARD[k]) + "\t", (k, AWKWARD[k])
    assert decode(tok, ids[slots[-1]:]) == SLOT + "\n"


@pytest.mark.parametrize("tokenizer", ALL, indirect=True)
def test_slots_match_the_tokens_one_by_one(tokenizer: Any) -> None:
    """Each token alone: the prompt is the prefix, the token's own pieces, then tab, slot and newline."""
    tok = tokenizer
    prefix = simulation_prefix(tok, "x")
    tab, slot, newline = encode(tok, "\t"), encode(tok, SLOT), encode(tok, "\n")
    for token in AWKWARD:
        pieces = encode(tok, show_token(token)) if token else []
        prompt = simulation_ids(tok, "x", [token], prefix)
        assert list(prompt.ids) == prefix + pieces + tab + slot + newline, token
        assert prompt.slots == (len(prefix) + len(pieces) + len(tab),)


@pytest.mark.parametrize("tokenizer", ALL, indirect=True)
def test_given_prefix_is_the_default_prefix(tokenizer: Any) -> None:
    tok = tokenizer
    prefix = simulation_prefix(tok, EXPLANATIONS[1])
    assert simulation_ids(tok, EXPLANATIONS[1], AWKWARD) == simulation_ids(tok, EXPLANATIONS[1], AWKWARD, prefix)
    empty = simulation_ids(tok, EXPLANATIONS[1], [])
    assert empty.slots == () and list(empty.ids) == prefix


@pytest.mark.parametrize("tokenizer", NO_CHAT, indirect=True)
def test_without_chat_template_ids_are_the_plain_text_prompt(tokenizer: Any) -> None:
    """No chat template: the plain header, and the ids decode to exactly simulation_text's prompt."""
    tok = tokenizer
    assert not getattr(tok, "chat_template", None)
    explanation = EXPLANATIONS[0]
    bos = bos_ids(tok)  # Gemma's <bos> comes first, as its model expects; then the plain text
    prefix = simulation_prefix(tok, explanation)
    assert prefix[: len(bos)] == bos
    assert decode(tok, prefix[len(bos):]).startswith(SIMULATE_SYSTEM + "\n\nDescription: ")
    prompt = simulation_ids(tok, explanation, AWKWARD)
    assert decode(tok, prompt.ids[len(bos):]) == simulation_text(explanation, AWKWARD).text


@pytest.mark.parametrize("tokenizer", ALL, indirect=True)
def test_digit_ids_are_ten_single_tokens(tokenizer: Any) -> None:
    tok = tokenizer
    ids = digit_ids(tok)
    assert len(ids) == TOP + 1 == len(set(ids))
    for d, i in enumerate(ids):
        assert decode(tok, [i]) == str(d)
        # The id read at a slot is the one the tokenizer itself uses for that digit in a listing line.
        assert i in encode(tok, f" cat\t{d}\n"), d


def test_digit_ids_see_past_a_dummy_prefix() -> None:
    """A Llama-2-style dummy prefix makes a digit encoded alone '▁' + digit; digit_ids takes the bare digit,
    the piece that follows a tab in a listing line."""
    tok = sentencepiece("first")
    assert len(encode(tok, "7")) == 2
    for d, i in enumerate(digit_ids(tok)):
        assert i in encode(tok, f" cat\t{d}\n") and decode(tok, [i]) == str(d)


def test_digit_ids_refuse_a_tokenizer_without_digit_tokens() -> None:
    """A vocabulary without digits encodes each digit as one <unk>: ten identical 'digit' ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "?": 2, "\t": 3, "\n": 4}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    assert encode(fast, "7") == [0]
    with pytest.raises(ValueError):
        digit_ids(fast)


def test_dummy_prefix_tokenizer_slot_structure() -> None:
    """What holds with a Llama-2-style tokenizer today: one slot per token, at the first id of SLOT's pieces."""
    tok = sentencepiece("first")
    prompt = simulation_ids(tok, EXPLANATIONS[1], AWKWARD)
    assert len(prompt.slots) == len(AWKWARD)
    assert all(prompt.ids[s] == encode_text(tok, SLOT)[0] for s in prompt.slots)
    assert decode(tok, simulation_prefix(tok, EXPLANATIONS[1])).endswith(explanation_line(EXPLANATIONS[1]))


def test_slots_with_a_dummy_prefix_tokenizer() -> None:
    """Llama-2/Mistral-style tokenizers prefix every separately encoded piece with '▁'; the slot token
    is then '▁', not '?', and every line gains spaces the header's lines do not have."""
    tok = sentencepiece("first")
    prompt = simulation_ids(tok, "x", ["Hello", " world"])
    assert len(prompt.slots) == 2
    assert decode(tok, prompt.ids[prompt.slots[0]: prompt.slots[1]]) == SLOT + "\n world\t"


def test_digit_ids_with_dummy_prefix_pieces_are_the_listing_digits() -> None:
    tok = sentencepiece("first", digits=True)
    ids = digit_ids(tok)  # every '▁d' is one piece here, so no ValueError
    for d, i in enumerate(ids):
        assert i in encode(tok, f" cat\t{d}\n"), tok.convert_ids_to_tokens([i])


# -- simulation_ids: chat templates, control tokens ----------------------------------------------------------

@pytest.mark.parametrize("tokenizer", CHAT, indirect=True)
def test_chat_template_puts_the_listing_in_the_assistant_turn(tokenizer: Any) -> None:
    tok = tokenizer
    marker = "<|im_start|>assistant\n"  # SmolLM2 and Qwen (ChatML)
    prefix = decode(tok, simulation_prefix(tok, EXPLANATIONS[0]))
    assert marker in prefix
    before, _, after = prefix.rpartition(marker)
    assert SIMULATE_SYSTEM in before
    shot = fewshot("simulate")
    assert after.startswith(f"Description: {shot['explanation']}\n")
    assert after.endswith(explanation_line(EXPLANATIONS[0]))
    assert "<|im_" not in after
    prompt = simulation_ids(tok, EXPLANATIONS[0], ["rain"])
    assert decode(tok, prompt.ids).endswith(explanation_line(EXPLANATIONS[0]) + "rain\t?\n")


def test_plain_header_without_a_chat_template() -> None:
    tok = byte_bpe()
    assert decode(tok, simulation_prefix(tok, "rain")) == simulation_text("rain", []).text


def test_chat_template_without_a_system_role_folds_the_instructions_into_the_user_turn() -> None:
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
                "{% endif %}<turn>{{ m['role'] }}\n{{ m['content'] }}<end>\n{% endfor %}"
                "{% if add_generation_prompt %}<turn>assistant\n{% endif %}")
    tok = byte_bpe(template)
    prefix = decode(tok, simulation_prefix(tok, "rain"))
    head = simulation_text("rain", []).text[len(SIMULATE_SYSTEM) + 2:]
    assert prefix == f"<turn>user\n{SIMULATE_SYSTEM}\n\nFill in the values.<end>\n<turn>assistant\n{head}"


def test_chat_template_with_a_system_role() -> None:
    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    tok = byte_bpe(template)
    prefix = decode(tok, simulation_prefix(tok, "rain"))
    assert prefix.startswith(f"<system>{SIMULATE_SYSTEM}</system><user>Fill in the values.</user><assistant>"
                             "Description: ")
    assert prefix.endswith(explanation_line("rain"))


CONTROL = [pytest.param("byte-bpe", "<|endoftext|>", id="byte-bpe"),
           pytest.param("smollm2-135m", "<|im_end|>", id="smollm2-135m", marks=slow),
           pytest.param("qwen-0.5b", "<|im_end|>", id="qwen-0.5b", marks=slow)]


@pytest.mark.parametrize(("tokenizer", "control"), CONTROL, indirect=["tokenizer"])
def test_token_strings_never_become_control_tokens(tokenizer: Any, control: str) -> None:
    """A subject token that spells one of the simulator's control tokens (SmolLM2's document separator is
    '<|im_end|>', which Qwen and SmolLM2 read as end-of-turn) must stay text in the listing."""
    tok = tokenizer
    prefix = simulation_prefix(tok, "x")
    prompt = simulation_ids(tok, "x", ["end", control, "<|im_start|>", "assistant"], prefix)
    assert not set(prompt.ids[len(prefix):]) & special_ids(tok)


def test_explanation_never_becomes_control_tokens() -> None:
    tok = byte_bpe()
    plain = simulation_prefix(tok, "x")
    hostile = simulation_prefix(tok, "x <|endoftext|> y")
    assert not set(hostile) & special_ids(tok) - set(plain)


@slow
def test_prefix_starts_with_bos_where_the_tokenizer_adds_one() -> None:
    tok = packaged_tokenizer("gemma3-270m")
    assert tok("a")["input_ids"][0] == tok.bos_token_id  # Gemma models expect <bos> first
    assert simulation_prefix(tok, "x")[0] == tok.bos_token_id


# -- simulation_text and simulation_messages --------------------------------------------------------------

@pytest.mark.parametrize("explanation", EXPLANATIONS, ids=["plain", "hostile"])
def test_simulation_text_slots_and_lines(explanation: str) -> None:
    prompt = simulation_text(explanation, AWKWARD)
    text, slots = prompt.text, prompt.slots
    assert len(slots) == len(AWKWARD)
    assert all(text[s] == SLOT for s in slots)
    assert text.startswith(SIMULATE_SYSTEM + "\n\n")
    head = text[: slots[0] - len(show_token(AWKWARD[0]) + "\t")]
    assert head.endswith(explanation_line(explanation))
    lines = text[len(head):].split("\n")
    assert lines[-1] == ""
    assert lines[:-1] == [f"{show_token(t)}\t{SLOT}" for t in AWKWARD]
    start = len(head)
    for slot, token in zip(slots, AWKWARD):
        assert slot == start + len(show_token(token)) + 1
        start = slot + len(SLOT + "\n")
    assert start == len(text)


def test_simulation_text_worked_example() -> None:
    shot = fewshot("simulate")
    text = simulation_text("rain", ["a"]).text
    listing = "\n".join(f"{t}\t{v}" for t, v in zip(shot["tokens"], shot["values"]))
    assert f"Description: {shot['explanation']}\n{listing}\n\nDescription: rain\na\t?\n" in text


def test_simulation_messages_lines() -> None:
    messages = simulation_messages(EXPLANATIONS[1], AWKWARD)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"].startswith(SIMULATE_SYSTEM)
    body = messages[1]["content"]
    head, _, listing = body.rpartition(explanation_line(EXPLANATIONS[1]))
    assert head
    assert listing.split("\n") == [f"{show_token(t)}\t{SLOT}" for t in AWKWARD]


# -- show_token --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("token", AWKWARD + ["\x00", "\x07", "\x7f", "\u200b", "\ufeff", "\u2029", "\x0b", "\x0c",
                                              "\x1c", "\r", "a\u0301"])
def test_show_token_is_one_inert_line_fragment(token: str) -> None:
    shown = show_token(token)
    assert len(shown.splitlines()) <= 1 and "\t" not in shown
    assert not any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in shown)
    plain = all(unicodedata.category(c) not in ("Cc", "Cf", "Zl", "Zp") for c in token)
    assert (shown == token) == plain


def test_show_token_escapes() -> None:
    assert show_token("a\nb\tc\rd") == "a\\nb\\tc\\rd"
    assert show_token("\x1b[31m") == "\\x1b[31m"
    assert show_token("\u2028\u200b") == "\\u2028\\u200b"
    assert show_token(" é [/INST] 😀\u0301") == " é [/INST] 😀\u0301"


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


# -- splits ----------------------------------------------------------------------------------------------------

def record(kind: str, rank: int, excerpt_id: int, activations: list[float] | None = None) -> ActivationRecord:
    acts = tuple(activations) if activations is not None else (float(excerpt_id % 7) - 3.0, 1.0, -2.0)
    return ActivationRecord(kind, rank, excerpt_id, tuple(f"t{excerpt_id}_{j}" for j in range(len(acts))), acts)


def neuron_records(top: int = 40, bottom: int = 40, rand: int = 20, quantile: int = 5) -> list[ActivationRecord]:
    out = [record("top", r, 1000 + r) for r in range(top)]
    out += [record("bottom", r, 2000 + r) for r in range(bottom)]
    out += [record("random", r, 3000 + r) for r in range(rand)]
    out += [record("quantile", r, 4000 + r) for r in range(quantile)]
    return out


@pytest.mark.parametrize("tail", ["pos", "neg"])
def test_split_is_interleaved_disjoint_and_sized(tail: str) -> None:
    base = 1000 if tail == "pos" else 2000
    splits = split_records(neuron_records(), tail)
    ids = {name: [e.excerpt_id - base if e.kind == "top" else e.excerpt_id for e in getattr(splits, name)]
           for name in ("train", "select", "test")}
    # Ranked records dealt train, test, train, select; randoms test, select.
    assert ids["train"] == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]
    assert ids["test"] == [1, 5, 9, 13, 17, 3000, 3002, 3004, 3006, 3008]
    assert ids["select"] == [3, 7, 11, 15, 19, 3001, 3003, 3005, 3007, 3009]
    all_ids = [e.excerpt_id for name in ("train", "select", "test") for e in getattr(splits, name)]
    assert len(all_ids) == len(set(all_ids)) == 30
    assert all(e.kind == "top" for e in splits.train)
    assert [e.kind for e in splits.test] == ["top"] * 5 + ["random"] * 5
    assert not any(4000 <= i < 5000 for i in all_ids)  # quantile records are not used
    if tail == "pos":
        assert not any(2000 <= i < 3000 for i in all_ids)
    else:
        assert not any(1000 <= i < 2000 for i in all_ids)


def test_split_respects_sizes() -> None:
    splits = split_records(neuron_records(), "pos", SplitSizes(train=3, top=2, random=1))
    assert [e.excerpt_id for e in splits.train] == [1000, 1002, 1004]
    assert [e.excerpt_id for e in splits.test] == [1001, 1005, 3000]
    assert [e.excerpt_id for e in splits.select] == [1003, 1007, 3001]
    few = split_records(neuron_records(top=5, rand=1), "pos")
    assert [e.excerpt_id for e in few.train] == [1000, 1002, 1004]
    assert [e.excerpt_id for e in few.test] == [1001, 3000]
    assert [e.excerpt_id for e in few.select] == [1003]
    empty = split_records([], "pos")
    assert empty.train == empty.select == empty.test == () and empty.scale_max == 0.0


def test_split_is_deterministic_whatever_the_order() -> None:
    records = neuron_records()
    shuffled = list(records)
    random.Random(3).shuffle(shuffled)
    for tail in ("pos", "neg"):
        a, b = split_records(records, tail), split_records(shuffled, tail)
        for name in ("train", "select", "test"):
            left, right = getattr(a, name), getattr(b, name)
            assert [(e.excerpt_id, e.kind, e.tokens) for e in left] == [(e.excerpt_id, e.kind, e.tokens) for e in right]
            assert all(np.array_equal(x.target, y.target) for x, y in zip(left, right))


def test_tails_and_targets() -> None:
    acts = [-3.0, -0.5, 0.0, 0.25, 2.0]
    assert tail_target(acts, "pos").tolist() == [0.0, 0.0, 0.0, 0.25, 2.0]
    assert tail_target(acts, "neg").tolist() == [3.0, 0.5, 0.0, 0.0, 0.0]
    assert tail_target(acts, "neg").dtype == np.float32
    records = [record("top", 0, 1, [1.0, -1.0, 4.0]), record("bottom", 0, 2, [-6.0, 2.0, -0.5]),
               record("top", 1, 3, [0.5]), record("bottom", 1, 4, [-1.0]), record("top", 2, 5, [8.0]),
               record("bottom", 2, 6, [-7.0, -9.0]), record("random", 0, 7, [-2.0, 3.0])]
    pos, neg = split_records(records, "pos"), split_records(records, "neg")
    assert [e.excerpt_id for e in pos.train] == [1, 5] and pos.scale_max == 8.0
    assert [e.excerpt_id for e in neg.train] == [2, 6] and neg.scale_max == 9.0
    assert neg.train[0].target.tolist() == [6.0, 0.0, 0.5] and neg.train[0].kind == "top"
    assert neg.test[0].target.tolist() == [1.0] and neg.test[1].kind == "random"
    assert neg.test[1].target.tolist() == [2.0, 0.0] and pos.test[1].target.tolist() == [0.0, 3.0]


def test_split_rejects_an_unknown_tail() -> None:
    with pytest.raises(ValueError, match="tail"):
        split_records(neuron_records(), "both")
