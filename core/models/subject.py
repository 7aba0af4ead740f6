"""Subject models: a loaded model whose MLP neurons (and other hidden states) are read, batch by batch
(neuronscope.core.models.loading loads one).

A neuron is the input of the MLP output projection, captured by one forward pre-hook per layer
(`down_proj` for Llama/Qwen/Gemma/Mistral-style gated MLPs, `c_proj` for GPT-2, `dense_4h_to_h` for
GPT-NeoX), so the model's own activation function is what gets recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from neuronscope.core.errors import NeuronscopeError

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
    def _hooks(
        self, layers: tuple[int, ...], out: dict[int, Any], each: Callable[[int, Any], None] | None = None,
        done: Callable[[], None] | None = None,
    ) -> Iterator[None]:
        """Hooks that read the neurons of `layers` into `out` (or pass them to `each`); the forward pass stops after
        the last one, or `done()` is called after each (it stops the pass when everything it waits for is read)."""
        last, skip = max(layers), len(self.prefix_ids)
        handles = []

        def make(layer: int) -> Callable[..., None]:
            def hook(_module: Any, args: tuple[Any, ...]) -> None:
                if each is None:
                    out[layer] = args[0]
                else:
                    each(layer, args[0][:, skip:, :])
                if done is not None:
                    done()
                elif layer == last:
                    raise _StopForward

            return hook

        try:
            for layer in layers:
                handles.append(self.projections[layer].register_forward_pre_hook(make(layer)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def activations(
        self, token_ids: Any, layers: tuple[int, ...], each: Callable[[int, Any], None] | None = None
    ) -> dict[int, Any]:
        """Neuron activations for a batch of excerpts.  token_ids [B, T] -> {layer: [B, T, F]}.

        With `each`, each layer's activations [B, T, F] are passed to each(layer, acts) as soon as they are computed
        (while they are still in the CPU's cache), and nothing is returned ({})."""
        import torch

        if not layers or not all(0 <= layer < self.n_layers for layer in layers):
            raise SubjectError(f"layers {layers} are not all within 0-{self.n_layers - 1}")
        ids = self._with_prefix(token_ids)
        out: dict[int, Any] = {}
        with torch.inference_mode(), self._hooks(layers, out, each):
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

        seen: list[Any] = []

        def stop() -> None:
            raise _StopForward

        handle = self._point_hook(layer, point, seen, stop)
        try:
            with torch.inference_mode():
                self.model(input_ids=self._with_prefix(token_ids), use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return seen[0][:, len(self.prefix_ids):, :]

    def activations_and_hidden(self, token_ids: Any, layers: tuple[int, ...], layer: int, point: str,
                               each: Callable[[int, Any], None] | None = None) -> tuple[dict[int, Any], Any]:
        """`activations` of `layers` (or, with `each`, passed to it as they are computed) and the hidden state
        `capture` reads at a hook point, in one forward pass (it stops once all are read): a sparse coder's latents
        collected beside the MLP neurons."""
        import torch

        if not layers or not all(0 <= one < self.n_layers for one in layers):
            raise SubjectError(f"layers {layers} are not all within 0-{self.n_layers - 1}")
        seen: list[Any] = []
        out: dict[int, Any] = {}
        pending = [len(layers) + 1]

        def done() -> None:
            pending[0] -= 1
            if pending[0] == 0:
                raise _StopForward

        handle = self._point_hook(layer, point, seen, done)
        try:
            with torch.inference_mode(), self._hooks(layers, out, each, done=done):
                self.model(input_ids=self._with_prefix(token_ids), use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        skip = len(self.prefix_ids)
        return {one: acts[:, skip:, :] for one, acts in out.items()}, seen[0][:, skip:, :]

    def _with_prefix(self, token_ids: Any) -> Any:
        """A batch's token ids with the model's prefix (its BOS) before each row, on the model's device."""
        import torch

        ids = torch.as_tensor(token_ids, dtype=torch.long)
        if self.prefix_ids:
            ids = torch.cat([torch.tensor(self.prefix_ids, dtype=torch.long).expand(ids.shape[0], -1), ids], 1)
        return to_device(ids, self.device)

    def _point_hook(self, layer: int, point: str, seen: list[Any], then: Callable[[], None]) -> Any:
        """A hook that appends the hidden state at a hook point of a layer to `seen`, then calls `then`."""
        if not 0 <= layer < self.n_layers:
            raise SubjectError(f"layer {layer} is not within 0-{self.n_layers - 1} of {self.name}")
        block = self.blocks[layer]
        module = _get(block, self.mlp_path) if point in ("mlp_in", "mlp_out") else block

        def before(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen.append(args[0] if args else kwargs["hidden_states"])
            then()

        def after(_module: Any, _args: Any, output: Any) -> None:
            seen.append(output[0] if isinstance(output, tuple) else output)
            then()

        if point in ("resid_pre", "mlp_in"):
            return module.register_forward_pre_hook(before, with_kwargs=True)
        if point in ("resid_post", "mlp_out"):
            return module.register_forward_hook(after)
        raise SubjectError(f"unknown hook point {point!r}: use resid_pre, resid_post, mlp_in or mlp_out")

    def bare_forward(self, token_ids: Any, last_layer: int | None = None) -> None:
        """The model's plain forward pass on a batch, for benchmarks: with `last_layer`, only as far as a collection
        whose last layer that is runs it (to that layer's MLP neurons), else to the last position's logits."""
        import torch

        ids = self._with_prefix(token_ids)
        with torch.inference_mode():
            if last_layer is None:
                self.model(input_ids=ids, use_cache=False, logits_to_keep=1)
                return
            with self._hooks((last_layer,), {}):  # the collection's own hook, which stops the pass there
                try:
                    self.model(input_ids=ids, use_cache=False)
                except _StopForward:
                    pass

    def token_strings(self, token_ids: Any, *, apart: bool = False) -> list[str]:
        """The text of each token of a sequence (an excerpt, a prompt). A character whose bytes several tokens share
        (much of a text in another script than Latin's, emoji) is given whole to the token that completes it, and
        a token holding only the first bytes of one is '' (alone, each token would show U+FFFD: `joined`).
        `apart`: the tokens are not one text (a ranking of next tokens), each is decoded alone."""
        ids = [int(t) for t in token_ids]
        out = []
        for tid in ids:
            text = self._strings.get(tid)
            if text is None:
                text = self._strings[tid] = self.tokenizer.decode([tid])
            out.append(text)
        if apart:
            return out
        start = 0
        while start < len(out):  # a token whose text holds no U+FFFD holds no part of a character
            if "\ufffd" not in out[start]:
                start += 1
                continue
            end = start + 1
            while end < len(out) and "\ufffd" in out[end]:
                end += 1
            if end - start > 1:
                out[start:end] = joined(self.tokenizer.decode, ids[start:end])
            start = end
        return out


def joined(decode: Callable[[list[int]], str], ids: list[int]) -> list[str]:
    """Each token's text within a run decoded together: the characters each token completes, a character split
    between tokens going to the one with its last byte. What stays U+FFFD (bytes that are no character) goes with
    the token after it, or the last."""
    texts, shown = [], 0
    for end in range(1, len(ids) + 1):
        text = decode(ids[:end])
        if end < len(ids):
            text = text.rstrip("\ufffd")  # an unfinished character, until a later token completes it
        texts.append(text[shown:])
        shown = max(shown, len(text))
    return texts


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
