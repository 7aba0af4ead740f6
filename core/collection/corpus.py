"""Turn a ``--corpus`` argument into fixed-length token excerpts.

Sources (``CorpusSpec.source``):

- ``"default"``: the embedded default corpus (below);
- a path: a text file (any extension that decodes as UTF-8, ``.gz`` too), a ``.jsonl`` /
  ``.jsonl.gz`` file (one JSON object per line, text in ``text_field``), a ``.parquet`` file
  (column ``text_field``), or a folder holding any of these (read recursively, sorted by
  relative path, hidden files and folders skipped; files that are not text are skipped and reported, each
  with its reason, through the ``skipped`` callback and in the corpus description);
- ``"hf:<dataset id>[:<config>][:<split>]"``: a Hugging Face dataset, streamed with the
  optional ``datasets`` package (split defaults to ``train``).

Text files are UTF-8 (text_files.py: what is text, how a file becomes documents, how a large one is read a block at
a time). Control characters inside text, NUL included (common in crawled text), are text: they are stored as they are
and shown inertly. JSONL lines get the same treatment of invalid bytes. neuronscope.core.collection.excerpts
tokenizes the documents and cuts them into numbered windows.

Default corpus: The Jargon File, version 4.4.7 (Eric S. Raymond and contributors, 2003),
which is in the public domain ("to be freely used, shared, and modified"). The file
``data/corpus/jargon-4.4.7.txt.gz`` is Debian's ``jargon-text`` 4.4.7-4.1
``/usr/share/doc/jargon-text/jargon.txt.gz``, byte for byte. The builder verifies the sha256 of
its text, drops the tables of contents and headword indexes (runs of three or more bare
one-line paragraphs), unwraps hard-wrapped paragraphs, verifies the sha256 of the result and
caches it under ``$NEURONSCOPE_CACHE`` (default ``~/.cache/neuronscope``) ``/corpus/``. If the
shipped file is missing it falls back to an installed ``jargon-text`` package, then to
``apt-get download jargon-text`` (same sha256 check). Result: 1.42 M characters in 72
documents, 360,918 SmolLM2 tokens, 5,639 excerpts of 64 tokens; identical on every machine.
"""

from __future__ import annotations

import datetime
import gzip
import json
import os
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from neuronscope.core.collection.text_files import (
    INVALID,
    CorpusError,
    NotText,
    Replaced,
    brief,
    split_text,
    text_documents,
)

_HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


#: skipped(path, reason): a file of a corpus folder that was not read, and why.
Skipped = Callable[[Path, str], None]


@dataclass(frozen=True)
class CorpusSpec:
    """What the user asked for."""

    source: str
    """``"default"``, a file or folder path, or ``"hf:<dataset id>[:<config>][:<split>]"``."""
    text_field: str = "text"
    """Field (JSONL, Hugging Face) or column (Parquet) that holds the text."""
    strict_utf8: bool = False
    """Refuse a file with any invalid UTF-8 byte (by default the bytes become U+FFFD and are counted)."""


# ---------------------------------------------------------------- description


