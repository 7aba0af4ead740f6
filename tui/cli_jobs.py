"""`neuronscope explain`, `score` and `run`: explain/score jobs from the command line.

The same command run again resumes the job: finished neurons are skipped, logged LLM calls are
answered from the store. `--dry-run` counts calls and tokens first; `--max-tokens` stops cleanly.
"""

from __future__ import annotations

import argparse
import getpass
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.text import Text

from neuronscope.core.choices import (
    DEFAULT_BACKEND,
    DEFAULT_ORDER,
    DEFAULT_SIMULATION,
    ORDERS,
    SIMULATIONS,
    TAILS,
    order_help,
)
from neuronscope.core.errors import InputError
from neuronscope.core.ids import NeuronId
from neuronscope.core.records import ActivationRecord, RunInfo
from neuronscope.core.results import ScoredExplanation
from neuronscope.core.store import Store
from neuronscope.tui.console import (
    EXIT_HELP,
    EXIT_UNFINISHED,
    MAX_SAMPLES,
    err,
    number,
    out,
    progress_bars,
    run_id,
    status,
)

if TYPE_CHECKING:
    from neuronscope.core.jobs.settings import Plan
    from neuronscope.core.llm.recording import Tally

#: Largest --train/--test-top/--test-random: a neuron keeps at most a thousand records of a kind.
MAX_EXCERPTS = 1_000


def add_job_parsers(sub: Any, store_arg: Any) -> None:
    """Register the three job subcommands."""
    helps = {
        "explain": "write explanations of neurons (the most selective by default) with an explainer model",
        "score": "simulate and score neurons' stored explanations, or your own sentence (--explanation)",
        "run": "explain, then simulate and score, each neuron beside its shuffled and token-baseline controls",
    }
    for kind, text in helps.items():
        p = sub.add_parser(kind, help=text, description=text, epilog=EXIT_HELP)
        p.add_argument("neurons", nargs="*", help="LAYER/NEURON pairs, e.g. 12/345 (default: chosen by --order)")
        p.add_argument("--explainer", default=DEFAULT_BACKEND,
                       help="backend that explains" + (" (and whose explanations score reads)" if kind == "score" else "")
                       + f": local:MODEL, openai:MODEL[@URL] or baseline (default: {DEFAULT_BACKEND})")
        if kind in ("score", "run"):
            p.add_argument("--simulator", help="backend that simulates (default: the explainer's)")
            p.add_argument("--scorers", default="",
                           help="scorers beside simulation on the test split, comma-separated: detection (firing vs "
                                "silent excerpts rated by the simulator), fuzzing (firing vs decoy tokens marked), "
                                "embedding (the packaged MiniLM); each beside its shuffled and token baselines")
            simulation_arg(p)
        if kind == "score":
            p.add_argument("--explanation", help="score this sentence instead of stored explanations (stored as "
                                                 "a human-written explanation, by --author)")
            p.add_argument("--author", help="who wrote --explanation (default: $USER)")
        if kind == "run":
            p.add_argument("--revise", action="store_true",
                           help="also revise the first explanation from the held-out select excerpts it simulated "
                                "worst, and keep whichever scores better there")
        p.add_argument("--output-centric", action="store_true",
                       help="also explain what each neuron makes the model say, from the next tokens amplifying it "
                            "promotes and suppresses (the run's model is loaded for that)"
                            + ("" if kind == "explain" else ", and score that explanation by steering: how well it "
                               "tells continuations with the neuron pushed up from plain ones, beside a shuffled "
                               "explanation's and the promoted tokens'"))
        if kind in ("explain", "run"):
            p.add_argument("--samples", type=number(1, MAX_SAMPLES), default=1,
                           help="candidate explanations per neuron; with score/run the best on a selection split "
                                "is kept (default: 1)")
        p.add_argument("--tail", choices=TAILS, default=TAILS[0],
                       help="pos: explain max(a,0) from top records; neg: max(-a,0) from bottom records")
        p.add_argument("--list", metavar="NAME", help="the neurons of a saved list (the app's L key; `neuronscope "
                                                      "lists` shows them), e.g. marked")
        p.add_argument("--layers", help="choose neurons from these layers, e.g. 0-5,12")
        p.add_argument("--limit", type=number(1), default=10, help="how many neurons to choose (default: 10)")
        p.add_argument("--order", default=DEFAULT_ORDER, choices=tuple(ORDERS),
                       help="how to choose neurons: " + order_help())
        p.add_argument("--where", default="", help="filter on statistics, e.g. 'density < 0.5 and kurtosis > 10'")
        p.add_argument("--train", type=number(1, MAX_EXCERPTS), default=10, help="top excerpts shown to the explainer (default: 10)")
        p.add_argument("--test-top", type=number(1, MAX_EXCERPTS), default=5, help="top excerpts per scoring split (default: 5)")
        p.add_argument("--test-random", type=number(1, MAX_EXCERPTS), default=5, help="random excerpts per scoring split (default: 5)")
        p.add_argument("--seed", type=number(0, 2**32 - 1), default=0, help="seed for sampled explanations and intervals (default: 0)")
        if kind in ("score", "run"):
            p.add_argument("--controls", default="all", type=controls_arg,
                           help="which neurons get the shuffled control and the contrast score (the neutral "
                                "explanation's simulation): all, none, or sample:F for a fraction F of them, e.g. "
                                "sample:0.1; the others show no shuffled score (the token baseline costs no call: "
                                "every neuron gets it) (default: all)")
        concurrency_arg(p)
        p.add_argument("--dry-run", action="store_true", help="count the LLM calls and tokens, then stop")
        p.add_argument("--max-tokens", type=number(1), help="stop cleanly once this many LLM tokens are spent")
        p.add_argument("--device", help="device for local models: cpu, cuda, cuda:N or mps")
        p.add_argument("--dtype", default="auto", help="dtype for local models (default: auto)")
        p.add_argument("--run", type=run_id, help="run id (default: the newest complete run)")
        store_arg(p)
        p.set_defaults(func=cmd_job, kind=kind)


