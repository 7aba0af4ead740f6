"""Several processes on one store: readers while a job runs, two job processes sharing one job, and the spool
that makes both possible (neuronscope.core.store.spool), including after kill -9."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli_command, cli_env, copy_store, run_cli
from spool_watch import SpoolWatch

from neuronscope.core.store import Store
from neuronscope.core.store.spool import Spool

ROOT = Path(__file__).resolve().parent.parent
def _start(args: list[str], **engine: float) -> subprocess.Popen[str]:
    """`neuronscope ARGS` started, with constants of the engine set (cli_command)."""
    return subprocess.Popen(cli_command(args, **engine), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=cli_env(NEURONSCOPE_PROGRESS_SECONDS="0", NEURONSCOPE_BATCH_TOKENS="1"))


def _wait_for_progress(proc: subprocess.Popen[str], at_least: int) -> None:
    assert proc.stderr is not None
    for line in proc.stderr:  # plain progress lines (stderr is not a terminal), counting committed neurons
        found = re.match(r"explaining and scoring neurons: (\d+)/", line)
        if found and int(found.group(1)) >= at_least:
            return
    raise AssertionError(f"the job ended before {at_least} neurons landed")


def _results(path: Path) -> dict[tuple[int, int], list[tuple[str, str, float | None]]]:
    """Every neuron's explanations (role, text, test score), as stored."""
    with Store.open(path, read_only=True) as store:
        rows = store.con.execute(
            "SELECT e.layer, e.neuron, e.role, e.text, s.value FROM explanations e LEFT JOIN scores s ON "
            "s.explanation_id = e.explanation_id AND s.split = 'test' AND s.method = 'all' "
            "ORDER BY e.layer, e.neuron, e.role, e.sample, e.text").fetchall()
    out: dict[tuple[int, int], list[tuple[str, str, float | None]]] = {}
    for layer, neuron, role, text, value in rows:
        out.setdefault((layer, neuron), []).append((role, text, None if value is None else round(value, 9)))
    return out


def _calls(path: Path) -> list[str]:
    with Store.open(path, read_only=True) as store:
        return [r[0] for r in store.con.execute("SELECT cache_key FROM llm_calls ORDER BY call_id").fetchall()]


@pytest.mark.slow
def test_readers_open_the_store_while_a_job_runs_and_see_what_landed(job_store: Path, tmp_path: Path,
                                                                      tiny_model: Path) -> None:
    path = copy_store(job_store, tmp_path, "busy.duckdb")
    proc = _start(["run", "--explainer", f"local:{tiny_model}", "--simulation", "lines", "--limit", "30",
                   "--concurrency", "2", "--store", path])  # two in flight: the job outlasts the readers' look
    try:
        _wait_for_progress(proc, 3)
        info = run_cli(["info", "--store", path])  # another terminal, while the job writes
        assert info.code == 0, info.err
        assert re.search(r"job 1  running  run on run 1  ([3-9]|[12]\d)/30 neurons done", info.out), info.out
        with Store.open(path, read_only=True) as store:
            job = store.jobs()[0]
            landed = store.summaries(store.run().run_id)
            assert job["state"] == "running" and 3 <= job["done"] < 30 and len(landed) >= 3
        first = landed[0]
        shown = run_cli(["show", f"{first.layer}/{first.neuron}", "--store", path])
        assert shown.code == 0, shown.err
        assert first.text in shown.out  # its explanation, written beside the store, is shown
        assert proc.wait(timeout=600) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        proc.kill()
    # The job was alone in the store when it ended, so it folded its spool into it.
    assert not Spool(path).names()
    with Store.open(path, read_only=True) as store:
        assert [(j["state"], j["done"], j["failed"]) for j in store.jobs()] == [("complete", 30, 0)]
        assert len(store.summaries(store.run().run_id)) == 30
    assert len(_calls(path)) == len(set(_calls(path)))


@pytest.mark.slow
def test_two_job_processes_finish_one_job_together_folding_as_they_go(job_store: Path, tmp_path: Path,
                                                                     tiny_model: Path) -> None:
    """Two processes split one job's blocks (made small here). Every second (SETTLE_SECONDS, here) the first asks
    the other, which would not fold for an hour, to step aside: it finishes its neurons in flight and closes the
    store until the fold is done, so the spool empties while both run."""
    args = ["run", "--explainer", f"local:{tiny_model}", "--simulation", "lines", "--limit", "16"]
    alone = copy_store(job_store, tmp_path, "alone.duckdb")
    reference = _start([*args, "--store", alone], BLOCK=4)
    assert reference.wait(timeout=600) == 0
    together = copy_store(job_store, tmp_path, "together.duckdb")
    procs = [_start([*args, "--store", together], BLOCK=4, SETTLE_SECONDS=settle) for settle in (1.0, 3600.0)]
    watch, deadline = SpoolWatch(together), time.monotonic() + 600  # both processes running throughout
    while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
        watch.look()
        time.sleep(0.02)
    assert watch.folded_midway
    paid = []
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        line = re.search(r"job 1 complete: 16/16 neurons done; (\d+) new LLM calls", err)
        assert line, err
        paid.append(int(line.group(1)))
    # Both worked (each paid for calls), and between them they paid exactly what one process alone did.
    assert all(n > 0 for n in paid), paid
    assert sum(paid) == len(_calls(alone)) == len(_calls(together)) == len(set(_calls(together)))
    assert _results(together) == _results(alone)  # nothing done twice, nothing lost, the same results
    with Store.open(together, read_only=True) as store:
        assert [(j["state"], j["done"], j["failed"]) for j in store.jobs()] == [("complete", 16, 0)]


