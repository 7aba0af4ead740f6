"""Sparse coders (SAEs and transcoders) read from the files their libraries write, and their latents computed.

Two layouts are read: through the library that defines each (sae_lens, EleutherAI's sparsify: the optional `sae`
extra, `pip install 'neuronscope[sae]'`) where it is installed, else directly from `cfg.json` and a safetensors file,
so neither library is needed:

- SAELens: a folder with `cfg.json` (`hook_name`, under `metadata` since SAELens 6, such as `blocks.8.hook_resid_pre`;
  `architecture` standard,
  jumprelu or topk, `apply_b_dec_to_input`) and `sae_weights.safetensors` (`W_enc` [d_in, d_sae], `b_enc`, `W_dec`
  [d_sae, d_in], `b_dec`, and `threshold` for JumpReLU). A transcoder has `d_out` or a `hook_name_out`.
- EleutherAI sparsify: a folder per hook point named after it (`layers.8` is the residual stream after block 8,
  `layers.8.mlp` the MLP's output) with `cfg.json` (`k`, `transcode`) and `sae.safetensors` (`encoder.weight`
  [d_sae, d_in], `encoder.bias`, `W_dec` [d_sae, d_in], `b_dec`); always TopK. A transcoder reads the MLP's input.

A hook point is where the coder reads the model: `resid_pre` (a block's input), `resid_post` (its output),
`mlp_in` (its MLP's input, after the norm) or `mlp_out` (its MLP's output), at a layer.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuronscope.core.errors import NeuronscopeError

POINTS = ("resid_pre", "resid_post", "mlp_in", "mlp_out")
#: SAELens (TransformerLens) hook names -> hook points.
_LENS_POINTS = {"hook_resid_pre": "resid_pre", "hook_resid_post": "resid_post", "hook_mlp_out": "mlp_out",
                "ln2.hook_normalized": "mlp_in", "hook_mlp_in": "mlp_in"}


class SparseError(NeuronscopeError):
    """A sparse coder that cannot be read or used, as one line naming the problem and the fix."""


@dataclass(frozen=True, eq=False)
class SparseCoder:
    """A sparse coder's weights (torch tensors, float32) and how it reads the model."""

    layer: int
    point: str
    """One of POINTS: where it reads the model (a transcoder writes the MLP's output)."""
    activation: str
    """relu, jumprelu or topk."""
    w_enc: Any
    """[d_in, d_sae]."""
    b_enc: Any
    w_dec: Any
    """[d_sae, d_in] (d_out for a transcoder): latent i's decoder direction is row i."""
    b_dec: Any
    subtract_b_dec: bool
    """Whether b_dec is subtracted from the input before encoding."""
    k: int = 0
    """Latents kept per token (topk)."""
    threshold: Any = None
    """[d_sae] (jumprelu)."""
    transcoder: bool = False
    source: str = ""
    """Where it came from and a digest of its weights: `sparsify:/path/layers.8 (sha256 …)`."""
    reader: str = "files"
    """What read it: `files` (directly), or the library and its version, e.g. `sae_lens 6.54.12`."""

    def on(self, device: Any) -> SparseCoder:
        """The same coder with its weights on `device` (moved once, not per batch)."""
        from dataclasses import replace

        move = {name: getattr(self, name).to(device) for name in ("w_enc", "b_enc", "w_dec", "b_dec")}
        if self.threshold is not None:
            move["threshold"] = self.threshold.to(device)
        return replace(self, **move)

    def check_fits(self, subject: Any) -> None:
        """SparseError unless the subject has the coder's layer and the width it reads (every hook point a coder
        reads has the residual stream's width)."""
        config = subject.model.config
        hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))
        if self.w_enc.shape[0] != hidden or self.layer >= subject.n_layers:
            raise SparseError(f"the sparse coder reads {self.w_enc.shape[0]} dimensions at layer {self.layer}, but "
                              f"{subject.name} has {subject.n_layers} layers of {hidden}: pass a coder trained on "
                              "this model")

    @property
    def width(self) -> int:
        return int(self.w_enc.shape[1])

    def encode(self, x: Any) -> Any:
        """Latents [..., d_sae] of inputs [..., d_in] (computed in float32)."""
        import torch

        x = x.float()
        if self.subtract_b_dec:
            x = x - self.b_dec.to(x.device)
        pre = x @ self.w_enc.to(x.device) + self.b_enc.to(x.device)
        if self.activation == "jumprelu":
            return torch.where(pre > self.threshold.to(x.device), pre, torch.zeros_like(pre)).relu()
        acts = pre.relu()
        if self.activation == "topk":
            top = torch.topk(acts, min(self.k, acts.shape[-1]), dim=-1)
            acts = torch.zeros_like(acts).scatter_(-1, top.indices, top.values)
        return acts


def units_text(coder: SparseCoder) -> str:
    """What a run records as its units when they are this coder's latents (read back by `recorded`)."""
    return f"latents of {coder.source} at {coder.point} of layer {coder.layer}"


