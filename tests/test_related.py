"""neuronscope.core.models.relations against brute force, on tiny random models of every supported architecture.

The references share no code with core/related.py. Input tokens run the model's own forward up to
the first block (so the model applies its own embedding scaling), then the block's MLP input norm
and its MLP module, and read the activations with a hook on the down projection. Output tokens
and neuron connections are explicit per-neuron numpy loops over weights, named per architecture.
Norm gains and biases are randomised: their default all-ones/zeros would hide a missing gain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from neuronscope.core.models.relations import (
    TopK,
    downstream_neurons,
    input_tokens,
    n_layers,
    output_tokens,
    upstream_neurons,
)
from neuronscope.core.models.subject import SubjectError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 203  # prime: no chunk size divides it
HIDDEN, NEURONS, LAYERS = 32, 48, 3
K = 5


@dataclass(frozen=True)
class Arch:
    """How to reach each part of one architecture, written out by hand for the references."""

    blocks: str
    norm: str  # MLP input norm, from a block
    down: str  # MLP output projection, from a block
    w_in: str  # gate projection or first projection, from a block
    final: str  # final norm, from the model
    unembed: str  # unembedding module, from the model
    conv1d: bool = False  # GPT-2: weights stored [in, out]
    gemma: bool = False  # RMSNorm gain is 1 + weight
    layer_norm: bool = False  # norms centre their input
    post: str | None = None  # Gemma 2/3 post_feedforward_layernorm


LLAMA = Arch("model.layers", "post_attention_layernorm", "mlp.down_proj", "mlp.gate_proj", "model.norm", "lm_head")
GEMMA = Arch("model.layers", "post_attention_layernorm", "mlp.down_proj", "mlp.gate_proj", "model.norm", "lm_head",
             gemma=True)
GEMMA2 = Arch("model.layers", "pre_feedforward_layernorm", "mlp.down_proj", "mlp.gate_proj", "model.norm", "lm_head",
              gemma=True, post="post_feedforward_layernorm")
GPT2 = Arch("transformer.h", "ln_2", "mlp.c_proj", "mlp.c_fc", "transformer.ln_f", "lm_head", conv1d=True,
            layer_norm=True)
NEOX = Arch("gpt_neox.layers", "post_attention_layernorm", "mlp.dense_4h_to_h", "mlp.dense_h_to_4h",
            "gpt_neox.final_layer_norm", "lm_head", layer_norm=True)  # `embed_out` before transformers 5

ATTN = {"num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 32}
GEMMA_KW = {**ATTN, "head_dim": 8, "hidden_activation": "gelu_pytorch_tanh"}
COMMON = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": NEURONS, "num_hidden_layers": LAYERS}

#: name -> (config class, model class, config kwargs, layout)
KINDS: dict[str, tuple[str, str, dict[str, Any], Arch]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {**COMMON, **ATTN}, LLAMA),
    "llama-bias": ("LlamaConfig", "LlamaForCausalLM", {**COMMON, **ATTN, "mlp_bias": True}, LLAMA),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**COMMON, **ATTN}, LLAMA),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**COMMON, **ATTN}, LLAMA),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**COMMON, **GEMMA_KW}, GEMMA),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**COMMON, **GEMMA_KW}, GEMMA2),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**COMMON, **GEMMA_KW}, GEMMA2),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             {"vocab_size": VOCAB, "n_embd": HIDDEN, "n_inner": NEURONS, "n_layer": LAYERS, "n_head": 4,
              "n_positions": 32}, GPT2),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {**COMMON, "num_attention_heads": 4,
                                                          "max_position_embeddings": 32}, NEOX),
}

_MODELS: dict[str, Any] = {}


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def randomise(model: Any, seed: int = 0) -> Any:
    """Seeded random weights, norm gains around 1 and biases around 0 (not the default ones/zeros)."""
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.3)
            else:
                param.normal_(1.0, 0.5)
    return model.eval()


def build(kind: str) -> Any:
    if kind not in _MODELS:
        config_cls, model_cls, kwargs, _ = KINDS[kind]
        if not hasattr(transformers, config_cls):
            pytest.skip(f"transformers has no {config_cls}")
        config = getattr(transformers, config_cls)(**kwargs)
        with torch.random.fork_rng():
            torch.manual_seed(1)
            model = getattr(transformers, model_cls)(config)
        _MODELS[kind] = randomise(model)
    return _MODELS[kind]


# --- references ---------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def embeddings_entering_first_block(model: Any, arch: Arch) -> Any:
    """What the model's own forward feeds the first block for each token alone at position 0."""
    seen: dict[str, Any] = {}

    def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    handle = _get(model, arch.blocks)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=torch.arange(VOCAB)[:, None], use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    x = seen["x"][:, 0, :]
    if arch is GPT2:  # GPT-2 adds a learned position embedding: not part of the token's direct path
        x = x - model.transformer.wpe.weight[0]
    return x


