"""Rich renderables for neurons: tokens coloured by activation, statistics, histograms.

Untrusted text (corpus tokens) only ever enters through `visible()` and `Text.append`, so markup
such as `[bold]` and terminal escapes show literally and are never interpreted.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Sequence

from rich import box
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
    token = f"'{visible(record.tokens[at])}'" if 0 <= at < len(record.tokens) else "''"
    line = Text(f"{value:+8.3f} ", style="dim")
    line.append(f"{token:>12.12} ", style="bold")  # quoted as it is made visible, not escaped a second time
    line.append_text(record_text(record, scale, negative=negative))
    return line


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
                      f"{s.density:.1%}", f"{s.kurtosis:.3g}")
    return table


def score_text(score: Score | None) -> Text:
    """A score with its 95% interval, e.g. `0.41 [0.30, 0.52]`; flags shown dim; '-' when not measured."""
    if score is None:
        return Text("-", style="dim")
    text = Text(f"{score.value:+.2f} [{score.ci_low:+.2f}, {score.ci_high:+.2f}]")
    if score.flags:
        text.append(f" {score.flags.replace('_', ' ')}", style="dim")
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
    explanation takes what is left (at most `width`, at least 12), cut to one line with …. A shuffled score that the
    explanation's interval does not lie above is yellow, with a caption saying so."""
    names = [f"{NeuronId(s.layer, s.neuron)}{'' if s.tail == 'pos' else ' (neg)'}" for s in rows]
    fixed = [max(len(str(len(rows))), 1), max(map(len, names), default=6), 20, 8, 8]
    room = total - sum(fixed) - 3 * len(fixed) - 2  # a space either side of every column, one between columns
    flagged = [s.score is not None and s.shuffled is not None and not s.beats_shuffled for s in rows]
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, caption="yellow: the score's interval does not lie above the shuffled "
                  "control" if any(flagged) else None, caption_justify="left")
    table.add_column("#", justify="right", no_wrap=True, min_width=fixed[0])
    table.add_column("neuron", no_wrap=True, min_width=fixed[1])
    table.add_column("explanation", width=max(12, min(width, room)), no_wrap=True, overflow="ellipsis")
    for name, least in zip(("score [95% CI]", "shuffled", "baseline"), fixed[2:]):
        table.add_column(name, justify="right", no_wrap=True, min_width=least)
    for i, (s, name, flag) in enumerate(zip(rows, names, flagged), 1):
        shuffled = Text(f"{s.shuffled.value:+.2f}", style="yellow" if flag else "") if s.shuffled else Text("-")
        table.add_row(str(i), name, Text(visible(s.text)), score_text(s.score), shuffled,
                      Text(f"{s.baseline.value:+.2f}") if s.baseline else Text("-"))
    return table


def simulated_record(record: ActivationRecord, predicted: Sequence[float], scale: float) -> ActivationRecord:
    """A record whose activations are a simulation's predictions (0-9) mapped onto the real colour scale."""
    from dataclasses import replace

    from neuronscope.core.records import TOP

    values = tuple(float(p) / TOP * scale for p in predicted)
    return replace(record, activations=values, exact_max=max(values, default=0.0), exact_min=min(values, default=0.0))


def shuffled_control(explanations: Sequence[ScoredExplanation], index: int, split: SplitScores) -> SplitScores | None:
    """The scores of the shuffled control nearest to explanations[index] (a job stores its candidates and controls
    together) on the same split by the same simulator, if any."""
    want = "output-shuffled" if explanations[index].role == "output" else "shuffled"
    nearest = sorted((abs(j - index), j) for j, e in enumerate(explanations) if e.role == want)
    for _, j in nearest:
        for other in explanations[j].splits:
            if (other.split, other.simulator) == (split.split, split.simulator):
                return other
    return None


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


def explanation_renderables(explanations: Sequence[ScoredExplanation], records: Sequence[ActivationRecord],
                            scale: float, count: int) -> list[tuple[RenderableType, bool]]:
    """A neuron's explanations with their scores, then real above simulated activations for the newest selected
    one, as (renderable, keep on one line) pairs: `show` prints them, the app's neuron screen stacks them."""
    parts: list[tuple[RenderableType, bool]] = [
        (Rule(Text("Explanations (newest first; scores on the test split unless marked)", style="bold")), False)]
    for index, ex in enumerate(explanations):
        label = {"candidate": f"{ex.explainer} #{ex.sample}", "shuffled": "shuffled control",
                 "baseline": "token baseline", "user": human_label(ex.explainer), "output": f"{ex.explainer} (output)",
                 "output-shuffled": "shuffled control (output)",
                 "output-baseline": "promoted tokens (output)"}.get(ex.role, ex.role)
        if ex.source:
            label += f" (from {ex.source})"
        line = Text("* " if ex.selected else "  ", style="bold")
        line.append(f"{visible(label)}: ", style="bold" if ex.selected else "")
        line.append(visible(ex.text))
        parts.append((line, True))
        for split in ex.splits:
            control = shuffled_control(explanations, index, split) if ex.role in ("candidate", "user", "output") else None
            parts.append((split_scores_line(split, control), True))
    chosen = next((e for e in explanations if e.selected and any(s.split == "test" for s in e.simulations)), None)
    if chosen is None:
        return parts
    by_excerpt = {(r.excerpt_id, r.kind): r for r in records}
    parts.append((Text(""), False))
    parts.append((Text("Real (upper) and simulated (lower) activations on the test excerpts", style="bold underline"),
                  False))
    for sim in [s for s in chosen.simulations if s.split == "test"][: 2 * count]:
        record = by_excerpt.get((sim.excerpt_id, sim.kind))
        if record is None:
            continue
        parts.append((Text("real ", style="bold") + record_line(record, scale), False))
        parts.append((Text("sim  ", style="bold") + record_line(simulated_record(record, sim.predicted, scale), scale),
                      False))
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
