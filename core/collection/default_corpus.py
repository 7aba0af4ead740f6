"""The default corpus: The Jargon File 4.4.7 (public domain), shipped in data/corpus/.

The shipped file is Debian's `jargon-text` 4.4.7-4.1 `/usr/share/doc/jargon-text/jargon.txt.gz`,
byte for byte. Building verifies the sha256 of its text, drops the tables of contents and headword
indexes, unwraps hard-wrapped paragraphs, verifies the sha256 of the result and caches it. If the
shipped file is missing, an installed `jargon-text` package or `apt-get download jargon-text`
(same checks) stand in. Identical on every machine.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import zlib
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from neuronscope.core.collection.corpus import CorpusError

DEFAULT_NAME = "jargon-file-4.4.7"
_JARGON_FILE = "jargon-4.4.7.txt.gz"
_JARGON_RAW_SHA256 = "40dfb4b98191a670a09a183d5798d50f243d23fdbd1495dcc0aca2ce5895ba97"
_JARGON_TEXT_SHA256 = "a772368d3904882ae18e0af53d44b5d3c37237ccf911af65668fdb33ebb32d5f"
_SYSTEM_JARGON = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
DESCRIPTION = f"default:{DEFAULT_NAME}@{_JARGON_TEXT_SHA256[:12]}"
"""How runs record the default corpus (see neuronscope.core.collection.corpus.describe)."""


def _cache_dir() -> Path:
    return Path(os.environ.get("NEURONSCOPE_CACHE") or Path.home() / ".cache" / "neuronscope")


def default_corpus_text() -> str:
    """Text of the default corpus, built once, verified by sha256 and cached."""
    target = _cache_dir() / "corpus" / f"{DEFAULT_NAME}-{_JARGON_TEXT_SHA256[:12]}.txt"
    try:
        data = target.read_bytes()
        if hashlib.sha256(data).hexdigest() == _JARGON_TEXT_SHA256:
            return data.decode("utf-8")
    except OSError:
        pass
    text = _normalise_jargon(_jargon_source().decode("utf-8"))
    data = text.encode("utf-8")
    got = hashlib.sha256(data).hexdigest()
    if got != _JARGON_TEXT_SHA256:
        raise CorpusError(
            f"default corpus built with sha256 {got[:12]}, expected {_JARGON_TEXT_SHA256[:12]}; "
            "this is a neuronscope bug: report it, and pass --corpus PATH meanwhile"
        )
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:  # an unwritable cache only costs a rebuild next time
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, target)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return text


def _jargon_source() -> bytes:
    """The Jargon File text from the first place that has the expected bytes."""
    for path in (_packaged(), _SYSTEM_JARGON):
        data = _verified_gunzip(path)
        if data is not None:
            return data
    data = _apt_download_jargon()
    if data is not None:
        return data
    raise CorpusError(
        f"cannot build the default corpus: data/corpus/{_JARGON_FILE} is missing or damaged and "
        "`apt-get download jargon-text` failed; reinstall neuronscope from a full checkout, or "
        "run `apt-get update` and retry, or pass --corpus PATH"
    )


def _packaged() -> Traversable:
    """The copy inside the package (data/corpus in a checkout), wherever neuronscope is installed or imported from."""
    return resources.files("neuronscope.data").joinpath("corpus", _JARGON_FILE)


def _verified_gunzip(path: Traversable) -> bytes | None:
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error):
        return None
    return data if hashlib.sha256(data).hexdigest() == _JARGON_RAW_SHA256 else None


def _apt_download_jargon() -> bytes | None:
    """Fetch Debian's jargon-text with apt-get download (no root needed, needs apt lists)."""
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(
                ["apt-get", "download", "-q", "jargon-text"],
                cwd=tmp,
                capture_output=True,
                timeout=300,
                check=True,
            )
            debs = sorted(Path(tmp).glob("jargon-text_*.deb"))
            if not debs:
                return None
            subprocess.run(
                ["dpkg-deb", "-x", str(debs[0]), str(Path(tmp, "x"))],
                capture_output=True,
                timeout=120,
                check=True,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return _verified_gunzip(Path(tmp, "x", *_SYSTEM_JARGON.parts[1:]))


def _normalise_jargon(text: str) -> str:
    """Drop tables, contents lists and headword indexes; unwrap hard-wrapped paragraphs."""
    paras = [p.strip() for p in re.split(r"\n[ \t]*\n", text)]
    paras = [p for p in paras if p and not re.search("[\u2500-\u257f]", p)]  # no tables
    bare = [
        "\n" not in p and len(p) <= 80 and not re.match(r"[:\[•(\d]", p) and not re.search(r"[.!?}\]):;,\"”]$", p)
        for p in paras
    ]
    kept: list[str] = []
    i = 0
    while i < len(paras):
        j = i
        while j < len(paras) and bare[j]:
            j += 1
        if j - i < 3:  # runs of three or more bare lines are indexes, not prose
            kept.extend(paras[i : max(j, i + 1)])
        i = max(j, i + 1)
    return "\n\n".join(" ".join(line.strip() for line in p.split("\n")) for p in kept) + "\n"