def _settings(args: argparse.Namespace) -> Any:
    """The job's settings, checked before the store is opened or a model loads."""
    from neuronscope.core.explanation.splits import SplitSizes
    from neuronscope.core.jobs.engine import JobSettings

    if getattr(args, "explanation", None) is not None and not args.explanation.strip():
        raise InputError("--explanation is empty: pass the sentence to score, e.g. --explanation 'the word \"dog\"'")
    explainer = getattr(args, "explainer", DEFAULT_BACKEND)
    settings = JobSettings(
        kind=args.kind, explainer=explainer, simulator=getattr(args, "simulator", None) or explainer, tail=args.tail,
        samples=getattr(args, "samples", 1), sizes=SplitSizes(args.train, args.test_top, args.test_random),
        seed=args.seed, explanation=getattr(args, "explanation", None), scorers=parse_scorers(getattr(args, "scorers", "")),
        simulation=getattr(args, "simulation", DEFAULT_SIMULATION), revise=getattr(args, "revise", False),
        controls=getattr(args, "controls", "all"), output=args.output_centric,
        author=(getattr(args, "author", None) or getpass.getuser()) if getattr(args, "explanation", None) else "",
    )
    return settings


def concurrency_arg(p: argparse.ArgumentParser) -> None:
    """The --concurrency option of the commands that run jobs."""
    p.add_argument("--concurrency", type=number(1, 4096),
                   help="LLM requests in flight at once, across neurons (default: NEURONSCOPE_CONCURRENCY, else "
                        "8 for api.openai.com, 64 per other server, 16 for a local model); results do not depend on it")


def controls_arg(text: str) -> str:
    """--controls, checked by the engine's parser (an argparse error names the forms)."""
    from neuronscope.core.jobs.engine import parse_controls
    from neuronscope.core.jobs.selection import JobError

    try:
        parse_controls(text)
    except JobError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix(f"--controls {text!r}: ")) from None
    return text


def _selection(args: argparse.Namespace, store: Store, run: RunInfo) -> Any:
    """The job's neurons: named ones, a saved list's, or a choice among the run's layers."""
    from neuronscope.core.ids import NeuronId, parse_layers
    from neuronscope.core.jobs.selection import Selection, parse_where

    named = tuple(NeuronId.parse(n, run.layers) for n in args.neurons)
    if args.list:
        from neuronscope.tui.cli_triage import listed_neurons

        listed = listed_neurons(store, run, args.list)
        if not listed:
            raise InputError(f"the list {args.list!r} of run {run.run_id} is empty: mark neurons in the app first")
        named += tuple(listed)
    return Selection(neurons=named,
                     layers=parse_layers(args.layers, run.layers) if args.layers else None, order=args.order,
                     where=parse_where(args.where), limit=args.limit)


def simulation_arg(p: argparse.ArgumentParser) -> None:
    """The --simulation option of the commands that score."""
    p.add_argument("--simulation", choices=SIMULATIONS, default=DEFAULT_SIMULATION,
                   help="how explanations are simulated: quotes (the tokens an explanation quotes, predicted where "
                        "they occur; no model call), tokens (quotes, and the simulator rates every other token "
                        "against the explanation), lines (the simulator writes a value after every token) "
                        f"(default: {DEFAULT_SIMULATION})")


def parse_scorers(text: str) -> tuple[str, ...]:
    """`detection,embedding` -> ('detection', 'embedding'); InputError naming the scorers for an unknown one."""
    from neuronscope.core.choices import SCORERS

    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in SCORERS]
    if unknown:
        raise InputError(f"unknown scorer {unknown[0]!r}: use any of {', '.join(SCORERS)}, comma-separated")
    return names