def reference_inputs(model: Any, arch: Arch, layer: int) -> np.ndarray:
    """[neurons, vocab]: activations read by a hook on the down projection, MLP fed norm(embedding)."""
    block = _get(model, arch.blocks)[layer]
    captured: dict[str, Any] = {}
    handle = _get(block, arch.down).register_forward_pre_hook(lambda _m, args: captured.update(a=args[0]))
    try:
        with torch.no_grad():
            block.mlp(_get(block, arch.norm)(embeddings_entering_first_block(model, arch)))
    finally:
        handle.remove()
    return captured["a"].double().numpy().T


def weight(module: Any, conv1d: bool, is_input: bool) -> np.ndarray:
    """A projection's weight as float64 [hidden, neurons]: Linear stores [out, in], GPT-2's Conv1D [in, out]."""
    w = module.weight.detach().double().numpy()
    return w.T if conv1d != is_input else w


def gain(norm: Any, arch: Arch) -> np.ndarray:
    g = norm.weight.detach().double().numpy()
    return 1.0 + g if arch.gemma else g


def output_direction(model: Any, arch: Arch, layer: int, n: int, reader_gain: np.ndarray) -> np.ndarray:
    """Neuron n's output column, through Gemma's post-MLP norm, centred for LayerNorm, times the reader's gain."""
    block = _get(model, arch.blocks)[layer]
    w_out = weight(_get(block, arch.down), arch.conv1d, is_input=False)  # [hidden, neurons]
    column = w_out[:, n].copy()
    if arch.post:
        column = column * gain(_get(block, arch.post), arch)
    if arch.layer_norm:
        column = column - column.mean()
    return column * reader_gain


def reference_outputs(model: Any, arch: Arch, layer: int) -> np.ndarray:
    unembed = _get(model, arch.unembed if hasattr(model, arch.unembed) else "embed_out").weight.detach().double().numpy()  # [vocab, hidden]
    final = gain(_get(model, arch.final), arch)
    rows = []
    for n in range(NEURONS):
        direction = output_direction(model, arch, layer, n, final)
        rows.append([float(unembed[t] @ direction) for t in range(unembed.shape[0])])
    return np.array(rows)


def reference_connections(model: Any, arch: Arch, layer: int) -> np.ndarray:
    """[neurons of layer, neurons of layer + 1]."""
    nxt = _get(model, arch.blocks)[layer + 1]
    w_in = weight(_get(nxt, arch.w_in), arch.conv1d, is_input=True)  # [hidden, neurons]
    g = gain(_get(nxt, arch.norm), arch)
    out = np.zeros((NEURONS, w_in.shape[1]))
    for n1 in range(NEURONS):
        direction = output_direction(model, arch, layer, n1, g)
        for n2 in range(w_in.shape[1]):
            out[n1, n2] = direction @ w_in[:, n2]
    return out


def assert_topk(got: TopK, full: np.ndarray, k: int) -> None:
    """`got` holds, per row of `full`, the k largest and k smallest entries, ids and values."""
    kk = min(k, full.shape[1])
    for ids, values in ((got.positive_ids, got.positive_values), (got.negative_ids, got.negative_values)):
        assert ids.shape == values.shape == (full.shape[0], kk)
        assert ids.dtype == np.int64 and values.dtype == np.float32
    atol = 1e-5 * float(np.abs(full).max())
    order = np.argsort(-full, axis=1, kind="stable")[:, :kk]
    np.testing.assert_array_equal(got.positive_ids, order)
    np.testing.assert_allclose(got.positive_values, np.take_along_axis(full, order, 1), rtol=1e-4, atol=atol)
    order = np.argsort(full, axis=1, kind="stable")[:, :kk]
    np.testing.assert_array_equal(got.negative_ids, order)
    np.testing.assert_allclose(got.negative_values, np.take_along_axis(full, order, 1), rtol=1e-4, atol=atol)


