"""Scores (core/score.py) against numpy/scipy computed by hand, and the token-lookup baseline
(core/llm/baseline.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from neuronscope.core.explanation.score import BOOTSTRAP, METHODS, contrast, score
from neuronscope.core.llm.baseline import (
    MAX_TOKENS,
    MIN_MEAN,
    BaselineBackend,
    lookup_explanation,
    lookup_predict,
    lookup_weights,
)
from neuronscope.core.llm.prompts import Example, explain_prompt
from neuronscope.core.records import TOP

RESAMPLES = 300  # enough for the interval checks, a few ms per call


def make_data(n_top: int = 12, n_random: int = 12, seed: int = 0, noise: float = 1.0,
              signal: float = 2.0) -> tuple[list[str], list[np.ndarray], list[np.ndarray], float]:
    """Excerpts of 8-24 tokens: sparse non-negative targets (bigger in top excerpts) and predictions
    signal * target + noise on the 0-9 scale."""
    rng = np.random.default_rng(seed)
    kinds, targets, predictions = [], [], []
    for i in range(n_top + n_random):
        kind = "top" if i < n_top else "random"
        length = int(rng.integers(8, 25))
        target = np.maximum(rng.normal(0.0, 1.0, length), 0) * (3.0 if kind == "top" else 1.0)
        target = target.astype(np.float32)
        prediction = np.clip(signal * target + rng.normal(0.0, noise, length), 0, TOP).astype(np.float32)
        kinds.append(kind)
        targets.append(target)
        predictions.append(prediction)
    scale_max = float(max(t.max() for t, k in zip(targets, kinds) if k == "top"))
    return kinds, targets, predictions, scale_max


def pooled(kinds: list[str], values: list[np.ndarray], kind: str | None = None) -> np.ndarray:
    return np.concatenate([np.asarray(v, np.float64) for k, v in zip(kinds, values) if kind in (None, k)])


def run(kinds, targets, predictions, scale_max, **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("resamples", RESAMPLES)
    return score(kinds, targets, predictions, scale_max=scale_max, **kw)


def assert_finite(result) -> None:  # type: ignore[no-untyped-def]
    for s in result.values():
        assert all(math.isfinite(x) for x in (s.value, s.ci_low, s.ci_high)), s


# -- values against scipy / by hand --------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correlations_equal_pearsonr(seed: int) -> None:
    kinds, targets, predictions, scale_max = make_data(seed=seed)
    result = run(kinds, targets, predictions, scale_max)
    assert set(result) == set(METHODS)
    for method, kind in (("all", None), ("top", "top"), ("random", "random")):
        a, p = pooled(kinds, targets, kind), pooled(kinds, predictions, kind)
        expected = stats.pearsonr(a, p).statistic
        assert result[method].value == pytest.approx(expected, abs=1e-9), method
        assert result[method].n == len(a)
        assert result[method].method == method and result[method].flags == ""


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_r2_is_the_documented_formula(seed: int) -> None:
    kinds, targets, predictions, scale_max = make_data(seed=seed, signal=1.0)
    a = pooled(kinds, targets) * TOP / scale_max
    p = pooled(kinds, predictions)
    a_c, p_c = a - a.mean(), p - p.mean()
    expected = 1.0 - np.sum((a_c - p_c) ** 2) / np.sum(a_c**2)
    result = run(kinds, targets, predictions, scale_max)["r2"]
    assert result.value == pytest.approx(expected, abs=1e-6)  # the targets are scaled in float32
    assert result.n == len(a)


def test_r2_rewards_the_size_of_peaks_and_ignores_an_offset() -> None:
    kinds, targets, _, scale_max = make_data()
    exact = [t * TOP / scale_max + 2.0 for t in targets]
    assert run(kinds, targets, exact, scale_max)["r2"].value == pytest.approx(1.0, abs=1e-6)
    half = [t * TOP / scale_max / 2 for t in targets]  # right shape, half the size: r² = 1 - (1/2)² = 0.75
    assert run(kinds, targets, half, scale_max)["r2"].value == pytest.approx(0.75, abs=1e-6)
    assert run(kinds, targets, half, scale_max)["all"].value == pytest.approx(1.0, abs=1e-9)
    double = [t * TOP / scale_max * 3 for t in targets]  # three times too big: 1 - 2² = -3
    assert run(kinds, targets, double, scale_max)["r2"].value == pytest.approx(-3.0, abs=1e-6)


def test_perfect_explanation_scores_one_with_a_tight_interval() -> None:
    kinds, targets, _, scale_max = make_data()
    predictions = [t * 2.5 + 0.5 for t in targets]
    result = run(kinds, targets, predictions, scale_max)
    for method in ("all", "top", "random"):
        s = result[method]
        assert s.value == pytest.approx(1.0, abs=1e-9)
        assert s.ci_low >= 1 - 1e-9 and s.ci_high <= 1.0
        assert s.flags == ""


def test_inverted_explanation_scores_minus_one() -> None:
    kinds, targets, _, scale_max = make_data()
    predictions = [TOP - t * 2.0 for t in targets]
    result = run(kinds, targets, predictions, scale_max)
    for method in ("all", "top", "random"):
        s = result[method]
        assert s.value == pytest.approx(-1.0, abs=1e-9)
        assert s.ci_low == pytest.approx(-1.0, abs=1e-9) and s.ci_high == pytest.approx(-1.0, abs=1e-9)


def test_random_predictions_score_near_zero_with_zero_in_the_interval() -> None:
    kinds, targets, _, scale_max = make_data(n_top=40, n_random=40)
    rng = np.random.default_rng(7)
    predictions = [rng.uniform(0, TOP, len(t)) for t in targets]
    result = run(kinds, targets, predictions, scale_max)
    for method in ("all", "top", "random"):
        s = result[method]
        assert abs(s.value) < 0.1, s
        assert s.ci_low < 0 < s.ci_high, s


# -- degenerate inputs: 0 with a flag, never NaN or an exception --------------------------------------------

@pytest.mark.parametrize("constant", [0.0, 3.0, 9.0])
def test_constant_prediction_scores_zero_with_a_flag(constant: float) -> None:
    kinds, targets, _, scale_max = make_data()
    predictions = [np.full(len(t), constant, np.float32) for t in targets]
    with np.errstate(all="raise"):
        result = run(kinds, targets, predictions, scale_max)
    assert_finite(result)
    for method in ("all", "top", "random"):
        s = result[method]
        assert (s.value, s.ci_low, s.ci_high) == (0.0, 0.0, 0.0)
        assert "constant_prediction" in s.flags.split(",") and "constant_target" not in s.flags
    # r²: a flat prediction explains nothing of the (centred) target.
    assert result["r2"].value == pytest.approx(0.0, abs=1e-9)


def test_constant_prediction_within_one_kind_only() -> None:
    """Flat on the top excerpts only: 'top' is flagged, 'all' and 'random' are real correlations."""
    kinds, targets, predictions, scale_max = make_data()
    predictions = [np.zeros_like(p) if k == "top" else p for k, p in zip(kinds, predictions)]
    result = run(kinds, targets, predictions, scale_max)
    assert result["top"].value == 0.0 and result["top"].flags == "constant_prediction"
    assert result["random"].flags == "" and result["random"].value > 0.3
    expected = stats.pearsonr(pooled(kinds, targets), pooled(kinds, predictions)).statistic
    assert result["all"].value == pytest.approx(expected, abs=1e-9) and result["all"].flags == ""


@pytest.mark.parametrize("constant", [0.0, 1.5])
def test_constant_target_scores_zero_with_a_flag(constant: float) -> None:
    kinds, _, predictions, _ = make_data()
    targets = [np.full(len(p), constant, np.float32) for p in predictions]
    with np.errstate(all="raise"):
        result = run(kinds, targets, predictions, scale_max=constant)
    assert_finite(result)
    for method in METHODS:
        s = result[method]
        assert (s.value, s.ci_low, s.ci_high) == (0.0, 0.0, 0.0), method
        assert "constant_target" in s.flags.split(","), method


def test_both_constant() -> None:
    kinds = ["top", "random"]
    zeros = [np.zeros(5, np.float32), np.zeros(3, np.float32)]
    result = run(kinds, zeros, zeros, 0.0)
    assert_finite(result)
    assert result["all"].value == 0.0
    assert set(result["all"].flags.split(",")) == {"constant_prediction", "constant_target"}
    assert result["r2"].flags == "constant_target"


def test_empty_selections_say_no_tokens() -> None:
    kinds, targets, predictions, scale_max = make_data(n_random=0)
    result = run(kinds, targets, predictions, scale_max)
    assert result["random"] == type(result["random"])("random", 0.0, 0.0, 0.0, 0, "no_tokens")
    assert result["top"].flags == "" and result["top"].n > 0
    for method, s in run([], [], [], 1.0).items():
        assert (s.value, s.ci_low, s.ci_high, s.n, s.flags) == (0.0, 0.0, 0.0, 0, "no_tokens"), method
    empty = [np.zeros(0, np.float32)] * 2
    for s in run(["top", "random"], empty, empty, 1.0).values():
        assert s.flags == "no_tokens" and s.n == 0


def test_single_token_scores_zero_not_nan() -> None:
    result = run(["top"], [np.array([2.0], np.float32)], [np.array([5.0], np.float32)], 2.0)
    assert_finite(result)
    assert result["all"].value == 0.0 and result["all"].n == 1 and result["all"].flags


def test_correlation_does_not_depend_on_the_target_scale() -> None:
    kinds, targets, predictions, scale_max = make_data()
    tiny = [t * 1e-6 for t in targets]
    assert run(kinds, tiny, predictions, scale_max * 1e-6)["all"].value == pytest.approx(
        run(kinds, targets, predictions, scale_max)["all"].value, abs=1e-6)


# -- bootstrap intervals -------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_interval_contains_the_value(seed: int) -> None:
    kinds, targets, predictions, scale_max = make_data(seed=seed, noise=2.0)
    for s in run(kinds, targets, predictions, scale_max, seed=seed).values():
        assert s.ci_low <= s.value <= s.ci_high, s
        assert s.ci_low < s.ci_high, s


def test_interval_is_deterministic_for_a_seed() -> None:
    kinds, targets, predictions, scale_max = make_data(noise=2.0)
    a = run(kinds, targets, predictions, scale_max, seed=3)
    b = run(kinds, targets, predictions, scale_max, seed=3)
    c = run(kinds, targets, predictions, scale_max, seed=4)
    assert a == b
    for method in METHODS:
        assert a[method].value == c[method].value
        assert (a[method].ci_low, a[method].ci_high) != (c[method].ci_low, c[method].ci_high), method


def test_default_resamples() -> None:
    kinds, targets, predictions, scale_max = make_data(n_top=4, n_random=4)
    assert BOOTSTRAP >= 1000
    assert score(kinds, targets, predictions, scale_max=scale_max) == score(
        kinds, targets, predictions, scale_max=scale_max, seed=0, resamples=BOOTSTRAP)


def test_interval_narrows_with_more_excerpts() -> None:
    few = make_data(n_top=8, n_random=8, noise=2.0)[:3]
    many = make_data(n_top=200, n_random=200, noise=2.0)[:3]
    small, large = run(*few, 6.0), run(*many, 6.0)  # one scale for both, as the train split fixes it
    for method in METHODS:
        width_few = small[method].ci_high - small[method].ci_low
        width_many = large[method].ci_high - large[method].ci_low
        assert width_many < width_few / 2.5, (method, width_few, width_many)


def test_bootstrap_resamples_whole_excerpts_within_their_kind() -> None:
    """One top and one random excerpt: every resample keeps both, so the interval is the point."""
    kinds, targets, predictions, scale_max = make_data(n_top=1, n_random=1)
    for s in run(kinds, targets, predictions, scale_max).values():
        assert s.ci_low == pytest.approx(s.value, abs=1e-12) and s.ci_high == pytest.approx(s.value, abs=1e-12)


# -- the token-lookup baseline ---------------------------------------------------------------------------------

def test_lookup_explanation_names_top_tokens_by_mean() -> None:
    examples = [
        ((" rain", "the", " rain", " sun"), (9.0, 0.0, 8.0, 2.0)),
        (("the", " sun", "Rain", " snow"), (0.0, 4.0, 0.5, 0.99)),
    ]
    # " rain" 8.5, " sun" 3.0; "Rain" 0.5 and " snow" 0.99 are below MIN_MEAN; "the" 0.
    assert lookup_explanation(examples) == 'tokens: " rain" 8.5, " sun" 3.0'
    assert MIN_MEAN == 1.0
    assert lookup_explanation([(("a", "b"), (0.0, 0.5))]) == "tokens: none stands out"
    assert lookup_explanation([]) == "tokens: none stands out"
    # Whitespace-only tokens are never named; ties are broken by the token.
    assert lookup_explanation([(("\n", " ", "b", "a"), (9.0, 9.0, 5.0, 5.0))]) == 'tokens: "a" 5.0, "b" 5.0'


def test_lookup_explanation_names_at_most_max_tokens() -> None:
    tokens = tuple(f"t{i:02d}" for i in range(20))
    values = tuple(float(TOP) - i * 0.4 for i in range(20))
    text = lookup_explanation([(tokens, values)])
    assert text.count('"') == 2 * MAX_TOKENS
    assert text.startswith('tokens: "t00" 9.0, "t01" 8.6')
    assert '"t07"' in text and '"t08"' not in text


WEIRD = ['"', 'say "hi"', "back\\slash", "\\n", "é", "日本", "😀", " lead", "tab\there", "a\nb", "\x1b[31m",
         "x 5, y", '", "z" 9', "'single'", "“curly”"]


def test_lookup_weights_parse_their_own_explanations() -> None:
    values = tuple(float(TOP) - 0.5 * i for i in range(len(WEIRD)))
    chosen = WEIRD[:MAX_TOKENS]
    text = lookup_explanation([(tuple(chosen), values[:MAX_TOKENS])])
    weights, exact = lookup_weights(text)
    assert exact
    assert weights == {t: pytest.approx(v) for t, v in zip(chosen, values)}
    rest = WEIRD[MAX_TOKENS:]
    weights, exact = lookup_weights(lookup_explanation([(tuple(rest), values[: len(rest)])]))
    assert exact and weights == {t: pytest.approx(v) for t, v in zip(rest, values)}


def test_lookup_weights_are_capped_and_keep_the_largest() -> None:
    weights, exact = lookup_weights('tokens: "a" 12.5, "b" 3.0, "a" 4.0, "c" 0.5')
    assert exact and weights == {"a": TOP, "b": 3.0, "c": 0.5}


def test_lookup_weights_read_quoted_words_in_free_text() -> None:
    weights, exact = lookup_weights('Fires on "Rain", \'storm\' and “ Thunder ” but not on sun.')
    assert not exact
    assert weights == {"rain": TOP, "storm": TOP, "thunder": TOP}
    assert lookup_weights("no quotes at all") == ({}, False)
    assert lookup_weights("tokens: none stands out") == ({}, False)
    assert lookup_weights('a blank " "') == ({}, False)


def test_lookup_weights_ignore_apostrophes() -> None:
    assert lookup_weights("the neuron's favourite word is 'cat'") == ({"cat": TOP}, False)
    assert lookup_weights("contractions like 'don't' and 'can't'")[0].keys() >= {"don't", "can't"}


def test_baseline_simulates_per_token() -> None:
    backend = BaselineBackend()
    excerpts = [[" rain", "rain", " Rain", "snow"], [], ["the", " rain", "😀"]]
    exact = backend.simulate('tokens: " rain" 8.5, "😀" 2.0', excerpts)
    assert [p.tolist() for p in exact] == [[8.5, 0.0, 0.0, 0.0], [], [0.0, 8.5, 2.0]]
    assert all(p.dtype == np.float32 for p in exact)
    loose = backend.simulate('words about "rain"', excerpts)  # free text: case and spaces ignored
    assert [p.tolist() for p in loose] == [[9.0, 9.0, 9.0, 0.0], [], [0.0, 9.0, 0.0]]
    nothing = backend.simulate("tokens: none stands out", excerpts)
    assert [p.tolist() for p in nothing] == [[0.0] * 4, [], [0.0] * 3]
    assert lookup_predict('tokens: " rain" 8.5', [" rain", "x"]).tolist() == [8.5, 0.0]
    assert backend.requests("simulate", "x", excerpts) == []


def _examples() -> list[Example]:
    rng = np.random.default_rng(5)
    out = []
    for i in range(6):
        tokens = tuple(rng.choice(["the", " cat", " sat", " on", " mat", "."], 10))
        target = np.array([3.0 if t == " cat" else 1.0 if t == " mat" else 0.0 for t in tokens], np.float32)
        out.append(Example(i, "top", tokens, target))
    return out


def test_baseline_explains_and_simulates_deterministically() -> None:
    prompt = explain_prompt(_examples(), lambda text: len(text) // 4, 10**6)
    first = BaselineBackend().explain(prompt)
    assert first == [lookup_explanation(prompt.examples)]
    assert first[0] == 'tokens: " cat" 9.0, " mat" 3.0'
    assert BaselineBackend().explain(prompt, n=3, seed=5) == first * 3
    excerpts = [e.tokens for e in _examples()]
    a, b = BaselineBackend().simulate(first[0], excerpts), BaselineBackend().simulate(first[0], excerpts)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    for e, p in zip(_examples(), a):
        assert p.tolist() == pytest.approx((e.target * 3.0).tolist())  # on the 0-9 scale, like the targets
    scores = score([e.kind for e in _examples()], [e.target for e in _examples()], a, scale_max=3.0,
                   resamples=RESAMPLES)
    assert scores["all"].value == pytest.approx(1.0) and scores["r2"].value == pytest.approx(1.0)


def test_baseline_explanation_of_long_tokens_survives_explain() -> None:
    tokens = tuple(c * 64 for c in "=-#*/~+_")  # GPT-2-style separator tokens in code
    prompt = explain_prompt([Example(0, "top", tokens, np.full(8, 5.0, np.float32))], len, 10**6)
    text = BaselineBackend().explain(prompt)[0]
    assert lookup_weights(text)[0] == dict.fromkeys(tokens, float(TOP))


def test_contrast_cancels_what_the_text_alone_predicts() -> None:
    """A simulator whose predictions are mostly its own prior for the text (the same under a neutral
    explanation) plus a little of what the explanation says: `all` is dominated by the prior, `contrast`
    by the explanation's shift; a shift along the target scores 1, against it -1, none 0 with a flag."""
    kinds, targets, _, _ = make_data(seed=3)
    rng = np.random.default_rng(7)
    prior = [rng.uniform(0, 9, len(t)) for t in targets]  # unrelated to the neuron
    helpful = [p + 0.05 * t for p, t in zip(prior, targets)]
    assert abs(score(kinds, targets, helpful, scale_max=1.0, resamples=RESAMPLES)["all"].value) < 0.3
    pooled_target = np.concatenate(targets)
    for shift, expected in ((0.05, 1.0), (-0.05, -1.0)):
        predicted = [p + shift * t for p, t in zip(prior, targets)]
        got = contrast(kinds, targets, predicted, prior, seed=1, resamples=RESAMPLES)
        assert got.method == "contrast" and got.value == pytest.approx(expected, abs=1e-9)
        assert got.ci_low <= got.value <= got.ci_high and got.n == len(pooled_target)
    unchanged = contrast(kinds, targets, prior, prior, resamples=RESAMPLES)
    assert unchanged.value == 0.0 and "constant_prediction" in unchanged.flags
    # Equal to scipy's Pearson r of the pooled differences, and deterministic for a seed.
    noisy = [p + 0.05 * t + rng.normal(0, 0.05, len(t)) for p, t in zip(prior, targets)]
    got = contrast(kinds, targets, noisy, prior, seed=2, resamples=RESAMPLES)
    expected = stats.pearsonr(pooled_target, np.concatenate([n - p for n, p in zip(noisy, prior)]))[0]
    assert got.value == pytest.approx(expected, abs=1e-9)
    assert got == contrast(kinds, targets, noisy, prior, seed=2, resamples=RESAMPLES)
