"""Explanation quality on the embedded models: explain and score the most selective neuron tails of a SmolLM2
collection, then compare every score method of the explanation with its shuffled control and the token-lookup
baseline.

    python bench/quality.py                                # 50 neurons x both tails, local:qwen-1.5b
    python bench/quality.py --neurons 10 --tails pos --explainer local:qwen-0.5b
    python bench/quality.py --store other.duckdb --simulator baseline

It reads a store holding a SmolLM2 collection (default ./neuronscope.duckdb, as `neuronscope demo` makes) and
runs one `run` job per tail over the `--neurons` most selective neurons (the tool's own ranking), so the
sample is fixed and reported; a rerun answers every LLM call from the store's log. The table: per explanation
kind and score method, the mean over neuron tails with a 95% bootstrap interval (over tails), how many reach
0.5, and how many tails the explanation's score beats the baseline's. Times are of this session's new calls.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from neuronscope.core.llm.base import Backend
    from neuronscope.core.records import RunInfo
    from neuronscope.core.store import Store

ROLES = (("candidate", "explanation"), ("shuffled", "shuffled control"), ("baseline", "token baseline"))


def mean_ci(values: list[float], seed: int = 0) -> tuple[float, float, float]:
    """Mean with a 95% percentile-bootstrap interval over the values."""
    x = np.asarray(values, np.float64)
    if not len(x):
        return float("nan"), float("nan"), float("nan")
    boot = np.random.default_rng(seed).choice(x, (2000, len(x))).mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return float(x.mean()), float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="neuronscope.duckdb")
    parser.add_argument("--neurons", type=int, default=50, help="most selective neurons per tail (default: 50)")
    parser.add_argument("--tails", default="pos,neg", help="pos, neg or both (default: pos,neg)")
    parser.add_argument("--explainer", default="local:qwen-1.5b")
    parser.add_argument("--simulator", default=None, help="default: the explainer")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--scorers", default="", help="also detection, fuzzing, embedding (comma-separated)")
    parser.add_argument("--revise", action="store_true", help="also revise each explanation (run jobs' --revise)")
    parser.add_argument("--simulation", default=None,
                        help="quotes, tokens or lines (default: the jobs' default); several, comma-separated, each "
                             "measured on the same explanations")
    parser.add_argument("--where", default="", help="neuron filter, e.g. 'density < 0.5'")
    parser.add_argument("--seed", type=int, default=0, help="jobs' seed (bootstraps, decoys, sampled candidates)")
    parser.add_argument("--ceiling", action="store_true",
                        help="also print what token lookups reach on the same tails (how far a token-level explanation "
                             "can go), and the explanations' quotes valued at their train means")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    from neuronscope.core.choices import DEFAULT_SIMULATION
    from neuronscope.core.llm.base import make_backend
    from neuronscope.core.store import Store

    scorers = tuple(n.strip() for n in args.scorers.split(",") if n.strip())
    modes = [m.strip() for m in (args.simulation or DEFAULT_SIMULATION).split(",") if m.strip()]
    backends: dict[str, Backend] = {}
    with Store.open(args.store) as store:
        run = store.run()
        for mode in modes:
            table(store, run, args, mode, scorers,
                  lambda spec: backends.setdefault(spec, make_backend(spec, device=args.device)))
        if args.ceiling:
            ceiling(store, run, args)
    for backend in backends.values():
        backend.close()


def ceiling(store: Store, run: RunInfo, args: argparse.Namespace) -> None:
    """Test-split r of token lookups built from each tail's train excerpts, and of the newest explanations' quotes
    valued at their mean on the train excerpts: what any explanation the quotes mode reads could reach."""
    from neuronscope.core.explanation.explain import lookup_of
    from neuronscope.core.explanation.score import score
    from neuronscope.core.explanation.simulation import quoted
    from neuronscope.core.explanation.splits import split_records
    from neuronscope.core.jobs.selection import parse_where
    from neuronscope.core.llm.baseline import lookup_predict
    from neuronscope.core.llm.prompts import on_scale

    def folded(token: str) -> str:
        return token.strip().casefold()

    rows: dict[str, list[float]] = defaultdict(list)
    unseen: dict[str, list[float]] = defaultdict(list)  # per tail: share of its firing test tokens the train lacks
    for tail in args.tails.split(","):
        for layer, neuron in store.choose_neurons(run.run_id, layers=None, order="selectivity",
                                                  where=parse_where(args.where), limit=args.neurons, seed=args.seed):
            splits = split_records(store.records(run.run_id, layer, neuron, kinds=("top", "bottom", "random")), tail)
            sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
            for e in splits.train:
                for token, value in zip(e.tokens, on_scale(e.target, splits.scale_max).tolist()):
                    if token.strip():
                        sums[folded(token)][0] += value
                        sums[folded(token)][1] += 1
            means = {key: total / count for key, (total, count) in sums.items()}
            ranked = [key for key in sorted(means, key=lambda k: -means[k]) if means[key] >= 1.0]
            texts = store.candidate_texts(run.run_id, layer, neuron, tail=tail, explainer=args.explainer)
            quotes = {folded(q) for q in quoted(texts[0])} if texts else set()
            tables = {
                "token baseline (8 tokens, exact)": None,
                "lookup, 8 tokens, case-folded": {k: means[k] for k in ranked[:8]},
                "lookup, every train token, case-folded": {k: means[k] for k in ranked},
                "explanation's quotes at their train means": {k: means.get(k, 0.0) for k in quotes},
            }
            fires = [folded(t) for e in splits.test if e.kind == "top" for t, v in zip(e.tokens, e.target.tolist())
                     if v >= 0.4 * splits.scale_max]
            if fires:
                unseen[tail].append(sum(t not in sums for t in fires) / len(fires))
            lookup = lookup_of(splits)
            for name, table in tables.items():
                predicted = [lookup_predict(lookup, e.tokens) if table is None else
                             np.array([table.get(folded(t), 0.0) for t in e.tokens], np.float32) for e in splits.test]
                rows[name].append(score([e.kind for e in splits.test], [e.target for e in splits.test], predicted,
                                        scale_max=splits.scale_max, resamples=10)["all"].value)
    print(f"token lookups on the same {len(rows['token baseline (8 tokens, exact)'])} tails (test split, r):")
    for name, values in rows.items():
        mean, low, high = mean_ci(values)
        print(f"  {name:42} {mean:7.3f} [{low:7.3f}, {high:7.3f}] {sum(v >= 0.5 for v in values):7d}")
    for tail, shares in unseen.items():
        print(f"  {tail} tails: {np.mean(shares):.0%} of the tokens firing in the top test excerpts (at 40 % of the "
              "scale or more) never occur in the train excerpts")


def table(store: Store, run: RunInfo, args: argparse.Namespace, mode: str, scorers: tuple[str, ...],
          factory: Callable[[str], Backend]) -> None:
    """Run (or answer from the log) one job per tail in a simulation mode and print its table."""
    from neuronscope.core.jobs.engine import Job, JobSettings, Selection
    from neuronscope.core.jobs.selection import parse_where

    scores: dict[tuple[str, str], list[float]] = defaultdict(list)  # (role, method) -> values over tails
    paired: dict[str, list[tuple[float, float]]] = defaultdict(list)  # method -> (explanation, baseline) per tail
    methods = ("all", *(("contrast",) if mode == "lines" else ()), *scorers)
    seconds = neurons_done = calls = 0.0
    for tail in args.tails.split(","):
        settings = JobSettings(explainer=args.explainer, simulator=args.simulator or args.explainer, tail=tail,
                               samples=args.samples, scorers=scorers, simulation=mode, revise=args.revise,
                               seed=args.seed)
        job = Job(store, run, settings, Selection(limit=args.neurons, where=parse_where(args.where)),
                  backend_factory=factory)
        started = time.perf_counter()
        def progress(_stage: str, done: int, total: int, t: str = tail) -> None:
            print(f"\r{mode} {t}: {done}/{total} neurons", end="", flush=True)

        report = job.run(progress=progress)
        print()
        seconds += time.perf_counter() - started
        neurons_done += report.done if report.new_calls else 0
        calls += report.new_calls
        by_tail: dict[tuple[int, int], dict[tuple[str, str], float]] = defaultdict(dict)
        for layer, neuron, _tail, role, method, value in store.job_scores(report.job_id):
            by_tail[(layer, neuron)][(role, method)] = value
        for got in by_tail.values():
            for key, value in got.items():
                scores[key].append(value)
            for method in methods:
                base = got.get(("baseline", method), got.get(("baseline", "all")))
                if ("candidate", method) in got and base is not None:
                    paired[method].append((got[("candidate", method)], base))
    tails = len(paired["all"])
    print(f"simulation {mode}: {tails} neuron tails ({args.tails}) of run {run.run_id} ({run.model}), the "
          f"{args.neurons} most selective neurons{f' where {args.where}' if args.where else ''}; explainer "
          f"{args.explainer}, simulator {args.simulator or args.explainer}, samples {args.samples}"
          f"{', revised' if args.revise else ''}; {calls:.0f} new "
          "LLM calls, " + (f"{seconds / neurons_done:.1f} s per neuron tail" if neurons_done
                           else "all calls answered from the log"))
    print(f"{'explanation':18} {'method':9} {'mean':>7} {'95% CI':>18} {'>= 0.5':>7}   (detection, fuzzing, "
          "embedding: AUROC, 0.5 is chance)")
    for role, name in ROLES:
        for method in methods:
            values = scores.get((role, method), [])
            if values:
                mean, low, high = mean_ci(values)
                print(f"{name:18} {method:9} {mean:7.3f} [{low:7.3f}, {high:7.3f}] {sum(v >= 0.5 for v in values):7d}")
    for method, pairs in paired.items():
        wins = sum(e > b for e, b in pairs)
        print(f"explanation ({method}) above the token baseline on {wins} of {len(pairs)} tails")
    print()


if __name__ == "__main__":
    main()
