"""Related tokens and related neurons of a subject model's MLP neurons, read off the weights alone.

Nothing here runs the model on text. Every number follows the *direct path*: one token embedding
fed straight into a block's MLP, or one neuron's output fed straight into the unembedding or into
the next block's MLP. Attention and all other blocks are skipped.

Notation for block l. The MLP reads the residual stream through its input norm N_l:
`post_attention_layernorm` for Llama/Qwen/Mistral/Gemma and GPT-NeoX, `pre_feedforward_layernorm`
for Gemma 2/3, and `ln_2` for GPT-2. Neuron n has an *input direction* W_in[:, n]. For gated MLPs
this is the gate projection, the direction that opens the neuron; for GPT-2 it is `c_fc` and for
GPT-NeoX `dense_h_to_4h`. The neuron also has an *output direction* W_out[:, n], a column of the
down projection (`down_proj` / `c_proj` / `dense_4h_to_h`): this is what the neuron adds to the
residual stream per unit of activation. A norm's *gain* g is the per-dimension factor it multiplies
by: its weight, or 1 + weight for Gemma's RMSNorm. The gain is read from the norm module itself by
a probe, not looked up by architecture name.

- Input tokens of (l, n): for every row of the input-embedding matrix (all rows, however many the
  tokenizer uses), the neuron's activation. The embedding is looked up through the embedding module,
  so it is scaled as the model scales it (Gemma: sqrt(hidden_size), which transformers 5 applies
  inside the module; the norm that follows makes the scale all but irrelevant). It is then passed
  through the module N_l itself, so normalisation, gain and bias all apply exactly. The neuron is then applied with the MLP's own
  activation function (`mlp.act` / `mlp.act_fn`): act(x·W_in[:, n] + b_n) for GPT-2 and GPT-NeoX,
  and act(x·W_gate[:, n] + b) · (x·W_up[:, n] + b) for gated MLPs (the biases only where the model
  has them).
- Output tokens of (l, n): the direct logit effect per unit of activation, (W_out[:, n] ⊙ g_final)
  dotted with every row of the unembedding (the output embeddings, tied or not).
- Connection of n1 in block l to n2 in block l+1: (W_out^l[:, n1] ⊙ g^{l+1}) · W_in^{l+1}[:, n2].
  That is, how much n1's output pushes the input direction of n2 (for gated MLPs, its gate).
  The downstream neurons of (l, n1) are ranked over block l+1; the upstream neurons of (l+1, n2)
  are ranked over block l. The first block has no upstream and the last has no downstream.

Two refinements keep these faithful to the forward pass. Both are exact, linear parts of it:
- When the norm that reads a neuron's output is a LayerNorm (GPT-2, GPT-NeoX: the next block's
  `ln_2`/`post_attention_layernorm`, or the final norm), the output direction is first centred,
  i.e. its mean over hidden dimensions is subtracted, as the LayerNorm does.
- Gemma 2/3 pass the MLP output through `post_feedforward_layernorm` before it joins the residual
  stream, so their output direction is W_out[:, n] ⊙ g_post.

What is dropped: the positive normalisation factor (1/rms, 1/std), which depends on the whole
residual stream and scales every entry of a ranking alike; constant offsets such as norm biases,
projection biases and embedding positions; and Gemma's final-logit soft-capping, which is
monotonic. None of these changes a ranking.

Every function returns a `TopK` per neuron of one layer. `positive_*` holds the k largest values,
strongest first. `negative_*` holds the k smallest, most negative first; with GELU-like
activations these may still lie above zero. Work is done in float32 on the model's device, under
`torch.inference_mode()`, and in chunks of vocabulary rows or neurons, so memory stays bounded by
chunk × neurons rather than vocabulary × neurons.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from neuronscope.core.models.subject import MLP_LAYOUTS, SubjectError

#: Names of the final norm, on the object that holds the list of blocks.
_FINAL_NORMS = ("norm", "ln_f", "final_layer_norm")


@dataclass(frozen=True)
class TopK:
    """Per neuron of a layer: the k most positive and k most negative entries."""

    positive_ids: np.ndarray
    """int64 [neurons, k]: token or neuron ids, strongest first."""
    positive_values: np.ndarray
    """float32 [neurons, k]: their values."""
    negative_ids: np.ndarray
    """int64 [neurons, k]: most negative first."""
    negative_values: np.ndarray
    """float32 [neurons, k]: their values."""


@dataclass(frozen=True)
class _Mlp:
    """One block's MLP as weight views (model dtype and device), every matrix [hidden, neurons]."""

    norm: Any
    """The MLP input norm module."""
    act: Callable[[Any], Any]
    w_in: Any
    """Gate projection (gated) or first projection, transposed to [hidden, neurons]."""
    b_in: Any | None
    w_up: Any | None
    """Up projection (gated MLPs only)."""
    b_up: Any | None
    w_out: Any
    """Down projection: column n is neuron n's output direction."""
    post_norm: Any | None
    """Gemma 2/3 `post_feedforward_layernorm`, applied to the MLP output."""


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _arch(model: Any) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))


