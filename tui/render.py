"""Rich renderables for neurons: tokens coloured by activation, statistics, histograms.

Untrusted text (corpus tokens) only ever enters through `visible()` and `Text.append`, so markup
such as `[bold]` and terminal escapes show literally and are never interpreted.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Sequence

from rich import box
from rich.cells import cell_len, set_cell_size
from rich.color import Color
from rich.console import RenderableType
from rich.rule import Rule
from rich.style import Style
from rich.table import Table
from rich.text import Span, Text

from neuronscope.core.choices import SCORERS
from neuronscope.core.explanation.output import STEER_METHOD
from neuronscope.core.ids import NeuronId
from neuronscope.core.records import FIRST_POSITION, ActivationRecord, NeuronStats
from neuronscope.core.results import NeuronSummary, Score, ScoredExplanation, SplitScores, Tag

_SHOWN = {"\n": "↵", "\r": "␍", "\t": "⇥"}
_SPARK = " ▁▂▃▄▅▆▇█"


@functools.lru_cache(maxsize=1 << 16)
def visible(token: str) -> str:
    """A token made safe and visible: newlines and tabs as symbols, other control characters as \\xNN."""
    out = []
    for ch in token:
        if ch in _SHOWN:
            out.append(_SHOWN[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp") and ch != " ":
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


#: How the suggested tags look (any other tag is bold cyan).
TAG_STYLES = {"good": "bold green", "wrong": "bold red", "unclear": "bold yellow", "polysemantic": "bold magenta"}


def tag_style(tag: str) -> str:
    return TAG_STYLES.get(tag, "bold cyan")


def tag_line(tag: Tag) -> Text:
    """One tag or note as `show` and the neuron screen list it: the tag, the note, who and when (all inert)."""
    line = Text("tag ", style="bold") + Text(visible(tag.tag) or "note", style=tag_style(tag.tag) if tag.tag else "bold")
    line.append(f"  {visible(tag.note)}" if tag.note else "")
    line.append(f"  ({visible(tag.author)}, {tag.created_at})", style="dim")
    return line


def activation_style(value: float, scale: float, peak: bool = False) -> Style:
    """Green for positive, purple for negative, stronger with |value| / scale; readable on dark and light."""
    t = 0.0 if scale <= 0 else max(-1.0, min(1.0, value / scale))
    return _shade(round(t * _SHADES), peak)


_SHADES = 48  # steps of |value| / scale per sign: finer than the eye tells apart, few enough to cache


@functools.lru_cache(maxsize=4 * _SHADES + 4)
def _shade(step: int, peak: bool) -> Style:
    t = step / _SHADES
    strength = abs(t)
    if strength < 0.05:
        return Style(bold=peak, underline=peak)
    if t > 0:
        rgb = (int(225 - 205 * strength), int(245 - 115 * strength), int(225 - 185 * strength))
    else:
        rgb = (int(240 - 130 * strength), int(225 - 200 * strength), int(245 - 75 * strength))
    fg = Color.from_rgb(255, 255, 255) if strength > 0.6 else Color.from_rgb(0, 0, 0)
    return Style(color=fg, bgcolor=Color.from_rgb(*rgb), bold=peak, underline=peak)


def fit(text: str, width: int, justify: str = "left") -> str:
    """`text` in exactly `width` terminal cells (wide characters take two, combining ones none), cut with … or
    padded; right-justified on request."""
    if cell_len(text) > width:
        text = set_cell_size(text, max(width - 1, 0)) + "…" if width > 0 else ""
    pad = " " * (width - cell_len(text))
    return pad + text if justify == "right" else text + pad


def peak_index(record: ActivationRecord, negative: bool = False) -> int:
    """Position of the record's largest activation (its most negative one for negative records)."""
    acts = record.activations
    pick = min if negative else max
    return pick(range(len(acts)), key=acts.__getitem__) if acts else -1


def record_text(record: ActivationRecord, scale: float, negative: bool = False) -> Text:
    """One excerpt as coloured tokens; the peak (or, for negative records, the trough) is underlined."""
    return tokens_text(record.tokens, record.activations, scale, peak_index(record, negative))


def tokens_text(tokens: Sequence[str], values: Sequence[float], scale: float, peak: int = -1) -> Text:
    """Tokens coloured by their activations (against `scale`), the token at `peak` underlined."""
    pieces, spans, at = [], [], 0
    for i, (token, value) in enumerate(zip(tokens, values)):
        piece = visible(token)
        pieces.append(piece)
        spans.append(Span(at, at + len(piece), activation_style(value, scale, peak=i == peak)))
        at += len(piece)
    return Text("".join(pieces), spans=spans, no_wrap=False)  # spans, not append: a neuron's ~3,000 tokens at once


