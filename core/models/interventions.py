"""What a unit does to the model's output. An intervention rewrites one unit's activation on its way into its layer's
MLP output projection (a forward pre-hook), so everything after it in the network sees the change:

- `effects`: over the unit's top excerpts, the next-token log-probabilities with the unit ablated (set to zero or
  to its mean, everywhere) and amplified (set to a multiple of its corpus max where it fires), against the plain
  pass; the tokens raised and lowered most, averaged over the positions where the unit fires;
- `steer`: a greedy continuation of a prompt with a constant added to the unit at every position, beside the plain
  one (scale 0 adds nothing, so both are the same).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from neuronscope.core.ids import NeuronId

if TYPE_CHECKING:
    from neuronscope.core.models.subject import Subject

#: A position counts as one where the unit fires when its activation reaches this share of the excerpt's peak.
FIRING_SHARE = 0.5


@dataclass(frozen=True)
class TokenShift:
    """A next-token candidate and how much its log-probability moved (mean over the positions measured)."""

    token: str
    token_id: int
    change: float


@dataclass(frozen=True)
class Shift:
    """One intervention's effect: the tokens raised most and lowered most."""

    name: str
    """e.g. "ablated to 0", "amplified to 4 x max (12.3)"."""
    raised: tuple[TokenShift, ...]
    lowered: tuple[TokenShift, ...]
    mean_abs_change: float
    """Mean |change| of log-probability over the vocabulary and positions: the size of the effect."""


@dataclass(frozen=True)
class Effects:
    """What a unit does to the next token, over some of its top excerpts."""

    unit: NeuronId
    excerpts: int
    positions: int
    """Positions averaged over (where the unit fires)."""
    shifts: tuple[Shift, ...]


@contextmanager
def intervening(subject: Subject, unit: NeuronId, edit: Callable[[Any], Any], where: Any = None) -> Iterator[None]:
    """While inside, the unit's activation x (every batch row and position) is replaced by edit(x), only at the
    positions of the boolean mask `where` [B, T] when one is given."""

    def hook(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0].clone()
        old = x[..., unit.neuron]
        new = edit(old).to(x.dtype)
        x[..., unit.neuron] = new if where is None else new.where(where.to(x.device), old)
        return (x, *args[1:])

    handle = subject.projections[unit.layer].register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _log_probs(subject: Subject, ids: Any, rows: Any) -> Any:
    """Log-softmax of the logits at the positions `rows` (a boolean [B, T] mask), float32 [positions, vocab]."""
    import torch

    with torch.inference_mode():
        logits = subject.model(input_ids=ids.to(subject.device), use_cache=False).logits
    return torch.log_softmax(logits[rows.to(logits.device)].float(), -1)


def effects(subject: Subject, unit: NeuronId, token_ids: np.ndarray, *, ablate_to: float, amplify_to: float,
            top: int = 10, labels: tuple[str, str] = ("ablated", "amplified")) -> Effects:
    """The unit's effect on the next token over excerpts `token_ids` [n, T] (its top excerpts): ablated (set to
    `ablate_to` everywhere) and amplified (set to `amplify_to` where it fires), each against the plain pass."""
    import torch

    ids = torch.as_tensor(np.asarray(token_ids, np.int64))
    if subject.prefix_ids:
        ids = torch.cat([torch.tensor(subject.prefix_ids).expand(len(ids), -1), ids], 1)
    seen: list[Any] = []

    def record(x: Any) -> Any:
        seen.append(x.float().cpu())
        return x

    with intervening(subject, unit, record):
        with torch.inference_mode():
            logits = subject.model(input_ids=ids.to(subject.device), use_cache=False).logits
    acts = seen[0]  # [n, T] the unit's own activations
    skip = len(subject.prefix_ids)
    firing = torch.zeros_like(acts, dtype=torch.bool)
    peak = acts[:, skip:].amax(1, keepdim=True)
    firing[:, skip:] = (acts[:, skip:] >= FIRING_SHARE * peak) & (peak > 0)
    base = torch.log_softmax(logits[firing.to(logits.device)].float(), -1)
    shifts = []
    for name, value, where in ((labels[0], ablate_to, None), (labels[1], amplify_to, firing)):
        def set_to(x: Any, v: float = value) -> Any:
            return torch.full_like(x, v)

        with intervening(subject, unit, set_to, where):
            changed = _log_probs(subject, ids, firing)
        shifts.append(_shift(subject, name, (changed - base).mean(0), top, float((changed - base).abs().mean())))
    return Effects(unit, len(token_ids), int(firing.sum()), tuple(shifts))


def _shift(subject: Subject, name: str, change: Any, top: int, size: float) -> Shift:
    import torch

    order = torch.argsort(change, descending=True).tolist()

    def shifts(ids: list[int]) -> tuple[TokenShift, ...]:
        return tuple(TokenShift(text, i, float(change[i])) for i, text in zip(ids, subject.token_strings(ids)))

    return Shift(name, shifts(order[:top]), shifts(order[::-1][:top]), size)


def steer(subject: Subject, unit: NeuronId, prompt: str, add: float, tokens: int) -> tuple[str, str]:
    """Greedy continuations of `prompt`, plain and with `add` added to the unit at every position."""
    import torch

    from neuronscope.core.models.subject import SubjectError

    ids = subject.prefix_ids + subject.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) == len(subject.prefix_ids):
        raise SubjectError("the prompt has no tokens: pass --prompt with some text")
    start = torch.tensor([ids], device=subject.device)
    pad = subject.tokenizer.pad_token_id
    pad = pad if pad is not None else subject.tokenizer.eos_token_id

    def continuation() -> str:
        with torch.inference_mode():
            out = subject.model.generate(start, attention_mask=torch.ones_like(start), max_new_tokens=tokens,
                                         do_sample=False, pad_token_id=pad)
        return str(subject.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))

    plain = continuation()
    with intervening(subject, unit, lambda x: x + add):
        steered = continuation()
    return plain, steered
