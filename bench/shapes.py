"""Randomly initialised models of real shapes, for measuring on a GPU machine that has no weights: nothing is
downloaded (the configs are written here, the weights are random), and the tokenizer is a packaged model's, saved
to a folder and carried (`python bench/gpu_local.py --save-tokenizer .gpu_tokenizer`; SmolLM2's 49,152 ids fit
every shape below)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: Llama-3.1-8B's config.json, as far as it shapes the computation.
LLAMA_31_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "hidden_act": "silu",
    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}
#: GPT-2 XL's (1.5B parameters, 48 layers of 6,400 MLP neurons: the 307,200 neurons OpenAI explained).
GPT2_XL: dict[str, Any] = {
    "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 1600, "n_layer": 48, "n_head": 25,
    "n_positions": 1024, "n_ctx": 1024, "vocab_size": 50257, "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
}
#: Small layers of Llama's shape, for a CPU check of a script (the vocabulary stays, so the tokenizer fits).
TINY = {**LLAMA_31_8B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16}
SHAPES = {"llama-3.1-8b": LLAMA_31_8B, "gpt2-xl": GPT2_XL, "tiny": TINY}


def make_importable() -> None:
    """Import neuronscope from this checkout when it is not installed (the GPU machine)."""
    try:
        import neuronscope.core  # noqa: F401
    except ImportError:
        shim = Path(tempfile.mkdtemp(prefix="neuronscope-")) / "neuronscope"
        shim.mkdir()
        for name in ("core", "data"):
            (shim / name).symlink_to(ROOT / name)
        sys.path.insert(0, str(shim.parent))
    sys.path.insert(0, str(ROOT / "bench"))


def build_model(config: dict[str, Any], device: Any, dtype: Any) -> Any:
    """A randomly initialised model of the config's shape (seeded), made directly on the device."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    kinds = {"llama": (LlamaConfig, LlamaForCausalLM), "gpt2": (GPT2Config, GPT2LMHeadModel)}
    config_class, model_class = kinds[config["model_type"]]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model: Any = model_class(config_class(**config))
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval()


#: Where each architecture's config counts its layers.
LAYER_KEYS = {"llama": "num_hidden_layers", "gpt2": "n_layer"}


def random_subject(shape: str, tokenizer_folder: Path, device: Any, dtype: Any, layers: int | None = None) -> Any:
    """A Subject over a random model of `shape` (a key of SHAPES) with the saved tokenizer; `layers` keeps only the
    first so many of its layers (each of the real shape), for a CPU that cannot hold or run them all."""
    from transformers import AutoTokenizer

    from neuronscope.core.models.subject import Subject

    config = SHAPES[shape]
    if layers:
        config = {**config, LAYER_KEYS[config["model_type"]]: layers}
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    if len(tokenizer) > config["vocab_size"]:
        raise SystemExit(f"the tokenizer has {len(tokenizer)} ids, more than the model's {config['vocab_size']} rows")
    model = build_model(config, device, dtype)
    name = f"random {shape} shape" + (f", {layers} layers" if layers else "")
    return Subject(model, tokenizer, name=name, revision=f"random-init-{shape}", device=device,
                   dtype=dtype)
