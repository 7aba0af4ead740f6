"""Tests for core/subject.py: neuron capture by forward pre-hooks, checked against a manual recomputation.

Every model here is a tiny random-weight model built in-process from a config: nothing is downloaded.
The manual reference rebuilds each block's MLP input from the residual stream (`output_hidden_states`)
plus the block's attention output, applies the block's own norms, and then the MLP's first half with
explicit torch.nn.functional activations, so it does not share code with the hook under test.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    BertConfig,
    BertModel,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    SiglipVisionConfig,
)

from neuronscope.core.models.subject import Subject, SubjectError, _bos_prefix, mlp_projections

VOCAB = 100
N_LAYERS = 3
CPU = torch.device("cpu")


# -- tokenizer stubs ----------------------------------------------------------------------------------

class StubTokenizer:
    """The tokenizer surface Subject uses: bos_token_id, decode, __call__(text, add_special_tokens)."""

    def __init__(self, bos: int | None = None, adds_bos: bool = False, adds_eos: bool = False) -> None:
        self.bos_token_id = bos
        self.adds_bos = adds_bos
        self.adds_eos = adds_eos
        self.decoded: list[list[int]] = []

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [ord(c) % VOCAB for c in text]
        if add_special_tokens and self.adds_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        if add_special_tokens and self.adds_eos:
            ids = [*ids, 99]
        return {"input_ids": ids}

    def decode(self, ids: list[int]) -> str:
        self.decoded.append(list(ids))
        return "".join(f"<{i}>" for i in ids)


# -- architectures ------------------------------------------------------------------------------------

def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's gelu_new / Gemma's gelu_pytorch_tanh, written out."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _gated(act: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    def neurons(mlp: Any, x: torch.Tensor) -> torch.Tensor:
        gate = F.linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias)
        return act(gate) * F.linear(x, mlp.up_proj.weight, mlp.up_proj.bias)

    return neurons


def _gpt2_neurons(mlp: Any, x: torch.Tensor) -> torch.Tensor:
    return _gelu_tanh(x @ mlp.c_fc.weight + mlp.c_fc.bias)  # Conv1D: weight [in, out]


def _neox_neurons(mlp: Any, x: torch.Tensor) -> torch.Tensor:
    return F.gelu(F.linear(x, mlp.dense_h_to_4h.weight, mlp.dense_h_to_4h.bias))  # exact erf GELU


@dataclass(frozen=True)
class Arch:
    name: str
    build: Callable[[], Any]
    blocks: Callable[[Any], Any]
    attn: str
    """Attribute of a block holding its attention module (output[0] is the attention output)."""
    mlp_input: Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]
    """(block, residual entering the block, attention output) -> the MLP's input."""
    neurons: Callable[[Any, torch.Tensor], torch.Tensor]
    """(mlp, MLP input) -> neuron activations (the input of the output projection)."""
    projection: str
    width: int


def _gpt2() -> Any:
    cfg = GPT2Config(n_layer=N_LAYERS, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def _neox() -> Any:
    cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    assert cfg.use_parallel_residual and cfg.hidden_act == "gelu"
    return GPTNeoXForCausalLM(cfg)


def _llama() -> Any:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=1, pad_token_id=None)
    assert cfg.hidden_act == "silu"
    return LlamaForCausalLM(cfg)


def _gemma_text_config() -> Any:
    return Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=N_LAYERS,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                            bos_token_id=2, eos_token_id=1, pad_token_id=0)


def _gemma() -> Any:
    cfg = _gemma_text_config()
    assert cfg.hidden_activation == "gelu_pytorch_tanh"
    return Gemma3ForCausalLM(cfg)


def _gemma_mm() -> Any:
    """Gemma 3 with its vision tower: blocks live at model.language_model.layers."""
    text = _gemma_text_config()
    text.vocab_size = 300  # room for the image tokens above the ids the tests feed
    cfg = Gemma3Config(
        text_config=text,
        vision_config=SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4, boi_token_index=297, eoi_token_index=298, image_token_index=299,
    )
    return Gemma3ForConditionalGeneration(cfg)


