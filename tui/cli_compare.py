"""`neuronscope compare A B`: two sets of explanations on the same neurons (two explainers, two simulation modes, two
jobs, two runs of one model, a model's against a person's), by the paired difference of their headline scores."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from rich.table import Table
from rich.text import Text

from neuronscope.core.choices import TAILS
from neuronscope.core.errors import InputError
from neuronscope.core.ids import NeuronId
from neuronscope.core.store import Store
from neuronscope.core.store.compare import SET_KEYS, ExplanationSet
from neuronscope.tui.console import number, out, progress_bars, run_id, status
from neuronscope.tui.render import visible

#: Draws (paired neurons × resamples) from which the bootstrap shows its progress: about a second of a CPU core.
LONG_BOOTSTRAP = 100_000_000
#: The progress bar's label.
BAR = "bootstrap resamples"


def add_compare_parser(sub: argparse._SubParsersAction,  # type: ignore[type-arg]
                       store_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    keys = "; ".join(f"{key}: {meaning}" for key, meaning in SET_KEYS.items())
    p = sub.add_parser(
        "compare", help="compare two sets of explanations on the neurons both scored: the paired difference of the "
                        "headline score (B − A) with a bootstrap interval over neurons, wins, losses and ties, and "
                        "the neurons that changed most",
        description=f"Each set is KEY=VALUE joined by commas ({keys}). Per neuron a set takes its newest selected "
                    "explanation with a test-split score. E.g. compare explainer=baseline "
                    "explainer=openai:gpt-4o-mini; "
                    "compare job=3 job=5; compare run=1 run=2; compare role=candidate role=user.")
    p.add_argument("a", metavar="A", help="the first set, e.g. explainer=baseline")
    p.add_argument("b", metavar="B", help="the second set, e.g. 'simulator=local:qwen-1.5b (tokens)'")
    p.add_argument("--tail", choices=TAILS, default=TAILS[0], help="which tail's explanations (default: pos)")
    p.add_argument("--top", type=number(0), default=10, help="neurons that changed most to list (default: 10)")
    p.add_argument("--tie", type=float, default=0.01,
                   help="differences this small or smaller are ties (default: 0.01)")
    p.add_argument("--seed", type=number(0, 2**32 - 1), default=0, help="seed of the bootstrap (default: 0)")
    p.add_argument("--out", help="write every paired neuron (scores, difference, both explanations) to a .csv, "
                                 ".parquet or .jsonl file, largest change first")
    p.add_argument("--run", type=run_id, help="run of the sets that name none (default: the newest complete run)")
    store_arg(p)
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    """Compare two sets of explanations."""
    from neuronscope.core.explanation.compare import MIN_PAIRS, RESAMPLES, compare_scores

    if not 0 <= args.tie < 2:
        raise InputError(f"--tie {args.tie}: a margin between 0 and 2 (scores are correlations)")
    first, second = ExplanationSet.parse(args.a), ExplanationSet.parse(args.b)
    with Store.open(args.store, read_only=True) as store:
        run = store.run(args.run)
        sides = [store.set_scores(run.run_id, chosen, args.tail) for chosen in (first, second)]
        for chosen, scores in zip((first, second), sides):
            if not scores:
                raise InputError(store.missing_set(chosen.run or run.run_id, chosen, args.tail))
    scores_a, scores_b = ({n: v for n, (v, _) in side.items()} for side in sides)
    pairs = len(scores_a.keys() & scores_b.keys())
    if not pairs:
        raise InputError(f"no neuron has a scored explanation in both sets ({len(sides[0]):,} in A, "
                         f"{len(sides[1]):,} in B): compare sets that cover the same neurons")
    long = pairs * RESAMPLES >= LONG_BOOTSTRAP  # seconds: a bar (or, in a log, a line every few seconds)
    with progress_bars() as progress:  # (it starts with the first progress reported: a short one shows nothing)
        comparison = compare_scores(scores_a, scores_b, tie=args.tie, seed=args.seed,
                                    progress=(lambda _stage, done, total: progress(BAR, done, total)) if long else None)
    n = len(comparison.neurons)
    summary = Text(f"A = {first.text}: mean {comparison.a.mean():+.3f}\nB = {second.text}: mean "
                   f"{comparison.b.mean():+.3f}\n")
    summary.append(f"B − A: {comparison.difference:+.3f} [{comparison.ci_low:+.3f}, {comparison.ci_high:+.3f}]",
                   style="bold")
    summary.append(f"  (95% bootstrap interval over {n:,} paired neuron{'s' if n != 1 else ''}, {RESAMPLES:,} "
                   f"resamples; headline score: Pearson r on the test split)\n")
    if not comparison.interval_meaningful:
        summary.append(f"the interval is not meaningful with {n} paired neuron{'s' if n != 1 else ''}: a bootstrap "
                       f"needs at least {MIN_PAIRS}; compare sets that share more neurons\n", style="yellow")
    summary.append(f"B wins {comparison.wins:,}, loses {comparison.losses:,}, ties {comparison.ties:,} "
                   f"(|difference| ≤ {args.tie:g})")
    if comparison.only_a or comparison.only_b:
        summary.append(f"; left out: {comparison.only_a:,} neurons only A scored, {comparison.only_b:,} only B")
    out.print(summary, soft_wrap=True)
    order = comparison.by_change()
    if args.top:
        out.print(changed_table(comparison.neurons, order[: args.top].tolist(), sides))
    if args.out:
        from neuronscope.core.interop.export import export_comparison

        neurons, deltas = comparison.neurons, comparison.deltas.tolist()
        a, b = comparison.a.tolist(), comparison.b.tolist()
        rows = [{"layer": neurons[i].layer, "neuron": neurons[i].neuron, "score_a": a[i], "score_b": b[i],
                 "difference": deltas[i], "explanation_a": sides[0][neurons[i]][1],
                 "explanation_b": sides[1][neurons[i]][1]} for i in order.tolist()]
        export_comparison(rows, Path(args.out))
        status(f"{len(rows):,} paired neurons → {args.out}")
    return 0


def changed_table(neurons: tuple[NeuronId, ...], chosen: list[int],
                  sides: list[dict[NeuronId, tuple[float, str]]]) -> Table:
    """The neurons that changed most: both scores, the difference and both explanations (inert)."""
    table = Table(title="Changed most", title_justify="left")
    for name, justify in (("neuron", "left"), ("A", "right"), ("B", "right"), ("B − A", "right"),
                          ("A's explanation", "left"), ("B's explanation", "left")):
        table.add_column(name, justify=justify,  # type: ignore[arg-type]
                         no_wrap=name in ("neuron", "A", "B", "B − A"),
                         overflow="fold")
    for i in chosen:
        neuron = neurons[i]
        (score_a, text_a), (score_b, text_b) = sides[0][neuron], sides[1][neuron]
        table.add_row(str(neuron), f"{score_a:+.2f}", f"{score_b:+.2f}", f"{score_b - score_a:+.2f}",
                      Text(visible(text_a)), Text(visible(text_b)))
    return table
