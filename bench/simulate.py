"""One-pass simulation against token-by-token simulation, and explanation quality against its controls.

    python bench/simulate.py speed                    # qwen-1.5b as simulator, 4 neurons of the store
    python bench/simulate.py speed --simulator local:qwen-0.5b --neurons 8
    python bench/simulate.py quality --neurons 50     # explainer vs shuffled vs token baseline on SmolLM2

Both read a store holding a SmolLM2 collection (default: ./neuronscope.duckdb, as `neuronscope demo` makes;
`--collect` makes one first). Speed: neurons scored per minute (one neuron = its 10 held-out excerpts) by
the one-pass simulator (every slot's digit distribution read from one forward pass) against a token-by-token
simulator on the same model (one cached forward step per token, writing its own digit before the next
line), and how closely the two agree. Quality: a `run` job over the most selective neurons, then the mean of
per-neuron test scores of the explanation, the shuffled control and the token-lookup baseline, with 95%
bootstrap intervals over neurons. Ratios and means are measured in one run; absolute times are noise.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def token_by_token(backend, prompts) -> list[list[float]]:  # type: ignore[no-untyped-def]
    """The slow reference: per excerpt, feed the prompt line by line with a KV cache and read the digit
    distribution after each token's tab, writing the most likely digit before moving on."""
    import torch

    from core.prompts import TOP

    model, device = backend.lm.model, backend.lm.device
    scale = torch.arange(TOP + 1, dtype=torch.float32)
    out = []
    for p in prompts:  # the same packed prompts as the one-pass simulator reads
        cache = None
        start = 0
        pending: list[int] = []
        with torch.inference_mode():
            for slots in p.slots:
                values: list[float] = []
                for slot in slots:
                    chunk = pending + list(p.ids[start:slot])  # the previous digit, then this line up to the tab
                    result = model(input_ids=torch.tensor([chunk], device=device), past_key_values=cache,
                                   use_cache=True, logits_to_keep=1)
                    cache = result.past_key_values
                    probs = torch.softmax(result.logits[0, -1, backend.digits].float().cpu(), dim=-1)
                    values.append(float(probs @ scale))
                    pending = [backend.digits[int(probs.argmax())]]
                    start = slot + 1  # skip the placeholder: the model's own digit stands in its place
                out.append(values)
    return out


def speed(args: argparse.Namespace) -> None:
    import numpy as np

    from core.llm.base import make_backend
    from core.splits import split_records
    from core.store import Store

    backend = make_backend(args.simulator, device=args.device)
    with Store.open(args.store, read_only=True) as store:
        run = store.run()
        neurons = store.top_neurons(run.run_id, limit=args.neurons)
        splits = [split_records(store.records(run.run_id, n.layer, n.index, kinds=("top", "bottom", "random")), "pos")
                  for n in neurons]
    explanation = "words about computers and programs, such as code, program and hacker"
    prompts = [backend._simulation_prompts(explanation, [e.tokens for e in s.test]) for s in splits]  # noqa: SLF001
    backend.expected_values(backend._simulation_prompts(explanation, [splits[0].test[0].tokens]))  # noqa: SLF001 warm-up
    started = time.perf_counter()
    one_pass = [backend.expected_values(p) for p in prompts]  # per neuron, per excerpt
    one_pass_s = time.perf_counter() - started
    started = time.perf_counter()
    slow = [token_by_token(backend, p) for p in prompts]
    slow_s = time.perf_counter() - started
    a = np.concatenate([np.concatenate(x) for x in one_pass])
    b = np.concatenate([np.concatenate(x) for x in slow])
    ids = sum(len(q.ids) for p in prompts for q in p)
    tokens = sum(len(v) for x in one_pass for v in x)
    print(f"simulator {args.simulator} on {backend.lm.device}, {len(neurons)} neurons x {len(splits[0].test)} "
          f"excerpts, {tokens:,} tokens simulated, {ids:,} prompt ids in {sum(len(p) for p in prompts)} packed prompts")
    print(f"one-pass:      {len(neurons) / one_pass_s * 60:8.2f} neurons/min")
    print(f"token-by-token:{len(neurons) / slow_s * 60:8.2f} neurons/min")
    print(f"speed-up one-pass / token-by-token: {slow_s / one_pass_s:.1f}x")
    print(f"agreement of the two simulators' expected values: Pearson r {np.corrcoef(a, b)[0, 1]:.3f}")


def _mean_ci(values: list[float], seed: int = 0) -> tuple[float, float, float]:
    import numpy as np

    x = np.asarray(values, np.float64)
    if not len(x):
        return float("nan"), float("nan"), float("nan")
    boot = np.random.default_rng(seed).choice(x, (2000, len(x))).mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return float(x.mean()), float(low), float(high)


def quality(args: argparse.Namespace) -> None:
    from core.jobs import Job, JobSettings, Selection, parse_where
    from core.llm.base import make_backend
    from core.store import Store

    settings = JobSettings(explainer=args.explainer, simulator=args.simulator or args.explainer, tail=args.tail,
                           samples=args.samples)
    with Store.open(args.store) as store:
        run = store.run()
        job = Job(store, run, settings, Selection(limit=args.neurons, where=parse_where(args.where)),
                  backend_factory=lambda spec: make_backend(spec, device=args.device))
        started = time.perf_counter()
        report = job.run(progress=lambda _s, done, total: print(f"\r{done}/{total} neurons", end="", flush=True))
        seconds = time.perf_counter() - started
        job.close()
        print()
        rows = [s for s in store.summaries(run.run_id, job_id=report.job_id) if s.score is not None]
    print(f"{len(rows)} neurons of run {run.run_id} ({run.model}), {settings.tail} tail, where {args.where!r}, "
          f"explainer {settings.explainer}, simulator {settings.simulator}, samples {settings.samples}; "
          f"{report.new_calls} new LLM calls ({report.cache_hits} from the log), {seconds / max(1, report.done):.1f} s "
          "per neuron in this session")
    print(f"{'method':18} {'mean r':>8} {'95% CI':>18} {'>= 0.5':>7}")
    for name, pick in (("explanation", lambda s: s.score), ("shuffled control", lambda s: s.shuffled),
                       ("token baseline", lambda s: s.baseline)):
        values = [pick(s).value for s in rows if pick(s) is not None]
        mean, low, high = _mean_ci(values)
        print(f"{name:18} {mean:8.3f} [{low:7.3f}, {high:7.3f}] {sum(v >= 0.5 for v in values):7d}")
    beats = sum(s.beats_shuffled for s in rows)
    print(f"explanations whose interval lies above their shuffled control: {beats} of {len(rows)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("speed", "quality"))
    parser.add_argument("--store", default="neuronscope.duckdb")
    parser.add_argument("--neurons", type=int, default=None, help="neurons (default: 4 for speed, 50 for quality)")
    parser.add_argument("--simulator", default=None, help="default: local:qwen-1.5b for speed, the explainer for quality")
    parser.add_argument("--explainer", default="local:qwen-1.5b")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--tail", default="pos", choices=("pos", "neg"))
    parser.add_argument("--where", default="", help="neuron filter, e.g. 'density < 0.5'")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    if args.what == "speed":
        args.neurons = args.neurons or 4
        args.simulator = args.simulator or "local:qwen-1.5b"
        speed(args)
    else:
        args.neurons = args.neurons or 50
        quality(args)


if __name__ == "__main__":
    main()