ARCHS = {
    "gpt2": Arch("gpt2", _gpt2, lambda m: m.transformer.h, "attn",
                 lambda b, h, a: b.ln_2(h + a), _gpt2_neurons, "c_proj", 128),
    # Parallel residual: the MLP reads the residual entering the block, not the attention output.
    "gpt_neox": Arch("gpt_neox", _neox, lambda m: m.gpt_neox.layers, "attention",
                     lambda b, h, a: b.post_attention_layernorm(h), _neox_neurons, "dense_4h_to_h", 64),
    "llama": Arch("llama", _llama, lambda m: m.model.layers, "self_attn",
                  lambda b, h, a: b.post_attention_layernorm(h + a), _gated(F.silu), "down_proj", 48),
    "gemma3_text": Arch("gemma3_text", _gemma, lambda m: m.model.layers, "self_attn",
                        lambda b, h, a: b.pre_feedforward_layernorm(h + b.post_attention_layernorm(a)),
                        _gated(_gelu_tanh), "down_proj", 40),
    "gemma3": Arch("gemma3", _gemma_mm, lambda m: m.model.language_model.layers, "self_attn",
                   lambda b, h, a: b.pre_feedforward_layernorm(h + b.post_attention_layernorm(a)),
                   _gated(_gelu_tanh), "down_proj", 40),
}

_MODELS: dict[str, Any] = {}


def _model(arch: str) -> Any:
    """One random-weight float32 model per architecture for the whole module (seeded, in eval mode).

    Matrices are redrawn with a large spread so that pre-activations are O(1): with the default 0.02
    init they are ~0.1, where an approximate GELU is indistinguishable from the exact one.
    """
    if arch not in _MODELS:
        torch.manual_seed(1234)
        model = ARCHS[arch].build().float().eval()
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() >= 2:
                    param.normal_(0.0, 0.3)
        _MODELS[arch] = model
    return _MODELS[arch]


def _subject(arch: str, tokenizer: Any = None) -> Subject:
    return Subject(_model(arch), tokenizer or StubTokenizer(), name=f"tiny-{arch}", revision="r0",
                   device=CPU, dtype=torch.float32)


def _ids(batch: int = 3, length: int = 11, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 96, (batch, length), generator=g)


