"""A corpus's token stream kept on disk for the shards of a collection: the first shard to take the lock tokenizes
the corpus (or its budget) once and writes the token ids; every other shard, started at the same time or later, on
this host or another that sees the folder, waits for it and then reads only its own windows from the file
(memory-mapped). A cache is named by what decides the tokens: the corpus's manifest (its files, bytes and newest
modification time, neuronscope.core.collection.corpus.describe), the tokenizer and the token budget; a changed file
is another cache."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

#: Bump when the cached layout or the tokenizing changes.
FORMAT = 1


@dataclass(frozen=True)
class TokenStream:
    """The token ids a corpus gives, with what a collection reports of its reading."""

    tokens: np.ndarray
    """[total] int32 (memory-mapped when it came from a cache)."""
    digest: str
    """sha256 of the token ids (little-endian int32)."""
    notes: tuple[tuple[str, str, str], ...]
    """("skipped", file, why) or ("replaced", file, invalid bytes): the files the reading skipped or repaired."""


def tokenizer_key(tokenizer: Any) -> str:
    """What names a tokenizer's behaviour: its serialised form where it has one (fast tokenizers), else its name and
    size."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else f"{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}"
    return hashlib.sha256(text.encode()).hexdigest()


def cache_key(description: str, tokenizer: Any, max_tokens: int | None) -> str:
    """The name of a corpus's token cache."""
    parts = json.dumps([FORMAT, description, tokenizer_key(tokenizer), max_tokens])
    return hashlib.sha256(parts.encode()).hexdigest()[:24]


def cached(folder: Path, key: str, make: Callable[[], TokenStream],
           waiting: Callable[[], None] | None = None) -> tuple[TokenStream, bool]:
    """The token stream of cache `key` in `folder` and whether it was read from there (True) or made by `make` (under
    the folder's lock for that key, so one process tokenizes while the others wait: `waiting` is told when this one
    must) and written there, whole, before the lock is let go."""
    folder.mkdir(parents=True, exist_ok=True)
    data, meta = folder / f"{key}.npy", folder / f"{key}.json"
    with open(folder / f"{key}.lock", "a") as lock:
        try:  # the lock is released when the file closes, also when its process dies
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process is tokenizing (a corpus budget of 100M tokens: minutes)
            if waiting is not None:
                waiting()
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not (data.exists() and meta.exists()):
            stream = make()
            _write(data, lambda out: np.save(out, np.ascontiguousarray(stream.tokens, dtype="<i4")))
            _write(meta, lambda out: out.write(json.dumps({"digest": stream.digest, "notes": stream.notes}).encode()))
            return stream, False
    read = json.loads(meta.read_text())
    return TokenStream(np.load(data, mmap_mode="r"), read["digest"], tuple(tuple(n) for n in read["notes"])), True


def _write(path: Path, save: Callable[[BinaryIO], Any]) -> None:
    """Write a file whole, then move it into place (a crash leaves no half-written cache)."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as out:
        save(out)
    os.replace(partial, path)