def describe(spec: CorpusSpec) -> str:
    """A corpus's manifest, from a listing, nothing read: the source, and for files their count, bytes and newest
    modification time. A run adds what it read, the count and sha256 of the token ids (excerpts.read_description),
    so that no terabyte is hashed twice and a corpus that changed is a different corpus."""
    field = "" if spec.text_field == "text" else f", field {spec.text_field!r}"
    if spec.source == "default":
        from neuronscope.core.collection.default_corpus import DESCRIPTION

        return DESCRIPTION
    if spec.source.startswith("hf:"):
        name, config, split = _parse_hf(spec.source)
        return f"hf:{name}:{config + ':' if config else ''}{split} (streamed{field})"
    root, stats = _listing(spec)
    size = sum(stat.st_size for stat in stats)
    newest = max((stat.st_mtime for stat in stats), default=0.0)
    when = datetime.datetime.fromtimestamp(newest, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
    strict = ", strict UTF-8" if spec.strict_utf8 else ""
    return (f"files:{root} ({len(stats):,} file{'' if len(stats) == 1 else 's'}, {size:,} bytes, newest {when} UTC"
            f"{field}{strict})")


def _listing(spec: CorpusSpec) -> tuple[Path, list[os.stat_result]]:
    """A file corpus's root and its files' stats (nothing read)."""
    root = _existing_path(spec.source)
    return root, [path.stat() for path in (_list_files(root) if root.is_dir() else [root])]


#: Bytes of text a token takes, at the fewest: English prose takes about 4 with a BPE tokenizer, source code about 3.
BYTES_PER_TOKEN = 3


def check_fits_whole(spec: CorpusSpec, memory: int) -> None:
    """Before a corpus is read whole (no token budget): CorpusError where its token ids would not fit in `memory`
    bytes. Read whole, a corpus's ids are kept in memory (8 bytes a token at the peak, as they are joined) to cut its
    excerpts, and a corpus of terabytes would take hours to tokenize before failing for memory. Files count at
    BYTES_PER_TOKEN of their size (a compressed one's, so it passes more easily); streamed datasets are not judged."""
    if spec.source == "default" or spec.source.startswith("hf:"):
        return
    root, stats = _listing(spec)
    size = sum(stat.st_size for stat in stats)
    need = 8 * size // BYTES_PER_TOKEN
    if need > memory:
        raise CorpusError(f"{root} holds {size / 1e9:,.1f} GB of files, up to {size / BYTES_PER_TOKEN / 1e9:,.1f} "
                          f"billion tokens, whose ids (some {need / 1e9:,.0f} GB) would not fit in this machine's "
                          f"{memory / 1e9:,.0f} GB of memory: pass --max-tokens (10M, 100M) to read the corpus's "
                          "first N tokens")


#: What a run read, at the end of its corpus description: "(all|first N tokens, sha256 DIGEST[; what was skipped])".
_READ = re.compile(r" \((?:all|first) ([\d,]+) tokens, sha256 ([0-9a-f]+)(?:; [^()]*)?\)$")


def same_corpus(a: str, b: str) -> bool:
    """Whether two runs' corpus descriptions name the same text: the same token ids read, wherever the files were
    (paths and modification times differ by host and copy)."""
    read_a, read_b = _READ.search(a), _READ.search(b)
    if read_a and read_b:
        return read_a.groups() == read_b.groups()
    return a == b


# ---------------------------------------------------------------- documents


def iter_documents(spec: CorpusSpec, skipped: Skipped | None = None,
                   replaced: Replaced | None = None) -> Iterator[str]:
    """Yield the corpus's documents in a deterministic order; CorpusError on bad input. A folder's files that are
    not text are passed to `skipped` with the reason, and left out; files whose invalid bytes became U+FFFD to
    `replaced` with their count."""
    if spec.source == "default":
        from neuronscope.core.collection.default_corpus import default_corpus_text

        yield from split_text(default_corpus_text())
        return
    if spec.source.startswith("hf:"):
        yield from _iter_hf(spec)
        return
    path = _existing_path(spec.source)
    files = _list_files(path) if path.is_dir() else [path]
    if not files:
        raise CorpusError(f"corpus folder {path} has no files; add text, JSONL or Parquet files")
    count = n_skipped = 0
    for file in files:
        try:
            docs = _file_docs(file, spec, replaced)
        except NotText as reason:
            if not path.is_dir():
                raise CorpusError(f"corpus file {path} is not text: {reason}; pass a UTF-8 text, JSONL or Parquet "
                                  "file") from None
            n_skipped += 1
            if skipped is not None:
                skipped(file, str(reason))
            continue
        for doc in docs:
            count += 1
            yield doc
    if count == 0 and path.is_dir():
        raise CorpusError(
            f"corpus folder {path} has no text ({len(files)} files, {n_skipped} not text, "
            "the rest empty); add UTF-8 text, JSONL or Parquet files"
        )
    if count == 0:
        raise CorpusError(f"corpus file {path} has no text (it is empty); add text or pass another file")


def _existing_path(source: str) -> Path:
    if not source.strip():
        raise CorpusError("no corpus given; pass 'default', a file or folder, or hf:<dataset id>")
    path = Path(source).expanduser()
    if path.is_file() or path.is_dir():
        return path.resolve()
    if path.exists():
        raise CorpusError(f"corpus path {source} is not a regular file or folder; pass a file or folder")
    if _HF_ID.fullmatch(source) and not path.suffix:
        raise CorpusError(
            f"corpus path {source} does not exist; for a Hugging Face dataset write "
            f"hf:{source}, else pass an existing file or folder"
        )
    raise CorpusError(
        f"corpus path {source} does not exist; pass an existing file or folder, 'default', or hf:<dataset id>"
    )


def _list_files(root: Path) -> list[Path]:
    """Regular, non-hidden files under root, sorted by relative path."""
    found: list[Path] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(Path(folder, n) for n in names if not n.startswith("."))
    return sorted((p for p in found if p.is_file()), key=lambda p: p.relative_to(root).parts)


def _file_docs(path: Path, spec: CorpusSpec, replaced: Replaced | None) -> Iterator[str]:
    """Documents of one file; NotText for a text file that is not text."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        return _iter_parquet(path, spec.text_field)
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _iter_jsonl(path, spec, replaced)
    return text_documents(path, spec.strict_utf8, replaced)


def _iter_jsonl(path: Path, spec: CorpusSpec, replaced: Replaced | None) -> Iterator[str]:
    field = spec.text_field
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    fix = f"write one JSON object per line with a {field!r} field"
    bad = 0
    try:
        with opener(path, "rb") as lines:
            for number, raw in enumerate(lines, 1):
                where = f"{path} line {number}"
                line, invalid = INVALID.subn("\ufffd", raw.decode("utf-8", "surrogateescape"))
                if invalid and spec.strict_utf8:
                    raise CorpusError(f"{where} is not UTF-8 text (--strict-utf8 refuses invalid bytes); {fix}")
                bad += invalid
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CorpusError(f"{where} is not valid JSON ({exc.msg}); {fix}") from None
                if not isinstance(obj, dict):
                    raise CorpusError(f"{where} is a JSON {type(obj).__name__}, not an object; {fix}")
                if field not in obj:
                    has = ", ".join(repr(k) for k in list(obj)[:6]) or "no fields"
                    raise CorpusError(f"{where} has no {field!r} field (it has {has}); pass --text-field NAME")
                value = obj[field]
                if value is not None and not isinstance(value, str):
                    raise CorpusError(
                        f"{where}: field {field!r} is a {type(value).__name__}, not text; "
                        "pass --text-field NAME of a text field"
                    )
                if value and value.strip():
                    yield value
    except (OSError, EOFError, zlib.error) as exc:
        raise CorpusError(f"cannot read {path} ({brief(exc)}); pass a valid JSONL or .jsonl.gz file") from None
    if bad and replaced is not None:
        replaced(path, bad)


def _iter_parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(
            f"{path} is not a readable Parquet file ({brief(exc)}); pass a valid .parquet file"
        ) from None
    schema = table.schema_arrow
    if field not in schema.names:
        has = ", ".join(repr(n) for n in schema.names[:6]) or "no columns"
        raise CorpusError(f"{path} has no {field!r} column (it has {has}); pass --text-field NAME")
    kind = schema.field(field).type
    if str(kind) not in ("string", "large_string", "string_view"):
        raise CorpusError(f"{path} column {field!r} is {kind}, not text; pass --text-field NAME of a text column")
    for batch in table.iter_batches(batch_size=1024, columns=[field]):
        for value in batch.column(0).to_pylist():
            if value and value.strip():
                yield value


def _parse_hf(source: str) -> tuple[str, str | None, str]:
    parts = source[3:].split(":")
    if not parts[0] or len(parts) > 3 or not all(parts):
        raise CorpusError(
            f"cannot read {source!r}; write hf:<dataset id>[:<config>][:<split>], e.g. hf:roneneldan/TinyStories:train"
        )
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    return parts[0], None, parts[1] if len(parts) == 2 else "train"


def _iter_hf(spec: CorpusSpec) -> Iterator[str]:
    name, config, split = _parse_hf(spec.source)
    try:
        import datasets
    except ImportError:
        raise CorpusError(
            "hf: corpora need the 'datasets' package, which is not installed; run "
            "`pip install datasets` (and be online), or pass a local text/JSONL/Parquet path"
        ) from None
    field = spec.text_field
    try:
        rows = iter(datasets.load_dataset(name, config, split=split, streaming=True))
        for row in rows:
            if field not in row:
                has = ", ".join(repr(k) for k in list(row)[:6])
                raise CorpusError(
                    f"Hugging Face dataset {name} has no {field!r} field (it has {has}); pass --text-field NAME"
                )
            value = row[field]
            if isinstance(value, str) and value.strip():
                yield value
    except CorpusError:
        raise
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, bad split: many types
        raise CorpusError(
            f"cannot load Hugging Face dataset {name!r} split {split!r} ({brief(exc)}); check the id "
            "and that you are online, or save it as JSONL/Parquet and pass the file"
        ) from None
