"""`neuronscope tag` and `tags`: a person's tags and notes on neurons, kept in the store with who wrote them and when
(`show` lists a neuron's, exports carry them)."""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable

from rich.table import Table
from rich.text import Text

from neuronscope.core.errors import InputError
from neuronscope.core.ids import NeuronId, layers_text
from neuronscope.core.records import RunInfo
from neuronscope.core.results import Tag
from neuronscope.core.store import Store, StoreBusy
from neuronscope.core.store.triage import tag_problem
from neuronscope.tui.console import out, plain_lines, run_id, status
from neuronscope.tui.render import visible


def add_triage_parsers(sub: argparse._SubParsersAction, store_arg: Callable[[argparse.ArgumentParser], None]) -> None:  # type: ignore[type-arg]
    """The tag and tags subcommands."""
    p = sub.add_parser("tag", help="tag neurons (good, wrong, unclear, polysemantic or your own word) and/or note "
                                   "something on them, kept in the store with your name and the time")
    p.add_argument("items", nargs="+", metavar="NEURON... [TAG]",
                   help="LAYER/NEURON pairs, e.g. 12/345, then the tag (leave it out to add a note alone); - reads "
                        "neurons from stdin, one or more a line (`neuronscope lists NAME | neuronscope tag - wrong`)")
    p.add_argument("--list", metavar="NAME", help="also the neurons of this saved list (`neuronscope lists`; the app's "
                                                  "marks are 'marked')")
    p.add_argument("--note", default="", help="a note on the neurons")
    p.add_argument("--author", help="who tags (default: $USER)")
    p.add_argument("--remove", action="store_true",
                   help="take the tag off the neurons instead (a note written with it stays)")
    p.add_argument("--run", type=run_id, help="run id (default: the newest complete run)")
    store_arg(p)
    p.set_defaults(func=cmd_tag)

    p = sub.add_parser("tags", help="list the tags and notes of a run's neurons, oldest first")
    p.add_argument("neurons", nargs="*", help="only these LAYER/NEURON pairs")
    p.add_argument("--tag", help="only this tag")
    p.add_argument("--run", type=run_id, help="run id (default: the newest complete run)")
    store_arg(p)
    p.set_defaults(func=cmd_tags)

    p = sub.add_parser("lists", help="the saved lists of neurons (the app saves its marks as 'marked'; L saves "
                                     "them under a name), or one list's neurons")
    p.add_argument("name", nargs="?", help="print this list's neurons, one LAYER/NEURON a line (for scripts, "
                                           "or a job's --list)")
    p.add_argument("--run", type=run_id, help="run id (default: the newest complete run)")
    store_arg(p)
    p.set_defaults(func=cmd_lists)


def _neurons(run: RunInfo, texts: list[str]) -> list[NeuronId]:
    neurons = [NeuronId.parse(t, run.layers) for t in texts]
    for n in neurons:
        if n.layer not in run.layers or not 0 <= n.neuron < run.neurons_per_layer:
            raise InputError(f"run {run.run_id} has no neuron {n}: it holds layers {layers_text(run.layers)} with "
                             f"neurons 0-{run.neurons_per_layer - 1}")
    return neurons


def cmd_tag(args: argparse.Namespace) -> int:
    """Tag neurons, note something on them, or take a tag off."""
    items = list(args.items)
    tag = ""
    if not NeuronId.written(items[-1]):  # not a neuron: the tag
        tag = items.pop()
    if tag and tag_problem(tag):
        raise InputError(str(tag_problem(tag)))
    if "-" in items:  # (a pipe of thousands of neurons, past what a command line holds)
        items = [word for item in items for word in (sys.stdin.read().split() if item == "-" else [item])]
    if not items and "-" in args.items:
        raise InputError("there are no neurons to tag: stdin was empty")
    if not items and not args.list:
        raise InputError("name the neurons to tag, e.g. neuronscope tag 12/345 good")
    if not tag and (args.remove or not args.note.strip()):
        raise InputError("pass a tag, --note, or both (e.g. neuronscope tag 12/345 wrong --note 'fires on dates too')")
    author = args.author or getpass.getuser()
    try:
        store = Store.open(args.store, create=False)
    except StoreBusy:  # the app or a job has it open: written beside it, as their results are
        store = Store.open(args.store, read_only=True)
    with store:
        run = store.run(args.run)
        neurons = _neurons(run, items) + (listed_neurons(store, run, args.list) if args.list else [])
        if not neurons:
            raise InputError(f"there are no neurons to tag: {'stdin' if '-' in args.items else 'the list'} was empty")
        if args.remove:
            gone = store.remove_tags(run.run_id, neurons, tag)
            status(f"took {tag!r} off {gone:,} tagging{'s' if gone != 1 else ''} of {len(neurons):,} neuron"
                   f"{'s' if len(neurons) != 1 else ''}")
            return 0
        store.add_tags(run.run_id, neurons, tag, args.note.strip(), author)
    what = f"tagged {tag!r}" if tag else "noted"
    status(f"{what} {len(neurons):,} neuron{'s' if len(neurons) != 1 else ''} of run {run.run_id} as {visible(author)}")
    return 0


def cmd_tags(args: argparse.Namespace) -> int:
    """List tags and notes."""
    with Store.open(args.store, read_only=True) as store:
        run = store.run(args.run)
        found = store.tags(run.run_id, _neurons(run, args.neurons) if args.neurons else None, args.tag)
    if not found:
        status(f"no tags or notes on run {run.run_id}" + (" match" if args.neurons or args.tag else ""))
        return 0
    if not out.is_terminal:  # for scripts (and fast at any size): a tab-separated line each, LAYER/NEURON first
        plain_lines("\t".join([f"{t.layer}/{t.neuron}", *map(visible, (t.tag, t.note, t.author)), str(t.created_at)])
                    for t in found)
        return 0
    out.print(tags_table(found))
    return 0


def tags_table(tags: list[Tag]) -> Table:
    """Tags and notes, one a row; the text inert."""
    table = Table()
    for name in ("neuron", "tag", "note", "by", "when"):
        table.add_column(name, no_wrap=name != "note", overflow="fold")
    for t in tags:
        table.add_row(str(NeuronId(t.layer, t.neuron)), Text(visible(t.tag) or "-"), Text(visible(t.note)),
                      Text(visible(t.author)), t.created_at)
    return table


def listed_neurons(store: Store, run: RunInfo, name: str) -> list[NeuronId]:
    """A saved list's neurons; InputError naming the run's lists when it has none of that name."""
    neurons = store.list_neurons(run.run_id, name)
    if neurons is None:
        known = ", ".join(saved for saved, *_ in store.saved_lists(run.run_id)) or "none yet"
        raise InputError(f"run {run.run_id} has no list {name!r} (lists: {known}): save one with L in the app")
    return neurons


def cmd_lists(args: argparse.Namespace) -> int:
    """Print the saved lists, or one list's neurons."""
    with Store.open(args.store, read_only=True) as store:
        run = store.run(args.run)
        saved = store.saved_lists(run.run_id)
        neurons = listed_neurons(store, run, args.name) if args.name else None
    if neurons is not None:
        plain_lines(f"{n.layer}/{n.neuron}" for n in neurons)
        return 0
    if not saved:
        status(f"no saved lists on run {run.run_id}: mark neurons in the app (m), and L saves them under a name")
        return 0
    table = Table()
    for name in ("list", "neurons", "saved by", "when"):
        table.add_column(name, no_wrap=True)
    for name, count, author, when in saved:
        table.add_row(Text(visible(name)), f"{count:,}", Text(visible(author)), when)
    out.print(table)
    return 0
