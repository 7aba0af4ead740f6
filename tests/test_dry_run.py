"""Dry runs go through the real per-neuron path: for every simulation mode, scorer set and way of choosing
candidates, the calls `plan()` counts are the calls the same job then makes, against the scripted OpenAI-compatible
fake (tests/fake_openai.py) or the tiny local model; what it counts as answered from the log is what the log then
answers; a dry run writes nothing and calls nothing."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import collect_into, fast_settings, run_cli
from fake_openai import CHAT, FakeOpenAI, Reply, chat_answer, error

from neuronscope.core.choices import SIMULATIONS
from neuronscope.core.explanation.embedding import Embedder
from neuronscope.core.explanation.splits import SplitSizes
from neuronscope.core.jobs.engine import Job, JobReport, JobSettings, Plan, Selection
from neuronscope.core.llm.base import LLMError
from neuronscope.core.llm.recording import Tally
from neuronscope.core.store import Store

pytestmark = pytest.mark.usefixtures("neuronscope_env")

#: Small splits keep every job to a few dozen calls.
SIZES = SplitSizes(train=4, top=2, random=2)
SCORER_SETS: dict[str, tuple[str, ...]] = {
    "none": (), "detection": ("detection",), "fuzzing": ("fuzzing",), "embedding": ("embedding",),
    "all": ("detection", "fuzzing", "embedding"),
}
#: Scorer sets whose every scorer is also in "all": run alone only with the slow tests.
SLOW_SETS = ("detection", "fuzzing", "embedding")
CHOICES: dict[str, dict[str, Any]] = {"samples-1": {}, "samples-2": {"samples": 2}, "revise": {"revise": True}}


class Model:
    """A chat model on the fake server: an explanation per prompt and sample (different for each, the same for the
    same request), a digit on every `token<TAB>?` simulation line and every `Rating: ?` line."""

    def __call__(self, body: Any) -> Reply:
        user = body["messages"][-1]["content"]
        lines = user.splitlines()
        slots = [line[:-1] for line in lines if line.endswith("\t?")]
        if slots:
            return chat_answer("".join(f"{line}{len(line) % 10}\n" for line in slots))
        ratings = [line for line in lines if line == "Rating: ?"]
        if ratings:
            return chat_answer("".join(f"Rating: {i % 10}\n" for i in range(len(ratings))))
        digest = hashlib.sha256(user.encode()).hexdigest()[:8]
        n, seed = int(body.get("n", 1)), int(body.get("seed", 0))
        return chat_answer(*(f"the pattern {digest}, sample {seed + i}" for i in range(n)))


@pytest.fixture(scope="module")
def dry_store(tmp_path_factory: pytest.TempPathFactory, subject, corpus_dir: Path) -> Path:  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("dry") / "dry.duckdb"
    collect_into(path, subject, corpus_dir, settings=fast_settings(top_k=12, random_k=8, bottom_k=4))
    return path


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    """The fake as a chat-only server (the route is named, so no probe is sent)."""
    monkeypatch.setenv("NEURONSCOPE_OPENAI_MODE", "chat-digits")
    monkeypatch.delenv("NEURONSCOPE_CONCURRENCY", raising=False)
    with FakeOpenAI() as fake:
        fake.on(CHAT, Model())
        yield fake


class StubEmbedder(Embedder):
    """The embedding scorer's model, stood in for by a vector per text from its hash: the scorer calls no LLM, and
    the packaged MiniLM (tests/test_embedding.py) takes most of a second a call on a small CPU."""

    def __init__(self) -> None:
        super().__init__(None, None, device="cpu", max_length=256)

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        rows = [np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)).normal(size=self.dim)
                for t in texts]
        out = np.array(rows, np.float32).reshape(len(texts), self.dim)
        return out / np.linalg.norm(out, axis=1, keepdims=True).clip(1e-9)


@pytest.fixture(autouse=True)
def _stub_embedder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Embedder, "load", classmethod(lambda cls, device=None: StubEmbedder()))


def _copy(dry_store: Path, tmp_path: Path, name: str = "job.duckdb") -> Path:
    path = tmp_path / name
    shutil.copy(dry_store, path)
    return path


class TerseModel(Model):
    """Model, but a greedy explanation is one letter (no usable line), so Backend.explain asks again as samples; while
    `refuse_samples` is set, it answers those with an error."""

    def __init__(self) -> None:
        self.refuse_samples = False

    def __call__(self, body: Any) -> Reply:
        user = body["messages"][-1]["content"]
        if "Rating: ?" in user or any(line.endswith("\t?") for line in user.splitlines()):
            return super().__call__(body)
        if body.get("temperature") == 0:
            return chat_answer("u")
        return error(400, "scripted refusal") if self.refuse_samples else super().__call__(body)


def test_a_retried_explanation_is_planned_not_sent(dry_store: Path, tmp_path: Path, server: FakeOpenAI) -> None:
    """A job whose explainer answered each neuron's greedy request unusably, then failed the retry as samples: the
    log holds the greedy answers alone. The rerun's dry run takes them from the log, counts the retries as calls to
    make and sends nothing; the run then makes exactly those calls."""
    model = TerseModel()
    model.refuse_samples = True
    server.on(CHAT, model)
    spec = f"openai:fake@{server.url}"
    settings = JobSettings(kind="run", explainer=spec, simulator=spec, simulation="tokens", sizes=SIZES)
    with Store.open(_copy(dry_store, tmp_path)) as store:
        job = Job(store, store.run(), settings, Selection(limit=2))
        try:
            failed = job.run()
        finally:
            job.close()
        assert (failed.done, len(failed.failed), failed.new_calls) == (0, 2, 2)  # the greedy requests, logged
        model.refuse_samples = False
        plan, report = plan_then_run(store, settings, server=server)  # checks that the plan sends nothing
        assert plan.neurons == 2 and report.done == 2 and plan.cached >= 2  # the greedy answers among them
        assert (plan.calls, plan.cached) == (report.new_calls, report.cache_hits)
        assert all(s.text.startswith("the pattern") for s in store.summaries(store.run().run_id))


def _rows(store: Store) -> int:
    return int(store.con.execute("SELECT count(*) FROM llm_calls").fetchall()[0][0])


def plan_then_run(store: Store, settings: JobSettings, limit: int = 2,
                  server: FakeOpenAI | None = None) -> tuple[Plan, JobReport]:
    """The job's dry run (checked to write and call nothing), then the same Job object run for real (so the dry run
    must leave nothing behind), its new calls checked against the log's rows and the server's requests."""
    job = Job(store, store.run(), settings, Selection(limit=limit))
    try:
        jobs, rows, sent = store.jobs(), _rows(store), len(server.requests) if server else 0
        plan = job.plan()
        assert store.jobs() == jobs and _rows(store) == rows  # no job row, no result, no logged call
        assert (len(server.requests) if server else 0) == sent  # no request sent
        report = job.run()
    finally:
        job.close()
    assert report.state == "complete", report
    assert _rows(store) - rows == report.new_calls
    if server is not None:
        assert len(server.requests) - sent == report.new_calls  # one request a call: the fake honours n
    return plan, report


@pytest.mark.parametrize("choice", CHOICES)
@pytest.mark.parametrize("scorers", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_SETS else name
                                     for name in SCORER_SETS])
@pytest.mark.parametrize("mode", SIMULATIONS)
def test_run_plan_counts_the_calls_the_run_makes(mode: str, scorers: str, choice: str, dry_store: Path,
                                                 tmp_path: Path, server: FakeOpenAI) -> None:
    spec = f"openai:fake@{server.url}"
    settings = JobSettings(kind="run", explainer=spec, simulator=spec, simulation=mode,  # type: ignore[arg-type]
                           scorers=SCORER_SETS[scorers], sizes=SIZES, **CHOICES[choice])  # type: ignore[arg-type]
    with Store.open(_copy(dry_store, tmp_path)) as store:
        plan, report = plan_then_run(store, settings, server=server)
        assert plan.neurons == 2 and report.done == 2
        assert (plan.calls, plan.cached) == (report.new_calls, report.cache_hits)
        assert plan.prompt_tokens > 0 and plan.completion_tokens > 0 and plan.cost is None  # no price for "fake"
        methods = {m for (m,) in store.con.execute("SELECT DISTINCT method FROM scores").fetchall()}
        assert set(SCORER_SETS[scorers]) <= methods  # every scorer ran
        # Finished: a second dry run of the same job has nothing to do.
        again = Job(store, store.run(), settings, Selection(limit=2))
        try:
            assert again.plan() == Plan(0, 0, 0, 0, 0, 0.0)
        finally:
            again.close()


def test_single_neuron_run_plans_its_shuffled_partner(dry_store: Path, tmp_path: Path, server: FakeOpenAI) -> None:
    """Alone in its job, a neuron's shuffled control is another neuron's explanation, asked of the explainer. The
    model's name has a known price, so the plan says what the calls cost."""
    spec = f"openai:gpt-4o-mini@{server.url}"
    settings = JobSettings(kind="run", explainer=spec, simulator=spec, sizes=SIZES)
    with Store.open(_copy(dry_store, tmp_path)) as store:
        plan, report = plan_then_run(store, settings, limit=1, server=server)
    assert (plan.neurons, plan.calls, plan.cached) == (1, 2, 0) == (1, report.new_calls, report.cache_hits)
    assert plan.cost == pytest.approx((plan.prompt_tokens * 0.15 + plan.completion_tokens * 0.60) / 1e6)
    assert plan.cost > 0


