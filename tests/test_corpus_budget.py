"""Reading a corpus against memory: a token budget (--max-tokens) honoured exactly with nothing after it read, and a
corpus too large to read whole refused before any of it is read."""

from __future__ import annotations

import gzip
import re

import pytest
from test_corpus import byte_tokenizer, write

from neuronscope.core.collection.corpus import CorpusError, CorpusSpec, same_corpus
from neuronscope.core.collection.excerpts import cut_excerpts


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return byte_tokenizer(eos_token="<eos>")


def test_max_tokens_is_honoured_exactly_and_nothing_after_is_read(tmp_path, tok):
    """The windows are exactly those of the first N tokens of the whole cut; the files after them are never opened
    (a binary one there is not even reported); the run is named by what it read, so shards of one budget agree and
    another budget is another corpus."""
    write(tmp_path / "a.txt", "\n\n".join(f"paragraph {i} of plain prose that goes on" for i in range(600)))
    write(tmp_path / "b.txt", "more prose after the budget")
    whole = cut_excerpts(CorpusSpec(str(tmp_path)), tok, length=8)
    write(tmp_path / "z.bin", bytes(range(256)))  # sorted after the text: read only by a cut that gets that far
    left_out: list[str] = []
    part = cut_excerpts(CorpusSpec(str(tmp_path)), tok, length=8, max_tokens=43,
                        skipped=lambda path, _why: left_out.append(path.name))
    assert part.token_ids.tolist() == whole.token_ids[:5].tolist() and part.excerpt_ids.tolist() == list(range(5))
    assert left_out == []
    assert re.search(r"\(3 files, [\d,]+ bytes, newest [\d-]+ [\d:]+ UTC\) \(first 43 tokens, sha256 [0-9a-f]{12}\)$",
                     part.corpus)
    shard = cut_excerpts(CorpusSpec(str(tmp_path)), tok, length=8, max_tokens=43, shard=(1, 2))
    assert shard.excerpt_ids.tolist() == [1, 3] and same_corpus(shard.corpus, part.corpus)
    assert not same_corpus(cut_excerpts(CorpusSpec(str(tmp_path)), tok, length=8, max_tokens=51).corpus, part.corpus)
    with pytest.raises(CorpusError, match="--max-tokens 7 is less than one excerpt of 8 tokens"):
        cut_excerpts(CorpusSpec(str(tmp_path)), tok, length=8, max_tokens=7)


def test_a_corpus_too_large_to_read_whole_is_refused_before_reading(tmp_path, tok):
    """Read whole, a corpus's token ids are held in memory: a terabyte of files (sparse here: nothing on disk) is
    refused at once, in one line naming --max-tokens, where it would have been tokenized for hours and then failed;
    with a budget, only the first tokens are read (the terabyte, sorted after them, is never opened)."""
    write(tmp_path / "a.txt", "\n\n".join(f"paragraph {i} of plain prose that goes on" for i in range(50)))
    with open(tmp_path / "b.txt", "wb") as huge:
        huge.truncate(1 << 40)
    with pytest.raises(CorpusError, match=r"holds 1,099.5 GB of files, up to 366.5 billion tokens, whose ids \(some "
                                          r"2,932 GB\) would not fit in this machine's [\d,]+ GB of memory: pass "
                                          r"--max-tokens \(10M, 100M\) to read the corpus's first N tokens"):
        cut_excerpts(CorpusSpec(str(tmp_path)), tok, length=8)
    assert len(cut_excerpts(CorpusSpec(str(tmp_path)), tok, length=8, max_tokens=64).excerpt_ids) == 8


def _text_with_edges() -> bytes:
    """Text whose blocks, however cut, split characters of two to four bytes, CRLFs and blank lines of spaces and tabs
    between paragraphs; with a BOM, NULs and a few invalid bytes past its start."""
    paragraphs = []
    for i in range(2000):
        gap = "\r\n\r\n" if i % 2 else "\n \t\n\n" if i % 3 else "\n\n \t\n" if i % 5 else "\n\n"
        paragraphs.append(f"paragraph {i}: caf\u00e9 \u4e2d\u6587 \U0001f600\r\nits second line\x00{gap}")
    data = ("\ufeff" + "".join(paragraphs)).encode()
    first, second = data.index(b"paragraph 300:"), data.index(b"paragraph 500:")
    return data[:first] + b"\xff" + data[first:second] + b"\xc3" + data[second:]


@pytest.mark.parametrize("block", [61, 64, 127, 1000, 4096])
@pytest.mark.parametrize("name", ["a.txt", "a.txt.gz"])
def test_a_large_text_file_read_a_block_at_a_time_gives_what_it_gives_read_whole(tmp_path, monkeypatch, block, name):
    """A file larger than a block streams (judged by its first block): the same documents, and the same count of
    invalid bytes replaced, as reading it whole, wherever the blocks cut it."""
    from neuronscope.core.collection import text_files
    from neuronscope.core.collection.corpus import iter_documents

    data = _text_with_edges()
    path = write(tmp_path / name, gzip.compress(data) if name.endswith(".gz") else data)

    def read() -> tuple[list[str], list[int]]:
        counts: list[int] = []
        return list(iter_documents(CorpusSpec(str(path)), replaced=lambda _p, n: counts.append(n))), counts

    whole = read()
    assert whole[1] == [2] and len(whole[0]) > 1
    monkeypatch.setattr(text_files, "TEXT_BLOCK", block)
    assert read() == whole


def test_a_budget_reads_only_the_blocks_it_needs(tmp_path, monkeypatch, tok):
    """Under --max-tokens a large file is read only as far as the budget: a .gz damaged past that point is collected
    from; read whole, it is refused in one line at the damage."""
    from neuronscope.core.collection import text_files

    monkeypatch.setattr(text_files, "TEXT_BLOCK", 4096)
    text = "\n\n".join(f"paragraph {i} of plain prose that goes on" for i in range(40_000)).encode()
    packed = gzip.compress(text)
    write(tmp_path / "a.txt.gz", packed[: len(packed) // 2])  # cut off mid-stream
    part = cut_excerpts(CorpusSpec(str(tmp_path)), tok, length=8, max_tokens=800)
    assert len(part.excerpt_ids) == 100
    with pytest.raises(CorpusError, match=r"cannot read \S+a.txt.gz past its first [\d,]+ bytes \(.*\); pass a whole "
                                          r"file"):
        cut_excerpts(CorpusSpec(str(tmp_path)), tok, length=8)
