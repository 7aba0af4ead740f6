"""Simulator prompt builders (core/prompts.py); the explainer prompt and the splits have their own files.

Simulator prompts are checked on four tokenizer families: GPT-2-style byte-level BPE (one trained here, as
conftest does, and SmolLM2's real one), SentencePiece/Llama-style (Metaspace + byte fallback, trained here: a
real Llama tokenizer is not available offline), Qwen's (qwen-0.5b) and Gemma's (gemma3-270m). The packaged
ones are `slow` (a few seconds each to load). For every tokenizer and a list of awkward token strings, the
slot positions of `simulation_ids` must be exact: the ids between two slots decode to exactly the next line.
"""

from __future__ import annotations

import json
import unicodedata
from functools import cache
from typing import Any

import pytest
from conftest import hostile_text, prose_text

from neuronscope.core.llm.prompt_ids import bos_ids, digit_ids, encode_text, simulation_ids, simulation_prefix
from neuronscope.core.llm.prompts import (
    SIMULATE_SYSTEM,
    SLOT,
    fewshot,
    show_token,
    simulation_messages,
    simulation_text,
)
from neuronscope.core.records import TOP

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

    from neuronscope.core.models.loading import _quiet_transformers
    from neuronscope.core.models.packaged import PACKAGED, cache_dir

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
