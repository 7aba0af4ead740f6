"""Numbers and tables that never mislead: a number formatted to its column is never cut, the piped table of a
job's scores stays one line a neuron at 80 columns and marks its flagged rows without colour, a record's peak token
reads as the excerpt shows it, and `show` flags each explanation against its own shuffled control, by tail, an
explanation that several jobs stored alike once."""

from __future__ import annotations

from dataclasses import replace

from rich.console import Console

from neuronscope.core.ids import NeuronId
from neuronscope.core.records import ActivationRecord
from neuronscope.core.results import NeuronSummary, Score, ScoredExplanation, SplitScores
from neuronscope.tui.render import explanation_renderables, record_line, short_number, summaries_table


def test_a_number_fits_its_column_and_reads_right() -> None:
    cases = {3569.0: "3.57k", -3569.2: "-3.57k", 999.7: "1k", 999.4: "999", 123456.0: "123k", 1.234e9: "1.23G",
             12.345: "12.3", 0.000123: "0.00012", 1.5e-7: "1.5e-07", 0.0: "0", -0.5: "-0.5"}
    for value, want in cases.items():
        assert short_number(value) == want, value
    for value in (3569.123, -98765.4, 1e-9, -1.234567e-5, 1e12 + 1):
        assert len(short_number(value, 7)) <= 7
    for value in (3569.123, 98765.4, 0.5, 1e12 + 1):
        assert len(short_number(value, 5)) <= 5


def _summary(neuron: int, text: str, value: float, shuffled: float) -> NeuronSummary:
    return NeuronSummary(3, neuron, "pos", text, "local:qwen-1.5b", Score("all", value, value - 0.05, value + 0.05, 10),
                         Score("all", shuffled, shuffled, shuffled, 10), Score("all", 0.4, 0.3, 0.5, 10))


def test_the_scores_table_is_one_line_a_neuron_at_80_columns() -> None:
    rows = [_summary(n, f"fires on the word {'very ' * 20}long explanation {n}", 0.8 - n / 10, 0.1 if n < 5 else 0.28)
            for n in range(6)]
    console = Console(width=80, record=True, color_system=None)
    console.print(summaries_table(rows, total=console.width))
    text = console.export_text()
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines)
    body = [line for line in lines if "L3/N" in line]
    assert len(body) == 6 and all("…" in line and "[+" in line for line in body)  # cut, not wrapped; intervals whole
    assert "≤ (yellow): the score's interval does not lie above the shuffled control" in text  # the last
    # Without colour the flagged row (its interval's low end 0.25 below the shuffled 0.28) reads as such too.
    assert ["≤" in line for line in body] == [False] * 5 + [True] and body[5].rstrip().endswith("≤ +0.28     +0.40")
    plain = Console(width=80, record=True, color_system=None)
    plain.print(summaries_table(rows[:2], total=80))
    assert "yellow" not in plain.export_text()  # no caption when every score beats its shuffled control
    # A flagged score and a long name keep every column whole at 80 columns (the flag said briefly, in the caption).
    flat = replace(rows[0], layer=30, neuron=10_063, tail="neg", score=Score("all", 0.0, 0.0, 0.0, 10,
                                                                            "constant_prediction"))
    plain.print(summaries_table([flat, *rows[1:3]], total=80))
    lines = plain.export_text().splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    assert any(line.startswith(" 1  L30/N10063 (neg)  fires on …") and "+0.00 [+0.00, +0.00] flat" in line and
               line.rstrip().endswith("≤ +0.10     +0.40") for line in lines), lines
    assert "flat: the simulation predicted one value everywhere" in [line.rstrip() for line in lines]


def test_a_records_peak_token_is_named_as_its_excerpt_shows_it() -> None:
    """A control character is escaped once (a NUL reads \\x00 in the excerpt and in the peak's name, not \\\\x00), and
    the name keeps its quotes and leading space."""
    def line(tokens: tuple[str, ...]) -> str:
        record = ActivationRecord("top", 0, 7, tokens, (0.1, 2.0, 0.3))
        return record_line(record, 2.0).plain

    assert line(("a", "\x00", "b")) == "  +2.000       '\\x00' a\\x00b"
    assert line(("a", " the", "\x1b[31m")) == "  +2.000       ' the' a the\\x1b[31m"
    # A long name is cut with …; one holding only the first bytes of a character names the token completing it.
    assert line(("a", " correspondent", "b")) == "  +2.000 ' correspon… a correspondentb"
    assert line(("a", "", "中")) == "  +2.000 part of '中' a中"
    assert line(("中", "文文", "x")) == "  +2.000       '文文' 中文文x"  # two cells a character: the column holds