@pytest.mark.parametrize("mode", SIMULATIONS)
def test_explain_then_score_jobs_plan_what_they_call(mode: str, dry_store: Path, tmp_path: Path,
                                                    server: FakeOpenAI) -> None:
    spec = f"openai:fake@{server.url}"
    common: dict[str, Any] = {"explainer": spec, "simulator": spec, "simulation": mode, "sizes": SIZES,
                              "scorers": ("detection", "fuzzing")}
    # A user's sentence, on a store of its own: the openai backend cannot give its requests' payloads, so a plan
    # does not recognise calls another job left in the log (the local backend can: see the next test).
    with Store.open(_copy(dry_store, tmp_path, "user.duckdb")) as store:
        plan, report = plan_then_run(store, JobSettings(kind="score", explanation='the word "the"', **common), limit=3,
                                     server=server)
        assert plan.neurons == 3 and report.done == 3 and plan.calls > 0
        assert (plan.calls, plan.cached) == (report.new_calls, report.cache_hits)
    with Store.open(_copy(dry_store, tmp_path, "stored.duckdb")) as store:
        # Nothing to score yet: the run fails every neuron before any call, and the plan counts none.
        job = Job(store, store.run(), JobSettings(kind="score", **common), Selection(limit=3))
        try:
            assert (job.plan().neurons, job.plan().calls) == (3, 0)
            assert len(job.run().failed) == 3 and _rows(store) == 0
        finally:
            job.close()
        # Explained, then the stored candidates scored (the failed neurons retried).
        for kind, extra in (("explain", {"samples": 2}), ("score", {})):
            plan, report = plan_then_run(store, JobSettings(kind=kind, **common, **extra), limit=3,  # type: ignore[arg-type]
                                         server=server)
            assert plan.neurons == 3 and report.done == 3 and plan.calls > 0
            assert (plan.calls, plan.cached) == (report.new_calls, report.cache_hits), kind