def _manual(arch: str, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Neuron activations of every layer, recomputed from the residual stream and the block's own modules.

    Also checks, per block, that the rebuilt MLP input is the MLP's real input, and that the output
    projection applied to the neurons gives the MLP's real output (so the neurons are its whole input).
    """
    spec = ARCHS[arch]
    model = _model(arch)
    blocks = list(spec.blocks(model))
    attn_out: dict[int, torch.Tensor] = {}
    mlp_in: dict[int, torch.Tensor] = {}
    mlp_out: dict[int, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(blocks):
        handles.append(getattr(block, spec.attn).register_forward_hook(
            lambda _m, _a, o, i=i: attn_out.__setitem__(i, o[0] if isinstance(o, tuple) else o)))
        handles.append(block.mlp.register_forward_pre_hook(lambda _m, a, i=i: mlp_in.__setitem__(i, a[0])))
        handles.append(block.mlp.register_forward_hook(lambda _m, _a, o, i=i: mlp_out.__setitem__(i, o)))
    try:
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
            out = {}
            for i, block in enumerate(blocks):
                x = spec.mlp_input(block, hidden[i], attn_out[i])
                torch.testing.assert_close(x, mlp_in[i], rtol=1e-5, atol=1e-5)
                acts = spec.neurons(block.mlp, x)
                proj = getattr(block.mlp, spec.projection)
                torch.testing.assert_close(proj(acts), mlp_out[i], rtol=1e-4, atol=1e-5)
                out[i] = acts
    finally:
        for handle in handles:
            handle.remove()
    return out


def _all_hooks(model: Any) -> dict[tuple[str, str], list[int]]:
    """Every forward (pre-)hook on the model, by module and kind.  Transformers installs its own
    output-recording hooks the first time hidden states are asked for, so tests compare snapshots."""
    found = {}
    for name, module in model.named_modules():
        for kind in ("_forward_pre_hooks", "_forward_hooks"):
            if getattr(module, kind):
                found[(name, kind)] = list(getattr(module, kind))
    return found


# -- neuron capture -----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", list(ARCHS))
def test_activations_equal_manual_recomputation(arch: str) -> None:
    spec = ARCHS[arch]
    subject = _subject(arch)
    assert subject.n_layers == N_LAYERS
    assert subject.n_neurons == spec.width
    assert subject.prefix_ids == []
    assert subject.architecture == _model(arch).config.model_type
    ids = _ids()
    manual = _manual(arch, ids)
    hooks_before = _all_hooks(_model(arch))
    for layers in ((0, 1, 2), (0, 2), (2,), (1,)):
        got = subject.activations(ids, layers)
        assert sorted(got) == sorted(layers)
        for layer in layers:
            assert got[layer].shape == (3, 11, spec.width)
            assert got[layer].dtype == torch.float32
            torch.testing.assert_close(got[layer], manual[layer], rtol=1e-5, atol=1e-5)
            # A few neurons spelled out, as plain numbers.
            for f in (0, 7, spec.width - 1):
                for b, t in ((0, 0), (1, 5), (2, 10)):
                    assert math.isclose(float(got[layer][b, t, f]), float(manual[layer][b, t, f]),
                                        rel_tol=1e-5, abs_tol=1e-5)
    assert _all_hooks(_model(arch)) == hooks_before


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_activations_accept_lists_and_do_not_depend_on_batchmates(arch: str) -> None:
    subject = _subject(arch)
    ids = _ids(batch=4, length=9, seed=3)
    whole = subject.activations(ids.tolist(), (1,))[1]
    for b in range(4):
        alone = subject.activations(ids[b : b + 1], (1,))[1]
        torch.testing.assert_close(alone[0], whole[b], rtol=1e-5, atol=1e-5)
    again = subject.activations(ids, (1,))[1]
    assert torch.equal(again, whole)


def test_gpt2_conv1d_width_and_projection_list() -> None:
    model = _model("gpt2")
    projections = mlp_projections(model)
    assert projections == [block.mlp.c_proj for block in model.transformer.h]
    assert _subject("gpt2").n_neurons == 4 * 32  # Conv1D stores [in, out]: in = 4 * n_embd


def test_only_requested_layers_and_forward_stops_early() -> None:
    model = _model("llama")
    subject = _subject("llama")
    hooks_before = _all_hooks(model)
    calls: list[str] = []
    spy = [
        model.model.layers[1].register_forward_pre_hook(lambda *_: calls.append("block1")),
        model.model.layers[2].register_forward_pre_hook(lambda *_: calls.append("block2")),
        model.model.norm.register_forward_pre_hook(lambda *_: calls.append("norm")),
        model.lm_head.register_forward_pre_hook(lambda *_: calls.append("lm_head")),
    ]
    try:
        got = subject.activations(_ids(), (0,))
        assert list(got) == [0]
        assert calls == []  # the forward stopped inside block 0
        got = subject.activations(_ids(), (1, 0))  # unsorted request
        assert sorted(got) == [0, 1]
        assert calls == ["block1"]
        calls.clear()
        subject.activations(_ids(), (2,))
        assert calls == ["block1", "block2"]
        calls.clear()
        subject.bare_forward(_ids(), last_layer=1)  # the benchmarks' reference: as far as a collection of layer 1
        assert calls == ["block1"]
        calls.clear()
        subject.bare_forward(_ids())
        assert calls == ["block1", "block2", "norm", "lm_head"]
    finally:
        for handle in spy:
            handle.remove()
    for projection in subject.projections:
        assert len(projection._forward_pre_hooks) == 0
    assert _all_hooks(model) == hooks_before


def test_hooks_removed_when_the_forward_raises() -> None:
    model = _model("gpt2")
    subject = _subject("gpt2")
    hooks_before = _all_hooks(model)
    # An error inside the model (token id outside the vocabulary): nothing swallowed, no hook left.
    with pytest.raises(IndexError):
        subject.activations(torch.full((2, 4), VOCAB + 5), (0, 2))
    assert all(len(p._forward_pre_hooks) == 0 for p in subject.projections)
    assert _all_hooks(model) == hooks_before

    # An error between two requested layers, after the first hook has fired.
    def boom(*_: Any) -> None:
        raise RuntimeError("boom in block 1")

    handle = model.transformer.h[1].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom in block 1"):
            subject.activations(_ids(), (0, 2))
    finally:
        handle.remove()
    assert all(len(p._forward_pre_hooks) == 0 for p in subject.projections)
    assert _all_hooks(model) == hooks_before
    # And the subject still works afterwards.
    torch.testing.assert_close(subject.activations(_ids(), (2,))[2], _manual("gpt2", _ids())[2],
                               rtol=1e-5, atol=1e-5)


def test_out_of_range_layer_raises_and_leaves_no_hooks() -> None:
    subject = _subject("gpt2")
    hooks_before = _all_hooks(_model("gpt2"))
    for bad in ((0, N_LAYERS), (0, -1), ()):
        with pytest.raises(SubjectError, match="not all within"):
            subject.activations(_ids(), bad)
    assert _all_hooks(_model("gpt2")) == hooks_before


# -- unsupported architectures ------------------------------------------------------------------------

def _assert_names_families(err: pytest.ExceptionInfo[SubjectError]) -> None:
    msg = str(err.value)
    for family in ("Llama", "Qwen", "Gemma", "GPT-2", "GPT-NeoX", "down_proj", "c_proj", "dense_4h_to_h"):
        assert family in msg, (family, msg)
    assert "\n" not in msg


def test_unsupported_plain_module() -> None:
    with pytest.raises(SubjectError, match="not supported") as err:
        mlp_projections(torch.nn.Linear(4, 4))
    _assert_names_families(err)
    assert "'Linear'" in str(err.value)


def test_unsupported_bert_subject() -> None:
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    with pytest.raises(SubjectError, match="not supported") as err:
        Subject(BertModel(cfg), StubTokenizer(), name="bert", revision="r", device=CPU, dtype=torch.float32)
    _assert_names_families(err)
    assert "'bert'" in str(err.value)


def test_unsupported_blocks_without_mlp_projection() -> None:
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 4))

    class Inner(torch.nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(Block() for _ in range(n))

    class Outer(torch.nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.model = Inner(n)

    with pytest.raises(SubjectError) as err:
        mlp_projections(Outer(2))
    _assert_names_families(err)
    with pytest.raises(SubjectError):
        mlp_projections(Outer(0))  # no blocks at all


# -- BOS prefix ---------------------------------------------------------------------------------------

def test_bos_prefix_detection() -> None:
    assert _bos_prefix(StubTokenizer(bos=2, adds_bos=True)) == [2]
    assert _bos_prefix(StubTokenizer(bos=2, adds_bos=False)) == []
    assert _bos_prefix(StubTokenizer(bos=None, adds_bos=False)) == []
    assert _bos_prefix(StubTokenizer(bos=2, adds_bos=False, adds_eos=True)) == []  # longer, but not by a BOS


@pytest.mark.parametrize("arch", ["gemma3_text", "gpt2"])
def test_bos_prefix_is_prepended_and_dropped(arch: str) -> None:
    bos = 2
    with_bos = _subject(arch, StubTokenizer(bos=bos, adds_bos=True))
    plain = _subject(arch, StubTokenizer(bos=bos, adds_bos=False))
    assert with_bos.prefix_ids == [bos]
    assert plain.prefix_ids == []
    ids = _ids(batch=2, length=7, seed=5)
    prefixed = torch.cat([torch.full((2, 1), bos), ids], 1)
    got = with_bos.activations(ids, (0, 2))
    reference = plain.activations(prefixed, (0, 2))
    manual = _manual(arch, prefixed)
    for layer in (0, 2):
        assert got[layer].shape == (2, 7, ARCHS[arch].width)
        assert torch.equal(got[layer], reference[layer][:, 1:])
        torch.testing.assert_close(got[layer], manual[layer][:, 1:], rtol=1e-5, atol=1e-5)
    # Without the prefix the values differ (the BOS really was fed).
    assert not torch.allclose(plain.activations(ids, (2,))[2], got[2], atol=1e-4)


def test_token_strings_decode_each_id_once() -> None:
    tok = StubTokenizer()
    subject = _subject("gpt2", tok)
    assert subject.token_strings(torch.tensor([5, 6, 5])) == ["<5>", "<6>", "<5>"]
    assert subject.token_strings([6, 7]) == ["<6>", "<7>"]
    assert tok.decoded == [[5], [6], [7]]
