"""What a unit does to the model's output. An intervention rewrites one unit's activation on its way into its layer's
MLP output projection (a forward pre-hook), so everything after it in the network sees the change:

- `effects`: over the unit's top excerpts, the next-token log-probabilities with the unit ablated (set to zero or
  to its mean, everywhere) and amplified (set to a multiple of its corpus max where it fires), against the plain
  pass; the tokens raised and lowered most, averaged over the positions where the unit fires;
- `steering_effect`: the next-token probabilities gained and lost when a constant is added to the unit at every
  position;
- `steer` and `continuations`: greedy continuations of prompts with a constant added to the unit at every position,
  beside the plain ones (adding 0 changes nothing, so both are the same).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from neuronscope.core.ids import NeuronId

if TYPE_CHECKING:
    from neuronscope.core.models.sparse import SparseCoder
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


@contextmanager
def intervening_latent(subject: Subject, coder: SparseCoder, latent: int, edit: Callable[[Any], Any],
                       where: Any = None) -> Iterator[None]:
    """While inside, latent `latent` of the sparse coder reads a (the coder's encoding of the hidden state it reads)
    and the hidden state it writes moves by (edit(a) - a) x its decoder direction, at every position or those of the
    mask `where`: the residual stream for an SAE on it, the MLP's output for one on that or for a transcoder (which
    reads the MLP's input)."""
    import torch

    coder = coder.on(subject.layer_device(coder.layer))
    direction = coder.w_dec[latent]
    block = subject.blocks[coder.layer]
    mlp = block.get_submodule(subject.mlp_path)

    def shift(read: Any) -> Any:
        """The change to write, [B, T, d], from the hidden state the coder reads."""
        old = coder.encode(read)[..., latent]
        new = edit(old).to(old.dtype)
        if where is not None:
            new = torch.where(where.to(old.device), new, old)
        return ((new - old)[..., None] * direction).to(read.dtype)

    def before(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        if args:
            return (args[0] + shift(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + shift(kwargs["hidden_states"])}

    def after(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        read = (args[0] if args else kwargs["hidden_states"]) if coder.transcoder else hidden
        moved = hidden + shift(read)
        return (moved, *output[1:]) if isinstance(output, tuple) else moved

    if coder.transcoder or coder.point == "mlp_out":
        handle = mlp.register_forward_hook(after, with_kwargs=True)
    elif coder.point == "resid_post":
        handle = block.register_forward_hook(after, with_kwargs=True)
    else:
        handle = (mlp if coder.point == "mlp_in" else block).register_forward_pre_hook(before, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _with_prefix(subject: Subject, token_ids: np.ndarray) -> Any:
    """Token ids [n, T] as a tensor, after the subject's prefix (a BOS token) where it has one."""
    import torch

    ids = torch.as_tensor(np.asarray(token_ids, np.int64))
    if subject.prefix_ids:
        ids = torch.cat([torch.tensor(subject.prefix_ids).expand(len(ids), -1), ids], 1)
    return ids


def _log_probs(subject: Subject, ids: Any, rows: Any) -> Any:
    """Log-softmax of the logits at the positions `rows` (a boolean [B, T] mask), float32 [positions, vocab]."""
    import torch

    with torch.inference_mode():
        logits = subject.model(input_ids=ids.to(subject.device), use_cache=False).logits
    return torch.log_softmax(logits[rows.to(logits.device)].float(), -1)


def effects(subject: Subject, unit: NeuronId, token_ids: np.ndarray, *, ablate_to: float, amplify_to: float,
            top: int = 10, labels: tuple[str, str] = ("ablated", "amplified"), coder: SparseCoder | None = None
            ) -> Effects:
    """The unit's effect on the next token over excerpts `token_ids` [n, T] (its top excerpts): ablated (set to
    `ablate_to` everywhere) and amplified (set to `amplify_to` where it fires), each against the plain pass. With
    `coder`, the unit is that coder's latent `unit.neuron`."""
    import torch

    def intervening(subject: Subject, unit: NeuronId, edit: Callable[[Any], Any], where: Any = None) -> Any:
        return _intervention(subject, unit, edit, where, coder)

    ids = _with_prefix(subject, token_ids)
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


def steering_effect(subject: Subject, unit: NeuronId, token_ids: np.ndarray, add: float, *, top: int = 10,
                    coder: SparseCoder | None = None) -> Shift:
    """What pushing the unit does to the next token: the mean next-token probability over every position of the
    excerpts `token_ids` [n, T] with `add` added to the unit at every position, against the plain pass; the tokens
    gaining and losing the most probability (not log-probability, which rare tokens dominate)."""
    import torch

    ids = _with_prefix(subject, token_ids)
    skip = len(subject.prefix_ids)

    def mean_probs() -> Any:
        with torch.inference_mode():
            logits = subject.model(input_ids=ids.to(subject.device), use_cache=False).logits[:, skip:]
        return torch.softmax(logits.float(), -1).mean((0, 1))

    plain = mean_probs()
    with _intervention(subject, unit, lambda x: x + add, None, coder):
        change = mean_probs() - plain
    return _shift(subject, f"pushed by {add:+.3g}", change, top, float(change.abs().mean()))


def _shift(subject: Subject, name: str, change: Any, top: int, size: float) -> Shift:
    import torch

    order = torch.argsort(change, descending=True).tolist()

    def shifts(ids: list[int]) -> tuple[TokenShift, ...]:
        texts = subject.token_strings(ids, apart=True)  # a ranking of tokens, not a text
        return tuple(TokenShift(text, i, float(change[i])) for i, text in zip(ids, texts))

    return Shift(name, shifts(order[:top]), shifts(order[::-1][:top]), size)


def _intervention(subject: Subject, unit: NeuronId, edit: Callable[[Any], Any], where: Any,
                  coder: SparseCoder | None) -> Any:
    """The intervention on an MLP neuron, or on a sparse coder's latent when `coder` is given."""
    if coder is None:
        return intervening(subject, unit, edit, where)
    return intervening_latent(subject, coder, unit.neuron, edit, where)


def steer(subject: Subject, unit: NeuronId, prompt: str, add: float, tokens: int,
          coder: SparseCoder | None = None) -> tuple[str, str]:
    """Greedy continuations of `prompt`, plain and with `add` added to the unit (a neuron, or `coder`'s latent) at
    every position."""
    from neuronscope.core.models.subject import SubjectError

    ids = subject.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise SubjectError("the prompt has no tokens: pass --prompt with some text")
    plain, steered = continuations(subject, unit, np.array([ids]), add, tokens, coder)

    def text(row: list[int]) -> str:
        return str(subject.tokenizer.decode(row, skip_special_tokens=True))

    return text(plain[0]), text(steered[0])


def continuations(subject: Subject, unit: NeuronId, prompts: np.ndarray, add: float, tokens: int,
                  coder: SparseCoder | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy continuations of `tokens` tokens (token ids, up to the end-of-text token) of each prompt of
    `prompts` [n, P] (token ids, one length, so they run as one batch), plain and with `add` added to the unit at
    every position."""
    import torch

    ids = _with_prefix(subject, prompts).to(subject.device)
    end = subject.tokenizer.eos_token_id
    pad = subject.tokenizer.pad_token_id
    pad = pad if pad is not None else end

    def generate() -> list[list[int]]:
        with torch.inference_mode():
            out = subject.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                         do_sample=False, pad_token_id=pad)
        rows = out[:, ids.shape[1]:].tolist()
        return [row[: row.index(end)] if end is not None and end in row else row for row in rows]

    plain = generate()
    with _intervention(subject, unit, lambda x: x + add, None, coder):
        steered = generate()
    return plain, steered
