"""`neuronscope collect`: a model run over a corpus into a store (or a shard state), and the table of the most
selective neurons it prints."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import TYPE_CHECKING

from rich.text import Text

from neuronscope.core.errors import InputError, Interrupted
from neuronscope.core.store import Store
from neuronscope.tui.console import (
    Skipped,
    batch_size,
    duration,
    number,
    out,
    progress_bars,
    speak_as,
    status,
    summary,
    warning,
)

if TYPE_CHECKING:
    from neuronscope.core.collection.ranks import Rank

#: Largest --top-k/--bottom-k/--random-k/--quantile-k: memory grows with neurons x k x length.
MAX_K = 1_000
#: How often a collection writes its state by default (seconds): a long run loses at most this much to a crash.
CHECKPOINT_EVERY = 20 * 60.0


# -- subcommands -------------------------------------------------------------------------------------

def cmd_collect(args: argparse.Namespace) -> int:
    """Collect activations of a model over a corpus into the store, then print the most selective neurons."""
    from neuronscope.core.collection.collect import CollectError
    from neuronscope.core.collection.ranks import from_environment, report
    from neuronscope.core.errors import caused_by_interrupt, interruption

    rank = from_environment() if args.shard == "auto" else None
    if rank is None or rank.launcher != "srun" or rank.index == 0:
        return _collect(args, rank)
    try:  # another task of an srun step: rank 0 waits for its word (ranks.gather)
        code = _collect(args, rank)
    except BaseException as exc:
        with suppress(CollectError):  # (this failure is the one to tell)
            report(rank, args.store, interruption(exc) if caused_by_interrupt(exc) else
                   (str(exc).splitlines() or [type(exc).__name__])[0])
        raise
    report(rank, args.store, None)
    return code


def _collect(args: argparse.Namespace, rank: Rank | None) -> int:
    from neuronscope.core.collection.batching import auto_batch_size
    from neuronscope.core.collection.checkpoint import Checkpoints
    from neuronscope.core.collection.collect import collect, collect_beside, collect_shard, parse_shard
    from neuronscope.core.collection.corpus import CorpusSpec
    from neuronscope.core.collection.excerpts import cut_excerpts
    from neuronscope.core.collection.ranks import gather, meet, shard_path, tokens_path
    from neuronscope.core.ids import parse_layers
    from neuronscope.core.models.loading import load_subject
    from neuronscope.core.records import CollectSettings
    from neuronscope.core.store.collecting import only_collection

    shard = (rank.index, rank.count) if rank is not None else parse_shard(args.shard)
    # torchrun's ranks and an srun step's tasks meet when all are done, and rank 0 merges (a job array's never do).
    together = rank is not None and rank.launcher in ("torchrun", "srun") and rank.count > 1
    if together:  # the ranks share a terminal (torchrun's a node's, srun's a step's): one shows the progress
        assert rank is not None
        speak_as(f"rank {rank.index}" if (rank.index if rank.launcher == "srun" else rank.local) else None)
        status(f"rank {rank.index} of {rank.count} shows its progress here; the other ranks print only their "
               "results, warnings and errors")
    part = shard_path(args.store, *shard) if shard[1] > 1 else None  # a shard writes its state beside the store
    if args.with_neurons and not args.sae:
        raise InputError("--with-neurons collects MLP neurons beside a sparse coder's latents: pass --sae FOLDER too, "
                         "or drop it (MLP neurons are what collect reads by default)")
    if args.with_neurons and part is not None:
        raise InputError("--with-neurons works on a whole collection, not a shard: collect the shards' latents "
                         "(--sae) and their neurons as two collections, or drop --shard")
    device, gpus = args.device, None
    if rank is not None and rank.local is not None and device is None:
        import torch

        if torch.cuda.is_available() and args.device_map is not None:
            gpus = rank.gpus(torch.cuda.device_count())  # each rank spreads its model over its share of the node's
        elif torch.cuda.is_available():
            device = f"cuda:{rank.device(torch.cuda.device_count())}"  # each rank its own GPU
    if args.skip_positions >= args.length:
        raise InputError(f"--skip-positions {args.skip_positions} leaves nothing of a {args.length}-token excerpt: "
                         f"pass fewer than {args.length}")
    settings = CollectSettings(length=args.length, top_k=args.top_k, bottom_k=args.bottom_k, random_k=args.random_k,
                               quantile_k=args.quantile_k, max_excerpts=args.max_excerpts, seed=args.seed,
                               skip_positions=args.skip_positions)
    target = part or Path(args.store)
    checkpoints = (Checkpoints(target, args.checkpoint_every, warn=warning) if args.checkpoint_every is not None
                   else None)
    with ExitStack() as stack:
        stack.enter_context(only_collection(target))
        if checkpoints is not None:  # once the run is in the store, under its name (the store closed): they go
            stack.push(lambda failed, _error, _trace: None if failed else checkpoints.clear())
        # A whole run fails fast on a locked or foreign store, before loading a model.
        store = _store_for(args.store, stack) if part is None else None
        subject = load_subject(args.model, device=device, dtype=args.dtype, status=status, device_map=args.device_map,
                               gpus=gpus)
        layers = parse_layers(args.layers, range(subject.n_layers)) or ()
        sparse = None
        beside: tuple[int, ...] = ()
        if args.sae:
            from neuronscope.core.models.sparse import load_sparse

            sparse = load_sparse(args.sae)
            sparse.check_fits(subject)
            if args.with_neurons:
                beside = layers
            elif args.layers and layers != (sparse.layer,):
                raise InputError(f"the sparse coder's latents are at layer {sparse.layer}: drop --layers, or pass "
                                 f"--layers {sparse.layer}")
            layers = (sparse.layer,)
        room = subject.context and subject.context - len(subject.prefix_ids)
        if room and args.length > room:
            raise InputError(f"--length {args.length} is longer than {subject.name} reads at once ({room} tokens after "
                             f"its {len(subject.prefix_ids)} prefix token(s)): pass --length {room} or less")
        spec = CorpusSpec(args.corpus, text_field=args.text_field, strict_utf8=args.strict_utf8)
        skipped = Skipped()
        # Shards tokenize the corpus once between them, beside the store, and each reads its own windows from there.
        shared = tokens_path(args.store) if part is not None else None
        status(f"cutting {args.corpus} corpus into {args.length}-token excerpts"
               + (f" (the shards' token ids in {shared})" if shared else ""))
        with progress_bars() as progress:
            read = [0]

            def tokenized(tokens: int) -> None:  # toward the budget when there is one (an eta), else a pulsing bar
                read[0] = tokens
                progress("tokenize", tokens, args.max_tokens or 0)

            excerpts = cut_excerpts(spec, subject.tokenizer, length=args.length, max_excerpts=args.max_excerpts,
                                    seed=args.seed, shard=shard, max_tokens=args.max_tokens, progress=tokenized,
                                    skipped=skipped, replaced=skipped.replaced, cache=shared,
                                    waiting=lambda: status(f"waiting for another shard to tokenize the corpus into "
                                                           f"{shared}"))
            if read[0] and read[0] != args.max_tokens:  # ends full where the corpus is shorter than the budget too
                progress("tokenize", read[0], read[0])
        skipped.finish()
        if part is not None and not len(excerpts.excerpt_ids):
            summary(f"shard {shard[0]}/{shard[1]} has no excerpts (more shards than the corpus fills): its state is "
                    "empty, and the merge takes it as it takes the others")
        batch = args.batch_size or auto_batch_size(subject, layers, args.length, sparse.width if sparse else None)
        units = (f"{sparse.width:,} latents ({sparse.point} of layer {sparse.layer}, read by {sparse.reader})" if sparse else
                 f"{len(layers)} layer{'s' if len(layers) > 1 else ''} x {subject.n_neurons} neurons")
        status(f"{subject.name}: {units}, "
               f"{len(excerpts.excerpt_ids):,} "
               f"excerpt{'' if len(excerpts.excerpt_ids) == 1 else 's'}, {str(subject.dtype).replace('torch.', '')} on {subject.device}, batch {batch}")
        options = {"layers": layers, "settings": settings, "batch_size": batch, "reuse": not args.force,
                   "checkpoints": checkpoints, "sparse": sparse}
        if beside:
            status(f"and {len(beside)} layer{'s' if len(beside) > 1 else ''} x {subject.n_neurons} MLP neurons in the "
                   "same forward passes, as a second run")
        with progress_bars() as progress:
            if store is None:
                assert part is not None
                result = collect_shard(part, subject, excerpts, shard=shard, progress=progress, **options)
            elif beside:
                assert sparse is not None
                options["layers"] = beside
                neurons, result = collect_beside(store, subject, excerpts, progress=progress, waiting=warning,
                                                 **options)  # type: ignore[arg-type]
                status(f"run {neurons.run_id}: {neurons.n_neurons:,} neurons over {neurons.n_excerpts:,} excerpts"
                       + (" (already in the store)" if neurons.reused else ""))
            else:
                result = collect(store, subject, excerpts, progress=progress, waiting=warning, **options)
        if store is not None:
            store.checkpoint()
    # Said once the store is complete under its name (a new one is renamed onto it as the block ends): a Ctrl-C
    # while the table prints used to delete a new store's whole collection.
    if result.reused:
        summary(f"{target} already holds this collection (use --force to collect again)")
    else:
        what = f"shard {shard[0]}/{shard[1]}" if part else f"run {result.run_id}"
        summary(f"{what}: {result.n_neurons:,} {'latents' if sparse else 'neurons'} over {result.n_excerpts:,} "
                f"excerpt{'' if result.n_excerpts == 1 else 's'} in {result.seconds:.1f} s → {target}")
    if part is None:
        assert result.run_id is not None
        _print_written(args.store, result.run_id, args.top)
    if together:
        assert rank is not None
        if rank.launcher == "torchrun":
            status(f"rank {rank.index} of {rank.count}: waiting for the other ranks")
            meet(rank)
        elif rank.index == 0:
            status(f"rank 0 of {rank.count}: waiting for the other tasks' shards")
            with progress_bars() as progress:
                gather(rank, args.store, lambda done, total: progress("shards", done, total))
        if rank.index == 0:
            from neuronscope.tui.cli_store import merge_shards

            merged = merge_shards([shard_path(args.store, i, rank.count) for i in range(rank.count)], args.store)
            assert merged.run_id is not None
            _print_written(args.store, merged.run_id, args.top)
    elif part is not None:
        status(f"when every shard is done: neuronscope merge {shard_path(args.store, '*', shard[1])} "
               f"--output {args.store}")
    return 0


def _store_for(path: str, stack: ExitStack) -> Store:
    """The store a whole collection writes, checked (a foreign or newer store, or one being written, is refused before
    a model loads) and set aside until `collect` needs it."""
    from neuronscope.core.store.schema import StoreBusy

    try:
        store = stack.enter_context(Store.output(path))
    except StoreBusy:  # the app or a job has it open: `collect` reads it beside them
        store = stack.enter_context(Store.open(path, read_only=True))
    store.set_aside()  # others may open it while the model loads and the corpus is cut (collect opens it again)
    return store


def _print_written(path: str, run_id: int, limit: int) -> None:
    """The top neurons of a run just written; a Ctrl-C meanwhile says the run is kept."""
    if not limit:  # (--top 0: no table)
        return
    try:
        with Store.open(path, read_only=True) as store:
            print_top(store, run_id, limit)
    except KeyboardInterrupt:
        raise Interrupted(f"run {run_id} is complete in {path}; only the table of its top neurons was cut short") \
            from None


def print_top(store: Store, run_id: int, limit: int, order: str = "selectivity") -> None:
    from neuronscope.tui.render import neurons_table

    if not limit:  # (--top 0: no table)
        return
    run = store.run(run_id)
    rows = store.top_neurons(run_id, limit=limit, order=order)
    out.print(Text(f"Neurons of run {run_id} by {order} ({run.model}, {run.n_excerpts:,} excerpts)", style="bold"),
              soft_wrap=True)
    out.print(neurons_table(rows))


def add_collect_parser(sub: argparse._SubParsersAction, store_arg: Callable[[argparse.ArgumentParser], None]) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("collect", help="run a model over a corpus and store every neuron's top, bottom, random "
                                       "and quantile excerpts with statistics")
    p.add_argument("--model", default="smollm2-135m",
                   help="packaged name (smollm2-135m, gemma3-270m), .gguf file, model folder or Hugging Face id "
                        "(default: smollm2-135m)")
    p.add_argument("--corpus", default="default",
                   help="'default' (the Jargon File, shipped), a text/JSONL/Parquet file or folder, or hf:DATASET[:CONFIG][:SPLIT]")
    p.add_argument("--text-field", default="text", help="field holding the text in JSONL/Parquet/HF data (default: text)")
    p.add_argument("--strict-utf8", action="store_true", help="refuse corpus files with invalid UTF-8 bytes (by default "
                                                             "a few become U+FFFD and are counted)")
    p.add_argument("--layers", help="layers to collect, e.g. 0-5,12 or -1 for the last (default: all)")
    p.add_argument("--max-excerpts", type=number(1), help="sample at most this many excerpts from the corpus")
    p.add_argument("--max-tokens", type=number(1), help="read only the corpus's first N tokens (10M, 100M: reading "
                                                        "stops there; the run is named by a hash of what it read)")
    p.add_argument("--seed", type=number(0, 2**32 - 1), default=0, help="seed for excerpt sampling and random records (default: 0)")
    p.add_argument("--length", type=number(1), default=64,
                   help="tokens per excerpt, at most the model's context (default: 64)")
    p.add_argument("--skip-positions", type=number(0), default=0, metavar="N",
                   help="leave each excerpt's first N positions out of the statistics and of what ranks its records "
                        "(their activations are still kept and shown), for models with massive first-position "
                        "activations (default: 0)")
    p.add_argument("--top-k", type=number(1, MAX_K), default=50,
                   help="top excerpts kept per neuron, at least 1: explanations are written from them (default: 50)")
    p.add_argument("--bottom-k", type=number(0, MAX_K), default=50, help="most negative excerpts kept per neuron (default: 50)")
    p.add_argument("--random-k", type=number(0, MAX_K), default=20, help="random excerpts per neuron (default: 20)")
    p.add_argument("--quantile-k", type=number(0, MAX_K), default=5, help="excerpts per quantile bin (default: 5)")
    p.add_argument("--batch-size", type=batch_size, help="excerpts per forward pass, or auto: on a GPU what fits in half "
                                                         "its free memory, 64 on a CPU (default: auto)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: auto)")
    p.add_argument("--sae", metavar="FOLDER", help="collect a sparse coder's latents (SAELens or sparsify folder) "
                                                  "instead of the MLP neurons, at the coder's layer")
    p.add_argument("--with-neurons", action="store_true",
                   help="with --sae: also the MLP neurons (of --layers, default all), from the same forward passes, "
                        "as a second run of the store")
    p.add_argument("--device-map", choices=("auto", "balanced", "balanced_low_0", "sequential"),
                   help="spread a model too large for one GPU across the GPUs (accelerate; under torchrun or srun, "
                        "the rank's share of its node's GPUs); each layer's statistics stay on its GPU")
    p.add_argument("--shard", help="collect only part i of n of the corpus, e.g. 0/4, into a shard state STORE.shard-i-of-n "
                                   "beside --store, for `neuronscope merge`; auto: the part torchrun, srun or a SLURM "
                                   "job array gives this process (README, \"On a GPU box\")")
    p.add_argument("--force", action="store_true", help="collect again even if the store holds this exact run "
                                                        "(with --shard: replace the shard state there, whatever it holds)")
    p.add_argument("--checkpoint-every", type=duration, default=CHECKPOINT_EVERY, metavar="TIME",
                   help="write the collection's state beside the store this often (90s, 20m, 1h; default 20m; off), "
                        "so the same command after a crash or kill -9 goes on from there")
    p.add_argument("--top", type=number(0), default=15, help="rows of the selective-neuron table printed at the end")
    store_arg(p)
    p.set_defaults(func=cmd_collect)