def _layout(model: Any) -> tuple[Any, list[Any]]:
    """(the object holding the blocks, the blocks), or SubjectError for an unknown architecture."""
    for blocks_path, proj_path in MLP_LAYOUTS:
        try:
            blocks = list(_get(model, blocks_path))
            for block in blocks:
                _get(block, proj_path)
            holder = _get(model, blocks_path.rpartition(".")[0])
        except (AttributeError, TypeError):
            continue
        if blocks:
            return holder, blocks
    raise SubjectError(
        f"architecture {_arch(model)!r} is not supported for related tokens and neurons: use a Llama/Qwen/Gemma/"
        "Mistral-style, GPT-2 or GPT-NeoX model"
    )


def _unsupported(model: Any, what: str) -> SubjectError:
    return SubjectError(f"architecture {_arch(model)!r} is not supported for related tokens and neurons: {what}")


def _mlp(model: Any, block: Any) -> _Mlp:
    mlp = block.mlp
    if all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")):
        gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        w_in, b_in, w_up, b_up, w_out = gate.weight.T, gate.bias, up.weight.T, up.bias, down.weight
        act = getattr(mlp, "act_fn", getattr(mlp, "act", None))
    elif hasattr(mlp, "c_fc") and hasattr(mlp, "c_proj"):  # GPT-2 Conv1D: weight is [in, out]
        w_in, b_in, w_up, b_up, w_out = mlp.c_fc.weight, mlp.c_fc.bias, None, None, mlp.c_proj.weight.T
        act = mlp.act
    elif hasattr(mlp, "dense_h_to_4h") and hasattr(mlp, "dense_4h_to_h"):
        first = mlp.dense_h_to_4h
        w_in, b_in, w_up, b_up, w_out = first.weight.T, first.bias, None, None, mlp.dense_4h_to_h.weight
        act = mlp.act
    else:
        raise _unsupported(model, "its MLP is not gate/up/down_proj, c_fc/c_proj or dense_h_to_4h/dense_4h_to_h")
    if act is None:
        raise _unsupported(model, "its MLP has no act_fn")
    pre, post = getattr(block, "pre_feedforward_layernorm", None), getattr(block, "post_feedforward_layernorm", None)
    if pre is not None:  # Gemma 2/3: the norm after attention is a post-norm of the attention output
        norm = pre
    elif post is not None:  # OLMo-2-style post-norms: no norm sits in front of the MLP
        raise _unsupported(model, "its blocks normalise the MLP output, not its input")
    else:
        norm = getattr(block, "ln_2", getattr(block, "post_attention_layernorm", None))
        if norm is None:
            raise _unsupported(model, "no MLP input norm (ln_2, post_attention_layernorm) found")
    return _Mlp(norm, act, w_in, b_in, w_up, b_up, w_out, post if pre is not None else None)


def n_layers(model: Any) -> int:
    """How many blocks (and so MLP layers) the model has."""
    return len(_layout(model)[1])


def _check(model: Any, layer: int, k: int) -> list[Any]:
    blocks = _layout(model)[1]
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer {layer} is not within 0-{len(blocks) - 1}")
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    return blocks


def _device(model: Any) -> Any:
    return model.get_input_embeddings().weight.device


def _f32(tensor: Any, device: Any) -> Any:
    import torch

    return tensor.detach().to(device=device, dtype=torch.float32)


def _norm32(norm: Any, device: Any) -> Any:
    """A float32 copy of a norm module (norms are small), so it runs at full precision on `device`."""
    import torch

    return copy.deepcopy(norm).to(device=device, dtype=torch.float32).eval()


