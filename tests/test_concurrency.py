"""The concurrent job engine: results independent of concurrency, controls on a sample, what a commit costs."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import Result, assert_one_line_error, run_cli

from neuronscope.core.jobs.engine import JobError, JobSettings, Selection, parse_controls, run_job
from neuronscope.core.store import Store

pytestmark = pytest.mark.usefixtures("neuronscope_env")


def _copy(cli_store: tuple[Path, Result], tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    shutil.copy(cli_store[0], path)
    return path


def _everything(path: Path) -> dict[tuple[int, int], list[Any]]:
    """Every explanation of every neuron, with its simulations and scores, in a comparable form (no ids)."""
    with Store.open(path, read_only=True) as store:
        run_id = store.run().run_id
        neurons = store.con.execute("SELECT DISTINCT layer, neuron FROM explanations ORDER BY 1, 2").fetchall()
        out = {}
        for layer, neuron in neurons:
            out[(layer, neuron)] = sorted(
                (e.role, e.text, e.explainer, e.sample, e.selected, e.source,
                 sorted((s.split, s.excerpt_id, s.predicted) for s in e.simulations),
                 sorted((sp.split, sp.simulator, sc.method, sc.value, sc.ci_low, sc.ci_high, sc.n, sc.flags)
                        for sp in e.splits for sc in sp.scores))
                for e in store.explanations(run_id, layer, neuron))
        return out


@pytest.mark.parametrize("simulation", ["quotes", "lines"])
def test_concurrent_equals_serial(cli_store: tuple[Path, Result], tmp_path: Path, simulation: str) -> None:
    """The same job at concurrency 1 and 16 stores the same explanations, partners and scores, to the last bit."""
    settings = JobSettings(explainer="baseline", simulator="baseline", simulation=simulation,  # type: ignore[arg-type]
                           scorers=("detection", "fuzzing"), samples=2, seed=7)
    found = {}
    for concurrency in (1, 16):
        path = _copy(cli_store, tmp_path, f"c{concurrency}.duckdb")
        with Store.open(path) as store:
            report = run_job(store, store.run(), settings, Selection(limit=40, order="random"),
                             concurrency=concurrency)
            assert report.state == "complete" and report.done == 40
            jobs = store.jobs()
            assert (jobs[0]["done"], jobs[0]["failed"], jobs[0]["total"]) == (40, 0, 40)
        found[concurrency] = _everything(path)
    assert len(found[1]) == 40 and found[1] == found[16]
    # Each neuron is the shuffled partner of exactly one other: the partners form one permutation.
    sources = [row[5] for rows in found[16].values() for row in rows if row[0] == "shuffled"]
    assert len(sources) == 40 and len(set(sources)) == 40 and set(sources) == set(found[16])


def test_controls_on_a_sample(cli_store: tuple[Path, Result], tmp_path: Path) -> None:
    """--controls sample:F gives the shuffled control and the contrast score to about F of the neurons, the same
    ones for the same seed; none to none (the token baseline is no control here: it is the explainer)."""

    def roles(controls: str) -> dict[tuple[int, int], set[str]]:
        path = _copy(cli_store, tmp_path, f"{controls.replace(':', '_')}.duckdb")
        with Store.open(path) as store:
            settings = JobSettings(explainer="baseline", simulator="baseline", simulation="lines", controls=controls)
            assert run_job(store, store.run(), settings, Selection(limit=60, order="random")).state == "complete"
        out: dict[tuple[int, int], set[str]] = {}
        for (layer, neuron), rows in _everything(path).items():
            out[(layer, neuron)] = {row[0] for row in rows}
            contrast = any(score[2] == "contrast" for row in rows if row[0] == "candidate" for score in row[7])
            assert contrast == ("shuffled" in out[(layer, neuron)])  # the two go together
        return out

    everything, sampled, none = roles("all"), roles("sample:0.5"), roles("none")
    assert len(everything) == len(sampled) == len(none) == 60
    assert all(r == {"candidate", "shuffled"} for r in everything.values())
    assert all(r == {"candidate"} for r in none.values())
    controlled = {n for n, r in sampled.items() if "shuffled" in r}
    assert 15 <= len(controlled) <= 45
    assert controlled == {n for n, r in roles("sample:0.5").items() if "shuffled" in r}  # the seed decides


def test_controls_and_concurrency_are_checked(cli_store: tuple[Path, Result], monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_controls("all") == 1.0 and parse_controls("none") == 0.0 and parse_controls("sample:0.1") == 0.1
    for bad in ("some", "sample:0", "sample:1.5", "sample:x"):
        with pytest.raises(JobError, match="sample:F"):
            parse_controls(bad)
    path = str(cli_store[0])
    assert_one_line_error(run_cli(["run", "--controls", "half", "--store", path]), "--controls", "sample:F")
    assert_one_line_error(run_cli(["run", "--concurrency", "0", "--store", path]), "--concurrency")
    assert_one_line_error(run_cli(["run", "--store", path], NEURONSCOPE_CONCURRENCY="many"),
                          "NEURONSCOPE_CONCURRENCY")


# -- against OpenAI-compatible servers (the scripted fake) ------------------------------------------------------

@pytest.fixture
def chat_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Servers are asked by chat, with written digits (the route named: no probe)."""
    monkeypatch.setenv("NEURONSCOPE_OPENAI_MODE", "chat-digits")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-concurrency")
    monkeypatch.delenv("NEURONSCOPE_CONCURRENCY", raising=False)


