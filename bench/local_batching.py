"""The local backend's batching across neurons: neurons per minute issued from 1 thread against N threads.

A "neuron" here is the LLM work a `lines` job does for one neuron with the defaults (one candidate, no
revision): one greedy explanation from core.llm.prompts.explain_prompt over its train excerpts, then the test
split simulated three times (the explanation, the neutral explanation for the contrast score, the shuffled
partner's explanation). Excerpts are cut from the packaged default corpus with the simulator's tokenizer; each
neuron "fires" on one frequent token, so prompts look like real ones. Every run gets a fresh call log (no
cache hits). The script also reports how far the concurrent run's answers are from the serial run's: greedy
explanations compared as text, simulations as the largest absolute difference on the 0-9 scale.

    python bench/local_batching.py   # local:qwen-0.5b: 3 neurons from 1 thread, 8 from 8 threads, twice, alternated
    python bench/local_batching.py --threads 1 4 8 --neurons 8 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from neuronscope.core.llm.base import CallLog
from neuronscope.core.llm.local import LocalBackend
from neuronscope.core.llm.prompts import NEUTRAL_EXPLANATION, Example, explain_prompt
from neuronscope.core.records import Call


class CountingLog(CallLog):
    """An in-memory call log that also counts explanations and their generated tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.explains = 0
        self.generated = 0

    def save(self, key: str, call: Call) -> None:
        super().save(key, call)
        if call.kind == "explain":
            with self._lock:
                self.explains += 1
                self.generated += call.completion_tokens


@dataclass(frozen=True)
class Neuron:
    """One synthetic neuron's excerpts: train (for the explainer) and test (simulated)."""

    train: tuple[Example, ...]
    test: tuple[tuple[str, ...], ...]
    partner: str
    """The shuffled control's explanation (another neuron's)."""