# --- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_matches_brute_force(kind: str) -> None:
    model, arch = build(kind), KINDS[kind][3]
    assert n_layers(model) == LAYERS
    for layer in (0, LAYERS - 1):
        assert_topk(input_tokens(model, layer, K), reference_inputs(model, arch, layer), K)
        assert_topk(output_tokens(model, layer, K), reference_outputs(model, arch, layer), K)
    connections = reference_connections(model, arch, 0)
    assert_topk(downstream_neurons(model, 0, K), connections, K)
    assert_topk(upstream_neurons(model, 1, K), connections.T, K)


def test_reference_sees_gemma_embedding_scale() -> None:
    """Sanity of the reference itself: Gemma's forward scales embeddings by sqrt(hidden)."""
    model = build("gemma")
    x = embeddings_entering_first_block(model, GEMMA)
    expected = model.model.embed_tokens.weight * HIDDEN**0.5
    torch.testing.assert_close(x, expected.detach())


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_chunk_sizes_do_not_change_results(kind: str) -> None:
    model = build(kind)
    for fn in (input_tokens, output_tokens, downstream_neurons):
        whole = fn(model, 1, K)
        for chunk in (1, 7, 64):
            part = fn(model, 1, K, chunk=chunk)
            np.testing.assert_array_equal(part.positive_ids, whole.positive_ids)
            np.testing.assert_array_equal(part.negative_ids, whole.negative_ids)
            np.testing.assert_allclose(part.positive_values, whole.positive_values, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(part.negative_values, whole.negative_values, rtol=1e-5, atol=1e-6)


def test_k_larger_than_available_is_clipped() -> None:
    model = build("gpt_neox")
    tokens = input_tokens(model, 0, k=10_000, chunk=50)
    assert tokens.positive_ids.shape == (NEURONS, VOCAB)
    assert sorted(tokens.positive_ids[3].tolist()) == list(range(VOCAB))
    np.testing.assert_array_equal(tokens.negative_values, tokens.positive_values[:, ::-1])  # GELU ties at 0
    assert output_tokens(model, 2, k=10_000).negative_values.shape == (NEURONS, VOCAB)
    assert downstream_neurons(model, 0, k=500).positive_ids.shape == (NEURONS, NEURONS)
    assert upstream_neurons(model, 2, k=500).negative_ids.shape == (NEURONS, NEURONS)


def test_layer_edges_and_bad_arguments() -> None:
    model = build("llama")
    with pytest.raises(ValueError, match="no upstream"):
        upstream_neurons(model, 0)
    with pytest.raises(ValueError, match="no downstream"):
        downstream_neurons(model, LAYERS - 1)
    for fn in (input_tokens, output_tokens, downstream_neurons, upstream_neurons):
        with pytest.raises(ValueError, match="not within"):
            fn(model, LAYERS)
        with pytest.raises(ValueError, match="k must be"):
            fn(model, 1, 0)
    with pytest.raises(ValueError, match="chunk"):
        input_tokens(model, 0, chunk=0)


def test_half_precision_models_are_computed_in_float32() -> None:
    """A bf16 model gives what the float32 model with the same (rounded) weights gives."""
    model = build("qwen2")
    bf16 = randomise(transformers.Qwen2ForCausalLM(model.config)).to(torch.bfloat16)
    f32 = transformers.Qwen2ForCausalLM(model.config)
    f32.load_state_dict({name: tensor.float() for name, tensor in bf16.state_dict().items()})
    f32.eval()
    for fn in (input_tokens, output_tokens, downstream_neurons):
        got, want = fn(bf16, 1, K), fn(f32, 1, K)
        assert got.positive_values.dtype == np.float32
        np.testing.assert_array_equal(got.positive_ids, want.positive_ids)
        np.testing.assert_allclose(got.negative_values, want.negative_values, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("config_cls", "model_cls", "words"), [
    ("OPTConfig", "OPTForCausalLM", "'opt' is not supported"),  # blocks not where neuronscope looks
    ("Olmo2Config", "Olmo2ForCausalLM", "normalise the MLP output"),  # post-norms only
    ("Phi3Config", "Phi3ForCausalLM", "MLP is not"),  # fused gate_up_proj
])
def test_unsupported_architectures_raise_subject_error(config_cls: str, model_cls: str, words: str) -> None:
    if not hasattr(transformers, config_cls):
        pytest.skip(f"transformers has no {config_cls}")
    kwargs = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": NEURONS, "ffn_dim": NEURONS, "max_position_embeddings": 32,
              "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()
    for call in (lambda: input_tokens(model, 0), lambda: output_tokens(model, 0), lambda: downstream_neurons(model, 0)):
        with pytest.raises(SubjectError, match=words) as info:
            call()
        assert "\n" not in str(info.value)
