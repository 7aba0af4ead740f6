"""A corpus's plain text files as documents (corpus.py reads the other sources and formats).

Text is UTF-8. Control characters inside it, NUL included (common in crawled text), are text. Invalid bytes inside a
mostly-UTF-8 file (at most MAX_INVALID_SHARE of its bytes) become U+FFFD and are counted (the `replaced` callback;
`strict` refuses such a file instead); a file with more, one where more than one byte in ten is NUL (binary, or
UTF-16), or a damaged .gz is not text (NotText). Documents are cut at paragraph (blank-line) boundaries, at most
MAX_DOC_CHARS characters each; CRLF line ends become LF.

A file is read TEXT_BLOCK bytes at a time (a .gz's text, decompressed) and judged by its first block, which is the
whole of a file up to that size: a token budget (`collect --max-tokens`) reads only the blocks it needs, and memory
stays bounded whatever the file's size (a text dump of tens of gigabytes was read whole before, however few tokens
were asked for). Wherever the blocks cut it, a file gives the same documents (a paragraph longer than a block aside:
it is cut at a line end).
"""

from __future__ import annotations

import codecs
import gzip
import io
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from neuronscope.core.errors import NeuronscopeError

MAX_DOC_CHARS = 20_000
#: A file with more than this share of NUL bytes is binary (or UTF-16, where every other byte of ASCII text is NUL),
#: not text with stray NULs: a line typed by hand with one NUL in it is text.
MAX_NUL_SHARE = 0.1
#: A file with more than this share of bytes that are not UTF-8 is in another encoding (or binary), not UTF-8 text
#: with stray invalid bytes.
MAX_INVALID_SHARE = 0.001
#: The bytes that UTF-8 decoding with surrogateescape could not decode.
INVALID = re.compile("[\udc80-\udcff]")
#: Bytes of a text file read at once; larger files are read a block at a time.
TEXT_BLOCK = 64 << 20
#: What separates paragraphs: a line end, then one or more lines of spaces and tabs.
_BLANK = re.compile(r"\n(?:[ \t\f\v]*\n)+")
_SPACE = " \t\f\v\n"

#: replaced(path, count): a file (or JSONL line's file) in which `count` invalid bytes became U+FFFD.
Replaced = Callable[[Path, int], None]


class CorpusError(NeuronscopeError):
    """One-line message naming the problem and the fix (shown to the user as is)."""


class NotText(Exception):
    """A file that is not text: its reason, e.g. "it is not UTF-8 text (byte 0xe9 at offset 1,024)"."""


def brief(exc: BaseException) -> str:
    """First line of an exception's message, for one-line CorpusErrors."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def text_documents(path: Path, strict: bool = False, replaced: Replaced | None = None) -> Iterator[str]:
    """A text file's documents; NotText, before any document, where it is not text."""
    try:
        source: io.BufferedIOBase = (gzip.open(path, "rb") if path.name.lower().endswith(".gz")  # noqa: SIM115
                                     else open(path, "rb"))  # (closed by _streamed)
    except OSError as exc:
        raise CorpusError(f"cannot read {path} ({brief(exc)}); check it exists and is readable") from None
    count = [0]
    try:
        blocks = _blocks(path, source, strict, count)
        first = next(blocks)  # judged now: NotText before any document
    except BaseException:
        source.close()
        raise
    return _streamed(path, source, first, blocks, count, replaced)


def split_text(text: str) -> Iterator[str]:
    """Documents of at most MAX_DOC_CHARS characters, cut at blank lines (then lines)."""
    return _documents(_BLANK.split(text))


def _judge_nuls(data: bytes) -> None:
    nuls = data.count(b"\0")
    if nuls > MAX_NUL_SHARE * len(data):
        raise NotText(f"it looks binary ({nuls / len(data):.0%} of its bytes are NUL; UTF-16 text must be converted "
                      "to UTF-8)")


def _replace_invalid(data: bytes, text: str, strict: bool) -> tuple[str, int]:
    """`data` decoded (as `text`, with surrogateescape), its invalid bytes as U+FFFD, and their count; NotText when
    `strict` finds one, or when there are more than MAX_INVALID_SHARE of them."""
    text, bad = INVALID.subn("\ufffd", text)
    if not bad:
        return text, 0
    where = ""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = f"byte 0x{data[exc.start]:02x} at offset {exc.start:,}"
    if strict:
        raise NotText(f"it is not UTF-8 text ({where}; --strict-utf8 refuses invalid bytes)")
    if bad > MAX_INVALID_SHARE * len(data):
        raise NotText(f"it is not UTF-8 text ({bad:,} invalid bytes, the first {where}): convert it to UTF-8")
    return text, bad