@pytest.mark.parametrize(("mode", "choice"), [("tokens", "revise"), ("lines", "samples-2")])
def test_resumed_and_overlapping_jobs_plan_from_the_log(mode: str, choice: str, dry_store: Path, tmp_path: Path,
                                                        tiny_model: Path) -> None:
    """With the local backend, whose requests are known exactly: after an interrupted job the plan counts the logged
    calls as answered (and plans the rest from their real answers), as the resumed run then finds them; so does
    a wider job's plan."""
    spec = f"local:{tiny_model}"
    settings = JobSettings(kind="run", explainer=spec, simulator=spec, simulation=mode,  # type: ignore[arg-type]
                           scorers=("detection", "fuzzing"), sizes=SIZES, **CHOICES[choice])

    landed: list[int] = []

    def interrupt_after_one(stage: str, done: int, total: int) -> None:
        if stage == "neurons" and done >= 1:  # one commit may land more than one neuron
            landed.append(done)
            raise KeyboardInterrupt

    with Store.open(_copy(dry_store, tmp_path)) as store:
        job = Job(store, store.run(), settings, Selection(limit=3))
        try:
            with pytest.raises(KeyboardInterrupt):
                job.run(progress=interrupt_after_one, concurrency=1)  # no other neuron finishes meanwhile
        finally:
            job.close()
        assert _rows(store) > 0
        plan, report = plan_then_run(store, settings, limit=3)
        assert landed[0] < 3 and plan.neurons == 3 - landed[0] and report.done == 3
        assert (plan.calls, plan.cached) == (report.new_calls, report.cache_hits) and plan.cached > 0
        assert plan.cost == 0.0  # a local model is free
        # A wider job: its first three neurons are all in the log.
        plan, report = plan_then_run(store, settings, limit=4)
        assert (plan.calls, plan.cached) == (report.new_calls, report.cache_hits) and plan.cached > plan.calls