def _reader(norm: Any, device: Any, hidden: int) -> tuple[Any, bool]:
    """(gain [hidden], whether it centres): the linear part of a norm module, as seen by a direction.

    LayerNorm centres and multiplies by its weight. Any other norm is taken to be RMSNorm-like and
    its effective gain is probed: f(s·1) - f(-s·1) = 2·gain for RMS normalisation with or without a
    bias, which covers weight and 1 + weight (Gemma) alike. s is large, so eps plays no part.
    """
    import torch

    if isinstance(norm, torch.nn.LayerNorm):
        if norm.weight is None:
            return torch.ones(norm.normalized_shape, device=device), True
        return _f32(norm.weight, device), True
    module = _norm32(norm, device)
    probe = torch.full((1, hidden), 1e3, device=device)
    return ((module(probe) - module(-probe)) / 2)[0], False


def _directions(mlp: _Mlp, reader: Any, device: Any) -> Any:
    """Neuron output directions [hidden, neurons] as the norm `reader` sees them: centred if it centres, times gain."""
    out = _f32(mlp.w_out, device)
    if mlp.post_norm is not None:
        gain, centres = _reader(mlp.post_norm, device, out.shape[0])
        if centres:
            out = out - out.mean(0, keepdim=True)
        out = out * gain[:, None]
    gain, centres = _reader(reader, device, out.shape[0])
    if centres:
        out = out - out.mean(0, keepdim=True)
    return out * gain[:, None]


def _finish(pos_vals: Any, pos_ids: Any, neg_vals: Any, neg_ids: Any) -> TopK:
    def arr(tensor: Any, dtype: Any) -> np.ndarray:
        return np.ascontiguousarray(tensor.cpu().numpy().astype(dtype))

    return TopK(arr(pos_ids, np.int64), arr(pos_vals, np.float32), arr(neg_ids, np.int64), arr(neg_vals, np.float32))


def _running_topk(blocks: Iterator[tuple[int, Any]], k: int) -> TopK:
    """Top-k along rows over [rows, neurons] blocks given as (first row id, block), for each neuron."""
    import torch

    best: list[Any] | None = None
    for start, values in blocks:
        kk = min(k, values.shape[0])
        top = torch.topk(values, kk, dim=0)
        bottom = torch.topk(values, kk, dim=0, largest=False)
        found = [top.values, top.indices + start, bottom.values, bottom.indices + start]
        if best is not None:
            found = [torch.cat([old, new]) for old, new in zip(best, found)]
            kk = min(k, found[0].shape[0])
            top_i = torch.topk(found[0], kk, dim=0).indices
            bottom_i = torch.topk(found[2], kk, dim=0, largest=False).indices
            found = [found[0].gather(0, top_i), found[1].gather(0, top_i),
                     found[2].gather(0, bottom_i), found[3].gather(0, bottom_i)]
        best = found
    assert best is not None
    return _finish(*(tensor.T for tensor in best))


def _chunks(total: int, chunk: int) -> Iterator[tuple[int, int]]:
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, not {chunk}")
    for start in range(0, total, chunk):
        yield start, min(start + chunk, total)


def input_tokens(model: Any, layer: int, k: int = 10, *, chunk: int = 4096) -> TopK:
    """The vocabulary tokens that most excite (and most inhibit) each neuron of `layer` along the direct path."""
    import torch

    mlp = _mlp(model, _check(model, layer, k)[layer])
    device = _device(model)
    embedding = model.get_input_embeddings()
    vocab = int(embedding.weight.shape[0])
    k = min(k, vocab)

    with torch.inference_mode():
        norm = _norm32(mlp.norm, device)
        w_in, w_up = _f32(mlp.w_in, device), None if mlp.w_up is None else _f32(mlp.w_up, device)
        b_in = None if mlp.b_in is None else _f32(mlp.b_in, device)
        b_up = None if mlp.b_up is None else _f32(mlp.b_up, device)

        def blocks() -> Iterator[tuple[int, Any]]:
            for start, stop in _chunks(vocab, chunk):
                ids = torch.arange(start, stop, device=embedding.weight.device)
                x = norm(_f32(embedding(ids), device))  # the module applies Gemma's scale
                pre = x @ w_in if b_in is None else x @ w_in + b_in
                acts = mlp.act(pre)
                if w_up is not None:
                    acts = acts * (x @ w_up if b_up is None else x @ w_up + b_up)
                yield start, acts

        return _running_topk(blocks(), k)


