"""How a collection batches its work: excerpts per forward pass (`--batch-size auto`) and the groups of layers
whose statistics are updated together on a GPU."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from neuronscope.core.models.subject import Subject

#: On a GPU, layers are joined for the bookkeeping in groups of about this many activations per batch.
GROUP_ELEMENTS = 1 << 28
#: Bytes per (excerpt, unit) candidate a fixed-shape update keeps until the next batch: three composites, a cell,
#: (max, min) and four masks (accumulate.py's _merge_fixed), rounded up.
CANDIDATE_BYTES = 48


def auto_batch_size(subject: Subject, layers: tuple[int, ...], length: int, width: int | None = None) -> int:
    """Excerpts per forward pass: 64 on a CPU (against 32, 12 % faster collections of SmolLM2 in bench/collect.py;
    128 slows its forward pass); on GPUs, the largest power of two (up to 1,024) whose working memory
    fits in half of each GPU's free memory. Per token that is the activations of the GPU's layers twice (a batch is
    kept until the next one's forward pass is queued, see accumulate.py), the model's own working memory (about 40
    bytes per hidden unit), and the statistics' float32 and float64 copies of a group of layers; per excerpt and
    unit, the candidates a fixed-shape update keeps with the batch."""
    import torch

    per_device: dict[Any, int] = {}
    for layer in layers:
        device = subject.layer_device(layer)
        per_device[device] = per_device.get(device, 0) + 1
    gpus = {device: count for device, count in per_device.items() if device.type == "cuda"}
    if not gpus:
        return 64
    free = {device: torch.cuda.mem_get_info(device)[0] for device in gpus}
    size = torch.finfo(subject.dtype).bits // 8
    hidden = int(getattr(subject.model.config, "hidden_size", 0) or 4096)
    n = width or subject.n_neurons  # units per layer: MLP neurons, or a sparse coder's latents
    for batch in (1 << p for p in range(10, -1, -1)):
        tokens = batch * length
        if all(tokens * (count * n * size * 2 + hidden * 40) + batch * count * n * CANDIDATE_BYTES
               + max(GROUP_ELEMENTS, tokens * n) * 20 <= free[device] // 2
               for device, count in gpus.items()):
            return batch
    return 1


def layer_groups(layers: tuple[int, ...], neurons: int, tokens_per_batch: int, budget: int) -> list[tuple[int, ...]]:
    """Split layers into groups updated together, each group's joined batch [tokens, layers x
    neurons] within `budget` elements (a copy of that size is made per batch)."""
    per_group = max(1, budget // max(1, tokens_per_batch * neurons))
    return [layers[i : i + per_group] for i in range(0, len(layers), per_group)]
