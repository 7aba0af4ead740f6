"""The commands that run the run's own model: `probe` (a text of your own, its tokens coloured by a unit's
activation, or the units that fire most on each token and over the whole text), `effects` (what a unit does to the
next token) and `steer` (a continuation with a unit pushed, beside the plain one)."""

from __future__ import annotations

import argparse
import math
import sys
from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text

from neuronscope.core.errors import InputError
from neuronscope.core.ids import NeuronId, layers_text
from neuronscope.core.store import Store
from neuronscope.tui.cli_store import store_to_read, store_to_write
from neuronscope.tui.console import number, out, real, run_id, status
from neuronscope.tui.render import activation_style, token_name, tokens_text, visible

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np

    from neuronscope.core.models.probe import Firing, Probe
    from neuronscope.core.models.sparse import SparseCoder
    from neuronscope.core.models.subject import Subject
    from neuronscope.core.records import RunInfo

#: Units listed per token without --unit.
PER_TOKEN = 3


def cmd_probe(args: argparse.Namespace) -> int:
    """Run a text through the run's subject and print what fires."""
    from neuronscope.core.models.probe import probe_text

    text = sys.stdin.buffer.read().decode("utf-8", "replace") if args.text == "-" else args.text
    if not text.strip():
        raise InputError("the text to probe is empty: pass it as an argument, or - to read it from stdin")
    if args.sae:
        return _probe_sparse(args, text)
    with Store.open(args.store, read_only=True) as store:
        run = store.run(args.run)
        units = [_unit_of(run, u) for u in args.unit or ()]
        layers = tuple(sorted({u.layer for u in units})) if units else run.layers
        maxima = store.maxima(run.run_id, layers, run.neurons_per_layer)
    subject, coder = _subject_of(run, args)
    probe = probe_text(subject, text, layers, sparse=coder)
    if units:
        for unit in units:
            _print_unit(probe, unit, float(maxima[layers.index(unit.layer), unit.neuron]))
    else:
        _print_top(probe, maxima, args.top)
    return 0


def _probe_sparse(args: argparse.Namespace, text: str) -> int:
    """probe --sae: a sparse coder's latents on the text, by raw activation (no collection to compare with yet)."""
    import numpy as np

    from neuronscope.core.models.probe import probe_text
    from neuronscope.core.models.sparse import load_sparse

    coder = load_sparse(args.sae)
    with Store.open(args.store, read_only=True) as store:
        run = store.run(args.run)
    units = [NeuronId.parse(u) for u in args.unit or ()]
    for unit in units:
        if unit.layer != coder.layer or not 0 <= unit.neuron < coder.width:
            raise InputError(f"the sparse coder has no latent {unit}: its latents are L{coder.layer}/N0-"
                             f"L{coder.layer}/N{coder.width - 1}")
    subject, _ = _subject_of(run, args)
    coder.check_fits(subject)
    status(f"{coder.width:,} latents of {coder.source} at {coder.point} of layer {coder.layer}")
    probe = probe_text(subject, text, (coder.layer,), sparse=coder)
    if units:
        for unit in units:
            _print_unit(probe, unit, math.nan)
    else:
        _print_top(probe, np.ones((1, coder.width), np.float32), args.top, shares=False)
    return 0


