"""Failures a script can trust: bounds on every number, outputs written whole or not at all, storage failures as
one line naming the fix (a full disk on a real tmpfs), and no duplicate or empty runs."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FAST, Result, assert_one_line_error, cli_command, cli_env, run_cli

from neuronscope.core.store import Store
from neuronscope.core.store.spool import Spool

pytestmark = pytest.mark.usefixtures("neuronscope_env")


@pytest.mark.parametrize(("args", "needles"), [
    (["top", "--limit", "-5"], ("argument --limit", "-5 is out of range", "at least 1", "neuronscope top --help")),
    (["show", "1/3", "--count", "-1"], ("argument --count", "at least 1")),
    (["related", "--top", "10000000"], ("argument --top", "from 1 to 1,000")),
    (["top", "--limit", "ten"], ("argument --limit", "'ten' is not a whole number")),
    (["top", "--order", "loudest"], ("argument --order", "invalid choice", "density")),
    (["collect", "--top-k", "1000000"], ("argument --top-k", "from 1 to 1,000")),
    (["collect", "--top-k", "0"], ("argument --top-k", "0 is out of range", "from 1 to 1,000")),
    (["import-openai", "x", "--workers", "0"], ("argument --workers", "from 1 to 64")),
    (["related", "--top", "2k"], ("argument --top", "2,000 is out of range", "from 1 to 1,000")),  # 2k is read
    (["collect", "--max-tokens", "1.5"], ("argument --max-tokens", "'1.5' is not a whole number (write 10000000 or 10M)")),
    (["collect", "--checkpoint-every", "soon"], ("argument --checkpoint-every", "not a duration: write 90s, 20m, 1h or off")),
    (["collect", "--checkpoint-every", "0s"], ("argument --checkpoint-every", "'0s' is no interval", "longer than 0")),
    (["collect", "--batch-size", "huge"], ("argument --batch-size", "'huge' is not a batch size: write a number of "
                                           "excerpts (64) or auto")),
    (["collect", "--batch-size", "0"], ("argument --batch-size", "0 is out of range", "from 1 to 65,536")),
    (["top", "--limit", "1" + "0" * 23], ("argument --limit", "is out of range", "below 2^63")),  # a store's BIGINT
    (["show", "1/3", "--run", "abc"], ("argument --run", "'abc' is not a run id", "neuronscope info")),
    (["effects", "1/3", "--factor", "nan"], ("argument --factor", "nan is out of range", "from -1000 to 1000")),
    (["steer", "1/3", "--prompt", "hi", "--scale", "inf"], ("argument --scale", "inf is out of range")),
], ids=["top-limit", "show-count", "related-top", "not-a-number", "unknown-order", "top-k", "top-k-zero", "workers",
        "suffix", "not-whole", "duration", "duration-zero", "batch-size-word", "batch-size-zero", "huge-limit", "run-id", "nan", "inf"])
def test_numbers_out_of_bounds_are_one_line(cli_store: tuple[Path, Result], args: list[str],
                                            needles: tuple[str, ...]) -> None:
    path, _ = cli_store
    before = path.stat().st_mtime_ns
    assert_one_line_error(run_cli([*args, "--store", path]), *needles)
    assert path.stat().st_mtime_ns == before


def test_a_reader_that_stops_reading_ends_the_command_quietly(cli_store: tuple[Path, Result]) -> None:
    """`neuronscope show … | head`: once the pipe's reader has gone, the command stops printing and exits 0 without
    a word (Rich's own handling exited 1); text with invalid UTF-8 bytes on the command line is text."""
    path, _ = cli_store
    for args in (["show", "1/3"], ["probe", "caf\udce9 au lait"]):  # (a byte 0xe9 alone, as Python keeps it)
        proc = subprocess.Popen(cli_command([*args, "--store", path]), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=cli_env())
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # the reader is gone before the first line
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 0 and "error" not in err, err


def test_errors_a_reader_no_longer_reads_keep_their_exit_status(tmp_path: Path) -> None:
    """`neuronscope … 2>&1 | tee log`, where Ctrl-C stops tee as well: the line that cannot be written is dropped,
    and the status says what happened (2 here, an error; it was 1, Rich's own for a closed pipe)."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    proc = subprocess.Popen(cli_command(["info", "--store", tmp_path / "none.duckdb"]), stdout=subprocess.DEVNULL,
                            stderr=write, env=cli_env())
    os.close(write)
    assert proc.wait(timeout=120) == 2


def test_an_excerpt_longer_than_the_model_reads_is_refused(tmp_path: Path, tiny_model: Path,
                                                          corpus_dir: Path) -> None:
    store = tmp_path / "s.duckdb"
    result = run_cli(["collect", "--model", tiny_model, "--corpus", corpus_dir, "--store", store, *FAST,
                      "--length", "500"])
    assert_one_line_error(result, "--length 500 is longer than", "pass --length")
    assert not store.exists() and not list(tmp_path.iterdir())  # no empty store left behind


def test_a_command_on_a_missing_store_creates_none(tmp_path: Path) -> None:
    assert_one_line_error(run_cli(["related", "--store", tmp_path / "none.duckdb"]), "no store at", "collect")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_collect_leaves_no_store(tmp_path: Path, tiny_model: Path) -> None:
    store = tmp_path / "new.duckdb"
    result = run_cli(["collect", "--model", tiny_model, "--corpus", tmp_path / "missing.txt", "--store", store, *FAST])
    assert_one_line_error(result, "missing.txt")
    assert list(tmp_path.iterdir()) == []


def test_exporting_a_run_that_is_not_complete_is_refused(cli_store: tuple[Path, Result], tmp_path: Path) -> None:
    store = tmp_path / "s.duckdb"
    shutil.copy(cli_store[0], store)
    with Store.open(store) as s:
        s.set_run_status(s.run().run_id, "interrupted")
    result = run_cli(["export", "--format", "jsonl", "--out", tmp_path / "out.jsonl", "--run", "1", "--store", store])
    assert_one_line_error(result, "run 1 is interrupted", "collect it again", "neuronscope info")
    assert not (tmp_path / "out.jsonl").exists()


def test_a_store_without_a_schema_version_says_so(tmp_path: Path) -> None:
    store = tmp_path / "s.duckdb"
    with Store.open(store) as s:
        s.con.execute("DELETE FROM meta WHERE key = 'schema_version'")
    assert_one_line_error(run_cli(["info", "--store", store]), "records no schema version", "pass another --store")


# -- a full disk, on a real tmpfs ------------------------------------------------------------------------

@contextlib.contextmanager
def small_disk(tmp_path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at a fresh folder (root only: CI runs as root)."""
    mount = tmp_path / f"disk-{size}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_an_export_that_fills_the_disk_leaves_nothing_and_can_be_retried(cli_store: tuple[Path, Result],
                                                                         tmp_path: Path) -> None:
    path, _ = cli_store
    with small_disk(tmp_path, "64k") as disk:
        for fmt, out in (("jsonl", disk / "run.jsonl"), ("openai", disk / "release")):
            result = run_cli(["export", "--format", fmt, "--out", out, "--store", path])
            line = assert_one_line_error(result, "the disk is full", "free space there", "No space left on device")
            assert list(disk.iterdir()) == [], line  # no partial file, no staged leftovers
        retry = run_cli(["export", "--format", "jsonl", "--out", tmp_path / "run.jsonl", "--store", path])
        assert retry.code == 0 and (tmp_path / "run.jsonl").stat().st_size > 0, retry.err