def recorded(units: str) -> SparseCoder:
    """The sparse coder a run recorded (`units_text`), loaded again from its folder and checked by its digest."""
    found = re.match(r"latents of \w+:(.+) \(sha256 ([0-9a-f]+)\) at ", units)
    if not found:
        raise SparseError(f"a run records its units as {units!r}, not a sparse coder neuronscope reads")
    coder = load_sparse(found.group(1))
    if f"(sha256 {found.group(2)})" not in coder.source:
        raise SparseError(f"the sparse coder at {found.group(1)} is not the one the run collected (its weights "
                          "changed): put that coder back there")
    return coder


def load_sparse(path: str | Path, library: bool | None = None) -> SparseCoder:
    """A sparse coder from a SAELens or sparsify folder; SparseError naming what is wrong otherwise. `library`: read
    it through its library (True: SparseError when that is not installed), from the files (False), or through the
    library where it is installed (None)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise SparseError(f"no sparse coder at {folder}: pass the folder holding its cfg.json and weights")
    for weights, read, module, name in (("sae_weights.safetensors", _saelens, "sae_lens", "SAE"),
                                        ("sae.safetensors", _sparsify, "sparsify", "SparseCoder")):
        if (folder / weights).exists():
            loader = _library(module, name, library)
            if loader is None:
                return read(folder)
            try:
                return read(folder, loader)
            except SparseError:
                if library:
                    raise
                return read(folder)  # what the library cannot read (an older layout) may still be read directly
    inner = sorted(p.name for p in folder.iterdir() if (p / "sae.safetensors").exists() or
                   (p / "sae_weights.safetensors").exists())
    if inner:
        shown = ", ".join(inner[:6]) + (", …" if len(inner) > 6 else "")
        raise SparseError(f"{folder} holds a sparse coder per hook point ({shown}): pass one of those folders")
    raise SparseError(f"{folder} has no sae_weights.safetensors (SAELens) or sae.safetensors (sparsify): pass a "
                      "sparse coder's folder")


def _read(folder: Path, weights: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        cfg = json.loads((folder / "cfg.json").read_text())
        tensors = load_file(str(folder / weights))
    except FileNotFoundError:
        raise SparseError(f"{folder} has no cfg.json: pass a sparse coder's folder as its library saved it") from None
    except (OSError, ValueError, SafetensorError) as err:
        raise SparseError(f"cannot read the sparse coder in {folder} ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:160]}): its files are damaged; copy them again") from None
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].float().contiguous().numpy().tobytes())
    return cfg, {name: t.float() for name, t in tensors.items()}, digest.hexdigest()[:12]


def _need(tensors: dict[str, Any], folder: Path, *names: str) -> list[Any]:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise SparseError(f"the sparse coder in {folder} lacks {', '.join(missing)}: it is not a layout neuronscope "
                          "reads (SAELens or sparsify)")
    return [tensors[n] for n in names]


def _library(module: str, name: str, wanted: bool | None) -> Any:
    """The library's loader class `name` when it is to be used, else None."""
    if wanted is False:
        return None
    import importlib

    try:
        found = getattr(importlib.import_module(module), name, None)
    except ImportError:
        found = None
    if found is None and wanted:
        raise SparseError(f"the {module} library is not installed (or is another package of that name): "
                          "pip install 'neuronscope[sae]', or read the coder's files directly")
    return found


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    for distribution in {"sae_lens": ("sae-lens",), "sparsify": ("eai-sparsify", "sparsify")}[module]:
        try:
            return f"{module} {version(distribution)}"
        except PackageNotFoundError:
            continue
    return module


def _through(library: str, folder: Path, load: Any) -> Any:
    """A coder loaded by its library, failures as one line."""
    try:
        return load()
    except Exception as err:  # noqa: BLE001 - whatever the library raises on a file it cannot read
        raise SparseError(f"{library} cannot load the sparse coder in {folder} ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:160] if str(err) else ''}): check its files, or read them "
                          "directly without the library") from None


