"""A job against a faulty OpenAI-compatible server (the scripted fake on loopback): malformed JSON, HTTP 500
after every retry and timeouts fail only their neurons, with their errors recorded; everything else is
kept, and a rerun against a healthy server finishes the failed neurons from the call log's cache."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import cli_command, cli_env, collect_into, fast_settings, run_cli
from fake_openai import CHAT, FakeOpenAI, Reply, chat_answer, error

from neuronscope.core.jobs.engine import JobSettings, Selection, run_job
from neuronscope.core.llm.prompts import EXPLAIN_SYSTEM, SLOT
from neuronscope.core.store import Store

pytestmark = pytest.mark.usefixtures("neuronscope_env")


class Server:
    """Chat answers: explanations, and simulations in chat-digits form (each `token<TAB>?` line filled with a
    digit). `faults` maps the index of a distinct explanation prompt (in order of first appearance) to the
    reply it always gets."""

    def __init__(self, faults: dict[int, Reply]) -> None:
        self.faults = faults
        self.prompts: list[str] = []

    def __call__(self, body: Any) -> Reply:
        messages = body["messages"]
        if messages[0]["content"] == EXPLAIN_SYSTEM:
            prompt = messages[-1]["content"]
            if prompt not in self.prompts:
                self.prompts.append(prompt)
            index = self.prompts.index(prompt)
            if index in self.faults:
                return self.faults[index]
            return chat_answer(f"tokens of neuron prompt {index}", usage_={"prompt_tokens": 100,
                                                                           "completion_tokens": 8,
                                                                           "total_tokens": 108})
        lines = [line for line in messages[-1]["content"].split("\n") if line.endswith("\t" + SLOT)]
        return chat_answer("\n".join(f"{line[:-1]}{len(line) % 10}" for line in lines))


@pytest.fixture(scope="module")
def fault_store(tmp_path_factory: pytest.TempPathFactory, subject, corpus_dir: Path) -> Path:  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("faults") / "faults.duckdb"
    collect_into(path, subject, corpus_dir, settings=fast_settings(top_k=12, random_k=8, bottom_k=4))
    return path


def _rows(store: Store, table: str) -> list[tuple]:  # type: ignore[type-arg]
    return store.con.execute(f"SELECT * FROM {table}").fetchall()


def test_faults_fail_only_their_neurons_and_a_rerun_finishes_them(fault_store: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "faults.duckdb"
    shutil.copy(fault_store, path)
    monkeypatch.setenv("NEURONSCOPE_OPENAI_MODE", "chat-digits")
    monkeypatch.setenv("NEURONSCOPE_OPENAI_TIMEOUT", "0.5")
    faults = {0: Reply(200, b"{this is not json"), 2: error(500), 3: Reply(200, {"choices": []}, delay=2.0)}
    with FakeOpenAI() as server:
        spec = f"openai:fake@{server.url}"
        settings = JobSettings(kind="run", explainer=spec, simulator=spec)
        server.on(CHAT, Server(faults))
        with Store.open(path) as store:
            report = run_job(store, store.run(), settings, Selection(limit=5))
            run_id = store.run().run_id
            assert report.state == "partial" and report.done == 2 and len(report.failed) == 3
            errors = sorted(report.failed.values())
            assert any("malformed" in e.lower() or "json" in e.lower() for e in errors), errors
            assert any("500" in e for e in errors), errors
            assert any("timed out" in e.lower() or "timeout" in e.lower() for e in errors), errors
            assert all("\n" not in e and "Traceback" not in e for e in errors)
            # The failed neurons have no result rows; the finished ones have all of theirs.
            done = {(s.layer, s.neuron) for s in store.summaries(run_id)}
            assert len(done) == 2 and not done & set(report.failed)
            for layer, neuron in report.failed:
                assert store.explanations(run_id, layer, neuron) == []
            for layer, neuron in done:
                roles = {e.role for e in store.explanations(run_id, layer, neuron)}
                assert {"candidate", "baseline"} <= roles
            assert [(j["state"], j["done"], j["failed"]) for j in store.jobs()] == [("partial", 2, 3)]
            before = {t: _rows(store, t) for t in ("explanations", "scores", "simulations", "llm_calls")}

        server.on(CHAT, Server({}))  # the server recovers
        requests_before = len(server.hits(CHAT))
        with Store.open(path) as store:
            report = run_job(store, store.run(), settings, Selection(limit=5))
            assert report.state == "complete" and report.done == 5 and not report.failed
            # Nothing from the first session was lost or rewritten.
            for table, rows in before.items():
                now = _rows(store, table)
                assert all(row in now for row in rows), table
            assert len(store.summaries(run_id)) == 5
        # Only the failed neurons' work went to the server again.
        new_explains = [r for r in server.hits(CHAT)[requests_before:]
                        if r.body["messages"][0]["content"] == EXPLAIN_SYSTEM]
        assert len(new_explains) == 3


class Slow(Server):
    """The same answers, explanations after `delay` seconds."""

    def __init__(self, delay: float) -> None:
        super().__init__({})
        self.delay = delay

    def __call__(self, body: Any) -> Reply:
        reply = super().__call__(body)
        if body["messages"][0]["content"] == EXPLAIN_SYSTEM:
            reply.delay = self.delay
        return reply


@pytest.mark.parametrize("presses", [1, 2], ids=["once", "twice"])
def test_ctrl_c_waits_for_answers_in_flight_and_twice_stops_waiting(fault_store: Path, tmp_path: Path,
                                                                   presses: int) -> None:
    """One Ctrl-C waits for the requests in flight, and what they bring is logged (paid for, never asked again); a
    second stops waiting at once, giving them up (it used to wait for them all the same, then drop their answers)."""
    path = tmp_path / "slow.duckdb"
    shutil.copy(fault_store, path)
    delay = 3.0 if presses == 1 else 60.0
    with FakeOpenAI() as server:
        server.on(CHAT, Slow(delay))
        spec = f"openai:fake@{server.url}"
        proc = subprocess.Popen(cli_command(["run", "--explainer", spec, "--simulator", spec, "--limit", "3",
                                             "--concurrency", "3", "--store", path]),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # (as in a terminal)
                                env=cli_env(NEURONSCOPE_OPENAI_MODE="chat-digits", NEURONSCOPE_OPENAI_TIMEOUT="90"))
        deadline = time.monotonic() + 120
        while len(server.hits(CHAT)) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert len(server.hits(CHAT)) == 3, proc.communicate()
        pressed = time.monotonic()
        for _ in range(presses):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.5)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted: job 1: "), err
    info = run_cli(["info", "--store", path]).out
    if presses == 1:
        assert "LLM calls logged: 3" in info, info  # the three explanations landed
    else:
        assert time.monotonic() - pressed < 20, "the second Ctrl-C did not stop the wait"
        assert "(3 neurons' requests in flight given up)" in err, err
        assert "LLM calls logged: 0" in info or "LLM calls logged" not in info, info