def _scored(text: str, role: str, job: int, value: float, low: float, *, tail: str = "pos", flags: str = "",
            source: NeuronId | None = None) -> ScoredExplanation:
    score = Score("all", value, low, value + 0.2, 10, flags)
    return ScoredExplanation(text, "baseline", role, selected=role == "candidate", source=source, tail=tail, job=job,
                             splits=(SplitScores("test", "baseline", (score,)),))


def _shown(explanations: list[ScoredExplanation]) -> list[str]:
    console = Console(width=200, record=True, color_system=None)
    for renderable, _ in explanation_renderables(explanations, [], 1.0, 2):
        console.print(renderable)
    return console.export_text().splitlines()


#: A neuron's explanations as the store lists them (newest job first): jobs 8, 6 and 4 explained the positive tail
#: alike, job 7 scored a person's sentence and job 5 explained the negative tail. Each explanation's own control
#: follows it, a control of another job or tail sits as near before it.
NEURON = [
    _scored('tokens: " my" 9.0', "candidate", 8, 0.83, 0.52),
    _scored('tokens: "ee" 9.0', "shuffled", 8, 0.0, 0.0, source=NeuronId(2, 1044)),
    _scored('the word "my"', "user", 7, 0.36, 0.0),
    _scored('tokens: " tack" 9.0', "shuffled", 7, -0.01, -0.01, source=NeuronId(0, 0)),
    _scored('tokens: " my" 9.0', "baseline", 7, 0.83, 0.52),
    _scored('tokens: " my" 9.0', "candidate", 6, 0.83, 0.52),
    _scored('tokens: "because" 9.0', "shuffled", 6, 0.01, -0.01, source=NeuronId(0, 244)),
    _scored('tokens: " competing" 9.0', "candidate", 5, 0.0, 0.0, tail="neg", flags="constant_prediction"),
    _scored('tokens: " all" 8.1', "shuffled", 5, -0.02, -0.03, tail="neg", source=NeuronId(0, 48)),
    _scored('tokens: " my" 9.0', "candidate", 4, 0.83, 0.52),
    _scored('tokens: "more" 8.6', "shuffled", 4, 0.95, 0.9, source=NeuronId(0, 1063)),
]


def test_each_explanation_is_flagged_against_its_own_shuffled_control() -> None:
    """The control of the same job and tail, not the nearest in the list: the person's sentence (+0.36 [+0.00, …])
    clears its own control (-0.01), not job 8's (+0.00) as near before it; the negative tail's constant prediction
    clears its own (-0.02), not the positive tail's (+0.01); job 4's explanation does not clear its own (+0.95)."""
    lines = _shown(NEURON)
    assert [line.strip() for line in lines if "≤" in line] == [
        "test   baseline: r +0.83 [+0.52, +1.03] ≤ shuffled (job 4)"]
    user = lines.index('* a person\'s sentence (job 7): the word "my"'.replace("* ", "  "))
    assert lines[user + 1].strip() == "test   baseline: r +0.36 [+0.00, +0.56]"
    assert "test   baseline: r +0.00 [+0.00, +0.20] constant prediction" in [line.strip() for line in lines]


def test_explanations_are_listed_by_tail_and_once_for_several_jobs() -> None:
    """The positive tail first, the negative one under its heading; jobs 8, 6 and 4 stored the same explanation:
    listed once, naming them, each job's control after it (naming its job), job 4's score line apart."""
    lines = _shown(NEURON)
    assert sum('tokens: " my" 9.0' in line for line in lines) == 2  # the explanation once, the token baseline once
    same = lines.index('* baseline #0 (jobs 8, 6, 4): tokens: " my" 9.0')
    assert [line.strip() for line in lines[same + 1:same + 3]] == [
        "test   baseline: r +0.83 [+0.52, +1.03] (jobs 8, 6)",
        "test   baseline: r +0.83 [+0.52, +1.03] ≤ shuffled (job 4)"]
    assert [line.split(":")[0] for line in lines[same + 3:] if not line.startswith("      ")] == [
        "  shuffled control (from L2/N1044, job 8)", "  shuffled control (from L0/N244, job 6)",
        "  shuffled control (from L0/N1063, job 4)", "  a person's sentence (job 7)",
        "  shuffled control (from L0/N0, job 7)", "  token baseline (job 7)", "Negative tail (--tail neg)",
        "* baseline #0 (job 5)", "  shuffled control (from L0/N48, job 5)"]
    # One job alone: nothing named, nothing moved.
    one = _shown([replace(e, job=7) for e in NEURON[2:5]])
    assert [line.split(":")[0].strip() for line in one[1::2]] == [
        "a person's sentence", "shuffled control (from L0/N0)", "token baseline"], one