def test_a_collect_that_fills_the_disk_is_one_line_and_leaves_no_store(tmp_path: Path, tiny_model: Path,
                                                                     corpus_dir: Path) -> None:
    with small_disk(tmp_path, "256k") as disk:
        result = run_cli(["collect", "--model", tiny_model, "--corpus", corpus_dir, "--store", disk / "s.duckdb",
                          *FAST])
        assert result.code == 2 and "Traceback" not in result.err, result.err
        last = result.err.strip().splitlines()[-1]  # after the progress lines of the steps that ran
        assert last.startswith("error: the disk is full") and "run the same command again" in last, last
        assert "No space left on device" in last
        assert list(disk.iterdir()) == []


# -- runs whose process is gone -------------------------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_reused_process_id_is_not_taken_for_the_owner(cli_store: tuple[Path, Result], tmp_path: Path) -> None:
    """A run is 'running' only while the process that started it runs: the same id given to a later process (here:
    a live process with another start time) does not keep it running."""
    from neuronscope.core.store.runs import process_start

    store = tmp_path / "s.duckdb"
    shutil.copy(cli_store[0], store)
    other = subprocess.Popen(["sleep", "60"])
    try:
        with Store.open(store) as s:
            run_id = s.create_run(model="m", revision="r", corpus="c", settings=s.run().settings, layers=(0,),
                                  neurons_per_layer=4, dtype="float32")
            s.con.execute("UPDATE runs SET pid = ?, owner_start = ? WHERE run_id = ?",
                          [other.pid, process_start(other.pid), run_id])
        with Store.open(store, read_only=True) as s:
            assert s.run(run_id).status == "running"  # its real owner still runs
        with Store.open(store) as s:
            s.con.execute("UPDATE runs SET owner_start = owner_start - 3600 WHERE run_id = ?", [run_id])
        with Store.open(store, read_only=True) as s:
            assert s.run(run_id).status == "interrupted"  # same id, another process
    finally:
        other.kill()