def output_tokens(model: Any, layer: int, k: int = 10, *, chunk: int = 4096) -> TopK:
    """The vocabulary tokens whose logits each neuron of `layer` raises (and lowers) most, per unit of activation."""
    import torch

    mlp = _mlp(model, _check(model, layer, k)[layer])
    holder = _layout(model)[0]
    final = next((getattr(holder, name) for name in _FINAL_NORMS if getattr(holder, name, None) is not None), None)
    unembedding = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if final is None or unembedding is None:
        raise _unsupported(model, "no final norm or no output embeddings (load it as a causal LM)")
    device = _device(model)
    vocab = int(unembedding.weight.shape[0])
    k = min(k, vocab)

    with torch.inference_mode():
        directions = _directions(mlp, final, device)

        def blocks() -> Iterator[tuple[int, Any]]:
            for start, stop in _chunks(vocab, chunk):
                yield start, _f32(unembedding.weight[start:stop], device) @ directions

        return _running_topk(blocks(), k)


def _connections(model: Any, source: int, k: int, chunk: int, downstream: bool) -> TopK:
    """Top-k connections between blocks `source` and `source + 1`, ranked per neuron of one side."""
    import torch

    blocks = _layout(model)[1]
    src, dst = _mlp(model, blocks[source]), _mlp(model, blocks[source + 1])
    device = _device(model)
    with torch.inference_mode():
        out = _directions(src, dst.norm, device)  # [hidden, source neurons]
        w_in = _f32(dst.w_in, device)  # [hidden, next neurons]
        rows, cols = (out, w_in) if downstream else (w_in, out)
        k = min(k, cols.shape[1])
        parts: list[list[Any]] = [[], [], [], []]
        for start, stop in _chunks(rows.shape[1], chunk):
            values = rows[:, start:stop].T @ cols
            top = torch.topk(values, k, dim=1)
            bottom = torch.topk(values, k, dim=1, largest=False)
            for part, tensor in zip(parts, (top.values, top.indices, bottom.values, bottom.indices)):
                part.append(tensor)
        return _finish(*(torch.cat(part) for part in parts))


def downstream_neurons(model: Any, layer: int, k: int = 10, *, chunk: int = 4096) -> TopK:
    """For each neuron of `layer`, the neurons of `layer + 1` it excites (and inhibits) most, by weights."""
    blocks = _check(model, layer, k)
    if layer == len(blocks) - 1:
        raise ValueError(f"layer {layer} is the last layer: it has no downstream neurons")
    return _connections(model, layer, k, chunk, downstream=True)


def upstream_neurons(model: Any, layer: int, k: int = 10, *, chunk: int = 4096) -> TopK:
    """For each neuron of `layer`, the neurons of `layer - 1` that excite (and inhibit) it most, by weights."""
    _check(model, layer, k)
    if layer == 0:
        raise ValueError("layer 0 is the first layer: it has no upstream neurons")
    return _connections(model, layer - 1, k, chunk, downstream=False)


#: Related tokens and neurons kept per list.
RELATED_K = 10


def _names(strings: Callable[[list[int]], list[str]], ids: np.ndarray) -> list[list[str]]:
    flat = strings([int(i) for i in ids.reshape(-1)])
    width = ids.shape[1]
    return [flat[i * width:(i + 1) * width] for i in range(ids.shape[0])]