def make_neurons(tokenizer: Any, count: int, *, excerpts: int = 10, length: int = 64, seed: int = 0,
                 vocab_limit: int | None = None) -> list[Neuron]:
    """`count` neurons over the default corpus: neuron k fires on one of the corpus's frequent tokens, its train
    excerpts are ones that hold that token, its test excerpts half such, half random. Token ids at or above
    `vocab_limit` are replaced (a random model with a smaller vocabulary)."""
    from neuronscope.core.collection.default_corpus import default_corpus_text

    text = default_corpus_text()[: 400 * length * excerpts * 3 + 200_000]
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if vocab_limit is not None:
        ids = [i if i < vocab_limit else i % vocab_limit for i in ids]
    cuts = [ids[i:i + length] for i in range(0, len(ids) - length, length)]
    strings: dict[int, str] = {}

    def show(cut: list[int]) -> tuple[str, ...]:
        for t in cut:
            if t not in strings:
                strings[t] = tokenizer.decode([t])
        return tuple(strings[t] for t in cut)

    frequent = [t for t, n in Counter(ids).most_common(400) if n >= 2 * excerpts and strings.setdefault(
        t, tokenizer.decode([t])).strip().isalpha()]
    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        target = frequent[k % len(frequent)]
        holding = [c for c in cuts if target in c]
        picked = rng.choice(len(holding), size=min(len(holding), excerpts + excerpts // 2), replace=False)
        train = []
        for j, index in enumerate(picked[:excerpts]):
            cut = holding[int(index)]
            values = np.array([1.0 if t == target else 0.0 for t in cut], np.float32)
            values += rng.random(len(cut), dtype=np.float32) * 0.1
            train.append(Example(j, "top", show(cut), values))
        test = [show(holding[int(i)]) for i in picked[excerpts:]]
        test += [show(cuts[int(i)]) for i in rng.choice(len(cuts), size=excerpts - len(test), replace=False)]
        partner = frequent[(k + 1) % len(frequent)]
        out.append(Neuron(tuple(train), tuple(test), f'the token "{strings[partner].strip()}"'))
    return out


def neuron_work(backend: LocalBackend, neuron: Neuron) -> tuple[str, list[np.ndarray]]:
    """One neuron's explain + the three simulations of its test split; the explanation and the simulations."""
    prompt = explain_prompt(neuron.train, backend.count_tokens, backend.context_tokens())
    text = backend.explain(prompt)[0]
    sims = []
    for explanation in (text, NEUTRAL_EXPLANATION, neuron.partner):
        sims += backend.simulate(explanation, neuron.test)
    return text, sims


def run(backend: LocalBackend, neurons: Sequence[Neuron], threads: int, first: int = 0) -> dict[str, Any]:
    """Process the neurons from `threads` threads with a fresh call log; timings, batches and the answers (by
    neuron number, counting from `first`)."""
    log = CountingLog()
    backend.bind(log)
    before = len(backend.batcher.history)
    batches_before = backend.batches_run
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        answers = list(pool.map(lambda n: neuron_work(backend, n), neurons))
    seconds = time.perf_counter() - start
    history = backend.batcher.history[before:]
    rows = {g: [b.rows for b in history if b.group == g] for g in ("greedy", "forward")}
    return {"threads": threads, "neurons": len(neurons), "seconds": round(seconds, 2),
            "neurons_per_min": round(len(neurons) / seconds * 60, 2), "batches": backend.batches_run - batches_before,
            "explain_rows_per_batch": round(float(np.mean(rows["greedy"])), 2) if rows["greedy"] else 0.0,
            "forward_rows_per_batch": round(float(np.mean(rows["forward"])), 2) if rows["forward"] else 0.0,
            "largest_batch_tokens": max((b.tokens for b in history), default=0),
            "generated_per_explanation": round(log.generated / max(1, log.explains), 1),
            "answers": dict(enumerate(answers, first))}


def compare(serial: dict[int, Any], other: dict[int, Any]) -> dict[str, Any]:
    """How the answers of two runs differ, neuron by neuron (those both ran): explanations that are not the same
    text; the largest simulation gap (0-9 scale) over simulations of the same text (the neutral and partner
    explanations always, the neuron's own when both runs wrote the same), which is floating-point noise alone."""
    differing, gap = [], 0.0
    common = sorted(set(serial) & set(other))
    for k in common:
        a, b = serial[k], other[k]
        if a[0] != b[0]:
            differing.append([a[0], b[0]])
        per_text = len(a[1]) // 3
        same = range(len(a[1])) if a[0] == b[0] else range(per_text, len(a[1]))
        gap = max([gap] + [float(np.max(np.abs(a[1][i] - b[1][i]))) for i in same])
    return {"neurons": len(common), "explanations_differing": len(differing), "max_gap_same_text": round(gap, 5),
            "differing": differing}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return platform.processor() or "unknown"
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
    return names[0] if names else platform.processor() or "unknown"


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen-0.5b", help="local model (packaged name or folder)")
    parser.add_argument("--neurons", type=int, default=8, help="neurons of the concurrent runs")
    parser.add_argument("--serial-neurons", type=int, default=3, help="neurons of the 1-thread run (it is the slow one)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 8], help="first is the reference run")
    parser.add_argument("--rounds", type=int, default=2, help="times each setting runs, alternating")
    parser.add_argument("--excerpts", type=int, default=10, help="train and test excerpts per neuron")
    parser.add_argument("--length", type=int, default=64, help="tokens per excerpt")
    parser.add_argument("--dtype", default=None, help="auto (bf16 where the CPU has it), float32, bfloat16")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-tokens", type=int, default=None, help="the backend's token budget per batch")
    args = parser.parse_args()

    backend = LocalBackend(args.model, spec=f"local:{args.model}", device=args.device, dtype=args.dtype)
    if args.batch_tokens:
        backend.batch_tokens = args.batch_tokens
    neurons = make_neurons(backend.lm.tokenizer, args.neurons, excerpts=args.excerpts, length=args.length)
    prompt = explain_prompt(neurons[0].train, backend.count_tokens, backend.context_tokens())
    sim_ids = sum(len(p.ids) for p in backend._simulation_prompts(neurons[0].partner, neurons[0].test))
    print(f"cpu: {cpu_name()} ({os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}, torch threads "
          f"{torch.get_num_threads()}); model {args.model} "
          f"{str(backend.lm.dtype).removeprefix('torch.')} on {backend.lm.device}; batch_tokens {backend.batch_tokens}")
    print(f"per neuron: explain prompt {backend.count_tokens(prompt.text())} tokens ({prompt.shown} excerpts shown), "
          f"3 simulations of {len(neurons[0].test)} excerpts x {args.length} tokens ({sim_ids} prompt ids each)")
    backend.simulate("warm-up", [neurons[0].test[0][:8]])

    print(f"\n{'round':>5} {'threads':>7} {'neurons':>7} {'seconds':>8} {'neurons/min':>11} {'batches':>7} "
          f"{'explain rows/b':>14} {'forward rows/b':>14} {'max batch tok':>13} {'generated/expl':>14} {'load':>5}",
          flush=True)
    rounds: list[list[dict[str, Any]]] = []
    for n in range(args.rounds):  # alternated, so a change in the machine's load hits every setting alike
        rounds.append([])
        for t in args.threads:
            if t == 1:  # each round's serial run takes the next few neurons, so the rounds cover more of them
                first = n * args.serial_neurons % max(1, len(neurons) - args.serial_neurons + 1)
                r = run(backend, neurons[first:first + args.serial_neurons], t, first)
            else:
                r = run(backend, neurons, t)
            rounds[-1].append(r)
            print(f"{n + 1:>5} {r['threads']:>7} {r['neurons']:>7} {r['seconds']:>8.1f} {r['neurons_per_min']:>11.2f} "
                  f"{r['batches']:>7} {r['explain_rows_per_batch']:>14.2f} {r['forward_rows_per_batch']:>14.2f} "
                  f"{r['largest_batch_tokens']:>13} {r['generated_per_explanation']:>14.1f} {os.getloadavg()[0]:>5.1f}",
                  flush=True)
    totals = {t: (sum(r[i]["neurons"] for r in rounds), sum(r[i]["seconds"] for r in rounds))
              for i, t in enumerate(args.threads)}
    rate = {t: n / s * 60 for t, (n, s) in totals.items()}
    base = rate.get(1, rate[args.threads[0]])
    print("\nall rounds: " + ", ".join(f"{t} thread{'s' if t > 1 else ''} {rate[t]:.2f} neurons/min ({rate[t] / base:.2f}x)"
                                       for t in args.threads))
    if 1 in args.threads:
        i = args.threads.index(1)
        serial = {k: v for r in rounds for k, v in r[i]["answers"].items()}
        for j, t in enumerate(args.threads):
            if t != 1:
                print(f"answers at {t} threads vs 1 (first round): "
                      f"{json.dumps(compare(serial, rounds[0][j]['answers']), ensure_ascii=False)}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    backend.close()


if __name__ == "__main__":
    main()