def record_line(record: ActivationRecord, scale: float, negative: bool = False) -> Text:
    """A record as one line: its peak (or trough) value and token, then the coloured excerpt; the
    token is named in plain text too, so the line reads without colour (NO_COLOR, pipes)."""
    at = peak_index(record, negative)
    value = record.min if negative else record.max
    line = Text(f"{value:+8.3f} ", style="dim")
    line.append(fit(token_name(record.tokens, at), 12, "right") + " ", style="bold")
    line.append_text(record_text(record, scale, negative=negative))
    return line


def token_name(tokens: Sequence[str], at: int) -> str:
    """The token at `at`, quoted as it is made visible (not escaped a second time); one holding only the first
    bytes of a character (Subject.token_strings gives it '') as part of the token that completes it."""
    if not 0 <= at < len(tokens):
        return "''"
    if tokens[at] or at == len(tokens) - 1:
        return f"'{visible(tokens[at])}'"
    rest = next((t for t in tokens[at + 1:] if t), "")
    return f"part of '{visible(rest[:1])}'"


def scale_of(records: Sequence[ActivationRecord]) -> float:
    """One colour scale for every record of a neuron: its largest |activation| shown."""
    return max((abs(a) for r in records for a in r.activations), default=0.0)


def sparkline(counts: Sequence[int]) -> str:
    """Counts as a line of block characters (log-scaled so rare tails stay visible)."""
    import math

    logs = [math.log1p(c) for c in counts]
    top = max(logs, default=0.0)
    if top <= 0:
        return ""
    return "".join(_SPARK[round(v / top * (len(_SPARK) - 1))] for v in logs)