def cmd_effects(args: argparse.Namespace) -> int:
    """What a unit does to the next token over its top excerpts: ablated and amplified."""
    import numpy as np

    from neuronscope.core.models.interventions import effects

    with store_to_read(args.store, "effects") as store:
        run = store.run(args.run)
        unit = _unit_of(run, args.unit)
        stats = store.neuron_stats(run.run_id, *unit)
        tops = [r for r in store.records(run.run_id, *unit, kinds=("top",))][: args.excerpts]
        if stats is None or not tops or stats.max <= 0:
            raise InputError(f"{unit} of run {run.run_id} has no top excerpt where it fires: pick another unit")
        texts = store.excerpts(run.run_id, [r.excerpt_id for r in tops])
        if not all(texts[r.excerpt_id][0] for r in tops):
            raise InputError(f"run {run.run_id} holds its excerpts as text alone (an import), not the token ids "
                             "`effects` runs through the model: use a run that `neuronscope collect` made")
        token_ids = np.array([texts[r.excerpt_id][0] for r in tops])
    subject, coder = _subject_of(run, args)
    ablate_to = stats.mean if args.ablate == "mean" else 0.0
    amplify_to = args.factor * stats.max
    found = effects(subject, unit, token_ids, ablate_to=ablate_to, amplify_to=amplify_to, top=args.top,
                    labels=(f"ablated to {args.ablate} ({ablate_to:+.3g})",
                            f"amplified to {args.factor:g} x its max ({amplify_to:+.3g}) where it fires"),
                    coder=coder)
    lists = {f"{key}_{way}": [(t.token, t.change) for t in getattr(shift, way)]
             for key, shift in zip(("ablated", "amplified"), found.shifts) for way in ("raised", "lowered")}
    # The lists join the neuron's related tokens (`show`, the app), saved before they are printed: a reader that
    # stops reading (`| head`) ends the printing.
    with store_to_write(args.store, "effects") as store:
        store.write_related(run.run_id, [(unit.layer, unit.neuron, lists, {})])
    out.print(Text(f"{unit}: next-token log-probability changes over {found.excerpts} top excerpts, at the "
                   f"{found.positions} positions where it fires", style="bold"), soft_wrap=True)
    for shift in found.shifts:
        table = Table(box=None, pad_edge=False)
        for name in ("raised most", "change", "lowered most", "change "):
            table.add_column(name, justify="right" if name.startswith("change") else "left")
        for up, down in zip(shift.raised, shift.lowered):
            table.add_row(Text(f"'{visible(up.token)}'"), f"{up.change:+.3f}", Text(f"'{visible(down.token)}'"),
                          f"{down.change:+.3f}")
        out.print()
        out.print(Text(f"{shift.name}: mean |change| {shift.mean_abs_change:.4f}", style="bold"), soft_wrap=True)
        out.print(table)
    status(f"saved with {unit}'s related tokens in {args.store} (`neuronscope show {unit}`, the app's neuron screen)")
    return 0


def cmd_steer(args: argparse.Namespace) -> int:
    """A greedy continuation with the unit pushed by scale x its corpus max, beside the plain one."""
    from neuronscope.core.models.interventions import steer

    with Store.open(args.store, read_only=True) as store:
        run = store.run(args.run)
        unit = _unit_of(run, args.unit)
        stats = store.neuron_stats(run.run_id, *unit)
        peak = stats.max if stats is not None and stats.max > 0 else 1.0
    subject, coder = _subject_of(run, args)
    add = args.scale * peak
    plain, steered = steer(subject, unit, args.prompt, add, args.tokens, coder=coder)
    table = Table(show_lines=True)
    table.add_column("plain", ratio=1)
    table.add_column(f"{unit} + {args.scale:g} x its max ({add:+.3g})", ratio=1)
    table.add_row(Text(visible(args.prompt), style="dim") + Text(visible(plain)),
                  Text(visible(args.prompt), style="dim") + Text(visible(steered)))
    out.print(table)
    return 0


def _unit_of(run: RunInfo, text: str) -> NeuronId:
    unit = NeuronId.parse(text, run.layers)
    if unit.layer not in run.layers or not 0 <= unit.neuron < run.neurons_per_layer:
        raise InputError(f"run {run.run_id} has no unit {unit}: it holds layers {layers_text(run.layers)} "
                         f"with neurons 0-{run.neurons_per_layer - 1}")
    return unit


def _subject_of(run: RunInfo, args: argparse.Namespace) -> tuple[Subject, SparseCoder | None]:
    """The run's model, loaded (a one-line error naming how to install it where it is missing), and its sparse coder
    for a run of latents."""
    from neuronscope.core.models.loading import run_subject

    return run_subject(run, device=args.device, dtype=None if args.dtype == "auto" else args.dtype, status=status)