def _calls(path: Path) -> tuple[int, int, int]:
    """(calls logged, distinct requests among them, tokens)."""
    with Store.open(path, read_only=True) as store:
        row = store.con.execute("SELECT count(*), count(DISTINCT cache_key), "
                                "coalesce(sum(prompt_tokens + completion_tokens), 0) FROM llm_calls").fetchall()[0]
        return int(row[0]), int(row[1]), int(row[2])


@pytest.mark.usefixtures("chat_only")
def test_a_job_over_two_servers_survives_one_failing(cli_store: tuple[Path, Result], tmp_path: Path) -> None:
    """One of two servers answers every request with 503: the job spreads over both, retries the failures on the
    other, and finishes with the results a one-server serial job gets; no request is paid twice."""
    from fake_openai import CHAT, FakeOpenAI, error
    from test_dry_run import Model

    settings = {"simulation": "lines", "scorers": ("detection",)}
    with FakeOpenAI() as good, FakeOpenAI() as bad:
        good.on(CHAT, Model())
        bad.fail(error(503, "overloaded"))
        serial = _copy(cli_store, tmp_path, "serial.duckdb")
        with Store.open(serial) as store:
            spec = f"openai:m@{good.url}"
            report = run_job(store, store.run(), JobSettings(explainer=spec, simulator=spec, **settings),  # type: ignore[arg-type]
                             Selection(limit=12), concurrency=1)
            assert report.state == "complete"
        served = good.count()
        both = _copy(cli_store, tmp_path, "both.duckdb")
        with Store.open(both) as store:
            spec = f"openai:m@{bad.url},{good.url}"
            report = run_job(store, store.run(), JobSettings(explainer=spec, simulator=spec, **settings),  # type: ignore[arg-type]
                             Selection(limit=12), concurrency=16)
            assert report.state == "complete" and report.done == 12 and not report.failed
        assert bad.count() >= 1  # it was tried, and failed over
        assert good.count() - served == report.new_calls  # every call answered once, by the good one
    assert _everything(serial) == _everything(both)  # the job's name and results leave the servers out
    calls, distinct, _ = _calls(both)
    assert calls == distinct == report.new_calls


@pytest.mark.usefixtures("chat_only")
def test_the_budget_under_concurrency_is_passed_by_at_most_the_requests_in_flight(
        cli_store: tuple[Path, Result], tmp_path: Path) -> None:
    from fake_openai import CHAT, FakeOpenAI
    from test_dry_run import Model

    path = _copy(cli_store, tmp_path, "budget.duckdb")
    with FakeOpenAI() as server:
        server.on(CHAT, Model())
        spec = f"openai:m@{server.url}"
        with Store.open(path) as store:
            report = run_job(store, store.run(), JobSettings(explainer=spec, simulator=spec, simulation="lines"),
                             Selection(limit=40), concurrency=8, max_tokens=20_000)
            assert report.state == "stopped" and "budget" in report.message and report.done < 40
            biggest = store.con.execute("SELECT max(prompt_tokens + completion_tokens) FROM llm_calls").fetchall()[0][0]
    calls, distinct, spent = _calls(path)
    assert calls == distinct and spent == report.tokens
    assert spent <= 20_000 + 8 * biggest
    # The same command with a larger budget finishes the job, paying no logged call again.
    with FakeOpenAI() as server:
        server.on(CHAT, Model())
        spec = f"openai:m@{server.url}"  # another port: the job and its calls are found all the same
        with Store.open(path) as store:
            report = run_job(store, store.run(), JobSettings(explainer=spec, simulator=spec, simulation="lines"),
                             Selection(limit=40), concurrency=8)
            assert report.state == "complete" and report.done == 40
    calls_after, distinct_after, _ = _calls(path)
    assert calls_after == distinct_after == calls + report.new_calls