def dry_run_line(plan: Plan, tally: Tally) -> str:
    """What a dry run counted, in one line: the new calls (and their repeats, which the real run answers from the
    log once the first is made) apart from the calls the log holds now."""
    def some(count: int, what: str) -> str:
        return f"{count:,} {what}{'s' if count != 1 else ''}"

    repeats = f" and {some(tally.repeats, 'repeat')} of them (answered from the log once made)" if tally.repeats else ""
    if plan.calls == 0:
        cost = "nothing (no new call)"
    else:
        cost = "free (local or baseline)" if plan.cost == 0 else (
            f"about ${plan.cost:.4f}" if plan.cost is not None else "unknown (no price for this model)")
    return (f"dry run: {some(plan.neurons, 'neuron')} to do, {some(plan.calls, 'new LLM call')}{repeats}, "
            f"{tally.logged:,} already in the log, about {plan.prompt_tokens:,} prompt + "
            f"{plan.completion_tokens:,} completion tokens; cost {cost}")


def cmd_job(args: argparse.Namespace) -> int:
    """Run, resume or plan an explain/score job, then print the ranked table."""
    from neuronscope.core.jobs.engine import Job, JobStopped, env_concurrency
    from neuronscope.core.jobs.neuron_work import needs_explanation
    from neuronscope.core.llm.base import make_backend, parse_spec
    from neuronscope.core.llm.recording import Tally
    from neuronscope.core.models.loading import run_subject
    from neuronscope.tui.render import summaries_table

    settings = _settings(args)
    env_concurrency()  # a bad NEURONSCOPE_CONCURRENCY fails before the store is opened
    for spec in {settings.explainer, settings.simulator}:
        parse_spec(spec)  # a bad spec fails before the store is opened or a model loads
    # The job opens the store read-only and writes its results beside it (neuronscope.core.store.spool), so the app,
    # `show`, `info` and other jobs can open it meanwhile; what is beside it is folded in when nobody else has it.
    Store.settle(args.store)
    try:  # a job stopped by a systematic failure (a bad key) leaves what it wrote beside the store: folded in too
        with Store.open(args.store, read_only=True) as store:
            run = store.run(args.run)
            selection = _selection(args, store, run)
            dtype = None if args.dtype == "auto" else args.dtype
            job = Job(store, run, settings, selection,
                      backend_factory=lambda spec: make_backend(spec, device=args.device, dtype=dtype, status=status),
                      subject_factory=lambda run: run_subject(run, device=args.device, dtype=dtype, status=status))
            try:
                if args.dry_run:
                    tally = Tally()
                    with progress_bars() as progress:
                        plan = job.plan(progress, tally)
                    out.print(Text(dry_run_line(plan, tally)), soft_wrap=True)
                    return 0
                found = store.find_job(job.key)
                if not (found and found[1] == "complete"):  # (run() reads which neurons are left)
                    job.prepare()  # models load before the progress bar; a complete job loads none
                count = len(job.neurons)
                uses = ([f"explainer {settings.explainer}"] if settings.kind != "score" else []) + \
                    ([f"simulator {settings.simulator} ({settings.simulation})"] if settings.kind != "explain" else [])
                status(f"{settings.kind} {count:,} neuron{'s' if count != 1 else ''} of run {run.run_id} "
                       f"({settings.tail} tail): {', '.join(uses)}")
                stage = {"explain": "explaining neurons", "score": "scoring neurons"}.get(settings.kind, "neurons")
                with progress_bars() as progress:
                    report = job.run(progress=lambda kind, done, total: progress(stage if kind == "neurons" else kind,
                                                                                 done, total),
                                     max_tokens=args.max_tokens, concurrency=args.concurrency)
            finally:
                job.close()
            rows = store.summaries(run.run_id, job_id=report.job_id)
    except JobStopped:
        Store.settle(args.store)
        raise
    Store.settle(args.store)
    if rows and settings.kind != "explain":
        out.print(Text(f"Run {run.run_id}, job {report.job_id}: test-split scores (Pearson r, 95% bootstrap interval)",
                       style="bold"), soft_wrap=True)
        out.print(summaries_table(rows, total=out.width))
    elif rows:
        for s in rows:
            out.print(Text(f"{NeuronId(s.layer, s.neuron)}  ", style="bold") + Text(s.text), soft_wrap=True)
    for neuron, error in sorted(report.failed.items()):
        err.print(Text(f"failed {neuron}: ", style="red") + Text(error), soft_wrap=True)
    mend = "explain them first, or pass --explanation" if all(map(needs_explanation, report.failed.values())) \
        else "run the same command to retry them"
    line = (f"job {report.job_id} {report.state}: {report.done}/{report.total} neurons done"
            f"{f', {len(report.failed)} failed ({mend})' if report.failed else ''}; "
            f"{report.new_calls} new LLM calls, {report.cache_hits} from the log, {report.tokens:,} tokens")
    status(line)
    if report.message:
        status(report.message + " — run the same command (with a larger --max-tokens) to continue")
    return 0 if report.state == "complete" and not report.failed else EXIT_UNFINISHED


def print_explanations(explanations: Sequence[ScoredExplanation], records: Sequence[ActivationRecord], scale: float,
                       count: int) -> None:
    """`show`'s explanation section (see neuronscope.tui.render.explanation_renderables)."""
    from neuronscope.tui.render import explanation_renderables

    out.print()
    for renderable, one_line in explanation_renderables(explanations, records, scale, count):
        out.print(renderable, soft_wrap=one_line)
