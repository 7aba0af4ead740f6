"""The local backend: a Hugging Face causal LM in this process (packaged, a folder, a GGUF or a hub id).

Explanations come from generation (greedy, or n seeded samples in one batch). Simulation is ONE forward
pass: the excerpts are packed into as few prompts as fit PACK_IDS ids (instructions once, then each
excerpt's `token<TAB>?` lines, built from ids by neuronscope.core.llm.prompts so every slot position is exact), the
prompts run in forward batches, the base model gives the final hidden state, and only the ten digit rows of the
output embedding are applied at the position before each slot, so the full softmax over the digits costs
a few multiply-adds per token instead of a vocabulary-wide logit tensor. The prediction is the expected
digit.

Jobs call one backend from many threads (one per neuron in flight). All model work goes through one worker
thread per backend (neuronscope.core.llm.batching): packed prompts of concurrent simulate/rate calls share
forward batches (right padding, so every slot keeps its position), and greedy explanations of concurrent
neurons share one `generate` (left padding with an attention mask); a batch holds at most `batch_tokens`
padded tokens (rows x longest row; NEURONSCOPE_BATCH_TOKENS overrides the default). Seeded sampled
explanations run alone, so a seed gives the same samples whatever else is in flight. Tokenizer use is
serialised too: a fast tokenizer toggles shared state (`encode_special_tokens`) on every encode call.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from neuronscope.core.llm.base import Backend, LLMError
from neuronscope.core.llm.batching import Batcher
from neuronscope.core.llm.prompt_ids import (
    PackedPrompt,
    bos_ids,
    chat_opening_ids,
    digit_ids,
    encode_text,
    packed_simulation_ids,
)
from neuronscope.core.llm.prompts import ExplainPrompt
from neuronscope.core.llm.rating import Item, packed_rating_ids
from neuronscope.core.records import TOP

if TYPE_CHECKING:
    from neuronscope.core.models.subject import Subject

#: Longest explanation generated, in tokens.
MAX_NEW_TOKENS = 64
#: Sampling temperature when several explanations are asked for.
TEMPERATURE = 0.8
#: Bumped when the prompt wording changes, so cached answers to old prompts are not reused.
PROMPT_VERSION = 3
#: Most ids in one packed simulation prompt.
PACK_IDS = 4096
#: Most padded tokens (rows x longest row) in one batch, by device type; NEURONSCOPE_BATCH_TOKENS overrides.
BATCH_TOKENS = {"cuda": 16384, "cpu": 8192}
#: The same for other devices (MPS).
OTHER_BATCH_TOKENS = 8192
#: Most rows (sequences) in one batch, whatever the budget.
BATCH_ROWS = 64


def default_batch_tokens(device_type: str) -> int:
    """The token budget of a batch on a device: NEURONSCOPE_BATCH_TOKENS when set, else BATCH_TOKENS."""
    value = os.environ.get("NEURONSCOPE_BATCH_TOKENS", "").strip()
    if value:
        try:
            tokens = int(value)
        except ValueError:
            tokens = 0
        if tokens <= 0:
            raise LLMError(f"NEURONSCOPE_BATCH_TOKENS={value!r} is not a positive number of tokens")
        return tokens
    return BATCH_TOKENS.get(device_type, OTHER_BATCH_TOKENS)


class _FirstLineDone:
    """Stops generation once every sequence has written a non-blank line and then a newline (a leading
    blank line, which some models write first, does not stop it). Each new token is judged by its own text
    (`token_kind`, cached per id), so a step costs a lookup per sequence rather than decoding every sequence
    again; a newline is one byte that no multi-byte character contains, so token by token reads it as the
    decoded text would."""

    def __init__(self, token_kind: Callable[[int], tuple[bool, bool, bool]], prompt_length: int) -> None:
        self.token_kind = token_kind
        self.at = prompt_length
        self.seen: list[bool] = []
        self.done: list[bool] = []

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        new = input_ids[:, self.at:].tolist()
        self.at = int(input_ids.shape[1])
        if not self.done:
            self.seen, self.done = [False] * len(new), [False] * len(new)
        for row, ids in enumerate(new):
            for token in ids:
                content, newline, newline_after_content = self.token_kind(token)
                if newline_after_content or (newline and self.seen[row]):
                    self.done[row] = True
                self.seen[row] = self.seen[row] or content
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


class LocalBackend(Backend):
    """An in-process model as explainer and simulator, batching the work of concurrent callers."""

    def __init__(self, model: str, *, spec: str, device: str | None = None, dtype: str | None = None,
                 status: Callable[[str], None] | None = None, batch_size: int = BATCH_ROWS) -> None:
        super().__init__()
        from neuronscope.core.models.loading import load_subject

        self._attach(load_subject(model, device=device, dtype=dtype, status=status), spec, batch_size)

    @classmethod
    def from_subject(cls, lm: Subject, *, spec: str, batch_size: int = BATCH_ROWS) -> LocalBackend:
        """A backend over a model already loaded (benchmarks on randomly initialised models of real shapes)."""
        backend = cls.__new__(cls)
        Backend.__init__(backend)
        backend._attach(lm, spec, batch_size)
        return backend

    def _attach(self, lm: Subject, spec: str, batch_size: int) -> None:
        self.spec = spec
        self.lm = lm
        self.revision = lm.revision
        self.price = (0.0, 0.0)
        #: Requests a job keeps in flight by default: enough concurrent neurons to fill the batcher's batches.
        self.default_concurrency = 16
        #: Most rows (packed prompts, or explanation prompts) in one batch.
        self.batch_size = batch_size
        #: Most padded tokens (rows x longest row) in one batch; a single larger row still runs, alone.
        self.batch_tokens = default_batch_tokens(lm.device.type)
        self.pack_ids = PACK_IDS
        self._tokenizer_lock = threading.RLock()
        self._token_kinds: dict[int, tuple[bool, bool, bool]] = {}
        tok = lm.tokenizer
        try:
            self.digits = digit_ids(tok)
        except ValueError as err:
            raise LLMError(f"{spec} cannot simulate in one pass: {err}") from None
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        #: The worker that runs every forward pass and generation of this backend (see the module docstring).
        self.batcher: Batcher[Any, Any] = Batcher(self._run_batch, budget=lambda: self.batch_tokens,
                                                  max_rows=lambda: self.batch_size, name=f"{spec} batcher")

    @property
    def batches_run(self) -> int:
        """Batches (forward passes or generations) run so far."""
        return self.batcher.batches_run

    # -- explanation --------------------------------------------------------------------------------
    def _chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        tok = self.lm.tokenizer
        with self._tokenizer_lock:
            if getattr(tok, "chat_template", None):
                return chat_opening_ids(tok, messages)
            return bos_ids(tok) + encode_text(tok, "\n\n".join(m["content"] for m in messages) + "\n\nExplanation:")

    def count_tokens(self, text: str) -> int:
        with self._tokenizer_lock:
            return len(encode_text(self.lm.tokenizer, text))

    def context_tokens(self) -> int:
        limit = int(getattr(self.lm.model.config, "max_position_embeddings", 4096) or 4096)
        return min(limit, 8192) - MAX_NEW_TOKENS - 64

    def _explain_payload(self, prompt: ExplainPrompt, n: int, seed: int) -> tuple[list[int], dict[str, Any]]:
        ids = self._chat_ids(prompt.messages())
        with self._tokenizer_lock:
            text = self.lm.tokenizer.decode(ids)
        return ids, {"v": PROMPT_VERSION, "prompt": text, "n": n, "seed": seed if n > 1 else 0,
                     "max_new_tokens": MAX_NEW_TOKENS, "temperature": TEMPERATURE if n > 1 else 0}

    def _explain(self, prompt: ExplainPrompt, n: int, seed: int) -> list[str]:
        ids, payload = self._explain_payload(prompt, n, seed)
        answer = self.call("explain", payload, lambda: self.generate(ids, n, seed), estimate=len(ids) + n * MAX_NEW_TOKENS)
        return list(json.loads(answer))

    def generate(self, prompt_ids: Sequence[int], n: int = 1, seed: int = 0) -> tuple[str, int, int]:
        """(JSON list of the n answers, prompt tokens, generated tokens): a greedy answer (n == 1) in a batch with
        other callers' greedy answers, n seeded samples alone."""
        ids = list(prompt_ids)
        if n == 1:
            return self.batcher.submit("greedy", [(len(ids) + MAX_NEW_TOKENS, ids)])[0]  # type: ignore[no-any-return]
        return self.batcher.submit("sample", [(n * (len(ids) + MAX_NEW_TOKENS), (ids, n, seed))],  # type: ignore[no-any-return]
                                   alone=True)[0]

    def requests(self, kind: str, *args: Any) -> list[tuple[Any, int, int]]:
        if kind == "explain":
            ids, payload = self._explain_payload(*args)
            return [(payload, len(ids), args[1] * MAX_NEW_TOKENS)]
        if kind == "rate":
            payload, prompts = self._rating_request(*args)
            return [(payload, sum(len(p.ids) for p in prompts), 0)]
        explanation, excerpts = args
        prompts = self._simulation_prompts(explanation, excerpts)
        return [(self._simulation_payload(explanation, excerpts), sum(len(p.ids) for p in prompts), 0)]

    @staticmethod
    def _simulation_payload(explanation: str, excerpts: Sequence[Sequence[str]]) -> dict[str, Any]:
        return {"v": PROMPT_VERSION, "explanation": explanation, "excerpts": [list(t) for t in excerpts]}

    def _simulation_prompts(self, explanation: str, excerpts: Sequence[Sequence[str]]) -> list[PackedPrompt]:
        limit = min(self.pack_ids, max(self.context_tokens(), 1024))
        with self._tokenizer_lock:
            return packed_simulation_ids(self.lm.tokenizer, explanation, excerpts, max_ids=limit)

    def _generate(self, prompt_ids: list[int], n: int, seed: int) -> tuple[str, int, int]:
        """n seeded samples (or one greedy answer) of one prompt, now, in this thread."""
        import torch

        ids = torch.tensor([prompt_ids], device=self.lm.device)
        options: dict[str, Any] = {"max_new_tokens": MAX_NEW_TOKENS, "pad_token_id": self.pad_id,
                                   "stopping_criteria": [_FirstLineDone(self._token_kind, ids.shape[1])]}
        if n > 1:
            options.update(do_sample=True, temperature=TEMPERATURE, top_p=0.95, num_return_sequences=n)
        else:
            options.update(do_sample=False)
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(seed)
            out = self.lm.model.generate(ids, attention_mask=torch.ones_like(ids), **options)
        new = out[:, ids.shape[1]:]
        texts = [self._decode(row) for row in new]
        generated = int((new != self.pad_id).sum())
        return json.dumps(texts, ensure_ascii=False), int(ids.shape[1]), generated

    def _generate_greedy(self, prompts: list[list[int]]) -> list[tuple[str, int, int]]:
        """One greedy answer per prompt, the prompts left-padded into one batch (positions follow the attention
        mask, so each answer is the one its prompt gets alone, up to floating-point rounding)."""
        import torch

        if len(prompts) == 1:
            return [self._generate(prompts[0], 1, 0)]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(self.lm.device), mask.to(self.lm.device)
        stop = _FirstLineDone(self._token_kind, width)
        with torch.inference_mode():
            out = self.lm.model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                         pad_token_id=self.pad_id, stopping_criteria=[stop])
        results = []
        for p, row in zip(prompts, out[:, width:].cpu()):
            kept = row[row != self.pad_id]  # a row that finished early is filled with pads after its answer
            results.append((json.dumps([self._decode(row)], ensure_ascii=False), len(p), int(len(kept))))
        return results

    def _token_kind(self, token: int) -> tuple[bool, bool, bool]:
        """(holds non-blank text, holds a newline, holds a newline after non-blank text) for one token id, as it
        decodes alone (special tokens skipped)."""
        kind = self._token_kinds.get(token)
        if kind is None:
            with self._tokenizer_lock:
                text = str(self.lm.tokenizer.decode([token], skip_special_tokens=True))
            rest = text.lstrip()
            kind = self._token_kinds[token] = (bool(rest), "\n" in text, "\n" in rest)
        return kind

    def _decode(self, row: Any) -> str:
        """An answer's text: trailing pads (a batched row that finished early) dropped, special tokens skipped."""
        ids = [int(t) for t in row]
        while ids and ids[-1] == self.pad_id:
            ids.pop()
        with self._tokenizer_lock:
            return str(self.lm.tokenizer.decode(ids, skip_special_tokens=True))

    # -- simulation ---------------------------------------------------------------------------------
    def _simulate(self, explanation: str, excerpts: Sequence[Sequence[str]]) -> list[np.ndarray]:
        payload = self._simulation_payload(explanation, excerpts)
        prompts = self._simulation_prompts(explanation, excerpts)
        total = sum(len(p.ids) for p in prompts)
        answer = self.call("simulate", payload, lambda: (json.dumps(self.expected_values(prompts)), total, 0),
                           estimate=total)
        return [np.asarray(v, np.float32) for v in json.loads(answer)]

    # -- rating -------------------------------------------------------------------------------------
    def _rating_request(self, task: str, explanation: str, items: Sequence[Item]) -> tuple[dict[str, Any],
                                                                                           list[PackedPrompt]]:
        payload = {"v": PROMPT_VERSION, "task": task, "explanation": explanation,
                   "items": [[list(i.tokens), list(i.marks)] for i in items]}
        limit = min(self.pack_ids, max(self.context_tokens(), 1024))
        with self._tokenizer_lock:
            return payload, packed_rating_ids(self.lm.tokenizer, task, explanation, items, max_ids=limit)

    def _rate(self, task: str, explanation: str, items: Sequence[Item]) -> list[float]:
        payload, prompts = self._rating_request(task, explanation, items)
        total = sum(len(p.ids) for p in prompts)
        answer = self.call("rate", payload, lambda: (json.dumps([v[0] for v in self.expected_values(prompts)]), total, 0),
                           estimate=total)
        return [float(v) for v in json.loads(answer)]

    def expected_values(self, prompts: Sequence[PackedPrompt]) -> list[list[float]]:
        """The expected digit at every slot of every excerpt of the packed prompts, in forward batches shared with
        the prompts of concurrent callers."""
        rows = self.batcher.submit("forward", [(len(p.ids), p) for p in prompts])
        return [values for row in rows for values in row]

    def _forward(self, prompts: list[PackedPrompt]) -> list[list[list[float]]]:
        """Per prompt, per excerpt, the expected digit at each slot: the prompts right-padded into one forward pass
        (so every slot keeps its position), one read of the digit rows at every slot of the batch. No attention
        mask: attention is causal, so a prompt's tokens never see the pads after them (their hidden states came out
        bit-identical with and without one), and without a mask the attention kernels take their causal path,
        which was faster here (2 rows of ~2,750 ids, qwen-0.5b bf16 on CPU: 5-12 s against 7-20 s with a mask)."""
        import torch

        model, device = self.lm.model, self.lm.device
        head = model.get_output_embeddings()
        rows = head.weight[self.digits]  # [10, hidden]
        bias = head.bias[self.digits] if getattr(head, "bias", None) is not None else None
        cap = getattr(model.config, "final_logit_softcapping", None)
        scale = torch.arange(TOP + 1, dtype=torch.float32, device=device)
        width = max(len(p.ids) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        where_row: list[int] = []
        where_pos: list[int] = []
        for i, p in enumerate(prompts):
            ids[i, :len(p.ids)] = torch.tensor(p.ids, dtype=torch.long)
            for excerpt_slots in p.slots:
                where_row += [i] * len(excerpt_slots)
                where_pos += [s - 1 for s in excerpt_slots]  # the digit is read one position before its slot
        with torch.inference_mode():
            hidden = model.base_model(input_ids=ids.to(device)).last_hidden_state  # [rows, width, hidden]
            picked = hidden[torch.tensor(where_row, device=device), torch.tensor(where_pos, device=device)]
            logits = picked @ rows.T  # [slots, 10]
            if bias is not None:
                logits = logits + bias
            if cap:
                logits = torch.tanh(logits / cap) * cap
            flat = (torch.softmax(logits.float(), dim=-1) @ scale).tolist()
        out: list[list[list[float]]] = []
        at = 0
        for p in prompts:
            per_excerpt = []
            for excerpt_slots in p.slots:
                per_excerpt.append(flat[at:at + len(excerpt_slots)])
                at += len(excerpt_slots)
            out.append(per_excerpt)
        return out

    def _run_batch(self, group: Hashable, payloads: list[Any]) -> list[Any]:
        """The batcher's work: one batch of a group, split in halves when a GPU runs out of memory."""
        try:
            if group == "forward":
                return self._forward(payloads)
            if group == "greedy":
                return self._generate_greedy(payloads)
            return [self._generate(ids, n, seed) for ids, n, seed in payloads]
        except RuntimeError as err:
            if len(payloads) < 2 or "out of memory" not in str(err).lower():
                raise
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(payloads) // 2
        return self._run_batch(group, payloads[:half]) + self._run_batch(group, payloads[half:])

    def close(self) -> None:
        batcher = self.__dict__.get("batcher")
        if batcher is not None:
            batcher.close()
        self.__dict__.pop("lm", None)