def _from_sae_lens(loader: Any, folder: Path, cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The settings and weights of a SAELens folder as sae_lens loads them."""
    sae = _through("sae_lens", folder, lambda: loader.load_from_disk(str(folder), device="cpu"))
    c = sae.cfg
    metadata = getattr(c, "metadata", None)
    read = {"apply_b_dec_to_input": getattr(c, "apply_b_dec_to_input", True),
            "normalize_activations": getattr(c, "normalize_activations", "none"),
            "architecture": c.architecture(), "k": getattr(c, "k", None),
            "rescale_acts_by_decoder_norm": getattr(c, "rescale_acts_by_decoder_norm", False),
            "hook_name": getattr(metadata, "hook_name", None) or cfg.get("hook_name")}
    return {**cfg, **{k: v for k, v in read.items() if v is not None}}, {
        name: t.detach().float() for name, t in sae.state_dict().items()}


def _saelens(folder: Path, loader: Any = None) -> SparseCoder:
    cfg, tensors, digest = _read(folder, "sae_weights.safetensors")
    cfg = {**(cfg.get("metadata") or {}), **cfg}  # SAELens 6 keeps the hook's name under metadata
    if loader is not None:
        cfg, tensors = _from_sae_lens(loader, folder, cfg)
    hook = str(cfg.get("hook_name") or cfg.get("hook_point") or "")
    found = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook)
    if not found or found.group(2) not in _LENS_POINTS:
        raise SparseError(f"the SAE in {folder} reads {hook or 'an unnamed hook'}: neuronscope reads blocks.L."
                          f"{', blocks.L.'.join(_LENS_POINTS)}")
    architecture = str(cfg.get("architecture") or "standard").lower()
    activation = str(cfg.get("activation_fn_str") or "relu").lower()
    if architecture == "gated":
        raise SparseError(f"the SAE in {folder} is gated, which neuronscope does not read yet: use a standard, "
                          "JumpReLU or TopK SAE")
    if str(cfg.get("normalize_activations") or "none") != "none":
        raise SparseError(f"the SAE in {folder} normalizes its input ({cfg['normalize_activations']}), which "
                          "neuronscope does not apply yet: use an SAE trained without it")
    if cfg.get("rescale_acts_by_decoder_norm") or "W_skip" in tensors or "skip" in architecture:
        raise SparseError(f"the SAE in {folder} rescales its latents by its decoder norms or has a skip connection, "
                          "which neuronscope does not read yet: use a standard, JumpReLU or TopK SAE or transcoder")
    w_enc, b_enc, w_dec, b_dec = _need(tensors, folder, "W_enc", "b_enc", "W_dec", "b_dec")
    k, threshold = 0, None
    if "topk" in architecture or activation == "topk":
        kwargs = cfg.get("activation_fn_kwargs") or {}
        k = int(cfg.get("k") or kwargs.get("k") or 0)
        if k < 1:
            raise SparseError(f"the TopK SAE in {folder} names no k in its cfg.json: add \"k\"")
        activation = "topk"
    elif "jumprelu" in architecture:
        activation = "jumprelu"
        if "threshold" in tensors:
            threshold = tensors["threshold"]
        elif "log_threshold" in tensors:
            threshold = tensors["log_threshold"].exp()
        else:
            raise SparseError(f"the JumpReLU SAE in {folder} has no threshold tensor: its weights are incomplete")
    elif activation != "relu":
        raise SparseError(f"the SAE in {folder} uses activation {activation!r}: neuronscope reads relu, jumprelu "
                          "and topk")
    transcoder = "d_out" in cfg or "hook_name_out" in cfg or "transcoder" in architecture
    return SparseCoder(layer=int(found.group(1)), point=_LENS_POINTS[found.group(2)], activation=activation,
                       w_enc=w_enc, b_enc=b_enc, w_dec=w_dec, b_dec=b_dec,
                       subtract_b_dec=bool(cfg.get("apply_b_dec_to_input", True)) and not transcoder, k=k,
                       threshold=threshold, transcoder=transcoder, source=f"saelens:{folder} (sha256 {digest})",
                       reader="files" if loader is None else _version("sae_lens"))


def _sparsify(folder: Path, loader: Any = None) -> SparseCoder:
    cfg, tensors, digest = _read(folder, "sae.safetensors")
    if loader is not None:
        coder = _through("sparsify", folder, lambda: loader.load_from_disk(folder, device="cpu"))
        cfg = {**cfg, "k": coder.cfg.k, "transcode": coder.cfg.transcode, "activation": coder.cfg.activation}
        tensors = {name: t.detach().float() for name, t in coder.state_dict().items()}
    if str(cfg.get("activation") or "topk") != "topk":
        raise SparseError(f"the sparsify coder in {folder} uses {cfg['activation']} latents: neuronscope reads TopK")
    found = re.fullmatch(r"(?:.*\.)?layers\.(\d+)(\.mlp)?", folder.name)
    if not found:
        raise SparseError(f"{folder.name} is not a hook point sparsify names (layers.N or layers.N.mlp): pass the "
                          "folder it saved for one hook point")
    w_enc, b_enc, w_dec, b_dec = _need(tensors, folder, "encoder.weight", "encoder.bias", "W_dec", "b_dec")
    if "W_skip" in tensors:
        raise SparseError(f"the transcoder in {folder} has a skip connection, which neuronscope does not read yet")
    k = int(cfg.get("k") or 0)
    if k < 1:
        raise SparseError(f"the sparsify coder in {folder} names no k in its cfg.json: add \"k\"")
    transcoder = bool(cfg.get("transcode", False))
    point = ("mlp_in" if transcoder else "mlp_out") if found.group(2) else "resid_post"
    return SparseCoder(layer=int(found.group(1)), point=point, activation="topk", w_enc=w_enc.T.contiguous(),
                       b_enc=b_enc, w_dec=w_dec, b_dec=b_dec, subtract_b_dec=not transcoder, k=k,
                       transcoder=transcoder, source=f"sparsify:{folder} (sha256 {digest})",
                       reader="files" if loader is None else _version("sparsify"))
