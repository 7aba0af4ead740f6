"""The local backend: a Hugging Face causal LM in this process (packaged, a folder, a GGUF or a hub id).

Explanations come from generation (greedy, or n seeded samples in one batch). Simulation is ONE forward
pass: the excerpts are packed into as few prompts as fit PACK_IDS ids (instructions once, then each
excerpt's `token<TAB>?` lines, built from ids by neuronscope.core.llm.prompts so every slot position is exact), the
prompts run as one batch, the base model gives the final hidden state, and only the ten digit rows of the
output embedding are applied at the position before each slot, so the full softmax over the digits costs
a few multiply-adds per token instead of a vocabulary-wide logit tensor. The prediction is the expected
digit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from neuronscope.core.llm.base import Backend, LLMError
from neuronscope.core.llm.prompts import (
    ExplainPrompt,
    PackedPrompt,
    bos_ids,
    chat_opening_ids,
    digit_ids,
    encode_text,
    packed_simulation_ids,
)
from neuronscope.core.llm.rating import Item, packed_rating_ids
from neuronscope.core.records import TOP

#: Longest explanation generated, in tokens.
MAX_NEW_TOKENS = 64
#: Sampling temperature when several explanations are asked for.
TEMPERATURE = 0.8
#: Bumped when the prompt wording changes, so cached answers to old prompts are not reused.
PROMPT_VERSION = 3
#: Most ids in one packed simulation prompt.
PACK_IDS = 4096


class _FirstLineDone:
    """Stops generation once every sequence has written a non-blank line and then a newline (a leading
    blank line, which some models write first, does not stop it)."""

    def __init__(self, tokenizer: Any, prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.start = prompt_length

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        done = [bool(text.lstrip().count("\n")) for text in
                self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class LocalBackend(Backend):
    """An in-process model as explainer and simulator."""

    def __init__(self, model: str, *, spec: str, device: str | None = None, dtype: str | None = None,
                 status: Callable[[str], None] | None = None, batch_size: int = 8) -> None:
        super().__init__()
        from neuronscope.core.models.subject import load_subject

        self.spec = spec
        self.lm = load_subject(model, device=device, dtype=dtype, status=status)
        self.revision = self.lm.revision
        self.price = (0.0, 0.0)
        self.batch_size = batch_size
        self.pack_ids = PACK_IDS
        tok = self.lm.tokenizer
        try:
            self.digits = digit_ids(tok)
        except ValueError as err:
            raise LLMError(f"{spec} cannot simulate in one pass: {err}") from None
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    # -- explanation --------------------------------------------------------------------------------
    def _chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        tok = self.lm.tokenizer
        if getattr(tok, "chat_template", None):
            return chat_opening_ids(tok, messages)
        return bos_ids(tok) + encode_text(tok, "\n\n".join(m["content"] for m in messages) + "\n\nExplanation:")

    def count_tokens(self, text: str) -> int:
        return len(encode_text(self.lm.tokenizer, text))

    def context_tokens(self) -> int:
        limit = int(getattr(self.lm.model.config, "max_position_embeddings", 4096) or 4096)
        return min(limit, 8192) - MAX_NEW_TOKENS - 64

    def _explain_payload(self, prompt: ExplainPrompt, n: int, seed: int) -> tuple[list[int], dict[str, Any]]:
        ids = self._chat_ids(prompt.messages())
        return ids, {"v": PROMPT_VERSION, "prompt": self.lm.tokenizer.decode(ids), "n": n, "seed": seed if n > 1 else 0,
                     "max_new_tokens": MAX_NEW_TOKENS, "temperature": TEMPERATURE if n > 1 else 0}

    def _explain(self, prompt: ExplainPrompt, n: int, seed: int) -> list[str]:
        ids, payload = self._explain_payload(prompt, n, seed)
        answer = self.call("explain", payload, lambda: self._generate(ids, n, seed), estimate=len(ids) + n * MAX_NEW_TOKENS)
        return list(json.loads(answer))

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
        return packed_simulation_ids(self.lm.tokenizer, explanation, excerpts, max_ids=limit)

    def _generate(self, prompt_ids: list[int], n: int, seed: int) -> tuple[str, int, int]:
        import torch

        tok = self.lm.tokenizer
        ids = torch.tensor([prompt_ids], device=self.lm.device)
        options: dict[str, Any] = {"max_new_tokens": MAX_NEW_TOKENS, "pad_token_id": self.pad_id,
                                   "stopping_criteria": [_FirstLineDone(tok, ids.shape[1])]}
        if n > 1:
            options.update(do_sample=True, temperature=TEMPERATURE, top_p=0.95, num_return_sequences=n)
        else:
            options.update(do_sample=False)
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(seed)
            out = self.lm.model.generate(ids, attention_mask=torch.ones_like(ids), **options)
        new = out[:, ids.shape[1]:]
        texts = [tok.decode(row, skip_special_tokens=True) for row in new]
        generated = int((new != self.pad_id).sum())
        return json.dumps(texts, ensure_ascii=False), int(ids.shape[1]), generated

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
        return payload, packed_rating_ids(self.lm.tokenizer, task, explanation, items, max_ids=limit)

    def _rate(self, task: str, explanation: str, items: Sequence[Item]) -> list[float]:
        payload, prompts = self._rating_request(task, explanation, items)
        total = sum(len(p.ids) for p in prompts)
        answer = self.call("rate", payload, lambda: (json.dumps([v[0] for v in self.expected_values(prompts)]), total, 0),
                           estimate=total)
        return [float(v) for v in json.loads(answer)]

    def expected_values(self, prompts: Sequence[PackedPrompt]) -> list[list[float]]:
        """The expected digit at every slot of every excerpt of the packed prompts, prompts batched."""
        import torch

        model = self.lm.model
        head = model.get_output_embeddings()
        rows = head.weight[self.digits]  # [10, hidden]
        bias = head.bias[self.digits] if getattr(head, "bias", None) is not None else None
        cap = getattr(model.config, "final_logit_softcapping", None)
        scale = torch.arange(TOP + 1, dtype=torch.float32, device=self.lm.device)
        out: list[list[float]] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start:start + self.batch_size]
            width = max(len(p.ids) for p in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, p in enumerate(batch):
                ids[i, :len(p.ids)] = torch.tensor(p.ids)
                mask[i, :len(p.ids)] = 1
            with torch.inference_mode():
                hidden = model.base_model(input_ids=ids.to(self.lm.device),
                                          attention_mask=mask.to(self.lm.device)).last_hidden_state  # [b, pos, hidden]
                for i, p in enumerate(batch):
                    for excerpt_slots in p.slots:
                        before = torch.tensor(excerpt_slots, dtype=torch.long, device=self.lm.device) - 1
                        logits = hidden[i, before] @ rows.T  # [slots, 10]
                        if bias is not None:
                            logits = logits + bias
                        if cap:
                            logits = torch.tanh(logits / cap) * cap
                        probs = torch.softmax(logits.float(), dim=-1)
                        out.append((probs @ scale).tolist())
        return out

    def close(self) -> None:
        del self.lm
