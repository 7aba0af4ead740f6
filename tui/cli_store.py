"""`neuronscope info`, `clean` and `merge`: what a store holds, tidying it, and making one from shards."""

from __future__ import annotations

import argparse
import os
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.text import Text

from neuronscope.core.errors import InputError
from neuronscope.core.ids import layers_text
from neuronscope.core.records import RunInfo
from neuronscope.core.store import SCHEMA_VERSION, Store, StoreBusy
from neuronscope.tui.console import out, progress_bars, status, warning

if TYPE_CHECKING:
    from neuronscope.core.collection.collect import CollectResult


def store_to_write(path: str | Path, command: str, *, create: bool = False) -> Store:
    """The store open for writing by `neuronscope command`: while other processes have it open, it asks them to
    close it (the app and jobs in other processes do, and open it again after the write) and waits, saying whom
    for, as a collection's write does, rather than refusing."""
    from neuronscope.core.store.runs import named_process

    def waiting(pid: int | None) -> None:
        _waits(command, path, f"{named_process(pid)} has it open and is asked to close it")

    return Store.open_when_free(path, waiting, create=create)


def store_to_read(path: str | Path, command: str) -> Store:
    """The store open read-only for `neuronscope command`, which writes it later (`related`, `effects`): while
    another process writes it, it waits, saying whom for, rather than refusing."""
    from neuronscope.core.store.runs import named_process

    told: list[int | None] = []
    while True:
        try:
            return Store.open(path, read_only=True)
        except StoreBusy as busy:  # (after Store.open's own few seconds)
            if told[-1:] != [busy.pid]:
                told.append(busy.pid)
                _waits(command, path, f"{named_process(busy.pid)} is writing it")


def _waits(command: str, path: str | Path, holder: str) -> None:
    warning(f"`neuronscope {command}` waits for {path}: {holder} (Ctrl-C stops waiting, with nothing written)")


def cmd_info(args: argparse.Namespace) -> int:
    """Runs, models, counts and size of a store."""
    from neuronscope.core.collection.checkpoint import saved_state
    from neuronscope.core.interop.importer import is_import, levels_unknown
    from neuronscope.core.store.collecting import collecting_into
    from neuronscope.core.store.runs import named_process

    checkpoint, collector = saved_state(args.store), collecting_into(args.store)
    if checkpoint is not None:
        after = (f"after {checkpoint.done:,} excerpt{'' if checkpoint.done == 1 else 's'} "
                 f"({checkpoint.size / 1e6:,.1f} MB)")
        saved = Text(f"{checkpoint.folder} holds a collection's state {after}: the collect command that made it goes "
                     "on from there (delete the folder to drop it)", style="yellow")
        if collector is not None:
            saved = Text(f"{checkpoint.folder} holds the state of a collection in progress, saved {after} by "
                         f"{named_process(collector)}", style="dim")
        if not Path(args.store).exists():
            out.print(saved, soft_wrap=True)
            raise InputError(f"no store at {args.store} yet: its first collection " + (
                "is in progress" if collector is not None else "was stopped before it wrote one"))
    with Store.open(args.store, read_only=True) as store:
        runs = store.runs()
        counts = store.counts()
        size = os.path.getsize(store.path)
        wal = store.path.with_name(store.path.name + ".wal")
        size += wal.stat().st_size if wal.exists() else 0
        out.print(Text(f"{store.path}  {size / 1e6:,.1f} MB  schema {SCHEMA_VERSION}", style="bold"), soft_wrap=True)
        if not runs:
            out.print("no runs yet: `neuronscope collect` makes one")
        styles = {"complete": "green", "running": "yellow", "interrupted": "red", "failed": "red", "partial": "yellow",
                  "stopped": "yellow"}
        for r in runs:
            stored = store.run_counts(r.run_id)
            excerpts = stored["excerpts"] if is_import(r) else r.n_excerpts  # (an import's are those it stored so far)
            line = Text(f"run {r.run_id}  ", style="bold")
            line.append(r.status, style=styles.get(r.status, ""))
            if r.error and r.status != "complete":
                line.append(f" ({r.error})")
            elif r.status == "running":
                line.append(" (collecting: its data lands when the pass ends)")
            line.append(f"  {r.model}  layers {layers_text(r.layers)} x {r.neurons_per_layer}  "
                        f"{stored['neurons']:,} {'latents' if r.latents else 'neurons'}  {excerpts:,} excerpts  "
                        f"{r.dtype}"
                        f"{'  shard ' + r.shard if r.shard else ''}  {r.created_at}")
            out.print(line, soft_wrap=True)
            out.print(Text(f"      corpus {r.corpus}  revision {r.model_revision[:12]}", style="dim"), soft_wrap=True)
            if r.latents:
                out.print(Text(f"      {r.units}", style="dim"), soft_wrap=True)
            if levels_unknown(r):
                out.print(Text("      quantile levels not recorded by the release: its excerpt-max edges and bins are "
                               "numbered 0, 1, 2, ... (q0, q1, ...), not quantiles", style="dim"), soft_wrap=True)
        for job in store.jobs():
            line = Text(f"job {job['job_id']}  ", style="bold")
            line.append(job["state"], style=styles.get(job["state"], "yellow"))
            line.append(f"  {job['kind']} on run {job['run_id']}  {job['done']:,}/{job['total']:,} neurons done"
                        f"{', ' + str(job['failed']) + ' failed' if job['failed'] else ''}  {job['created_at']}")
            if job["error"]:
                line.append(f"  ({job['error']})", style="dim")
            out.print(line, soft_wrap=True)
        calls, tokens = store.call_totals()
        if calls:
            out.print(Text(f"LLM calls logged: {calls:,} ({tokens:,} tokens)"), soft_wrap=True)
        out.print(Text("rows: " + ", ".join(f"{k} {v:,}" for k, v in counts.items())), soft_wrap=True)
        if store.shared is not None and store.shared.loaded:
            out.print(Text(f"{len(store.shared.loaded):,} segments of jobs' results beside the store, in "
                           f"{store.shared.spool.root} (read with it; folded in by the next command that opens it "
                           "for writing with no other process in it)", style="dim"), soft_wrap=True)
        if counts["neurons"]:
            out.print(Text(f"store bytes per neuron: {size / counts['neurons']:,.0f}"))
        unfinished = [r for r in runs if r.status in ("interrupted", "failed")]
        for r in unfinished:
            if is_import(r):
                out.print(Text(f"run {r.run_id} is an import that did not finish: `{_resume(store, r, args.store)}` "
                               f"resumes it (or `neuronscope clean --store {args.store}` removes it)", style="yellow"),
                          soft_wrap=True)
        if checkpoint is not None:
            out.print(saved, soft_wrap=True)
        others = [r.run_id for r in unfinished if not is_import(r)]
        if others:
            out.print(Text(f"{len(others)} run{'s' if len(others) > 1 else ''} did not finish "
                           f"({', '.join(map(str, others))}): `neuronscope clean --store {args.store}` removes "
                           "them and compacts the store", style="yellow"), soft_wrap=True)
    return 0


