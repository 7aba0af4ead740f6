"""`neuronscope import-openai`, `export` and `related`: other tools' files in, ours out, and what a run's model weights
say about its neurons."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from neuronscope.core.errors import InputError
from neuronscope.core.ids import parse_layers
from neuronscope.core.store import Store
from neuronscope.tui.cli_store import store_to_read, store_to_write
from neuronscope.tui.console import (
    EXIT_INTERRUPTED,
    EXIT_UNFINISHED,
    Skipped,
    err,
    number,
    progress_bars,
    run_id,
    status,
    warning,
)

#: Largest `related --top`: each list entry is stored for every neuron.
MAX_RELATED = 1_000
#: Problems printed one per line; the rest are counted.


def cmd_import_openai(args: argparse.Namespace) -> int:
    """Import a local copy of OpenAI's GPT-2 XL neuron release (or part of it) as a run of the store."""
    from neuronscope.core.interop.importer import import_release, release_metadata, release_root
    from neuronscope.core.interop.release import ACTIVATIONS, release_layers
    from neuronscope.core.interop.sidecar import RUN_FILE

    problem = Skipped()
    root = release_root(Path(args.path))
    layers = parse_layers(args.layers, release_layers(root, ACTIVATIONS))
    exported = release_metadata(root)
    if args.model and exported and args.model != exported.model:
        warning(f"{RUN_FILE} says this export is of {exported.model}; importing it as {args.model} (--model)")
    with store_to_write(args.store, "import-openai", create=True) as store, progress_bars() as progress:
        report = import_release(store, root, model=args.model, layers=layers,
                                workers=args.workers, progress=progress, problem=problem)
        store.checkpoint()
    problem.finish()
    summary = (f"run {report.run_id}: {report.imported:,} neurons imported"
               + (f" ({report.retried:,} again: a file of theirs had been skipped)" if report.retried else "")
               + (f", {report.present:,} already there" if report.present else ""))
    if report.problems:
        summary += (f", {report.problems:,} file{'s' if report.problems != 1 else ''} skipped (each listed above "
                    f"with its reason): {report.failed:,} neuron{'s' if report.failed != 1 else ''} failed"
                    + (f", {report.partial:,} of them imported without what a skipped file holds" if report.partial
                       else ""))
    if not report.complete:
        err.print(f"interrupted: {summary}; run the same command again to resume")
        return EXIT_INTERRUPTED
    if report.failed:
        warning(f"{summary} → {args.store}; fix or replace the files skipped and run the same command again: it "
                "reads those neurons again")
        return EXIT_UNFINISHED
    status(f"{summary} → {args.store}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a run as Parquet files, JSONL or the OpenAI release layout."""
    from neuronscope.core.interop.export import export_jsonl, export_openai, export_parquet, layer_neurons

    with Store.open(args.store, read_only=True) as store:
        run = store.run(args.run)
        if run.status != "complete":
            raise InputError(f"run {run.run_id} is {run.status}, so it holds part of a collection at most: finish it "
                             "(collect it again, or rerun the import that made it) or export a complete run "
                             "(`neuronscope info` lists them)")
        layers = parse_layers(args.layers, run.layers) if args.layers else None
        out = Path(args.out)
        if args.format == "parquet":
            counts = export_parquet(store, run.run_id, out, layers)
            status(f"run {run.run_id}: " + ", ".join(f"{name}.parquet {rows:,} rows" for name, rows in counts.items())
                   + f" → {out}")
            return 0
        write: Callable[..., int] = export_jsonl if args.format == "jsonl" else export_openai
        with progress_bars() as progress:
            n = write(store, run.run_id, out, progress, neurons=layer_neurons(store, run.run_id, layers))
    status(f"run {run.run_id}: {n:,} neurons → {out}")
    return 0


def cmd_related(args: argparse.Namespace) -> int:
    """Compute a run's related tokens and neurons from its model's weights and store them."""
    from neuronscope.core.models.loading import load_subject
    from neuronscope.core.models.relations import related_lists

    with store_to_read(args.store, "related") as store:  # (beside the app and jobs: the model loads meanwhile)
        run = store.run(args.run)
    layers = parse_layers(args.layers, run.layers) or ()
    subject = load_subject(args.model or run.model, device=args.device, dtype=args.dtype, status=status)

    def vocabulary(ids: list[int]) -> list[str]:  # lists of tokens, not a text: each token decoded alone
        return subject.token_strings(ids, apart=True)

    if run.latents:
        from neuronscope.core.models.relations import latent_related_lists
        from neuronscope.core.models.sparse import recorded

        coder = recorded(run.units)
        lists = latent_related_lists(subject.model, coder, vocabulary, args.top)
        with store_to_write(args.store, "related") as store:
            store.write_related(run.run_id, lists)
            store.checkpoint()
        status(f"run {run.run_id}: related tokens of {coder.width:,} latents from the coder's weights through "
               f"{subject.name}'s embeddings and unembedding → {args.store}")
        return 0
    if subject.n_neurons != run.neurons_per_layer or max(layers) >= subject.n_layers:
        raise InputError(f"{subject.name} has {subject.n_layers} layers of {subject.n_neurons} neurons, run "
                         f"{run.run_id} ({run.model}) {len(run.layers)} of {run.neurons_per_layer}: pass the "
                         "run's own model with --model")
    # Written a layer at a time as they are computed: a large model's lists at --top 1000 do not fit in memory.
    with store_to_write(args.store, "related") as store, progress_bars() as progress:
        progress("related", 0, len(layers))
        for i, layer in enumerate(layers, 1):
            store.write_related(run.run_id, related_lists(subject.model, layer, vocabulary, args.top))
            progress("related", i, len(layers))
        store.checkpoint()
    status(f"run {run.run_id}: related tokens and neurons of {len(layers)} layer{'s' if len(layers) > 1 else ''} "
           f"from {subject.name}'s weights → {args.store}")
    return 0


def add_io_parsers(sub: argparse._SubParsersAction, store_arg: Callable[[argparse.ArgumentParser], None]) -> None:  # type: ignore[type-arg]
    """The import-openai, export and related subcommands."""
    from neuronscope.core.choices import EXPORT_FORMATS as FORMATS
    from neuronscope.core.interop.importer import DEFAULT_MODEL

    p = sub.add_parser("import-openai", help="import a local copy of OpenAI's GPT-2 XL neuron release (or part of it): "
                                             "records, statistics, explanations, related tokens and neurons")
    p.add_argument("path", help="the release folder (holding collated-activations/, explanations/, related-tokens/, "
                                "related-neurons/)")
    p.add_argument("--model", help="the model the run is of (default: the one an export by neuronscope names in its "
                                   f"neuronscope/run.json, else {DEFAULT_MODEL})")
    p.add_argument("--layers", help="import only these layers, e.g. 0-5,12 (default: all)")
    p.add_argument("--workers", type=number(1, 64), default=min(8, max(1, (os.cpu_count() or 1) - 1)),
                   help="processes that read and parse the files while one writes (default: CPU cores - 1, at most 8)")
    store_arg(p)
    p.set_defaults(func=cmd_import_openai)

    p = sub.add_parser("export", help="write a run as Parquet files, JSONL (one neuron per line) or the OpenAI "
                                      "release layout")
    p.add_argument("--format", choices=FORMATS, required=True,
                   help="parquet (a folder of tables), jsonl (one file) or openai (a folder in the release's layout)")
    p.add_argument("--out", required=True, help="new file (jsonl) or new or empty folder (parquet, openai)")
    p.add_argument("--run", type=run_id, help="run id (default: the newest complete run)")
    p.add_argument("--layers", help="export only the neurons of these layers, e.g. 0-5,12 (default: all)")
    store_arg(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("related", help="compute every neuron's related tokens (input and output, through the "
                                       "weights) and related neurons (adjacent layers) of a run, for show and the app")
    p.add_argument("--run", type=run_id, help="run id (default: the newest complete run)")
    p.add_argument("--model", help="the run's model, when it is not where the run says (an imported run's GPT-2 XL)")
    p.add_argument("--layers", help="only these layers, e.g. 0-5,12 (default: the run's)")
    p.add_argument("--top", type=number(1, MAX_RELATED), default=10,
                   help=f"tokens and neurons kept per list, at most {MAX_RELATED} (default: 10)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: auto)")
    store_arg(p)
    p.set_defaults(func=cmd_related)