def test_an_import_killed_midway_reads_as_interrupted_and_says_how_to_resume(cli_store: tuple[Path, Result],
                                                                            tmp_path: Path) -> None:
    store = tmp_path / "s.duckdb"
    with Store.open(cli_store[0], read_only=True) as collected:
        settings = collected.run().settings
    with Store.open(store) as s:
        run_id = s.create_run(model="gpt2-xl", revision="release", corpus="openai-release:/x", settings=settings,
                              layers=(0,), neurons_per_layer=4, dtype="float32")
        s.set_run_status(run_id, "importing")
        s.con.execute("UPDATE runs SET pid = ? WHERE run_id = ?", [_dead_pid(), run_id])
    info = run_cli(["info", "--store", store])
    assert f"run {run_id}  interrupted" in info.out and "neuronscope clean" in info.out, info.out
    line = assert_one_line_error(run_cli(["top", "--store", store]), f"run {run_id} is interrupted",
                                 "finish it with the command that made it")
    assert "run `neuronscope collect` first" not in line


def test_clean_removes_unfinished_runs_and_compacts(cli_store: tuple[Path, Result], tmp_path: Path) -> None:
    store = tmp_path / "s.duckdb"
    shutil.copy(cli_store[0], store)
    with Store.open(store) as s:
        kept = s.run()
        counts = s.run_counts(kept.run_id)
        stale = s.create_run(model="m", revision="r", corpus="c", settings=kept.settings, layers=kept.layers,
                             neurons_per_layer=kept.neurons_per_layer, dtype="float32")
        s.con.execute("INSERT INTO excerpts SELECT ?, excerpt_id, token_ids, tokens FROM excerpts WHERE run_id = ?",
                      [stale, kept.run_id])
        s.con.execute("UPDATE runs SET pid = ? WHERE run_id = ?", [_dead_pid(), stale])
        s.checkpoint()
    grown = store.stat().st_size
    result = run_cli(["clean", "--store", store])
    assert result.code == 0 and f"removed run {stale} (interrupted)" in result.err, result.err
    with Store.open(store, read_only=True) as s:
        assert [r.run_id for r in s.runs()] == [kept.run_id] and s.run_counts(kept.run_id) == counts
        assert s.counts()["excerpts"] == counts["excerpts"]
    assert store.stat().st_size < grown
    again = run_cli(["show", "1/3", "--store", store])  # the compacted store reads as before
    assert again.code == 0 and "Top excerpts" in again.out, again.err


# -- secrets --------------------------------------------------------------------------------------------

