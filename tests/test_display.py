"""Numbers and tables that never mislead: a number formatted to its column is never cut, the piped table of a
job's scores stays one line a neuron at 80 columns, and a record's peak token reads as the excerpt shows it."""

from __future__ import annotations

from rich.console import Console

from neuronscope.core.records import ActivationRecord
from neuronscope.core.results import NeuronSummary, Score
from neuronscope.tui.render import record_line, short_number, summaries_table


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
    assert "yellow: the score's interval does not lie above the shuffled control" in text  # the last
    plain = Console(width=80, record=True, color_system=None)
    plain.print(summaries_table(rows[:2], total=80))
    assert "yellow" not in plain.export_text()  # no caption when every score beats its shuffled control


def test_a_records_peak_token_is_named_as_its_excerpt_shows_it() -> None:
    """A control character is escaped once (a NUL reads \\x00 in the excerpt and in the peak's name, not \\\\x00), and
    the name keeps its quotes and leading space."""
    def line(tokens: tuple[str, ...]) -> str:
        record = ActivationRecord("top", 0, 7, tokens, (0.1, 2.0, 0.3))
        return record_line(record, 2.0).plain

    assert line(("a", "\x00", "b")) == "  +2.000       '\\x00' a\\x00b"
    assert line(("a", " the", "\x1b[31m")) == "  +2.000       ' the' a the\\x1b[31m"
