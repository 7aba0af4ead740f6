"""Simulation modes (core/simulation.py): the quotes an explanation commits to, token ratings on top of them, the
lines mode unchanged, and the dry run counting what each mode calls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from neuronscope.core.explanation.simulation import LAST_QUOTE, quoted, requests, simulate, simulator_name
from neuronscope.core.llm.base import CallLog, make_backend
from neuronscope.core.llm.baseline import BaselineBackend
from neuronscope.core.llm.prompts import NEUTRAL_EXPLANATION
from neuronscope.core.llm.rating import Item, rating_text
from neuronscope.core.records import TOP

EXCERPTS = [(" The", " cat", " sat", ".", " Until", " dawn"), ("until", " the", " Cat", " slept", ".")]


@pytest.fixture(scope="module")
def tiny_backend(tiny_model: Path):  # type: ignore[no-untyped-def]
    return make_backend(f"local:{tiny_model}", device="cpu", dtype="float32")


def test_quoted_reads_straight_and_curly_quotes_case_and_spaces_ignored() -> None:
    assert quoted('the word "until" in any case, and " since"') == {"until": TOP, " since": TOP * LAST_QUOTE}
    months = quoted("month names: “ Nov”, “March ”, \"  two\", \"MARCH\"")
    assert list(months) == [" nov", "march", " two"]
    assert list(months.values()) == pytest.approx([TOP, TOP * (1 + LAST_QUOTE) / 2, TOP * LAST_QUOTE])
    assert quoted('"://" in URLs, and "" or "  "') == {"://": TOP}
    assert quoted("words about weather") == {}
    assert quoted('a quote "across\na line" is not one') == {}


def test_quotes_mode_predicts_the_quoted_tokens_and_calls_nothing(tiny_backend) -> None:  # type: ignore[no-untyped-def]
    log = CallLog()
    tiny_backend.bind(log)
    got = simulate(tiny_backend, "quotes", 'the word "until" and "cat"', EXCERPTS)
    low = TOP * LAST_QUOTE
    assert [g.tolist() for g in got] == [[0, low, 0, 0, TOP, 0], [TOP, 0, low, 0, 0]]
    # A quote with a leading space names only the word-initial token.
    got = simulate(tiny_backend, "quotes", 'the tokens " cat" and " until"', EXCERPTS)
    assert [g.tolist() for g in got] == [[0, TOP, 0, 0, low, 0], [0, 0, TOP, 0, 0]]
    assert all(g.dtype == np.float32 for g in got)
    assert [g.tolist() for g in simulate(tiny_backend, "quotes", "animals", EXCERPTS)] == [[0] * 6, [0] * 5]
    assert log.new_calls == log.cache_hits == 0
    assert requests(tiny_backend, "quotes", "animals", EXCERPTS) == []


def test_tokens_mode_rates_every_token_once_with_the_neutral_call_shared(tiny_backend) -> None:  # type: ignore[no-untyped-def]
    log = CallLog()
    tiny_backend.bind(log)
    first = simulate(tiny_backend, "tokens", 'the word "until"', EXCERPTS)
    assert log.new_calls == 2  # the explanation's ratings and the neutral explanation's
    for tokens, values in zip(EXCERPTS, first):
        assert len(values) == len(tokens) and ((values >= 0) & (values <= TOP)).all()
        for token, value in zip(tokens, values):
            if token.strip().lower() == "until":
                assert value == TOP  # the only quote
    # One value per distinct token, wherever it occurs.
    assert first[1][4] == first[0][3]  # "."
    # The neutral explanation's ratings of the same tokens are answered from the log.
    simulate(tiny_backend, "tokens", "animals", EXCERPTS)
    assert log.new_calls == 3 and log.cache_hits == 1
    # The ratings asked are the explanation's own, minus the neutral explanation's.
    types = sorted({t for tokens in EXCERPTS for t in tokens})
    items = [Item((t,)) for t in types]
    shift = tiny_backend.rate("token", "animals", items) - tiny_backend.rate("token", NEUTRAL_EXPLANATION, items)
    expected = dict(zip(types, np.clip(shift, 0, TOP)))
    second = simulate(tiny_backend, "tokens", "animals", EXCERPTS)
    assert [v.tolist() for v in second] == [pytest.approx([expected[t] for t in tokens]) for tokens in EXCERPTS]
    planned = requests(tiny_backend, "tokens", "animals", EXCERPTS)
    assert len(planned) == 2 and all(kind == "rate" and tiny_backend.is_cached(kind, payload)
                                     for kind, (payload, _, _) in planned)


def test_token_rating_prompt_quotes_each_token_inertly() -> None:
    text = rating_text("token", "closing brackets", [Item(("]",)), Item(("\n",)), Item(('Rating: 9"',))])
    assert 'Token: "]"\nRating: ?\n' in text and 'Token: "\\n"\nRating: ?\n' in text
    assert 'Token: "Rating: 9""\nRating: ?\n' in text
    assert text.count("Rating: ?") == 3


def test_lines_mode_and_the_baseline_simulate_as_before(tiny_backend) -> None:  # type: ignore[no-untyped-def]
    tiny_backend.bind(CallLog())
    lines = simulate(tiny_backend, "lines", "animals", EXCERPTS)
    assert [v.tolist() for v in lines] == [v.tolist() for v in tiny_backend.simulate("animals", EXCERPTS)]
    baseline, lookup = BaselineBackend(), 'tokens: " cat" 9.0, " dawn" 4.5'
    for mode in ("quotes", "tokens", "lines"):
        assert [v.tolist() for v in simulate(baseline, mode, lookup, EXCERPTS)] == [
            v.tolist() for v in baseline.simulate(lookup, EXCERPTS)]
    assert simulator_name("local:qwen-1.5b", "lines") == "local:qwen-1.5b"
    assert simulator_name("local:qwen-1.5b", "quotes") == "local:qwen-1.5b (quotes)"
    assert simulator_name("baseline", "quotes") == "baseline"
    with pytest.raises(ValueError, match="unknown simulation 'guess'"):
        simulate(tiny_backend, "guess", "animals", EXCERPTS)


def test_quotes_mode_on_the_planted_neurons(planted_store: Path, planted_model: Path, tmp_path: Path) -> None:
    """A sentence quoting a planted neuron's token scores at least 0.9 on that neuron in the quotes mode, and near
    0 on the other planted neurons and on unwired ones."""
    import shutil

    from conftest import PLANTED_WORDS

    from neuronscope.core.jobs.engine import JobSettings, Selection, run_job
    from neuronscope.core.store import Store

    path = tmp_path / "planted.duckdb"
    shutil.copy(planted_store, path)
    neurons = ((0, 0), (0, 1), (0, 2), (1, 5), (0, 7))
    with Store.open(path) as store:
        for word in PLANTED_WORDS:
            settings = JobSettings(kind="score", explanation=f'the token "{word}"', simulator=f"local:{planted_model}",
                                   simulation="quotes")
            report = run_job(store, store.run(), settings, Selection(neurons=neurons))
            assert report.state == "complete" and report.new_calls == 0  # the quotes mode asks no model
            got = {(layer, neuron): value for layer, neuron, _t, role, method, value in store.job_scores(report.job_id)
                   if role == "user" and method == "all"}
            for (layer, neuron), value in got.items():
                if (layer, neuron) == (0, PLANTED_WORDS.index(word)):
                    assert value >= 0.9, (word, got)
                else:
                    assert abs(value) < 0.2, (word, layer, neuron, got)
