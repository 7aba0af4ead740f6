"""Explain/score jobs end to end: the planted-neuron ground truth, resume after Ctrl-C and kill -9, the call
log as a cache, the token budget, dry runs, `show` with explanations, and one-line errors."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    PLANTED_WORDS,
    assert_one_line_error,
    cli_command,
    cli_env,
    copy_store,
    run_cli,
)
from terminal import Terminal

from neuronscope.core.jobs.engine import Job, JobError, JobSettings, Selection, run_job
from neuronscope.core.jobs.selection import parse_where
from neuronscope.core.llm.base import make_backend
from neuronscope.core.store import Store
from neuronscope.core.store.spool import Spool

pytestmark = pytest.mark.usefixtures("neuronscope_env")

PLANTED = ["0/0", "0/1", "0/2"]


def _summaries(path: Path) -> dict[tuple[int, int], object]:
    with Store.open(path, read_only=True) as store:
        return {(s.layer, s.neuron): s for s in store.summaries(store.run().run_id)}


# -- ground truth -------------------------------------------------------------------------------------

def test_planted_neurons_are_found_named_and_scored(planted_store: Path, tmp_path: Path) -> None:
    path = tmp_path / "planted.duckdb"
    shutil.copy(planted_store, path)
    with Store.open(path, read_only=True) as store:
        run = store.run()
        for index, word in enumerate(PLANTED_WORDS):
            tops = [r for r in store.records(run.run_id, 0, index, kinds=("top",))]
            assert tops and all(word in r.tokens for r in tops), f"top records of neuron {index} lack {word!r}"
    result = run_cli(["run", *PLANTED, "1/5", "0/7", "--explainer", "baseline", "--store", path])
    assert result.code == 0, result.err
    rows = _summaries(path)
    for index, word in enumerate(PLANTED_WORDS):
        row = rows[(0, index)]
        assert json.dumps(word) in row.text, row.text  # the lookup explainer names the planted token
        assert row.score.value >= 0.9 and row.score.ci_low > 0.8
        assert abs(row.shuffled.value) < 0.2  # another neuron's explanation predicts nothing here
        assert row.beats_shuffled
    assert "L0/N0" in result.out and "score [95% CI]" in result.out

    # The planted explanation, as a user's sentence, scored on unwired neurons: near 0.
    result = run_cli(["score", "1/5", "0/7", "1/11", "--explanation", 'fires on "the"', "--simulator", "baseline",
                      "--store", path])
    assert result.code == 0, result.err
    with Store.open(path, read_only=True) as store:
        for layer, neuron in ((1, 5), (0, 7), (1, 11)):
            user = [e for e in store.explanations(store.run().run_id, layer, neuron) if e.role == "user"]
            assert user and user[0].text == 'fires on "the"'
            assert abs(user[0].score().value) < 0.2
    # The quotes mode asks the simulator nothing: its model is not loaded, nor even looked for (a sentence scored
    # with the default simulator used to need its package installed); the lines mode asks it, and says it is missing.
    nowhere = f"local:{tmp_path / 'no-model'}"
    for mode, code in (("quotes", 0), ("lines", 2)):
        result = run_cli(["score", "1/5", "--explanation", 'fires on "of"', "--simulator", nowhere, "--simulation",
                          mode, "--store", path])
        assert result.code == code and ("error: " in result.err) == (code == 2), result.err
    show = run_cli(["show", "0/0", "--store", path])
    assert show.code == 0, show.err
    assert "Explanations" in show.out and "baseline #0" in show.out and "shuffled control" in show.out
    assert "r +1.00" in show.out and "real " in show.out and "sim  " in show.out


# -- jobs with a real local model ------------------------------------------------------------------------

def _job(store: Store, spec: str, limit: int = 6, **settings: object) -> Job:
    """A job with the lines simulation: calls a model for every simulation, so call accounting shows."""
    return Job(store, store.run(), JobSettings(explainer=spec, simulator=spec, simulation="lines",
                                               **settings),  # type: ignore[arg-type]
               Selection(limit=limit))


def _calls(path: Path) -> list[str]:
    with Store.open(path, read_only=True) as store:
        return [r[0] for r in store.con.execute("SELECT cache_key FROM llm_calls ORDER BY call_id").fetchall()]


def test_interrupted_job_resumes_without_repeating_calls(job_store: Path, tmp_path: Path, tiny_model: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Every local request alone: what the neurons share a batch with then cannot change a float, so the resumed
    # job's results equal the uninterrupted one's exactly (batching's own tolerance: tests/test_local_batching.py).
    monkeypatch.setenv("NEURONSCOPE_BATCH_TOKENS", "1")
    spec = f"local:{tiny_model}"
    reference = copy_store(job_store, tmp_path, "reference.duckdb")
    with Store.open(reference) as store:
        report = run_job(store, store.run(), JobSettings(explainer=spec, simulator=spec, simulation="lines"), Selection(limit=6))
        assert report.state == "complete" and report.done == 6 and not report.failed
        # Per neuron: explain (twice when the greedy answer was unusable: Backend.explain); simulate the
        # explanation, the shuffled control and the neutral one.
        explains = store.con.execute("SELECT count(*) FROM llm_calls WHERE kind = 'explain'").fetchone()[0]
        assert 6 <= explains <= 12 and report.new_calls == explains + 6 * 3
        total = report.new_calls
        expected = {(s.layer, s.neuron): (s.text, s.score.value) for s in store.summaries(store.run().run_id) if s.score}

    path = copy_store(job_store, tmp_path, "interrupted.duckdb")

    def interrupt_after_two(stage: str, done: int, total: int) -> None:
        if stage == "neurons" and done >= 2:
            raise KeyboardInterrupt

    with Store.open(path) as store:
        job = _job(store, spec)
        with pytest.raises(KeyboardInterrupt):
            job.run(progress=interrupt_after_two)
        job.close()
        # the two that landed, and any that another worker finished while the requests in flight were waited for
        assert store.jobs()[0]["state"] == "interrupted" and 2 <= store.jobs()[0]["done"] < 6
        first_calls = store.call_totals()[0]
        report = run_job(store, store.run(), JobSettings(explainer=spec, simulator=spec, simulation="lines"), Selection(limit=6))
        assert report.state == "complete" and report.done == 6 and report.job_id == store.jobs()[0]["job_id"]
        assert first_calls + report.new_calls == total  # the interrupted part is never paid twice
        got = {(s.layer, s.neuron): (s.text, s.score.value) for s in store.summaries(store.run().run_id) if s.score}
    assert got == expected
    assert len(_calls(path)) == len(set(_calls(path)))

    # The same job again: nothing to do, no call. An overlapping job: its shared calls come from the log (its
    # partners come from another permutation, so each old neuron may pay one new shuffled simulation).
    with Store.open(path) as store:
        again = run_job(store, store.run(), JobSettings(explainer=spec, simulator=spec, simulation="lines"), Selection(limit=6))
        assert again.state == "complete" and again.new_calls == 0
        wider = run_job(store, store.run(), JobSettings(explainer=spec, simulator=spec, simulation="lines"), Selection(limit=7))
        assert wider.cache_hits >= 6 * 2 and wider.new_calls <= 5 + 6  # the new neuron: 4 calls, or 5


def test_budget_stops_cleanly_and_dry_run_counts(job_store: Path, tmp_path: Path, tiny_model: Path) -> None:
    path = copy_store(job_store, tmp_path, "budget.duckdb")
    spec = f"local:{tiny_model}"
    with Store.open(path) as store:
        job = _job(store, spec, limit=4)
        plan = job.plan()
        # 4 calls a neuron (explain; simulate it, the shuffled control, the neutral explanation); from the log: each
        # explanation asked again (the previous neuron's shuffled control), the neutral explanation asked again
        assert (plan.neurons, plan.calls, plan.cached) == (4, 16, 8) and plan.cost == 0.0
        assert plan.prompt_tokens > 0 and store.jobs() == [] and store.call_totals() == (0, 0)  # nothing ran
        report = job.run(max_tokens=plan.prompt_tokens // 2, concurrency=1)  # one neuron at a time: some finish
        job.close()
        assert report.state == "stopped" and "budget" in report.message and 0 < report.done < 4
        spent = store.call_totals()[1]
        assert spent <= plan.prompt_tokens // 2
        job = _job(store, spec, limit=4)
        remaining = job.plan()
        assert remaining.neurons == 4 - report.done and remaining.cached >= 0
        report = job.run()
        job.close()
        assert report.state == "complete" and report.done == 4
        assert _job(store, spec, limit=4).plan().neurons == 0


def test_a_finished_job_run_again_loads_no_model(job_store: Path, tmp_path: Path, tiny_model: Path) -> None:
    """The same command again, once its job is complete, says so without loading the explainer (seconds to minutes
    for a real model): here the model is gone by then."""
    path = copy_store(job_store, tmp_path, "again.duckdb")
    model = shutil.copytree(tiny_model, tmp_path / "model")
    args = ["run", "--explainer", f"local:{model}", "--limit", "2", "--store", path]
    assert run_cli(args).code == 0
    shutil.rmtree(model)
    again = run_cli(args)
    assert again.code == 0 and "job 1 complete: 2/2 neurons done; 0 new LLM calls" in again.err, again.err


def test_best_of_k_selects_on_select_split_and_scores_on_test(job_store: Path, tmp_path: Path) -> None:
    path = copy_store(job_store, tmp_path, "bestof.duckdb")
    with Store.open(path) as store:
        report = run_job(store, store.run(), JobSettings(explainer="baseline", simulator="baseline", samples=3),
                         Selection(limit=3))
        assert report.state == "complete"
        run_id = store.run().run_id
        for layer, neuron in [(s.layer, s.neuron) for s in store.summaries(run_id)]:
            candidates = [e for e in store.explanations(run_id, layer, neuron) if e.role == "candidate"]
            assert [c.sample for c in candidates] == [0, 1, 2]
            assert sum(c.selected for c in candidates) == 1
            chosen = next(c for c in candidates if c.selected)
            assert chosen.score("select") is not None and chosen.score("test") is not None
            for c in candidates:  # every candidate was measured on select; only the chosen one on test
                assert c.score("select") is not None
                assert (c.score("test") is not None) == c.selected
            test_ids = {s.excerpt_id for s in chosen.simulations if s.split == "test"}
            select_ids = {s.excerpt_id for s in chosen.simulations if s.split == "select"}
            assert test_ids and select_ids and not test_ids & select_ids


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM, signal.SIGHUP], ids=["kill-9", "sigterm", "hangup"])
def test_kill_then_rerun_finishes_without_repeating_calls(job_store: Path, tmp_path: Path, tiny_model: Path,
                                                          stop: int) -> None:
    """kill -9, SIGTERM (a scheduler's cancel or time limit: taken as Ctrl-C is, exit 130 with one line), or the
    job's terminal closing (an SSH connection dropped: SIGHUP, taken as SIGTERM is, with nowhere to write) mid-job;
    the same command then finishes the job without asking anything twice."""
    path = copy_store(job_store, tmp_path, "killed.duckdb")
    # Two requests in flight: the job outlasts its first commits (at 16, the tiny model's default, it can finish
    # between the progress line and the kill).
    args = ["run", "--explainer", f"local:{tiny_model}", "--simulation", "lines", "--limit", "30", "--concurrency", "2",
            "--store", path]
    if stop == signal.SIGHUP:
        with Terminal(args) as terminal:
            terminal.wait_for(r"(\d+)/30", lambda found: int(found.group(1)) >= 3)  # the progress bar: committed
            time.sleep(0.1)
            terminal.hang_up()
            assert terminal.proc.wait(timeout=30) == 130
    else:
        proc = subprocess.Popen(cli_command(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=cli_env(NEURONSCOPE_PROGRESS_SECONDS="0"), cwd=Path(__file__).resolve().parent.parent)
        assert proc.stderr is not None
        for line in proc.stderr:  # plain progress lines, since stderr is not a terminal: committed neurons
            found = re.match(r"explaining and scoring neurons: (\d+)/30", line)
            if found and int(found.group(1)) >= 3:
                break
        time.sleep(0.1)  # somewhere inside a later neuron
        proc.send_signal(stop)
        said = proc.stderr.read()
        assert proc.wait(timeout=30) == (-9 if stop == signal.SIGKILL else 130), said
    if stop == signal.SIGKILL:
        assert Spool(path).names()  # what landed is in segments beside the store (the job held it read-only)
    else:
        with Store.open(path, read_only=True) as store:
            assert store.jobs()[0]["error"].startswith(f"stopped by {signal.Signals(stop).name}")
    if stop == signal.SIGTERM:
        assert "Traceback" not in said, said
        kept = re.fullmatch(r"interrupted: job 1: (\d+) of 30 neurons done and kept; the same command goes on from "
                            r"there", said.strip().splitlines()[-1])
        with Store.open(path, read_only=True) as store:
            assert kept and int(kept.group(1)) == store.jobs()[0]["done"], said
    killed_calls = _calls(path)
    with Store.open(path, read_only=True) as store:
        states = [j["state"] for j in store.jobs()]
        done_before = store.jobs()[0]["done"]
    assert states == ["interrupted"] and 3 <= done_before < 30, "the job finished before the kill: make it longer"
    assert len(killed_calls) >= 3 * 2
    result = run_cli(args, timeout=300)  # (27 neurons of a local model: two minutes on a loaded CI machine)
    assert result.code == 0, result.err
    calls = _calls(path)
    # Every call made before the kill is kept and none is made twice (identical requests are one call).
    assert calls[: len(killed_calls)] == killed_calls and len(calls) == len(set(calls))
    assert not Spool(path).root.exists()  # the rerun folded them into the store
    with Store.open(path, read_only=True) as store:
        assert [j["state"] for j in store.jobs()] == ["complete"] and store.jobs()[0]["done"] == 30
        assert len({(s.layer, s.neuron) for s in store.summaries(store.run().run_id)}) == 30


# -- input errors ---------------------------------------------------------------------------------------

def test_job_input_errors_are_one_line(cli_store: tuple[Path, object]) -> None:
    path, _ = cli_store
    cases = [
        (["run", "--explainer", "gpt4", "--store", path], "unknown backend"),
        (["run", "--explainer", "openai:m@ftp://x", "--store", path], "openai:MODEL[#REVISION]@http"),
        (["run", "--where", "density <<< 2", "--explainer", "baseline", "--store", path], "cannot read the filter"),
        (["run", "--where", "colour > 2", "--explainer", "baseline", "--store", path], "selectivity"),
        (["run", "7/1", "--explainer", "baseline", "--store", path], "no neuron L7/N1"),
        (["run", "x/1", "--explainer", "baseline", "--store", path], "cannot read the neuron"),
        (["run", "--limit", "0", "--explainer", "baseline", "--store", path], "--limit"),
        (["run", "--where", "density > 2", "--explainer", "baseline", "--store", path], "no neuron matches"),
        (["run", "--explainer", "local:/no/such/model", "--store", path], "/no/such/model"),
        (["explain", "--explainer", "baseline", "--store", path.with_name("missing.duckdb")], "no store"),
    ]
    for args, needle in cases:
        assert_one_line_error(run_cli(args), needle)
    assert not path.with_name("missing.duckdb").exists()  # a job never creates a store


def test_score_without_stored_explanations_records_the_failure(job_store: Path, tmp_path: Path) -> None:
    path = copy_store(job_store, tmp_path, "noexpl.duckdb")
    with Store.open(path) as store:
        report = run_job(store, store.run(), JobSettings(kind="score", explainer="baseline", simulator="baseline"),
                         Selection(limit=2))
        assert report.state == "partial" and report.done == 0 and len(report.failed) == 2
        assert all("run `neuronscope explain` first" in e for e in report.failed.values())
        # Explaining first makes the same score job work.
        run_job(store, store.run(), JobSettings(kind="explain", explainer="baseline"), Selection(limit=2))
        report = run_job(store, store.run(), JobSettings(kind="score", explainer="baseline", simulator="baseline"),
                         Selection(limit=2))
        assert report.state == "complete" and report.done == 2


def test_where_parses_typed_conditions() -> None:
    assert parse_where("density < 0.5 and kurtosis >= 10") == (("density", "<", 0.5), ("kurtosis", ">=", 10.0))
    assert parse_where("") == ()
    for bad in ("density < x", "density; DROP TABLE neurons", "1 < density", "density <"):
        with pytest.raises(JobError):
            parse_where(bad)


def test_filtered_selection(job_store: Path) -> None:
    with Store.open(job_store, read_only=True) as store:
        run = store.run()
        chosen = store.choose_neurons(run.run_id, layers=[1], order="selectivity", where=(("density", "<", 0.6),),
                                      limit=5)
        stats = [store.neuron_stats(run.run_id, layer, n) for layer, n in chosen]
        assert chosen and all(layer == 1 for layer, _ in chosen) and all(s.density < 0.6 for s in stats)
        assert [s.selectivity for s in stats] == sorted((s.selectivity for s in stats), reverse=True)
        assert make_backend("baseline").spec == "baseline"


def test_fixed_seeds_give_identical_results(job_store: Path, tmp_path: Path, tiny_model: Path) -> None:
    """The same job on two copies of a store (sampled candidates, every scorer, bootstraps, decoys) stores the
    same explanations and scores to the last digit; another seed samples other candidates or intervals."""
    spec = f"local:{tiny_model}"

    def results(name: str, seed: int) -> list[tuple]:  # type: ignore[type-arg]
        path = copy_store(job_store, tmp_path, name)
        settings = JobSettings(explainer=spec, simulator=spec, samples=2, seed=seed, simulation="lines",
                               scorers=("detection", "fuzzing"))
        with Store.open(path) as store:
            # One neuron at a time: the local batcher then runs each request alone, so floats match to the last bit
            # (concurrent batches agree within a tolerance: tests/test_local_batching.py, test_concurrency.py).
            job = run_job(store, store.run(), settings, Selection(limit=3), concurrency=1)
            assert job.state == "complete"
            return store.con.execute(
                "SELECT e.layer, e.neuron, e.role, e.sample, e.selected, e.text, s.split, s.method, s.value, s.ci_low, "
                "s.ci_high FROM explanations e JOIN scores s USING (explanation_id) ORDER BY ALL").fetchall()

    first, second = results("seed-a.duckdb", 7), results("seed-b.duckdb", 7)
    assert first == second and len(first) > 20
    assert {r[7] for r in first} >= {"all", "contrast", "detection", "fuzzing"}
    assert results("seed-c.duckdb", 8) != first
