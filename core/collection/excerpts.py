"""A corpus's documents as fixed-length token windows: tokenized a batch of documents at a time, joined by the
tokenizer's eos token (bos if it has none), cut into consecutive windows numbered in order (the numbers are
stable, so shards merge), then sampled and sharded. The documents come from neuronscope.core.collection.corpus."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neuronscope.core.collection.corpus import (
    CorpusError,
    CorpusSpec,
    Replaced,
    Skipped,
    check_fits_whole,
    describe,
    iter_documents,
)
from neuronscope.core.collection.token_cache import TokenStream, cache_key, cached

_BATCH_CHARS = 1_000_000


@dataclass(frozen=True, eq=False)
class Excerpts:
    """Fixed-length token windows cut from a corpus, sorted by excerpt id."""

    token_ids: np.ndarray
    """[n, length] int32 token ids."""
    excerpt_ids: np.ndarray
    """[n] int64 index of each window in the full cut (before sampling and sharding)."""
    length: int
    """Tokens per excerpt."""
    corpus: str
    """The corpus the excerpts came from and what of it was read (``read_description``)."""


def _token_batches(docs: Iterator[str], tokenizer: Any, batch_chars: int = _BATCH_CHARS) -> Iterator[np.ndarray]:
    """Token ids of the documents joined by eos (or bos), a batch of documents at a time."""
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    first = True
    batch: list[str] = []
    size = 0

    def encode(texts: list[str]) -> np.ndarray:
        nonlocal first
        out = tokenizer(
            texts,
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )["input_ids"]
        flat: list[int] = []
        for ids in out:
            if not ids:
                continue
            if not first and sep is not None:
                flat.append(sep)
            flat.extend(ids)
            first = False
        return np.asarray(flat, dtype=np.int32)

    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= batch_chars or len(batch) >= 4096:
            yield encode(batch)
            batch, size = [], 0
    if batch:
        yield encode(batch)


def cut_excerpts(
    spec: CorpusSpec,
    tokenizer: Any,
    length: int = 64,
    max_excerpts: int | None = None,
    seed: int = 0,
    shard: tuple[int, int] = (0, 1),
    *,
    max_tokens: int | None = None,
    progress: Callable[[int], None] | None = None,
    skipped: Skipped | None = None,
    replaced: Replaced | None = None,
    cache: Path | None = None,
    waiting: Callable[[], None] | None = None,
) -> Excerpts:
    """Cut the corpus into windows of ``length`` tokens; sample, then keep one shard.

    ``tokenizer`` is a Hugging Face (fast) tokenizer; ``progress`` gets the number of tokens
    read so far after each batch of documents; ``max_tokens`` stops reading once that many tokens are in (the
    windows cover exactly the first ``max_tokens``; files past them are never opened); ``skipped`` hears of every
    file of a folder that is not text, ``replaced`` of every file whose invalid bytes became U+FFFD. With ``cache``
    (a folder), the token ids are tokenized once for every process that names the same folder and corpus, and each
    reads only its own windows (neuronscope.core.collection.token_cache): for shards; ``waiting`` is told when this
    one waits for another that is tokenizing.
    """
    if length < 1:
        raise CorpusError(f"excerpt length must be at least 1 token (got {length}); raise --length")
    if max_excerpts is not None and max_excerpts < 1:
        raise CorpusError(f"--max-excerpts must be at least 1 (got {max_excerpts})")
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise CorpusError(f"shard {index}/{count} is invalid; use 0 <= index < count")
    if max_tokens is not None and max_tokens < length:
        raise CorpusError(f"--max-tokens {max_tokens:,} is less than one excerpt of {length} tokens; raise it")
    if max_tokens is None:
        check_fits_whole(spec, _memory())

    def read() -> TokenStream:
        return _tokenize(spec, tokenizer, max_tokens, progress, skipped, replaced)

    if cache is None:
        stream = read()
    else:
        stream, from_cache = cached(cache, cache_key(describe(spec), tokenizer, max_tokens), read, waiting)
        if from_cache:  # say what the reading said
            for kind, path, value in stream.notes:
                if kind == "skipped" and skipped is not None:
                    skipped(Path(path), value)
                elif kind == "replaced" and replaced is not None:
                    replaced(Path(path), int(value))
            if progress is not None:
                progress(len(stream.tokens))
    read_ids, total = stream.tokens, len(stream.tokens)
    n = total // length
    if n == 0:
        raise CorpusError(
            f"corpus gives only {total} tokens, fewer than one excerpt of {length}; add text or lower --length"
        )
    corpus = read_description(spec, stream.digest, total, complete=max_tokens is None or total < max_tokens,
                              notes=stream.notes)
    windows = read_ids[: n * length].reshape(n, length)  # [n, length]
    ids = np.arange(n, dtype=np.int64)
    if max_excerpts is not None and max_excerpts < n:
        rng = np.random.default_rng(seed)
        ids = np.sort(rng.choice(n, size=max_excerpts, replace=False)).astype(np.int64)
    ids = ids[index::count]
    return Excerpts(
        token_ids=np.ascontiguousarray(windows[ids], dtype=np.int32),
        excerpt_ids=ids,
        length=length,
        corpus=corpus,
    )


def _memory() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _tokenize(spec: CorpusSpec, tokenizer: Any, max_tokens: int | None, progress: Callable[[int], None] | None,
              skipped: Skipped | None, replaced: Replaced | None) -> TokenStream:
    """The corpus's token ids (the first max_tokens of them), hashed as they stream through; the files skipped or
    repaired are heard of by the callbacks and noted."""
    notes: list[tuple[str, str, str]] = []

    def skip(path: Path, reason: str) -> None:
        notes.append(("skipped", str(path), reason))
        if skipped is not None:
            skipped(path, reason)

    def repair(path: Path, count: int) -> None:
        notes.append(("replaced", str(path), str(count)))
        if replaced is not None:
            replaced(path, count)

    # Under a budget, a batch of documents is no bigger than the budget needs (about 8 characters a token), so
    # little is read past it.
    batch_chars = _BATCH_CHARS if max_tokens is None else min(_BATCH_CHARS, max(16_384, 8 * max_tokens))
    chunks: list[np.ndarray] = []
    total = 0
    digest = hashlib.sha256()  # of the token ids read: the corpus's identity, without a second pass over it
    for chunk in _token_batches(iter_documents(spec, skip, repair), tokenizer, batch_chars):
        if max_tokens is not None:
            chunk = chunk[: max_tokens - total]
        chunks.append(chunk)
        digest.update(np.ascontiguousarray(chunk, dtype="<i4").tobytes())
        total += len(chunk)
        if progress is not None:
            progress(total)
        if max_tokens is not None and total >= max_tokens:
            break  # the documents after are never read
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
    return TokenStream(tokens, digest.hexdigest(), tuple(notes))


def read_description(spec: CorpusSpec, digest: str, tokens: int, complete: bool,
                     notes: Sequence[tuple[str, str, str]] = ()) -> str:
    """What a run records as its corpus: the manifest (corpus.describe: the source, its files, bytes and newest
    modification time) and what was read: all of it or the first `tokens` token ids, their sha256, and how many
    files were skipped as not text and invalid bytes replaced (TokenStream.notes). Runs and shards that read the same
    text agree wherever the files are (corpus.same_corpus); a changed file is another corpus. The default corpus is
    pinned by the sha256 of its text: its name says it all when read whole."""
    if spec.source == "default" and complete:
        return describe(spec)
    said = [f"{'all' if complete else 'first'} {tokens:,} tokens, sha256 {digest[:12]}"]
    skipped = sum(kind == "skipped" for kind, _, _ in notes)
    if skipped:
        said.append(f"{skipped:,} file{'s' * (skipped != 1)} skipped as not text")
    fixed = [int(value) for kind, _, value in notes if kind == "replaced"]
    if fixed:
        said.append(f"{sum(fixed):,} invalid byte{'s' * (sum(fixed) != 1)} replaced in {len(fixed):,} "
                    f"file{'s' * (len(fixed) != 1)}")
    return describe(spec) + f" ({'; '.join(said)})"