def test_baseline_dry_run_is_free(dry_store: Path, tmp_path: Path) -> None:
    settings = JobSettings(kind="run", explainer="baseline", simulator="baseline", simulation="tokens",
                           scorers=("detection", "fuzzing"), sizes=SIZES, revise=True)
    with Store.open(_copy(dry_store, tmp_path)) as store:
        plan, report = plan_then_run(store, settings, limit=3)
    assert plan == Plan(3, 0, 0, 0, 0, 0.0) and (report.new_calls, report.cache_hits) == (0, 0)


def test_an_openai_job_is_priced_without_a_key(dry_store: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Pricing a job comes before having a key: without OPENAI_API_KEY, the dry run of a job on OpenAI's API counts
    what it would send as it does with a key (it sends nothing either way), and prices it; the run still asks for
    the key (the backend built for the dry run is not kept), and nothing is written."""
    for name in ("OPENAI_BASE_URL", "NEURONSCOPE_OPENAI_MODE"):
        monkeypatch.delenv(name, raising=False)
    settings = JobSettings(kind="run", explainer="openai:gpt-4o-mini", simulator="openai:gpt-4o-mini", sizes=SIZES)
    plans: dict[str, Plan] = {}
    with Store.open(_copy(dry_store, tmp_path)) as store:
        for key in ("sk-test", ""):
            if key:
                monkeypatch.setenv("OPENAI_API_KEY", key)
            else:
                monkeypatch.delenv("OPENAI_API_KEY", raising=False)
            job = Job(store, store.run(), settings, Selection(limit=3))
            try:
                plans[key] = job.plan()
                if not key:
                    with pytest.raises(LLMError, match="set OPENAI_API_KEY"):
                        job.prepare()
            finally:
                job.close()
        assert _rows(store) == 0 and store.jobs() == []
    assert plans[""] == plans["sk-test"]
    assert plans[""].calls == 3 and plans[""].prompt_tokens > 0 and plans[""].cost is not None and plans[""].cost > 0


def test_the_plan_tells_calls_in_the_log_from_repeats(dry_store: Path, tmp_path: Path, server: FakeOpenAI) -> None:
    """Plan.cached is what the run will answer from the log: the calls the log holds now, and the repeats of the
    job's own new calls (a neuron's shuffled control asks for its partner's explanation). The tally tells them
    apart, so a dry run on an empty log says none is in it."""
    spec = f"openai:gpt-4o-mini@{server.url}"
    settings = JobSettings(kind="run", explainer=spec, simulator=spec, sizes=SIZES)
    with Store.open(_copy(dry_store, tmp_path)) as store:
        tally = Tally()
        job = Job(store, store.run(), settings, Selection(limit=3))
        try:
            plan = job.plan(tally=tally)
        finally:
            job.close()
        assert (plan.calls, plan.cached, tally.logged, tally.repeats) == (3, 3, 0, 3)
        plan_then_run(store, settings, limit=2, server=server)  # two neurons' explanations now in the log
        tally = Tally()
        job = Job(store, store.run(), settings, Selection(limit=3))
        try:
            plan = job.plan(tally=tally)
            report = job.run()
        finally:
            job.close()
    assert (plan.calls, plan.cached) == (report.new_calls, report.cache_hits) == (1, 5)
    assert (tally.logged, tally.repeats) == (4, 1)  # two neurons' explanations, each asked twice; the third's repeat


def test_dry_run_line_is_the_same_with_or_without_a_key(dry_store: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The tester's command: `run --explainer openai:gpt-4o-mini --dry-run --limit 3` on a store with an empty call
    log prices the job without a key as with one, and says no call is in the log."""
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "NEURONSCOPE_OPENAI_MODE"):
        monkeypatch.delenv(name, raising=False)
    path = _copy(dry_store, tmp_path)
    args = ["run", "--explainer", "openai:gpt-4o-mini", "--dry-run", "--limit", "3", "--store", str(path)]
    lines = []
    for env in ({}, {"OPENAI_API_KEY": "sk-test"}):
        result = run_cli(args, **env)
        assert result.code == 0, result.err
        lines += [line for line in result.out.splitlines() if line.startswith("dry run:")]
    assert len(lines) == 2 and lines[0] == lines[1]
    assert lines[0].startswith("dry run: 3 neurons to do, 3 new LLM calls and 3 repeats of them (answered from the "
                               "log once made), 0 already in the log, about "), lines[0]
    assert "cost about $" in lines[0] and "free" not in lines[0]
