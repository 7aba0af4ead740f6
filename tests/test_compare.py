"""`neuronscope compare` (issue 18): two sets of explanations on a hand-made store with known headline scores: the
paired difference, its bootstrap interval (against scipy's), wins, losses and ties, the neurons that changed most,
the export, and how sets are chosen (explainer, simulator, job, role; newest selected; neurons only one set has)."""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import assert_one_line_error, copy_store, run_cli
from scipy import stats

from neuronscope.core.explanation.compare import MIN_PAIRS, Comparison, compare_scores, paired_interval
from neuronscope.core.ids import NeuronId
from neuronscope.core.store import Store

pytestmark = pytest.mark.usefixtures("neuronscope_env")
#: Set A's scores on neurons L0/N0..11, and B − A on each (three ties within 0.01, five wins, four losses).
A = np.round(np.linspace(-0.2, 0.9, 12), 3)
DELTAS = np.array([0.30, -0.10, 0.0, 0.005, 0.25, -0.40, 0.12, -0.008, 0.05, -0.02, 0.6, -0.15])


def _explain(store: Store, run_id: int, job: int, neuron: int, text: str, explainer: str, value: float, *,
             simulator: str = "sim", role: str = "candidate", selected: bool = True) -> None:
    """One explanation with its test-split headline score, as a job would have stored it."""
    (ident,) = store.con.execute(
        "INSERT INTO explanations (run_id, layer, neuron, tail, role, explainer, sample, selected, text, job_id) "
        "VALUES (?, 0, ?, 'pos', ?, ?, 0, ?, ?, ?) RETURNING explanation_id",
        [run_id, neuron, role, explainer, selected, text, job]).fetchone()
    store.con.execute("INSERT INTO scores (explanation_id, simulator, split, method, value, ci_low, ci_high, n, flags) "
                      "VALUES (?, ?, 'test', 'all', ?, ?, ?, 10, '')", [ident, simulator, value, value - 0.1,
                                                                         value + 0.1])


