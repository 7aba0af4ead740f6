"""Loading a subject model: what kind of name it is (packaged, GGUF file, folder or hub id), which device and dtype
it runs in, and the load itself (a GGUF dequantised once and cached as safetensors; digests as revisions)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuronscope.core.models.packaged import PACKAGED, ModelError, cache_dir
from neuronscope.core.models.subject import Subject, SubjectError

if TYPE_CHECKING:
    from neuronscope.core.models.sparse import SparseCoder
    from neuronscope.core.records import RunInfo


@dataclass(frozen=True)
class SubjectSource:
    """Where a model's weights come from."""

    kind: str
    """packaged, gguf, folder or hub."""
    location: str
    """GGUF path, folder or hub id."""
    name: str
    """What the user typed."""


def resolve_source(model: str) -> SubjectSource:
    """Decide what kind of model name this is, without loading anything."""
    if model in PACKAGED:
        return SubjectSource("packaged", model, model)
    path = Path(model).expanduser()
    if path.suffix == ".gguf" or path.is_file():
        if not path.exists():
            raise SubjectError(f"model file {path} does not exist: check the path")
        if path.suffix != ".gguf":
            raise SubjectError(f"model file {path} is not a .gguf file: pass a GGUF file or a model folder")
        return SubjectSource("gguf", str(path.resolve()), model)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise SubjectError(f"{path} has no config.json: pass a Hugging Face model folder or a .gguf file")
        return SubjectSource("folder", str(path.resolve()), model)
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return SubjectSource("hub", model, model)
    names = ", ".join(PACKAGED)
    raise SubjectError(
        f"unknown model {model!r}: use a packaged name ({names}), a .gguf file, a model folder "
        "or a Hugging Face id such as openai-community/gpt2"
    )