def related_lists(model: Any, layer: int, strings: Callable[[list[int]], list[str]], k: int = RELATED_K
                  ) -> list[tuple[int, int, dict[str, list[tuple[str, float]]], dict[str, list[tuple[int, int, float]]]]]:
    """Every neuron of a layer with its related-token lists (input/output, positive/negative; `strings` names
    token ids) and related-neuron lists (upstream from the layer before, downstream into the next, where they
    exist), as Store.write_related takes them."""
    tokens: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for side, top in (("input", input_tokens(model, layer, k)), ("output", output_tokens(model, layer, k))):
        tokens[f"{side}_positive"] = (top.positive_ids, top.positive_values)
        tokens[f"{side}_negative"] = (top.negative_ids, top.negative_values)
    neurons: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}
    for side, other, neighbours in (("upstream", layer - 1, upstream_neurons),
                                    ("downstream", layer + 1, downstream_neurons)):
        if 0 <= other < n_layers(model):
            top = neighbours(model, layer, k)
            neurons[f"{side}_positive"] = (other, top.positive_ids, top.positive_values)
            neurons[f"{side}_negative"] = (other, top.negative_ids, top.negative_values)
    names = {name: _names(strings, ids) for name, (ids, _) in tokens.items()}
    width = next(iter(tokens.values()))[0].shape[0]
    return [(layer, n,
             {name: list(zip(names[name][n], values[n].tolist())) for name, (_, values) in tokens.items()},
             {name: [(other, int(i), float(v)) for i, v in zip(ids[n].tolist(), values[n].tolist())]
              for name, (other, ids, values) in neurons.items()})
            for n in range(width)]


def latent_related_lists(model: Any, coder: Any, strings: Callable[[list[int]], list[str]], k: int = RELATED_K
                         ) -> list[tuple[int, int, dict[str, list[tuple[str, float]]], dict[str, list[Any]]]]:
    """A sparse coder's latents (neuronscope.core.models.sparse) with their related-token lists, the vocabulary
    projection along the direct path, as Store.write_related takes them:
    - input tokens: each token's embedding fed straight to the coder (through the block's MLP input norm when it
      reads the MLP input), the latent's pre-activation: (x - b_dec)·W_enc[:, i] + b_enc[i];
    - output tokens: its decoder direction W_dec[i] as the final norm sees it (centred for a LayerNorm, times the
      gain; a coder writing the MLP output of a Gemma 2/3 block through its post-norm first), dotted with every row
      of the unembedding.
    """
    import torch

    blocks = _check(model, coder.layer, k)
    holder = _layout(model)[0]
    device = _device(model)
    embedding = model.get_input_embeddings()
    unembedding = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    final = next((getattr(holder, name) for name in _FINAL_NORMS if getattr(holder, name, None) is not None), None)
    if final is None or unembedding is None:
        raise _unsupported(model, "no final norm or no output embeddings (load it as a causal LM)")
    mlp = _mlp(model, blocks[coder.layer]) if coder.point in ("mlp_in", "mlp_out") or coder.transcoder else None
    with torch.inference_mode():
        w_enc, b_enc, b_dec = (_f32(t, device) for t in (coder.w_enc, coder.b_enc, coder.b_dec))
        norm = _norm32(mlp.norm, device) if mlp is not None and coder.point == "mlp_in" else None

        def inputs() -> Iterator[tuple[int, Any]]:
            for start, stop in _chunks(int(embedding.weight.shape[0]), 4096):
                x = _f32(embedding(torch.arange(start, stop, device=embedding.weight.device)), device)
                x = norm(x) if norm is not None else x
                yield start, ((x - b_dec) if coder.subtract_b_dec else x) @ w_enc + b_enc

        out = _f32(coder.w_dec, device).T  # [hidden, latents]
        if mlp is not None and mlp.post_norm is not None and (coder.point == "mlp_out" or coder.transcoder):
            gain, centres = _reader(mlp.post_norm, device, out.shape[0])
            out = (out - out.mean(0, keepdim=True) if centres else out) * gain[:, None]
        gain, centres = _reader(final, device, out.shape[0])
        directions = (out - out.mean(0, keepdim=True) if centres else out) * gain[:, None]

        def outputs() -> Iterator[tuple[int, Any]]:
            for start, stop in _chunks(int(unembedding.weight.shape[0]), 4096):
                yield start, _f32(unembedding.weight[start:stop], device) @ directions

        found = {"input": _running_topk(inputs(), k), "output": _running_topk(outputs(), k)}
    lists: dict[str, tuple[list[list[str]], np.ndarray]] = {}
    for side, top in found.items():
        lists[f"{side}_positive"] = (_names(strings, top.positive_ids), top.positive_values)
        lists[f"{side}_negative"] = (_names(strings, top.negative_ids), top.negative_values)
    return [(coder.layer, i, {name: list(zip(names[i], values[i].tolist())) for name, (names, values) in lists.items()},
             {}) for i in range(coder.width)]