@pytest.fixture
def compared(cli_store, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    path = copy_store(cli_store[0], tmp_path, "compare.duckdb")
    with Store.open(path) as store:
        run_id = store.run().run_id
        for i, (a, d) in enumerate(zip(A, DELTAS)):
            _explain(store, run_id, 1, i, f"alpha says {i}", "alpha", 0.0)  # older: a newer job replaces it
            _explain(store, run_id, 3, i, f"alpha again {i}", "alpha", float(a))
            _explain(store, run_id, 2, i, f"beta says {i}", "beta", float(a + d))
            _explain(store, run_id, 2, i, f"beta unchosen {i}", "beta", 0.99, selected=False)  # not the selected one
            _explain(store, run_id, 2, i, f"beta says {i}", "beta", -0.9, simulator="other")  # another simulator
        _explain(store, run_id, 3, 20, "alpha alone", "alpha", 0.5)  # only A
        _explain(store, run_id, 4, 0, "mine", "user:ada", 0.7, role="user")
        _explain(store, run_id, 5, 30, "gamma alone", "gamma", 0.1)
        _explain(store, run_id, 3, 1, "tokens: x", "baseline", -0.3, role="baseline", selected=False)
    return path


def test_compare_gives_the_paired_difference_with_scipys_interval(compared: Path, tmp_path: Path) -> None:
    out = tmp_path / "changed.csv"
    result = run_cli(["compare", "explainer=alpha", "explainer=beta,simulator=sim", "--top", "3", "--out", str(out),
                      "--store", str(compared)])
    assert result.code == 0, result.err
    text = " ".join(result.out.split())
    low, high = stats.bootstrap((DELTAS,), np.mean, n_resamples=10_000, method="percentile",
                                random_state=np.random.default_rng(0)).confidence_interval
    mean = DELTAS.mean()
    assert f"B − A: {mean:+.3f} [" in text
    printed = text.split("B − A: ")[1].split("]")[0].split("[")[1].split(", ")
    assert float(printed[0]) == pytest.approx(low, abs=0.01) and float(printed[1]) == pytest.approx(high, abs=0.01)
    assert "over 12 paired neurons" in text and "B wins 5, loses 4, ties 3 (|difference| ≤ 0.01)" in text
    assert "1 neurons only A scored, 0 only B" in text
    assert f"A = explainer=alpha: mean {A.mean():+.3f}" in text
    # The three that changed most, largest first, with both explanations (the newest selected of each set).
    changed = result.out.split("Changed most")[1]
    assert changed.index("L0/N10") < changed.index("L0/N5") < changed.index("L0/N0")
    assert "alpha again 10" in changed and "beta says 10" in changed and "alpha says" not in changed
    assert "L0/N4" not in changed and "unchosen" not in result.out

    rows = out.read_text().splitlines()
    assert rows[0].replace('"', "") == "layer,neuron,score_a,score_b,difference,explanation_a,explanation_b"
    assert len(rows) == 13 and rows[1].startswith("0,10,")
    differences = [float(r.split(",")[4]) for r in rows[1:]]
    assert differences == sorted(differences, key=lambda d: -abs(d))
    assert sorted(differences) == pytest.approx(sorted(DELTAS))


def test_the_other_simulator_roles_and_exports(compared: Path, tmp_path: Path) -> None:
    # Another simulator's scores of the same explanations: every difference is -0.9 - A.
    other = run_cli(["compare", "explainer=beta,simulator=sim", "explainer=beta,simulator=other", "--top", "0",
                     "--store", str(compared)])
    assert other.code == 0, other.err
    assert f"B − A: {(-0.9 - (A + DELTAS)).mean():+.3f}" in other.out and "Changed most" not in other.out
    # A person's explanation against the models', by role; Parquet and JSONL exports.
    parquet, jsonl = tmp_path / "roles.parquet", tmp_path / "roles.jsonl"
    assert run_cli(["compare", "role=candidate", "role=user", "--out", str(parquet), "--store", str(compared)]).code == 0
    (row,) = pq.read_table(parquet).to_pylist()
    assert (row["layer"], row["neuron"], row["explanation_b"], row["score_b"]) == (0, 0, "mine", 0.7)
    assert row["score_a"] == pytest.approx(A[0])  # the newest job's selected candidate (alpha's, job 3)
    assert run_cli(["compare", "job=3", "job=2,simulator=sim", "--out", str(jsonl), "--store", str(compared)]).code == 0
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(lines) == 12 and lines[0]["neuron"] == 10 and lines[0]["explanation_a"] == "alpha again 10"
    # A control (never selected) against the explanations it controls.
    control = run_cli(["compare", "role=baseline", "job=3", "--store", str(compared)])
    assert control.code == 0 and f"B − A: {A[1] + 0.3:+.3f}" in control.out, control.out + control.err


def test_bad_comparisons_are_one_line(compared: Path, tmp_path: Path) -> None:
    store = str(compared)
    assert_one_line_error(run_cli(["compare", "alpha", "explainer=beta", "--store", store]),
                          "cannot read 'alpha'", "explainer=baseline")
    assert_one_line_error(run_cli(["compare", "job=x", "explainer=beta", "--store", store]), "whole number")
    assert_one_line_error(run_cli(["compare", "explainer=nobody", "explainer=beta", "--store", store]),
                          "'explainer=nobody' matches no scored pos explanation", "simulators: 'other', 'sim')")
    assert_one_line_error(run_cli(["compare", "explainer=alpha", "explainer=beta", "--out", str(tmp_path / "x.txt"),
                                   "--store", store]), "end --out with .csv, .parquet, .jsonl")
    assert_one_line_error(run_cli(["compare", "role=user", "explainer=gamma", "--store", store]),
                          "no neuron has a scored explanation in both sets")


def test_the_interval_is_scipys_percentile_bootstrap() -> None:
    rng = np.random.default_rng(7)
    deltas = rng.normal(0.05, 0.2, 400)
    low, high = paired_interval(deltas, seed=1)
    reference = stats.bootstrap((deltas,), np.mean, n_resamples=10_000, method="percentile",
                                random_state=np.random.default_rng(2)).confidence_interval
    width = reference.high - reference.low
    assert low == pytest.approx(reference.low, abs=0.03 * width) and high == pytest.approx(reference.high, abs=0.03 * width)
    # Pairing: neurons only one side has are counted apart; ties are within the margin on both sides.
    result = compare_scores({NeuronId(0, 0): 0.1, NeuronId(0, 1): 0.5, NeuronId(1, 0): 0.2},
                            {NeuronId(0, 0): 0.1 + 0.01, NeuronId(0, 1): 0.3, NeuronId(2, 0): 0.9})
    assert result.neurons == (NeuronId(0, 0), NeuronId(0, 1)) and (result.only_a, result.only_b) == (1, 1)
    assert (result.wins, result.losses, result.ties) == (0, 1, 1)
    assert result.difference == pytest.approx((0.01 - 0.2) / 2)


# -- scale, few pairs, controls (testers' reports on a 307,200-neuron store) ----------------------------

def _best_time(action, repeats: int = 5) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - start)
    return best


