"""Resolving --model names, and choosing devices and dtypes."""


from __future__ import annotations

from typing import Any

import pytest
import torch

from neuronscope.core.models.loading import choose_device, choose_dtype, resolve_source
from neuronscope.core.models.packaged import PACKAGED
from neuronscope.core.models.subject import SubjectError

VOCAB = 100
N_LAYERS = 3
CPU = torch.device("cpu")


# -- sources, devices, dtypes -------------------------------------------------------------------------

def test_resolve_source_packaged_and_hub() -> None:
    for name in PACKAGED:
        src = resolve_source(name)
        assert (src.kind, src.location, src.name) == ("packaged", name, name)
    src = resolve_source("openai-community/gpt2")
    assert (src.kind, src.location) == ("hub", "openai-community/gpt2")


def test_resolve_source_files_and_folders(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SubjectError, match="does not exist"):
        resolve_source(str(tmp_path / "missing.gguf"))
    with pytest.raises(SubjectError, match="does not exist"):
        resolve_source("missing.gguf")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    src = resolve_source(str(gguf))
    assert (src.kind, src.location) == ("gguf", str(gguf.resolve()))
    assert resolve_source("model.gguf").location == str(gguf.resolve())
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(SubjectError, match="not a .gguf"):
        resolve_source(str(other))
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(SubjectError, match="no config.json"):
        resolve_source(str(folder))
    (folder / "config.json").write_text("{}")
    src = resolve_source(str(folder))
    assert (src.kind, src.location) == ("folder", str(folder.resolve()))
    # A relative "owner/name" that exists on disk is a folder, not a hub id.
    (tmp_path / "owner" / "name").mkdir(parents=True)
    (tmp_path / "owner" / "name" / "config.json").write_text("{}")
    assert resolve_source("owner/name").kind == "folder"


@pytest.mark.parametrize("garbage", ["not a model", "a/b/c", "./nowhere/x", "/no/such/dir", "~/nope"])
def test_resolve_source_garbage(garbage: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SubjectError, match="unknown model") as err:
        resolve_source(garbage)
    for name in PACKAGED:
        assert name in str(err.value)


def test_choose_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_dtype("float32", CPU) is torch.float32
    assert choose_dtype("fp32", CPU) is torch.float32
    assert choose_dtype("bf16", CPU) is torch.bfloat16
    assert choose_dtype("bfloat16", CPU) is torch.bfloat16
    assert choose_dtype("float16", CPU) is torch.float16
    assert choose_dtype("fp16", CPU) is torch.float16
    for bad in ("float8", "int8", "Float32"):
        with pytest.raises(SubjectError, match="unknown dtype"):
            choose_dtype(bad, CPU)
    import neuronscope.core.models.loading as subject_module

    monkeypatch.setattr(subject_module, "cpu_has_bf16", lambda: False)
    assert choose_dtype(None, CPU) is torch.float32
    assert choose_dtype("auto", CPU) is torch.float32
    monkeypatch.setattr(subject_module, "cpu_has_bf16", lambda: True)
    assert choose_dtype("auto", CPU) is torch.bfloat16


def test_choose_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_device("cpu") == CPU
    with pytest.raises(SubjectError, match="unknown device"):
        choose_device("nonsense")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SubjectError, match="no CUDA"):
        choose_device("cuda")
    with pytest.raises(SubjectError, match="no CUDA"):
        choose_device("cuda:1")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)  # (it was an internal error, exit 1)
    with pytest.raises(SubjectError, match=r"--device mps asked for, but this machine has no Apple GPU \(MPS\)"):
        choose_device("mps")
    with pytest.raises(SubjectError, match="use cpu, cuda, cuda:N or mps"):
        choose_device("tpu")
    assert choose_device(None).type == "cpu"
