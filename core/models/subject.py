"""Subject models: load one (packaged name, GGUF file, folder or hub id) and read its MLP neurons.

A neuron is the input of the MLP output projection, captured by one forward pre-hook per layer
(`down_proj` for Llama/Qwen/Gemma/Mistral-style gated MLPs, `c_proj` for GPT-2, `dense_4h_to_h` for
GPT-NeoX), so the model's own activation function is what gets recorded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuronscope.core.errors import NeuronscopeError
from neuronscope.core.models.packaged import PACKAGED, ModelError, cache_dir

#: (path to the list of blocks, path from a block to the MLP output projection), tried in order.
MLP_LAYOUTS = (
    ("model.layers", "mlp.down_proj"),
    ("model.language_model.layers", "mlp.down_proj"),
    ("transformer.h", "mlp.c_proj"),
    ("gpt_neox.layers", "mlp.dense_4h_to_h"),
)


class SubjectError(NeuronscopeError):
    """A subject-model problem, as one line naming the problem and the fix."""


class _StopForward(Exception):
    """Raised by the last hook needed: the rest of the forward pass is skipped."""


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
        try:
            return torch.device(requested)
        except RuntimeError:
            raise SubjectError(f"unknown device {requested!r}: use cpu, cuda or cuda:N") from None
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


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def mlp_projections(model: Any) -> list[Any]:
    """The MLP output projection of every block, or SubjectError for an unknown architecture."""
    for blocks_path, proj_path in MLP_LAYOUTS:
        try:
            blocks = _get(model, blocks_path)
            projections = [_get(block, proj_path) for block in blocks]
        except (AttributeError, TypeError):
            continue
        if projections:
            return projections
    arch = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise SubjectError(
        f"architecture {arch!r} is not supported: neuronscope reads MLP neurons of Llama/Qwen/Gemma/Mistral-style "
        "(mlp.down_proj), GPT-2 (mlp.c_proj) and GPT-NeoX (mlp.dense_4h_to_h) models"
    )


def _blocks(model: Any) -> tuple[list[Any], str]:
    """The transformer blocks and the path of the MLP module within one."""
    for blocks_path, proj_path in MLP_LAYOUTS:
        try:
            return list(_get(model, blocks_path)), proj_path.rsplit(".", 1)[0]
        except (AttributeError, TypeError):
            continue
    return [], "mlp"


def _in_features(projection: Any) -> int:
    if hasattr(projection, "in_features"):
        return int(projection.in_features)
    return int(projection.weight.shape[0])  # GPT-2's Conv1D stores [in, out]


class Subject:
    """A loaded model whose MLP neurons can be read, batch by batch."""

    def __init__(self, model: Any, tokenizer: Any, *, name: str, revision: str, device: Any, dtype: Any) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.revision = revision
        self.device = device
        self.dtype = dtype
        self.projections = mlp_projections(model)
        self.blocks, self.mlp_path = _blocks(model)
        self.n_layers = len(self.projections)
        self.n_neurons = _in_features(self.projections[0])
        self.architecture = getattr(model.config, "model_type", type(model).__name__)
        self.prefix_ids = _bos_prefix(tokenizer)
        self._strings: dict[int, str] = {}

    def layer_device(self, layer: int) -> Any:
        """Where a layer's activations are (its MLP's device: the subject's, unless a device map spread the model)."""
        return self.projections[layer].weight.device

    @property
    def context(self) -> int | None:
        """The longest sequence the model takes (its position table), if its config says."""
        config = self.model.config
        for name in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = getattr(config, name, None) or getattr(getattr(config, "text_config", None), name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @contextmanager
    def _hooks(self, layers: tuple[int, ...], out: dict[int, Any]) -> Iterator[None]:
        last = max(layers)
        handles = []

        def make(layer: int) -> Callable[..., None]:
            def hook(_module: Any, args: tuple[Any, ...]) -> None:
                out[layer] = args[0]
                if layer == last:
                    raise _StopForward

            return hook

        try:
            for layer in layers:
                handles.append(self.projections[layer].register_forward_pre_hook(make(layer)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def activations(self, token_ids: Any, layers: tuple[int, ...]) -> dict[int, Any]:
        """Neuron activations for a batch of excerpts.  token_ids [B, T] -> {layer: [B, T, F]}."""
        import torch

        if not layers or not all(0 <= layer < self.n_layers for layer in layers):
            raise SubjectError(f"layers {layers} are not all within 0-{self.n_layers - 1}")
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        if self.prefix_ids:
            prefix = torch.tensor(self.prefix_ids, dtype=torch.long).expand(ids.shape[0], -1)
            ids = torch.cat([prefix, ids], 1)
        ids = to_device(ids, self.device)
        out: dict[int, Any] = {}
        with torch.inference_mode(), self._hooks(layers, out):
            try:
                self.model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
        skip = len(self.prefix_ids)
        return {layer: acts[:, skip:, :] for layer, acts in out.items()}

    def capture(self, token_ids: Any, layer: int, point: str) -> Any:
        """The model's hidden state at a hook point (neuronscope.core.models.sparse.POINTS) of a layer for a batch:
        token_ids [B, T] -> [B, T, d] (the prefix dropped). The forward pass stops there."""
        import torch

        if not 0 <= layer < self.n_layers:
            raise SubjectError(f"layer {layer} is not within 0-{self.n_layers - 1} of {self.name}")
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        if self.prefix_ids:
            ids = torch.cat([torch.tensor(self.prefix_ids, dtype=torch.long).expand(ids.shape[0], -1), ids], 1)
        block = self.blocks[layer]
        module = _get(block, self.mlp_path) if point in ("mlp_in", "mlp_out") else block
        seen: list[Any] = []

        def before(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen.append(args[0] if args else kwargs["hidden_states"])
            raise _StopForward

        def after(_module: Any, _args: Any, output: Any) -> None:
            seen.append(output[0] if isinstance(output, tuple) else output)
            raise _StopForward

        if point in ("resid_pre", "mlp_in"):
            handle = module.register_forward_pre_hook(before, with_kwargs=True)
        elif point in ("resid_post", "mlp_out"):
            handle = module.register_forward_hook(after)
        else:
            raise SubjectError(f"unknown hook point {point!r}: use resid_pre, resid_post, mlp_in or mlp_out")
        try:
            with torch.inference_mode():
                self.model(input_ids=to_device(ids, self.device), use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return seen[0][:, len(self.prefix_ids):, :]

    def bare_forward(self, token_ids: Any) -> None:
        """The model's plain forward pass on a batch, for benchmarks."""
        import torch

        ids = torch.as_tensor(token_ids, dtype=torch.long).to(self.device)
        with torch.inference_mode():
            self.model(input_ids=ids, use_cache=False, logits_to_keep=1)

    def token_strings(self, token_ids: Any) -> list[str]:
        """Each token decoded on its own (partial UTF-8 shows as U+FFFD)."""
        out = []
        for tid in (int(t) for t in token_ids):
            text = self._strings.get(tid)
            if text is None:
                text = self._strings[tid] = self.tokenizer.decode([tid])
            out.append(text)
        return out


def to_device(tensor: Any, device: Any) -> Any:
    """A host tensor on `device`; to a GPU through pinned memory, so that the host does not wait for the queued work."""
    if getattr(device, "type", device) != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _bos_prefix(tokenizer: Any) -> list[int]:
    """[bos] when the tokenizer adds one by default (Gemma), else []: models expect what they saw in training."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if len(with_special) > len(plain) and with_special[0] == bos else []


# -- loading ----------------------------------------------------------------------------------------

def load_subject(
    model: str, *, device: str | None = None, dtype: str | None = None, status: Callable[[str], None] | None = None,
    device_map: str | None = None,
) -> Subject:
    """Load a subject model; SubjectError/ModelError for every failure a user can fix. `device_map` (auto, balanced,
    sequential) places the layers across the GPUs, through accelerate, for a model larger than one GPU."""
    say = status or (lambda _msg: None)
    source = resolve_source(model)
    if device_map is not None and device is not None:
        raise SubjectError("--device and --device-map both place the model: pass one of them")
    dev = choose_device(device)
    dt = choose_dtype(dtype, dev)
    place = {"device_map": device_map} if device_map is not None else {}
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
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / "subjects" / revision[:16]
    if (cached / "config.json").exists() and (cached / "model.safetensors").exists():
        say(f"loading {gguf.name} from the safetensors cache")
        return (
            AutoModelForCausalLM.from_pretrained(cached, dtype=dtype, **place),
            AutoTokenizer.from_pretrained(cached),
        )
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


def _folder_digest(folder: Path) -> str:
    """A digest of a model folder's content: every file that decides the model's behaviour (config,
    weights, tokenizer), each file hashed once per version (memoised by size and mtime)."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and (path.suffix in (".json", ".safetensors", ".bin", ".pt", ".model", ".txt", ".gguf")):
            digest.update(f"{path.name}:{_file_digest(path)}\n".encode())
    return digest.hexdigest()
