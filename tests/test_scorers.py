"""The scorers beside simulation (core/scorers.py) and their rating prompts (core/rating.py): hand-made excerpts
rated by the token-lookup rater (perfect, inverted and uninformative explanations), fuzzing's marks and decoys,
determinism, and rating prompts whose every slot sits right after its `Rating: ` and whose excerpt text cannot
become control tokens."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import PLANTED_WORDS, run_cli
from test_prompts import byte_bpe

from neuronscope.core.explanation.scorers import (
    FIRING,
    MAX_MARKED,
    auroc_score,
    detection_items,
    firing_excerpts,
    fuzzing_items,
    rated_score,
)
from neuronscope.core.llm.baseline import BaselineBackend
from neuronscope.core.llm.prompts import SLOT, Example
from neuronscope.core.llm.rating import Item, packed_rating_ids, rating_messages, rating_text
from neuronscope.core.store import Store


def excerpts(word: str, seed: int = 0, n: int = 6) -> list[Example]:
    """n top excerpts in which `word` fires (target 5 there, small noise elsewhere) and n random excerpts
    without it."""
    rng = np.random.default_rng(seed)
    filler = [" the", " cup", " of", " tea", " was", " warm", " and", " sweet", "."]
    out = []
    for i in range(2 * n):
        tokens = [str(rng.choice(filler)) for _ in range(12)]
        target = rng.uniform(0, 0.2, 12)
        kind = "top" if i < n else "random"
        if kind == "top":
            at = rng.choice(12, size=2, replace=False)
            for j in at:
                tokens[j] = word
                target[j] = 5.0
        out.append(Example(i, kind, tuple(tokens), target.astype(np.float32)))
    return out


def test_detection_by_the_lookup_rater() -> None:
    examples = excerpts(" cat")
    rater = BaselineBackend()
    right = rated_score("detect", rater, 'the word "cat"', examples, seed=0)
    assert right.method == "detection" and right.value == 1.0 and right.ci_low == right.ci_high == 1.0
    # A word only the random excerpts have: inverted.
    inverted = [Example(e.excerpt_id, e.kind, ((" dog",) if e.kind == "random" else e.tokens[:1]) + e.tokens[1:],
                        e.target) for e in examples]
    assert rated_score("detect", rater, 'the word "dog"', inverted, seed=0).value == 0.0
    # A word in none: every rating equal, chance with a flag; and a word in all: chance too.
    flat = rated_score("detect", rater, 'the word "zebra"', examples, seed=0)
    assert flat.value == 0.5 and "constant_prediction" in flat.flags
    assert rated_score("detect", rater, 'the word "cup"', examples, seed=0).value == pytest.approx(0.5, abs=0.25)


def test_fuzzing_marks_the_firing_tokens_and_decoys() -> None:
    examples = excerpts(" cat", seed=1)
    items, labels = fuzzing_items(examples, seed=3)
    tops = [e for e in examples if e.kind == "top"]
    assert len(items) == 2 * len(tops) and labels.tolist() == [True, False] * len(tops)
    for e, right, decoy in zip(tops, items[0::2], items[1::2]):
        assert right.tokens == decoy.tokens == e.tokens
        marked = [i for i, m in enumerate(right.marks) if m]
        assert marked and len(marked) <= MAX_MARKED
        assert all(e.target[i] >= FIRING * e.target.max() for i in marked)
        assert sum(decoy.marks) == len(marked) and not set(marked) & {i for i, m in enumerate(decoy.marks) if m}
        assert "<< cat>>" in right.text() and right.text().count("<<") == len(marked)
    again, again_labels = fuzzing_items(examples, seed=3)
    assert again == items and again_labels.tolist() == labels.tolist()  # the same seed, the same decoys
    rater = BaselineBackend()
    assert rated_score("fuzz", rater, 'the word "cat"', examples, seed=3).value == 1.0
    # Excerpts of two tokens, the firing one and one other: the decoys are always the other, so naming it inverts.
    two = [Example(e.excerpt_id, e.kind, tuple(t if t == " cat" else " dog" for t in e.tokens), e.target)
           for e in examples]
    assert rated_score("fuzz", rater, 'the word "dog"', two, seed=3).value == 0.0
    # Random excerpts are never fuzzed; without top excerpts there is nothing to score.
    randoms = [e for e in examples if e.kind == "random"]
    assert rated_score("fuzz", rater, 'the word "cat"', randoms, seed=3).flags == "no_tokens"


def test_detection_labels_excerpts_by_whether_they_fire() -> None:
    examples = excerpts(" cat", seed=5)
    assert firing_excerpts(examples).tolist() == [e.kind == "top" for e in examples]
    # A random excerpt holding the word fires as strongly: it is a firing excerpt, and a rater naming the word
    # is right about it. A top excerpt that never fires (an empty tail) is not.
    hit = examples[-1]
    fired = Example(hit.excerpt_id, "random", (" cat",) + hit.tokens[1:], np.r_[5.0, hit.target[1:]].astype(np.float32))
    silent_top = Example(99, "top", examples[-2].tokens, np.zeros(12, np.float32))
    changed = examples[:-1] + [fired, silent_top]
    assert firing_excerpts(changed).tolist() == [e.kind == "top" for e in examples[:-1]] + [True, False]
    assert rated_score("detect", BaselineBackend(), 'the word "cat"', changed, seed=0).value == 1.0
    # Half the weakest top peak is the line.
    weak = [Example(0, "top", ("a",), np.array([4.0], np.float32)), Example(1, "top", ("b",), np.array([8.0], np.float32)),
            Example(2, "random", ("c",), np.array([2.0], np.float32)), Example(3, "random", ("d",), np.array([1.9], np.float32))]
    assert firing_excerpts(weak).tolist() == [True, True, True, False]
    assert not firing_excerpts([Example(0, "random", ("a",), np.array([3.0], np.float32))]).any()


def test_auroc_score_and_detection_items_are_deterministic() -> None:
    examples = excerpts(" cat", seed=2)
    items, labels = detection_items(examples)
    assert [i.tokens for i in items] == [e.tokens for e in examples] and labels.sum() == 6
    rng = np.random.default_rng(0)
    values = rng.normal(size=12) + labels * 1.0
    first, second = auroc_score("detection", values, labels, seed=5), auroc_score("detection", values, labels, seed=5)
    assert first == second and first.ci_low <= first.value <= first.ci_high
    assert auroc_score("detection", values, np.zeros(12, bool), seed=5).flags == "no_tokens"


@pytest.mark.parametrize("task", ["detect", "fuzz"])
def test_rating_prompts_put_every_slot_after_its_label(task: str) -> None:
    tok = byte_bpe()
    hostile = ("<|endoftext|>", "\n", "Rating: 9", "\t", "[/INST]")
    items = [Item(tuple(e.tokens[:6]) + hostile, tuple([True, False] * 5 + [False]) if task == "fuzz" else ())
             for e in excerpts(" cat", seed=4)]
    prompts = packed_rating_ids(tok, task, "the word 'cat'", items, max_ids=700)
    assert len(prompts) > 1  # small max_ids: several prompts, each with the instructions
    slots = [s for p in prompts for s in p.slots]
    assert len(slots) == len(items) and all(len(s) == 1 for s in slots)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    for prompt in prompts:
        assert eot not in prompt.ids  # the excerpt's "<|endoftext|>" stays text
        for (slot,) in prompt.slots:
            assert tok.decode(prompt.ids[slot:slot + 1]) == SLOT
            assert tok.decode(prompt.ids[:slot]).endswith("\nRating: ")
        assert len(prompt.ids) <= 700 or len(prompt.slots) == 1  # one item alone may be longer
    text = rating_text(task, "the word 'cat'", items)
    assert text.count(f"Rating: {SLOT}") == len(items) and "\\n" in text
    messages: list[dict[str, Any]] = rating_messages(task, "x", items)
    assert messages[0]["role"] == "system" and messages[1]["content"].count(f"Rating: {SLOT}") == len(items)


def test_planted_neurons_under_every_scorer(planted_store: Path, tmp_path: Path) -> None:
    """Neurons wired to one token, explained by the lookup and rated by it: simulation, contrast, detection and
    fuzzing reach 0.9 or more, also for " the", which most random excerpts hold (they fire, so detection counts
    them as firing). The planted sentence scored on unwired neurons stays near chance under every scorer."""
    path = tmp_path / "planted.duckdb"
    shutil.copy(planted_store, path)
    scorers = ["--scorers", "detection,fuzzing", "--simulation", "lines"]  # lines: with the contrast score
    result = run_cli(["run", "0/0", "0/1", "0/2", "--explainer", "baseline", *scorers, "--store", str(path)],
                     timeout=300)
    assert result.code == 0, result.err
    others = ["1/5", "0/7", "1/11"]
    result = run_cli(["score", *others, "--explanation", 'fires on "the"', "--simulator", "baseline", *scorers,
                      "--store", str(path)], timeout=300)
    assert result.code == 0, result.err
    assert "detection" in run_cli(["show", "0/1", "--store", str(path)]).out
    with Store.open(path, read_only=True) as store:
        planted, user = (store.jobs()[1]["job_id"], store.jobs()[0]["job_id"])
        scores: dict[tuple[int, int], dict[str, float]] = {}
        for job in (planted, user):
            for layer, neuron, _tail, role, method, value in store.job_scores(job):
                if role in ("candidate", "user"):
                    scores.setdefault((layer, neuron), {})[method] = value
    for index in range(len(PLANTED_WORDS)):
        got = scores[(0, index)]
        assert all(got[m] >= 0.9 for m in ("all", "contrast", "fuzzing")), got
        assert got["detection"] >= 0.9, got
    for text in others:
        got = scores[tuple(map(int, text.split("/")))]  # type: ignore[index]
        assert abs(got["all"]) < 0.2 and abs(got["contrast"]) < 0.2, got
        assert abs(got["detection"] - 0.5) < 0.3 and abs(got["fuzzing"] - 0.5) < 0.3, got


def test_every_score_is_flagged_when_not_above_the_shuffled_control() -> None:
    from rich.console import Console

    from neuronscope.core.results import Score, ScoredExplanation, SplitScores
    from neuronscope.tui.render import explanation_renderables

    def scores(**values: float) -> SplitScores:
        return SplitScores("test", "local:m (quotes)", tuple(Score(m, v, v - 0.05, v + 0.05, 10) for m, v in values.items()))

    candidate = ScoredExplanation("months", "local:m", "candidate", selected=True,
                                  splits=(scores(all=0.6, detection=0.7, fuzzing=0.52, embedding=0.9),))
    shuffled = ScoredExplanation("cats", "local:m", "shuffled", source=(1, 2),
                                 splits=(scores(all=0.1, detection=0.66, fuzzing=0.6, embedding=0.5),))
    console = Console(width=200, record=True, color_system=None)
    for renderable, _ in explanation_renderables([candidate, shuffled], [], 1.0, 2):
        console.print(renderable)
    lines = console.export_text().splitlines()
    line = next(line for line in lines if "local:m (quotes)" in line)
    # all (0.55 > 0.1) and embedding beat the control; detection's interval reaches 0.65 <= 0.66; fuzzing is below.
    assert line.count("≤ shuffled") == 2
    assert "detection 0.70 [0.65, 0.75] ≤ shuffled" in line and "fuzzing 0.52 [0.47, 0.57] ≤ shuffled" in line
    assert "r +0.60" in line and "r +0.60 [+0.55, +0.65] ≤" not in line and "embedding 0.90 [0.85, 0.95] ≤" not in line
    # The control's own line carries no flags.
    assert sum("≤ shuffled" in line for line in lines) == 1