def stats_table(stats: NeuronStats, quantiles: Sequence[float]) -> Table:
    """A neuron's statistics as a two-column table."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("tokens", f"{stats.count:,}" if stats.count else "unknown (imported)"),
        ("mean", f"{stats.mean:.4g}"),
        ("std", f"{stats.variance ** 0.5:.4g}"),
        ("skewness", f"{stats.skewness:.3g}"),
        ("kurtosis", f"{stats.kurtosis:.3g}"),
        ("max / min", f"{stats.max:.4g} / {stats.min:.4g}"),
        ("density", f"{stats.density:.1%} of tokens > 0" if stats.density == stats.density else "unknown"),
        ("selectivity", f"{stats.selectivity:.3g}"),
    ]
    if stats.quantile_edges:
        edges = ", ".join(f"q{q:g}={v:.3g}" for q, v in zip(quantiles, stats.quantile_edges))
        rows.append(("excerpt max", edges))
    if stats.first_peak is not None:
        rows.append(("first position", f"{stats.first_peak:.0%} of its top excerpts peak there"))
    for key, value in rows:
        table.add_row(key, value)
    if stats.first_peak is not None and stats.first_peak >= FIRST_POSITION:
        table.add_row("", Text("a position artefact? collect again with --skip-positions 1", style="yellow"))
    return table


def histogram_text(stats: NeuronStats) -> Text:
    """The token-activation histogram (symmetric log bins) as a sparkline with its range."""
    from neuronscope.core.layerdata import HIST_EDGES

    counts = list(stats.histogram)
    nonzero = [i for i, c in enumerate(counts) if c]
    if not nonzero:
        return Text("no tokens")
    lo, hi = nonzero[0], nonzero[-1]
    left = "-inf" if lo == 0 else f"{HIST_EDGES[lo - 1]:.3g}"
    right = "+inf" if hi >= len(HIST_EDGES) else f"{HIST_EDGES[hi]:.3g}"
    text = Text(f"{left} ")
    text.append(sparkline(counts[lo : hi + 1]), style="cyan")
    text.append(f" {right}  (log counts, bins of ±2^(j/2))")
    return text


def neurons_table(rows: Sequence[NeuronStats]) -> Table:
    """A ranked table of neurons."""
    table = Table()
    for name, justify in (("#", "right"), ("neuron", "left"), ("selectivity", "right"), ("max", "right"),
                          ("min", "right"), ("density", "right"), ("kurtosis", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for i, s in enumerate(rows, 1):
        table.add_row(str(i), str(NeuronId(s.layer, s.index)), f"{s.selectivity:.2f}", f"{s.max:.3g}", f"{s.min:.3g}",
                      f"{s.density:.1%}" if s.density == s.density else "-", f"{s.kurtosis:.3g}")
    return table


#: A score's flags as a table's narrow column names them (`score_text(brief=True)`).
BRIEF_FLAGS = {"constant_prediction": "flat", "constant_target": "flat target", "no_tokens": "no tokens"}


def score_text(score: Score | None, brief: bool = False) -> Text:
    """A score with its 95% interval, e.g. `0.41 [0.30, 0.52]`; flags shown dim (`brief`: BRIEF_FLAGS's words);
    '-' when not measured."""
    if score is None:
        return Text("-", style="dim")
    text = Text(f"{score.value:+.2f} [{score.ci_low:+.2f}, {score.ci_high:+.2f}]")
    if score.flags:
        flags = score.flags.split(",")
        text.append(" " + ", ".join(BRIEF_FLAGS.get(f, f) if brief else f.replace("_", " ") for f in flags),
                    style="dim")
    return text


def short_number(value: float, width: int = 7) -> str:
    """A number in at most `width` characters, never cut: three significant digits where they fit (fewer where not),
    thousands and more as k, M, G, T: 3569 -> '3.57k', 0.000123 -> '0.00012', 1.5e-07 -> '1.5e-07'."""
    for digits in (3, 2, 1):
        text = f"{value:.{digits}g}"
        if "e+" in text:  # 1,000 or more (after rounding)
            for suffix, scale in (("k", 1e3), ("M", 1e6), ("G", 1e9), ("T", 1e12)):
                text = f"{value / scale:.{digits}g}{suffix}"
                if "e+" not in text:
                    break
        if len(text) <= width:
            return text
    return f"{value:.0e}"


def summaries_table(rows: Sequence[NeuronSummary], width: int = 60, total: int = 120) -> Table:
    """Explained neurons ranked by headline score, each beside its shuffled and token-baseline controls, in `total`
    columns (the console's width): every column but the explanation keeps the width of its content, and the
    explanation takes what is left (at most `width`, at least 8), cut to one line with …. A shuffled score that the
    explanation's interval does not lie above is marked ≤ (read without colour too) and yellow, as the caption says."""
    names = [f"{NeuronId(s.layer, s.neuron)}{'' if s.tail == 'pos' else ' (neg)'}" for s in rows]
    scores = [score_text(s.score, brief=True) for s in rows]
    fixed = [max(len(str(len(rows))), 1), max(map(len, names), default=6), max([20, *(t.cell_len for t in scores)]),
             8, 8]
    room = total - sum(fixed) - 2 * (len(fixed) + 1)  # a space either side of every column, shared between them
    flagged = [s.score is not None and s.shuffled is not None and not s.beats_shuffled for s in rows]
    notes = ["≤ (yellow): the score's interval does not lie above the shuffled control"] if any(flagged) else []
    if any(s.score is not None and "constant_prediction" in s.score.flags for s in rows):
        notes.append("flat: the simulation predicted one value everywhere")
    caption = "\n".join(notes) or None
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, caption=caption, caption_justify="left", collapse_padding=True)
    table.add_column("#", justify="right", no_wrap=True, min_width=fixed[0])
    table.add_column("neuron", no_wrap=True, min_width=fixed[1])
    table.add_column("explanation", width=max(8, min(width, room)), no_wrap=True, overflow="ellipsis")
    for name, least in zip(("score [95% CI]", "shuffled", "baseline"), fixed[2:]):
        table.add_column(name, justify="right", no_wrap=True, min_width=least)
    for i, (s, name, flag) in enumerate(zip(rows, names, flagged), 1):
        shuffled = Text(f"{'≤ ' if flag else ''}{s.shuffled.value:+.2f}", style="yellow" if flag else "") \
            if s.shuffled else Text("-")
        table.add_row(str(i), name, Text(visible(s.text)), scores[i - 1], shuffled,
                      Text(f"{s.baseline.value:+.2f}") if s.baseline else Text("-"))
    return table


def simulated_record(record: ActivationRecord, predicted: Sequence[float], scale: float) -> ActivationRecord:
    """A record whose activations are a simulation's predictions (0-9) mapped onto the real colour scale."""
    from dataclasses import replace

    from neuronscope.core.records import TOP

    values = tuple(float(p) / TOP * scale for p in predicted)
    return replace(record, activations=values, exact_max=max(values, default=0.0), exact_min=min(values, default=0.0))


#: The role of each role's shuffled control.
CONTROL_ROLES = {"candidate": "shuffled", "user": "shuffled", "output": "output-shuffled"}


def shuffled_control(explanations: Sequence[ScoredExplanation], index: int, split: SplitScores) -> SplitScores | None:
    """The scores of explanations[index]'s own shuffled control (the one its job stored for the same tail) on the
    same split by the same simulator, if any."""
    ex = explanations[index]
    want = CONTROL_ROLES.get(ex.role)
    controls = [e for e in explanations if e.role == want and e.job == ex.job and e.tail == ex.tail]
    return next((other for e in controls for other in e.splits
                 if (other.split, other.simulator) == (split.split, split.simulator)), None)


def split_scores_line(split: SplitScores, control: SplitScores | None) -> Text:
    """One split's scores on one line; with the shuffled control's, a score whose interval does not lie above the
    control's value is flagged."""
    text = Text(f"      {split.split:6} {visible(split.simulator)}:")

    def flag(score: Score) -> None:
        other = control.get(score.method) if control else None
        if other is not None and not score.ci_low > other.value:
            text.append(" ≤ shuffled", style="yellow")

    score = split.get("all")
    if score is not None:
        text.append(" r ")
        text.append_text(score_text(score))
        flag(score)
    for method in ("top", "random", "r2", "contrast", "published"):  # published: an imported release's own r
        s = split.get(method)
        if s is not None:
            text.append(f"  {method} {s.value:+.2f}")
            if method == "contrast":
                flag(s)
    for method in (*SCORERS, STEER_METHOD):  # AUROCs, 0.5 is chance
        s = split.get(method)
        if s is not None:
            text.append(f"  {method} {s.value:.2f} [{s.ci_low:.2f}, {s.ci_high:.2f}]")
            flag(s)
    return text


def human_label(explainer: str) -> str:
    """How a person's own explanation is labelled: `by ada (human)`, from its explainer `user:ada`."""
    author = explainer.partition(":")[2]
    return f"by {author} (human)" if author else "a person's sentence"


#: How each tail's explanations are introduced in `show` (the positive tail's need no heading).
TAIL_HEADINGS = {"neg": "Negative tail (--tail neg): explanations of the most negative activations"}


def _jobs(jobs: Sequence[int | None]) -> str:
    return f" (job{'s' if len(jobs) > 1 else ''} {', '.join(map(str, jobs))})"


def _entry(explanations: Sequence[ScoredExplanation], indexes: Sequence[int],
           by_job: bool) -> list[tuple[RenderableType, bool]]:
    """One explanation as `show` lists it, stored alike (same tail, role, author, text) by the jobs at `indexes`:
    once, naming the jobs where `by_job`, each score line once (each job's flagged against its own control; the
    lines that differ between the jobs name theirs)."""
    ex = explanations[indexes[0]]
    label = {"candidate": f"{ex.explainer} #{ex.sample}", "shuffled": "shuffled control", "baseline": "token baseline",
             "user": human_label(ex.explainer), "output": f"{ex.explainer} (output)",
             "output-shuffled": "shuffled control (output)", "output-baseline": "promoted tokens (output)"}.get(ex.role,
                                                                                                          ex.role)
    named = _jobs([explanations[i].job for i in indexes]) if by_job else ""
    label += f" (from {ex.source}{', ' + named[2:-1] if named else ''})" if ex.source else named
    line = Text("* " if ex.selected else "  ", style="bold")
    line.append(f"{visible(label)}: ", style="bold" if ex.selected else "")
    line.append(visible(ex.text))
    lines: dict[str, tuple[Text, list[int | None]]] = {}
    for i in indexes:
        for split in explanations[i].splits:
            text = split_scores_line(split, shuffled_control(explanations, i, split))
            lines.setdefault(text.plain, (text, []))[1].append(explanations[i].job)
    kinds = {(s.split, s.simulator) for i in indexes for s in explanations[i].splits}
    for text, jobs in lines.values():
        if by_job and len(lines) > len(kinds):
            text.append(_jobs(jobs), style="dim")
    return [(line, True), *((text, True) for text, _ in lines.values())]


def _ordered(explanations: Sequence[ScoredExplanation], groups: list[list[int]]) -> list[list[int]]:
    """Groups of explanations in their order, but each control after the last explanation it controls (those of
    the same jobs, output-centric or not): a control read with another job's explanations would look like theirs."""
    def family(e: ScoredExplanation) -> tuple[bool, int | None]:
        return e.role.startswith("output"), e.job

    last = {family(explanations[i]): n for n, g in enumerate(groups) if explanations[g[0]].role in CONTROL_ROLES
            for i in g}

    def place(n: int, g: list[int]) -> tuple[int, int, int]:
        if explanations[g[0]].role in CONTROL_ROLES:
            return n, 0, n
        return max(last.get(family(explanations[i]), n) for i in g), 1, n

    return [g for n, g in sorted(enumerate(groups), key=lambda ng: place(*ng))]


def explanation_renderables(explanations: Sequence[ScoredExplanation], records: Sequence[ActivationRecord],
                            scale: float, count: int) -> list[tuple[RenderableType, bool]]:
    """A neuron's explanations with their scores, by tail (the positive first), an explanation that several jobs
    stored alike listed once; then real above simulated activations for the newest selected one (of the positive
    tail where there is one), as (renderable, keep on one line) pairs: `show` prints them, the app's neuron screen
    stacks them. Explanations from several jobs name their jobs (where they were read with them)."""
    parts: list[tuple[RenderableType, bool]] = [
        (Rule(Text("Explanations (newest first; scores on the test split unless marked)", style="bold")), False)]
    jobs = {e.job for e in explanations}
    by_job = len(jobs) > 1 and None not in jobs
    for tail in dict.fromkeys(["pos", *(e.tail for e in explanations)]):
        alike: dict[tuple[object, ...], list[int]] = {}
        for i, e in enumerate(explanations):
            if e.tail == tail:
                alike.setdefault((e.role, e.explainer, e.sample, e.selected, e.text, e.source), []).append(i)
        if alike and tail != "pos":
            parts.append((Text(TAIL_HEADINGS.get(tail, f"{visible(tail)} tail"), style="bold"), True))
        for indexes in _ordered(explanations, list(alike.values())) if by_job else alike.values():
            parts += _entry(explanations, indexes, by_job)
    with_test = [e for e in explanations if e.selected and any(s.split == "test" for s in e.simulations)]
    chosen = next((e for e in with_test if e.tail == "pos"), with_test[0] if with_test else None)
    if chosen is None:
        return parts
    negative = chosen.tail == "neg"  # a negative tail's records and simulation as troughs, real beside simulated
    by_excerpt = {(r.excerpt_id, r.kind): r for r in records}
    parts.append((Text(""), False))
    parts.append((Text("Real (upper) and simulated (lower) activations on the test excerpts"
                       + (" (negative tail)" if negative else ""), style="bold underline"), False))
    for sim in [s for s in chosen.simulations if s.split == "test"][: 2 * count]:
        record = by_excerpt.get((sim.excerpt_id, "bottom" if negative and sim.kind == "top" else sim.kind))
        if record is None:
            continue
        simulated = simulated_record(record, sim.predicted, -scale if negative else scale)
        parts.append((Text("real ", style="bold") + record_line(record, scale, negative), False))
        parts.append((Text("sim  ", style="bold") + record_line(simulated, scale, negative), False))
    return parts


#: How the related lists are labelled, in the order they are shown.
RELATED_LABELS = {"input_positive": "input +", "input_negative": "input −", "output_positive": "output +",
                  "output_negative": "output −", "lookup": "lookup", "upstream_positive": "upstream +",
                  "upstream_negative": "upstream −", "downstream_positive": "downstream +",
                  "downstream_negative": "downstream −", "ablated_lowered": "ablated −", "ablated_raised": "ablated +",
                  "amplified_raised": "amplified +", "amplified_lowered": "amplified −"}


def related_lines(tokens: dict[str, list[tuple[str, float]]], neurons: dict[str, list[tuple[int, int, float]]],
                  count: int = 8) -> list[Text]:
    """A neuron's related tokens (from its weights or the lookup of its activations) and related neurons (through
    the adjacent layers' weights), one labelled line per list, the `count` strongest of each."""
    lines = []
    for name, label in RELATED_LABELS.items():
        if name in tokens:
            body = ", ".join(f"'{visible(t)}' {v:+.3g}" for t, v in tokens[name][:count])
        elif name in neurons:
            body = ", ".join(f"{NeuronId(layer, index)} {v:+.3g}" for layer, index, v in neurons[name][:count])
        else:
            continue
        lines.append(Text(f"  {label:13}", style="bold") + Text(body))
    return lines