def test_a_spool_is_folded_once_and_its_unpublished_segments_dropped(job_store: Path, tmp_path: Path) -> None:
    """What a killed writer leaves (a segment never renamed into place) is not read; a fold moves every published
    segment into the store once, and the spool is empty after it."""
    path = copy_store(job_store, tmp_path, "fold.duckdb")
    with Store.open(path, read_only=True) as store:
        run = store.run()
        job = store.create_job(run.run_id, "explain", "{}", "key", 2)
        store.set_job_state(job, "interrupted", "killed")
        other = store.create_job(run.run_id, "explain", "{}", "key", 2)
    assert other == job  # the same parameters: the same job, whichever process registers it
    spool = Spool(path)
    (spool.segments / ".00000000000000000000-1-000001").mkdir()  # a writer killed before publishing
    (spool.segments / ".00000000000000000000-1-000001" / "jobs.parquet").write_bytes(b"PAR1 half")
    assert len(spool.names()) == 2
    with Store.open(path, read_only=True) as store:
        assert [(j["job_id"], j["state"], j["error"]) for j in store.jobs()] == [(job, "interrupted", "killed")]
    assert Store.settle(path)
    assert not spool.root.exists()  # folded, and the spool folder gone with it
    with Store.open(path) as store:  # folded into the store's own tables, with its sequence past the job's id
        assert store.con.execute("SELECT job_id, state, error FROM jobs").fetchall() == [(job, "interrupted", "killed")]
        assert store.create_job(run.run_id, "explain", "{}", "other", 1) == job + 1


def test_a_job_alone_folds_its_spool_as_it_goes(job_store: Path, tmp_path: Path, tiny_model: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Alone on the store, a job folds its segments into it every SETTLE_SECONDS (here one second) and opens it
    again, its requests drained meanwhile: it finishes with the results of a job on a writable store."""
    from neuronscope.core.jobs import engine
    from neuronscope.core.jobs.engine import JobSettings, Selection, run_job

    monkeypatch.setenv("NEURONSCOPE_BATCH_TOKENS", "1")
    settings = JobSettings(explainer=f"local:{tiny_model}", simulator=f"local:{tiny_model}", simulation="lines")
    alone = copy_store(job_store, tmp_path, "writable.duckdb")
    with Store.open(alone) as store:
        assert run_job(store, store.run(), settings, Selection(limit=8), concurrency=2).state == "complete"
    path = copy_store(job_store, tmp_path, "settling.duckdb")
    monkeypatch.setattr(engine, "SETTLE_SECONDS", 1.0)
    folds = []
    with Store.open(path, read_only=True) as store:
        resettle = store.resettle
        monkeypatch.setattr(store, "resettle", lambda **how: folds.append(resettle(**how)) or folds[-1])
        report = run_job(store, store.run(), settings, Selection(limit=8), concurrency=2)
        assert report.state == "complete" and report.done == 8
        assert folds and all(folds)  # it was alone each time, so each fold happened
        assert store.summaries(store.run().run_id)  # and the store it reopened reads the results
    assert _results(path) == _results(alone)
    assert sorted(_calls(path)) == sorted(_calls(alone)) and len(set(_calls(path))) == len(_calls(path))


@pytest.mark.slow
def test_a_fold_killed_at_any_moment_loses_and_doubles_nothing(job_store: Path, tmp_path: Path) -> None:
    """kill -9 a process folding the spool at random moments: every open in between reads each row once, and the
    fold that finally completes leaves exactly what was written."""
    import random

    from neuronscope.core.records import Call
    from neuronscope.core.results import NeuronResult, ScoredExplanation

    path = copy_store(job_store, tmp_path, "folding.duckdb")
    segments = 400  # a fold of about a second here, so most kills land inside it
    with Store.open(path, read_only=True) as store:
        run_id = store.run().run_id
        job = store.create_job(run_id, "explain", "{}", "fold", segments * 2)
        for k in range(segments):
            results = [NeuronResult(0, 2 * k + i, "pos", (ScoredExplanation(f"text {k} {i}", "x", "candidate"),))
                       for i in range(2)]
            store.save_batch(job, run_id, results, calls=[(f"key {k}", Call("b", "m", "explain", "p", "r", 1, 1, 0.0))])

    def counts() -> tuple[int, int, int, int]:
        with Store.open(path, read_only=True) as store:
            return (store.con.execute("SELECT count(*), count(DISTINCT explanation_id) FROM explanations").fetchall()[0]
                    + store.con.execute("SELECT count(*) FROM llm_calls").fetchall()[0]
                    + (store.jobs()[0]["done"],))

    expected = (segments * 2, segments * 2, segments, segments * 2)
    assert counts() == expected
    rng = random.Random(0)
    fold = [sys.executable, "-c", "import sys; from neuronscope.core.store import Store; Store.settle(sys.argv[1])",
            str(path)]
    for _ in range(6):
        proc = subprocess.Popen(fold, cwd=ROOT, env=cli_env())
        time.sleep(rng.uniform(0.3, 1.5))  # interpreter start-up, the open, the fold's transaction, the deletes
        proc.kill()
        proc.wait()
        assert counts() == expected
    assert Store.settle(path) and not Spool(path).root.exists()
    assert counts() == expected
