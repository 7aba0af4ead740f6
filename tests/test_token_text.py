"""A sequence's token text (Subject.token_strings): a character whose bytes several tokens share reads whole."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_prompts import byte_bpe, sentencepiece
from test_subject_hooks import _subject


@pytest.mark.parametrize("make", [byte_bpe, lambda: sentencepiece("never")], ids=["byte-bpe", "sentencepiece"])
def test_token_strings_give_a_split_character_whole(make: Any) -> None:
    """A character whose bytes several tokens share reads whole, given to the token that completes it (the tokens
    before it ''), where each token decoded alone shows U+FFFD; a next-token ranking (`apart`) stays one by one."""
    tokenizer = make()
    subject = _subject("gpt2", tokenizer)
    text = "שלום 😀 中文 e\u0301 a\ufffdb ok"
    ids = tokenizer.encode(text, add_special_tokens=False)
    alone = [tokenizer.decode([i]) for i in ids]
    assert sum("\ufffd" in t for t in alone) > 10  # the stand-ins split every such character into its bytes
    got = subject.token_strings(torch.tensor(ids))
    assert len(got) == len(ids) and "".join(got).replace(" ", "") == tokenizer.decode(ids).replace(" ", "")
    assert [t for t in got if "\ufffd" in t] == ["\ufffd"]  # only the corpus's own replacement character
    for char in ("ש", "ם", "😀", "中", "\u0301"):
        at = got.index(char)
        pieces = tokenizer.encode(char, add_special_tokens=False)
        assert got[at - len(pieces) + 1 : at] == [""] * (len(pieces) - 1)
    assert subject.token_strings(ids, apart=True) == alone