def test_the_changed_order_is_n_log_n_and_breaks_ties_by_neuron() -> None:
    """The CLI sorted its indices by a key that rebuilt B − A over every neuron for each index: quadratic (17.9 s at
    200,000 pairs). The order comes from one argsort of the differences."""
    small = compare_scores({NeuronId(0, i): 0.0 for i in range(6)},
                           {NeuronId(0, i): d for i, d in enumerate([0.1, -0.3, 0.3, 0.0, -0.1, 0.2])}, resamples=10)
    assert small.by_change().tolist() == [1, 2, 5, 0, 4, 3]  # |0.3| twice: the lower neuron first
    rng = np.random.default_rng(0)

    def ordering(n: int) -> Comparison:
        neurons = [NeuronId(i // 6400, i % 6400) for i in range(n)]
        return compare_scores(dict(zip(neurons, rng.normal(size=n).tolist())),
                              dict(zip(neurons, rng.normal(size=n).tolist())), resamples=1)

    few, many = ordering(20_000), ordering(160_000)
    ratio = _best_time(many.by_change) / _best_time(few.by_change)
    assert ratio < 30, ratio  # 8x the pairs: about 9x the time for n log n, 64x for the old sort


def test_the_bootstrap_holds_a_bounded_chunk_of_draws() -> None:
    """The bootstrap drew up to 20 million neuron indices at once (int64, then their float64 differences: about
    320 MB whatever the count); it now holds _CHUNK draws per thread (at most _WORKERS threads), and its time grows
    with resamples × neurons."""
    deltas = np.random.default_rng(3).normal(0.02, 0.2, 300_000)
    tracemalloc.start()
    try:
        paired_interval(deltas, resamples=200)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 48 * 2**20, peak  # at most 8 x 125,000 draws (an index and a difference each): 16 MB; was 320 MB
    low, high = paired_interval(deltas[:1000], seed=4)
    assert (low, high) == paired_interval(deltas[:1000], seed=4) != paired_interval(deltas[:1000], seed=5)
    assert low < deltas[:1000].mean() < high
    quarter = _best_time(lambda: paired_interval(deltas[:75_000], resamples=100), 7)
    whole = _best_time(lambda: paired_interval(deltas, resamples=100), 5)
    # Linear in the neurons: about 4 (quadratic would be 16). A CI worker beside another measured 9.3 once.
    assert whole / quarter < 12, whole / quarter


def test_few_pairs_say_the_interval_means_nothing(compared: Path) -> None:
    """One paired neuron printed an interval of [x, x] as if it were one."""
    result = run_cli(["compare", "role=candidate", "role=user", "--store", str(compared)])
    assert result.code == 0, result.err
    text = " ".join(result.out.split())
    assert "over 1 paired neuron," in text
    assert f"the interval is not meaningful with 1 paired neuron: a bootstrap needs at least {MIN_PAIRS}" in text
    many = run_cli(["compare", "explainer=alpha", "explainer=beta,simulator=sim", "--store", str(compared)])
    assert many.code == 0 and "not meaningful" not in many.out


def test_a_set_that_matches_nothing_lists_only_what_its_roles_can_name(compared: Path) -> None:
    """`explainer=baseline` matched no candidate, and the error listed 'baseline' among the explainers to choose
    from: the token baseline's explanations are controls, a set of their own (role=baseline)."""
    wrong = run_cli(["compare", "explainer=baseline", "explainer=alpha", "--store", str(compared)])
    line = assert_one_line_error(wrong, "'explainer=baseline' matches no scored pos explanation in run",
                                 "explainers: 'alpha', 'beta', 'gamma', 'user:ada';",
                                 "'baseline' explains only its baseline controls, compared with role=baseline",
                                 "compare role=baseline explainer=alpha")
    assert "'baseline'," not in line and "'baseline';" not in line
    # As it says: the controls by role, against the explanations they control.
    assert run_cli(["compare", "role=baseline", "explainer=alpha", "--store", str(compared)]).code == 0
    # A set of controls lists the controls' names.
    assert_one_line_error(run_cli(["compare", "role=shuffled", "explainer=alpha", "--store", str(compared)]),
                          "'role=shuffled' matches no scored pos explanation", "it has no scored shuffled explanation")
    assert_one_line_error(run_cli(["compare", "role=baseline,explainer=alpha", "explainer=alpha", "--store",
                                   str(compared)]),
                          "its baseline explanations' explainers: 'baseline'; simulators: 'sim')")