def _blocks(path: Path, source: io.BufferedIOBase, strict: bool, count: list[int]) -> Iterator[str]:
    """A file's text a block at a time, gunzipped (a character cut by a block's end decoded whole in the next; a CRLF
    cut so, made LF; the BOM dropped). The first block is judged as text (NotText: binary, another encoding, a
    damaged .gz); later, invalid bytes are counted into count[0] (CorpusError with `strict`), and a .gz that ends
    early or is damaged is a CorpusError."""
    decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    offset, carried_cr = 0, False
    while True:
        try:
            data = source.read(TEXT_BLOCK)
        except (EOFError, OSError, zlib.error) as exc:  # gzip's, for a truncated or damaged stream; or the disk's
            if not isinstance(source, gzip.GzipFile):
                raise CorpusError(f"cannot read {path} ({brief(exc)}); check it exists and is readable") from None
            if offset == 0:
                raise NotText("it is a truncated .gz file (the compressed stream ends early)" if isinstance(
                    exc, EOFError) else f"it is not a valid .gz file ({brief(exc)})") from None
            raise CorpusError(f"cannot read {path} past its first {offset:,} bytes ({brief(exc)}); pass a whole "
                              "file") from None
        final = len(data) < TEXT_BLOCK  # a short read is the end of a file, plain or gunzipped
        text = decoder.decode(data, final)
        if offset == 0:
            _judge_nuls(data)
            text, bad = _replace_invalid(data, text, strict)
            text = text.removeprefix("\ufeff")
        else:
            text, bad = INVALID.subn("\ufffd", text)
            if bad and strict:
                raise CorpusError(f"{path} is not UTF-8 text past its first {offset:,} bytes (--strict-utf8 refuses "
                                  "invalid bytes); convert it to UTF-8 or drop --strict-utf8")
        count[0] += bad
        if carried_cr:
            text = "\r" + text
        carried_cr = not final and text.endswith("\r")
        yield (text[:-1] if carried_cr else text).replace("\r\n", "\n")
        if final:
            return
        offset += len(data)


def _streamed(path: Path, source: io.BufferedIOBase, first: str, blocks: Iterator[str], count: list[int],
              replaced: Replaced | None) -> Iterator[str]:
    """A file's documents, from its first block's text and the blocks after it; the invalid bytes replaced in what
    was read are reported when reading ends (also when a budget stops it part-way)."""
    try:
        with source:
            yield from _documents(_paragraphs(first, blocks))
    finally:
        if count[0] and replaced is not None:
            replaced(path, count[0])


def _paragraphs(first: str, blocks: Iterable[str]) -> Iterator[str]:
    """What _BLANK.split gives of the whole text, from its blocks: a block is split up to its last character that
    is not white space (a separator cannot reach past it), and the rest goes on into the next block; a paragraph that
    grows past a block is cut at a line end."""
    rest = first
    for block in blocks:
        text = rest + block
        end = len(text.rstrip(_SPACE))
        parts = _BLANK.split(text[:end])
        rest = parts.pop() + text[end:]
        yield from parts
        if len(rest) > TEXT_BLOCK:
            cut = rest.rfind("\n") + 1 or len(rest) // MAX_DOC_CHARS * MAX_DOC_CHARS
            yield rest[:cut]
            rest = rest[cut:]
    yield from _BLANK.split(rest)


def _documents(paragraphs: Iterable[str]) -> Iterator[str]:
    """Paragraphs grouped into documents of at most MAX_DOC_CHARS characters (an over-long one cut: _pieces)."""
    pieces = (piece for para in paragraphs for piece in _pieces(para.lstrip("\n").rstrip()) if piece.strip())
    return _grouped(pieces, "\n\n")


def _pieces(para: str) -> Iterator[str]:
    """Split an over-long paragraph at line ends, then every MAX_DOC_CHARS characters."""
    if len(para) <= MAX_DOC_CHARS:
        return iter((para,))
    return _grouped((line[start : start + MAX_DOC_CHARS] for line in para.split("\n")
                     for start in range(0, len(line) or 1, MAX_DOC_CHARS)), "\n")


def _grouped(parts: Iterable[str], joiner: str) -> Iterator[str]:
    """Consecutive parts joined by `joiner` into texts of at most MAX_DOC_CHARS characters."""
    group: list[str] = []
    size = 0
    for part in parts:
        if group and size + len(part) + len(joiner) > MAX_DOC_CHARS:
            yield joiner.join(group)
            group, size = [], 0
        group.append(part)
        size += len(part) + len(joiner)
    if group:
        yield joiner.join(group)