def choose_device(requested: str | None = None) -> Any:
    """CUDA when present, else MPS, else CPU; an explicit request wins (and is checked)."""
    import torch

    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise SubjectError(f"--device {requested} asked for, but this machine has no CUDA GPU: use --device cpu")
        mps = getattr(torch.backends, "mps", None)
        if requested.startswith("mps") and not (mps and mps.is_available()):
            raise SubjectError(f"--device {requested} asked for, but this machine has no Apple GPU (MPS): "
                               "use --device cpu")
        try:
            return torch.device(requested)
        except RuntimeError:
            raise SubjectError(f"unknown device {requested!r}: use cpu, cuda, cuda:N or mps") from None
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), where bf16 is much faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_dtype(requested: str | None, device: Any) -> Any:
    """bf16 on GPUs that support it and CPUs with native bf16; fp32 otherwise."""
    import torch

    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if requested and requested != "auto":
        if requested not in names:
            raise SubjectError(f"unknown dtype {requested!r}: use auto, float32, bfloat16 or float16")
        return names[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


def load_subject(
    model: str, *, device: str | None = None, dtype: str | None = None, status: Callable[[str], None] | None = None,
    device_map: str | None = None, gpus: tuple[int, ...] | None = None,
) -> Subject:
    """Load a subject model; SubjectError/ModelError for every failure a user can fix. `device_map` (auto, balanced,
    sequential) places the layers across the GPUs, through accelerate, for a model larger than one GPU: those of
    `gpus` alone where given (a torchrun rank's share of its node's), each with its free memory."""
    say = status or (lambda _msg: None)
    source = resolve_source(model)
    if device_map is not None and device is not None:
        raise SubjectError("--device and --device-map both place the model: pass one of them")
    dev = choose_device(device)
    dt = choose_dtype(dtype, dev)
    if device_map is not None and dev.type != "cuda":
        say(f"--device-map {device_map} spreads a model over GPUs, and this machine has none: it runs on the {dev.type}")
    place: dict[str, Any] = {"device_map": device_map} if device_map is not None else {}
    if device_map is not None and gpus:
        import torch

        place["max_memory"] = {gpu: torch.cuda.mem_get_info(gpu)[0] for gpu in gpus}  # the others are not used
    _quiet_transformers()
    try:
        if source.kind in ("packaged", "gguf"):
            if source.kind == "packaged":
                say(f"verifying packaged weights of {model}")
                gguf = PACKAGED[model].path()
                revision = PACKAGED[model].sha256
            else:
                gguf = Path(source.location)
                revision = _file_digest(gguf)
            hf_model, tokenizer = _load_gguf_cached(gguf, revision, dt, say, place)
        else:
            hf_model, tokenizer, revision = _load_transformers(source, dt, say, place)
    except (ModelError, SubjectError):
        raise
    except _damaged_weights() as err:
        raise SubjectError(f"cannot load model {model!r}: its weight files are damaged or incomplete "
                           f"({type(err).__name__}: {str(err).splitlines()[0]}); copy or download them again") from None
    except OSError as err:
        raise SubjectError(f"cannot load model {model!r}: {str(err).splitlines()[0]}") from None
    except (ValueError, KeyError, RuntimeError) as err:
        raise SubjectError(f"cannot load model {model!r} ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if device_map is None:
        hf_model.to(dev)
    else:  # the inputs go where the embeddings are; each layer's activations come out on its own device
        dev = hf_model.get_input_embeddings().weight.device
    return Subject(hf_model, tokenizer, name=model, revision=revision, device=dev, dtype=dt)


def _damaged_weights() -> tuple[type[BaseException], ...]:
    """Errors of reading a truncated or corrupt safetensors file."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - transformers installs safetensors
        return ()
    return (SafetensorError,)


def _quiet_transformers() -> None:
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    for name in ("transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _silence_gguf_progress() -> None:
    """transformers' GGUF loader draws its own tqdm bar on stderr, which would tear through ours."""
    import functools

    from tqdm.auto import tqdm

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - a transformers without GGUF support fails later, clearly
        return
    if hasattr(gguf_utils, "tqdm"):
        gguf_utils.tqdm = functools.partial(tqdm, disable=True)


def _file_digest(path: Path) -> str:
    """sha256 of a file, memoised by path, size and mtime."""
    stat = path.stat()
    index_path = cache_dir() / "digests.json"
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    index: dict[str, str] = {}
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
        except ValueError:
            index = {}
    if key not in index:
        digest = hashlib.sha256()
        with path.open("rb") as src:
            while block := src.read(1 << 22):
                digest.update(block)
        index[key] = digest.hexdigest()
        index_path.write_text(json.dumps(index))
    return index[key]


def _load_gguf_cached(gguf: Path, revision: str, dtype: Any, say: Callable[[str], None],
                      place: dict[str, Any]) -> tuple[Any, Any]:
    """Load a GGUF once (slow: every tensor dequantised), keep a safetensors copy, reload from it (placed across
    devices as `place` says)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / "subjects" / revision[:16]
    cached.parent.mkdir(parents=True, exist_ok=True)
    with open(cached.with_name(cached.name + ".lock"), "a") as lock:
        # One process dequantises while the others (torchrun's ranks, started together) wait, then read its copy:
        # each would otherwise hold the whole float32 model at once and write over the others' files.
        fcntl.flock(lock, fcntl.LOCK_EX)  # let go when the file closes, also when this process dies
        if not ((cached / "config.json").exists() and (cached / "model.safetensors").exists()):
            return _dequantised(gguf, cached, dtype, say, place)
    say(f"loading {gguf.name} from the safetensors cache")
    return (
        AutoModelForCausalLM.from_pretrained(cached, dtype=dtype, **place),
        AutoTokenizer.from_pretrained(cached),
    )


def _dequantised(gguf: Path, cached: Path, dtype: Any, say: Callable[[str], None],
                 place: dict[str, Any]) -> tuple[Any, Any]:
    """_load_gguf_cached's first time: the GGUF dequantised, written as safetensors at `cached`, and returned."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say(f"loading {gguf.name} (first time: dequantising, then caching as safetensors)")
    _silence_gguf_progress()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained until its quantisation markers are cleared.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False  # type: ignore[assignment]
    partial = cached.with_name(cached.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if cached.exists():
        import shutil

        shutil.rmtree(cached)
    partial.rename(cached)
    if place:  # placed by accelerate: load the copy just written
        return AutoModelForCausalLM.from_pretrained(cached, dtype=dtype, **place), tokenizer
    return model.to(dtype), tokenizer


def _load_transformers(source: SubjectSource, dtype: Any, say: Callable[[str], None],
                       place: dict[str, Any]) -> tuple[Any, Any, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source.kind == "folder":
        say(f"loading {source.location}")
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **place)
        tokenizer = AutoTokenizer.from_pretrained(source.location)
        return model, tokenizer, _folder_digest(Path(source.location))
    say(f"loading {source.location} from the Hugging Face hub cache or network")
    try:
        try:  # a model already in the hub cache loads without touching the network
            model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, local_files_only=True, **place)
            tokenizer = AutoTokenizer.from_pretrained(source.location, local_files_only=True)
        except OSError:
            model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **place)
            tokenizer = AutoTokenizer.from_pretrained(source.location)
    except OSError as err:
        raise SubjectError(
            f"cannot load {source.location!r} from the Hugging Face hub ({str(err).splitlines()[0][:120]}): "
            "check the id and the network, or download it elsewhere and pass its folder"
        ) from None
    return model, tokenizer, str(getattr(model.config, "_commit_hash", None) or source.location)


def run_subject(run: RunInfo, *, device: str | None = None, dtype: str | None = None,
                status: Callable[[str], None] | None = None) -> tuple[Subject, SparseCoder | None]:
    """A run's subject model, loaded (a one-line error naming how to install it where it is missing), and for a run of
    sparse-coder latents the coder, found again where the run read it. Says through `status` when the model is not
    the run's exact revision; SubjectError when its shape is not the run's."""
    from neuronscope.core.ids import layers_text
    from neuronscope.core.models.sparse import recorded

    subject = load_subject(run.model, device=device, dtype=dtype, status=status)
    if subject.revision != run.model_revision and status is not None:
        status(f"note: {run.model} is not the exact model of run {run.run_id} (revision {subject.revision[:12]}, the "
               f"run's {run.model_revision[:12]}): activations may not match its excerpts")
    if (not run.latents and subject.n_neurons != run.neurons_per_layer) or max(run.layers) >= subject.n_layers:
        raise SubjectError(f"{run.model} has {subject.n_layers} layers of {subject.n_neurons} neurons, not the run's "
                           f"layers {layers_text(run.layers)} of {run.neurons_per_layer}: pass the run's model's store")
    return subject, recorded(run.units) if run.latents else None


def _folder_digest(folder: Path) -> str:
    """A digest of a model folder's content: every file that decides the model's behaviour (config,
    weights, tokenizer), each file hashed once per version (memoised by size and mtime)."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and (path.suffix in (".json", ".safetensors", ".bin", ".pt", ".model", ".txt", ".gguf")):
            digest.update(f"{path.name}:{_file_digest(path)}\n".encode())
    return digest.hexdigest()