def test_a_key_a_server_echoes_in_a_good_answer_is_never_stored(cli_store: tuple[Path, Result], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that puts the API key (and the bearer header it got) into a 200 answer: the explanation, the call
    log and `show` hold neither."""
    from fake_openai import CHAT, FakeOpenAI, chat_answer

    key = "sk-test-9f8e7d6c5b4a39281706"
    store = tmp_path / "s.duckdb"
    shutil.copy(cli_store[0], store)
    monkeypatch.setenv("OPENAI_API_KEY", key)
    with FakeOpenAI() as server:
        server.on(CHAT, lambda body: chat_answer(f'the word "cat" (your key {key}, header Bearer {key})'))
        result = run_cli(["explain", "1/3", "--explainer", f"openai:fake@{server.url}", "--store", store],
                         OPENAI_API_KEY=key)
    assert result.code == 0, result.err
    with Store.open(store, read_only=True) as s:
        texts = [e.text for e in s.explanations(s.run().run_id, 1, 3) if e.role == "candidate"]
        logged = s.con.execute("SELECT prompt || response FROM llm_calls").fetchall()
    assert texts and all(key not in t and "***" in t for t in texts), texts
    assert logged and all(key not in row[0] for row in logged)
    shown = run_cli(["show", "1/3", "--store", store])
    assert shown.code == 0 and key not in shown.out and "Bearer ***" in shown.out


# -- jobs: exit statuses and failing fast ---------------------------------------------------------------

def test_a_job_against_a_dead_server_stops_within_seconds(tmp_path: Path) -> None:
    """Nothing listens at the URL: a 1,000-neuron job stops after three neurons in a row fail the same way, with one
    line naming the cause, instead of retrying every neuron for hours; the same command resumes it later."""
    import sys
    import time

    store = tmp_path / "s.duckdb"  # 1,000 synthetic neurons through the store API (bench/make_store.py)
    bench = Path(__file__).resolve().parent.parent / "bench" / "make_store.py"
    made = subprocess.run([sys.executable, str(bench), str(store), "--layers", "1", "--neurons", "1000",
                           "--no-related"], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-2000:]
    start = time.perf_counter()
    result = run_cli(["run", "--explainer", "openai:m@http://127.0.0.1:1/v1", "--limit", "1000", "--store", store])
    assert time.perf_counter() - start < 30  # three neurons' two quick tries each, plus start-up (2.5 s here)
    assert result.code == 2 and "Traceback" not in result.err, result.err
    last = result.err.strip().splitlines()[-1]
    assert re.match(r"error: job \d+ stopped: 3 neurons in a row failed the same way \(unreachable\)", last), last
    assert "connection refused" in last and "run the same command to resume" in last
    with Store.open(store, read_only=True) as s:
        job = s.jobs()[-1]
        assert (job["state"], job["failed"], job["done"], job["total"]) == ("failed", 3, 0, 1000)


def test_a_bad_key_stops_the_job_and_names_the_fix(cli_store: tuple[Path, Result], tmp_path: Path) -> None:
    from fake_openai import CHAT, FakeOpenAI, error

    store = tmp_path / "s.duckdb"
    shutil.copy(cli_store[0], store)
    with FakeOpenAI() as server:
        server.on(CHAT, lambda body: error(401, "invalid api key"))
        result = run_cli(["explain", "--explainer", f"openai:m@{server.url}", "--limit", "50", "--store", store])
        assert len(server.hits(CHAT)) == 3  # one request per neuron, none retried
    last = result.err.strip().splitlines()[-1]
    assert result.code == 2 and "(authentication)" in last and "check OPENAI_API_KEY" in last, result.err
    assert not Spool(store).root.exists()  # what the stopped job wrote beside the store is folded in, as after any job
    with Store.open(store, read_only=True) as s:
        assert s.jobs()[-1]["state"] == "failed"


def test_a_job_that_leaves_neurons_unfinished_exits_3(cli_store: tuple[Path, Result], tmp_path: Path) -> None:
    """Some neurons failed (here: nothing stored to score): not 0, and not an error either; the line says what
    mends them (explaining them: a retry alone would fail again)."""
    store = tmp_path / "s.duckdb"
    shutil.copy(cli_store[0], store)
    result = run_cli(["score", "--explainer", "baseline", "--limit", "2", "--store", store])
    assert result.code == 3, result.err
    assert "0/2 neurons done, 2 failed (explain them first, or pass --explanation)" in result.err
    done = run_cli(["run", "--explainer", "baseline", "--limit", "2", "--store", store])
    assert done.code == 0, done.err


@pytest.mark.parametrize(("args", "needle"), [
    (["run", "--max-tokens", "-5"], "argument --max-tokens: -5 is out of range"),
    (["score", "--explanation", "  "], "--explanation is empty"),
    (["run", "--samples", "100000"], "argument --samples"),
    (["explain", "--train", "0"], "argument --train"),
], ids=["max-tokens", "empty-explanation", "samples", "train"])
def test_job_numbers_and_texts_are_checked(cli_store: tuple[Path, Result], args: list[str], needle: str) -> None:
    assert_one_line_error(run_cli([*args, "--explainer", "baseline", "--store", cli_store[0]]), needle)


# -- damaged stores, read-only places, damaged weights --------------------------------------------------

def _damaged_copies(source: Path, folder: Path) -> dict[str, Path]:
    size = source.stat().st_size
    truncated, flipped = folder / "truncated.duckdb", folder / "flipped.duckdb"
    shutil.copy(source, truncated)
    with truncated.open("r+b") as f:
        f.truncate(size // 2)
    shutil.copy(source, flipped)
    with flipped.open("r+b") as f:
        for offset in range(12_288 + 100, size, 262_144):  # a few bytes in every block DuckDB checksums
            f.seek(offset)
            chunk = f.read(64)
            f.seek(offset)
            f.write(bytes(b ^ 0xFF for b in chunk))
    return {"truncated": truncated, "flipped": flipped}


def test_a_damaged_store_is_one_line_naming_the_fix(cli_store: tuple[Path, Result], tmp_path: Path) -> None:
    for name, path in _damaged_copies(cli_store[0], tmp_path).items():
        for command in (["info"], ["show", "1/3"], ["run", "--explainer", "baseline", "--limit", "2"]):
            line = assert_one_line_error(run_cli([*command, "--store", path]), "the store is damaged",
                                         "restore it from a copy")
            assert "internal error" not in line, (name, command)


def test_a_store_on_a_read_only_file_system_says_so(cli_store: tuple[Path, Result], tmp_path: Path) -> None:
    with small_disk(tmp_path, "8m") as disk:
        shutil.copy(cli_store[0], disk / "s.duckdb")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        assert run_cli(["show", "1/3", "--store", disk / "s.duckdb"]).code == 0  # reading still works
        result = run_cli(["run", "--explainer", "baseline", "--limit", "2", "--store", disk / "s.duckdb"])
        assert_one_line_error(result, "read-only", "write the store or output somewhere writable")
        export = run_cli(["export", "--format", "jsonl", "--out", disk / "x.jsonl", "--store", cli_store[0]])
        assert_one_line_error(export, "read-only")


def test_damaged_model_weights_are_one_line(tiny_model: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    weights = model / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    result = run_cli(["collect", "--model", model, "--corpus", "default", "--store", tmp_path / "s.duckdb", *FAST])
    assert_one_line_error(result, "weight files are damaged or incomplete", "copy or download them again")
    assert not (tmp_path / "s.duckdb").exists()


def test_a_job_that_fills_the_disk_is_one_line_and_resumes(cli_store: tuple[Path, Result], tmp_path: Path) -> None:
    """The disk fills while a job writes its results: one line naming the fix, the store still opens, and once
    there is room the same command finishes the job."""
    with small_disk(tmp_path, "6m") as disk:
        store = disk / "s.duckdb"
        shutil.copy(cli_store[0], store)
        filler = disk / "filler"
        free = shutil.disk_usage(disk).free
        filler.write_bytes(b"\0" * max(free - 48 * 1024, 0))  # leave ~48 KB: less than the job's results
        result = run_cli(["run", "--explainer", "baseline", "--limit", "40", "--store", store])
        assert result.code == 2 and "Traceback" not in result.err, result.err
        last = result.err.strip().splitlines()[-1]
        assert last.startswith("error: the disk is full") and "run the same command again" in last, last
        filler.unlink()
        again = run_cli(["run", "--explainer", "baseline", "--limit", "40", "--store", store])
        assert again.code == 0 and "40/40 neurons done" in again.err, again.err
