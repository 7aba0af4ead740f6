"""Revision (`run --revise`): the explainer sees its first explanation and the select excerpts simulated worst,
the better of the two on the select split is kept, and only the test split gives the headline. The explainer is
the scripted OpenAI-compatible fake on loopback; the simulation is the quotes mode, which calls no model."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import collect_into, fast_settings
from fake_openai import CHAT, FakeOpenAI, Reply, chat_answer

from neuronscope.core.jobs.engine import JobSettings, Selection, run_job
from neuronscope.core.llm.prompts import REVISION_MISSES, ExplainPrompt, revision_prompt
from neuronscope.core.store import Store

pytestmark = pytest.mark.usefixtures("neuronscope_env")

FIRST = 'the word "zzzz"'  # a token no excerpt holds: its simulation misses every firing excerpt


class Explainer:
    """Answers a first prompt with FIRST, and a revision prompt with the token it lists first, quoted."""

    def __init__(self) -> None:
        self.revisions: list[str] = []

    def __call__(self, body: Any) -> Reply:
        prompt = body["messages"][-1]["content"]
        if "A first answer was" not in prompt:
            return chat_answer(FIRST)
        self.revisions.append(prompt)
        first = re.match(r'Tokens it fires on most[^:]*: "((?:[^"\\]|\\.)*)"', prompt)
        return chat_answer(f'the token "{first.group(1) if first else "?"}"')


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory, subject, corpus_dir: Path) -> Path:  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("revise") / "revise.duckdb"
    collect_into(path, subject, corpus_dir, settings=fast_settings(top_k=12, random_k=8, bottom_k=4))
    return path


def test_revision_prompt_shows_the_first_answer_and_the_misses() -> None:
    base = ExplainPrompt("system", (), "Tokens it fires on most: ...\n\nWhat does this neuron respond to?", 1)
    fires = np.array([0.0, 3.0, 0.0], np.float32)
    silent = np.zeros(3, np.float32)
    prompt = revision_prompt(base, 'the word "dog"', [(("a", " cat", "."), fires, np.zeros(3)),
                                                      (("x", " y", " z"), silent, np.array([0.0, 0.0, 9.0]))])
    assert prompt.user.startswith("Tokens it fires on most: ...\n\nA first answer was: \"the word \"dog\"\"")
    assert "\n1. a<< cat>>.\n2. x y z (it fires on nothing here)\n" in prompt.user
    assert prompt.user.endswith("What does this neuron respond to? Answer better, in one short phrase.")
    assert prompt.user.count("What does this neuron respond to?") == 1
    assert (prompt.system, prompt.shots, prompt.shown) == ("system", (), 1)


def test_run_revise_keeps_the_better_explanation_by_the_select_split(small_store: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "revise.duckdb"
    shutil.copy(small_store, path)
    monkeypatch.setenv("NEURONSCOPE_OPENAI_MODE", "chat-digits")
    explainer = Explainer()
    with FakeOpenAI() as server:
        server.on(CHAT, explainer)
        spec = f"openai:fake@{server.url}"
        settings = JobSettings(kind="run", explainer=spec, simulator=spec, simulation="quotes", revise=True)
        with Store.open(path) as store:
            report = run_job(store, store.run(), settings, Selection(limit=3))
            assert report.state == "complete" and report.done == 3
            run_id = store.run().run_id
            improved = 0
            for layer, neuron in [(s.layer, s.neuron) for s in store.summaries(run_id)]:
                candidates = [e for e in store.explanations(run_id, layer, neuron) if e.role == "candidate"]
                # results name the explainer without its server
                assert {e.explainer for e in candidates} == {"openai:fake", "openai:fake (revised)"}
                first = next(e for e in candidates if e.explainer == "openai:fake")
                revised = next(e for e in candidates if e.explainer != "openai:fake")
                assert first.text == FIRST
                # Both were scored on the select split; only the one kept there has test scores.
                select = {e.explainer: e.score("select") for e in candidates}
                assert all(s is not None for s in select.values())
                chosen = max(candidates, key=lambda e: (e.score("select").value, e is first))  # type: ignore[union-attr]
                assert [e.selected for e in candidates].count(True) == 1 and chosen.selected
                assert chosen.score("test") is not None
                assert (revised if chosen is first else first).score("test") is None
                improved += chosen is revised
            assert improved >= 1
            calls = report.new_calls
        assert len(explainer.revisions) == 3
        for prompt in explainer.revisions:
            assert f'A first answer was: "{FIRST}"' in prompt
            assert 0 < len(re.findall(r"^\d+\. ", prompt.split("A first answer was")[1], re.M)) <= REVISION_MISSES
        # The same job again: resumed, nothing asked twice.
        hits = len(server.hits(CHAT))
        with Store.open(path) as store:
            again = run_job(store, store.run(), settings, Selection(limit=3))
        assert again.new_calls == 0 and len(server.hits(CHAT)) == hits and calls > 0