def _resume(store: Store, run: RunInfo, path: str) -> str:
    """The import-openai command that resumes an imported run: its folder, model and the layers it was asked for."""
    from neuronscope.core.interop.importer import import_path

    layers = store.import_layers(run.run_id)
    return " ".join(["neuronscope import-openai", shlex.quote(import_path(run)), "--model", shlex.quote(run.model),
                     *(["--layers", layers_text(layers)] if layers else []), "--store", shlex.quote(str(path))])


def cmd_clean(args: argparse.Namespace) -> int:
    """Remove the runs that did not finish and compact the store."""
    with store_to_write(args.store, "clean") as store:
        before = store.path.stat().st_size
        gone = store.remove_unfinished_runs()
        status(f"compacting {store.path}")
        store.compact()
        after = store.path.stat().st_size
    from neuronscope.core.collection.checkpoint import saved_state

    removed = ", ".join(f"run {r.run_id} ({r.status})" for r in gone) or "no unfinished run"
    checkpoint = saved_state(args.store)
    kept = (f"; {checkpoint.folder} ({checkpoint.size / 1e6:,.1f} MB) stays: the collect command that made it goes "
            "on from it (delete the folder to drop it)") if checkpoint else ""
    status(f"removed {removed}; {before / 1e6:,.1f} MB → {after / 1e6:,.1f} MB{kept}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge the shard states of a collection into one store equal to a single collection."""
    from neuronscope.core.collection.ranks import shard_path

    shards = args.shards
    if not shards:
        pattern = shard_path(args.output, "*", "*")
        exact = re.compile(re.escape(pattern.name).replace(r"\*", r"\d+"))
        shards = sorted(p for p in pattern.parent.glob(pattern.name) if exact.fullmatch(p.name) and p.is_dir())
        if not shards:
            raise InputError(f"no shard states beside {args.output} ({pattern}): pass the folders `collect --shard` "
                             "wrote")
    if os.path.abspath(args.output) in {os.path.abspath(s) for s in shards}:
        raise InputError("the output store is also a shard: pass a new --output path")
    merge_shards(shards, args.output)
    return 0


def merge_shards(paths: Sequence[str | Path], output: str | Path) -> CollectResult:
    """Merge shard states into `output` (`merge`, and rank 0 of `collect --shard auto` under torchrun or srun): an
    existing store another process has open is waited for, as a collection's write does."""
    from neuronscope.core.collection.merge import merge
    from neuronscope.core.collection.state import ShardState
    from neuronscope.core.store.runs import named_process

    shards = [ShardState(path) for path in paths]

    def waiting(pid: int | None) -> None:
        warning(f"the shards are done; they are merged into {output} once {named_process(pid)} closes it (the shard "
                "states stay beside it, so stopping now loses nothing: `neuronscope merge` merges them later)")

    with Store.output(output, waiting) as target, progress_bars() as progress:
        result = merge(target, shards, progress=progress)
    if result.reused:
        status(f"run {result.run_id} of {output} already holds this merge: nothing written")
    else:
        units = "latents" if shards[0].meta.units else "neurons"
        status(f"run {result.run_id}: {result.n_neurons:,} {units} over {result.n_excerpts:,} excerpts "
               f"merged from {len(shards)} shards → {output}")
    _left_behind(paths, output)
    return result


def _left_behind(paths: Sequence[str | Path], output: str | Path) -> None:
    """Say what the merged store no longer needs beside it, and its size: the shard states (a large model's are
    gigabytes each) and the token ids the shards shared."""
    from neuronscope.core.collection.ranks import tokens_path
    from neuronscope.tui.render import visible

    tokens = tokens_path(output)
    folders = [Path(path) for path in paths] + ([tokens] if tokens.is_dir() else [])
    size = sum(file.stat().st_size for folder in folders for file in folder.rglob("*") if file.is_file())
    status(f"the store holds the {len(paths)} shard states now: they can be deleted"
           + (f", with the shards' token ids in {visible(str(tokens))}" if tokens.is_dir() else "")
           + f" ({size / 1e6:,.1f} MB in all)")