def _print_unit(probe: Probe, unit: NeuronId, peak: float) -> None:
    values = [float(v) for v in probe.unit(unit)]
    scale = peak if peak > 0 else max((abs(v) for v in values), default=0.0)
    best = max(range(len(values)), key=values.__getitem__)
    header = Text(f"{unit}  ", style="bold")
    header.append(f"peak {values[best]:+.3f} at token {best} ({_share(_of(values[best], peak))} of its corpus max "
                  f"{peak:.3g})", style="dim")
    out.print(header, soft_wrap=True)
    out.print(tokens_text(probe.tokens, values, scale, best))
    table = Table(box=None, pad_edge=False)
    for name, justify in (("#", "right"), ("token", "left"), ("activation", "right"), ("of max", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for i, value in enumerate(values):
        table.add_row(str(i), Text(token_name(probe.tokens, i)), Text(f"{value:+.3f}", style=activation_style(value, scale)),
                      _share(_of(value, peak)))
    out.print(table)
    out.print()


def _print_top(probe: Probe, maxima: np.ndarray, count: int, shares: bool = True) -> None:
    from neuronscope.core.models.probe import top_at_tokens, top_over_text

    out.print(Text("Units firing most at each token: activation" +
                   (" (share of the unit's corpus max)" if shares else ""), style="bold"), soft_wrap=True)
    table = Table(box=None, pad_edge=False)
    table.add_column("#", justify="right")
    table.add_column("token")
    for rank in range(PER_TOKEN):
        table.add_column(f"unit {rank + 1}")
    for i, firings in enumerate(top_at_tokens(probe, maxima, PER_TOKEN)):
        cells = [_firing_text(f, shares) for f in firings] + [Text("")] * (PER_TOKEN - len(firings))
        table.add_row(str(i), Text(token_name(probe.tokens, i)), *cells)
    out.print(table)
    out.print()
    out.print(Text(f"Units firing most over the text (top {count})", style="bold"), soft_wrap=True)
    whole = Table(box=None, pad_edge=False)
    for name, justify in (("unit", "left"), ("peak", "right"), ("of max", "right"), ("at", "right"),
                          ("token", "left")):
        whole.add_column(name, justify=justify)  # type: ignore[arg-type]
    for f in top_over_text(probe, maxima, count):
        whole.add_row(str(f.unit), f"{f.activation:+.3f}", _share(f.relative) if shares else "-", str(f.position),
                      Text(token_name(probe.tokens, f.position)))
    out.print(whole)


def _firing_text(firing: Firing, shares: bool = True) -> Text:
    text = Text(f"{firing.unit} ", style="bold")
    if shares:
        text.append(f"{firing.activation:+.2f} ({firing.relative:.0%})", style=activation_style(firing.relative, 1.0))
    else:
        text.append(f"{firing.activation:+.2f}")
    return text


def _share(relative: float) -> str:
    return f"{relative:.0%}" if math.isfinite(relative) else "-"


def _of(value: float, peak: float) -> float:
    return value / peak if peak > 0 else math.nan


def add_probe_parser(sub: argparse._SubParsersAction, store_arg: Callable[[argparse.ArgumentParser], None]) -> None:  # type: ignore[type-arg]
    """probe, effects and steer."""

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--run", type=run_id, help="run id (default: the newest complete run)")
        p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available)")
        p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: auto)")
        store_arg(p)

    p = sub.add_parser("effects", help="what a unit does to the next token: ablated and amplified over its top "
                                       "excerpts, the tokens raised and lowered most")
    p.add_argument("unit", help="LAYER/INDEX, e.g. 12/345")
    p.add_argument("--excerpts", type=number(1, 1_000), default=10, help="top excerpts measured (default: 10)")
    p.add_argument("--ablate", choices=("zero", "mean"), default="zero", help="ablate to zero or to its mean")
    p.add_argument("--factor", type=real(-1000, 1000), default=4.0, help="amplify to this multiple of its max (default: 4)")
    p.add_argument("--top", type=number(1, 1_000), default=10, help="tokens listed each way (default: 10)")
    model_args(p)
    p.set_defaults(func=cmd_effects)

    p = sub.add_parser("steer", help="a greedy continuation with a unit pushed, beside the plain one")
    p.add_argument("unit", help="LAYER/INDEX, e.g. 12/345")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--scale", type=real(-1000, 1000), required=True, help="add this multiple of the unit's max at every token")
    p.add_argument("--tokens", type=number(1, 2_000), default=30, help="tokens generated (default: 30)")
    model_args(p)
    p.set_defaults(func=cmd_steer)

    p = sub.add_parser("probe", help="run a text of your own through the run's model: what fires at each token")
    p.add_argument("text", help="the text (- reads it from stdin)")
    p.add_argument("--unit", action="append", metavar="L/N",
                   help="show this unit's activation at every token (repeat for several)")
    p.add_argument("--top", type=number(1, 10_000), default=20,
                   help="units listed for the whole text without --unit (default: 20)")
    p.add_argument("--sae", metavar="FOLDER", help="a sparse coder's folder (SAELens or sparsify): its latents "
                                                  "instead of the MLP neurons, ranked by activation")
    model_args(p)
    p.set_defaults(func=cmd_probe)
