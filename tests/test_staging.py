"""Hidden copies written beside a target (core/staging.py): a process killed outright leaves its own behind, and the
next one to stage that target removes it, never a running process's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from neuronscope.core.staging import staged, target_of
from neuronscope.core.store import Store


def test_what_a_killed_process_left_is_removed_and_a_running_ones_kept(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(gone.stdout), os.getppid()
    target = tmp_path / "s.duckdb"
    left = [tmp_path / f".s.duckdb.{dead}.partial", tmp_path / f".s.duckdb.{dead}.partial.wal"]
    kept = [tmp_path / f".s.duckdb.{alive}.partial", tmp_path / f".s.duckdb.{dead}.compact",
            tmp_path / f".other.duckdb.{dead}.partial", tmp_path / "s.duckdb"]
    for path in left + kept:
        path.write_bytes(b"x")
    (tmp_path / f".s.duckdb.{dead}.partial.d").mkdir()  # a shard state's folder
    assert staged(target, "partial") == tmp_path / f".s.duckdb.{os.getpid()}.partial"
    assert sorted(tmp_path.iterdir()) == sorted(kept)
    with Store.output(tmp_path / "new.duckdb") as store:  # a store built under a hidden name does the same
        assert store.path.name == f".new.duckdb.{os.getpid()}.partial"
    (tmp_path / f".s.duckdb.{dead}.compact").write_bytes(b"x")
    with Store.open(target.with_name("t.duckdb")) as store:
        store.compact()
    assert (tmp_path / f".s.duckdb.{dead}.compact").exists()  # another target's


def test_a_message_names_the_target_not_its_hidden_copy() -> None:
    assert target_of("/data/.x.jsonl.16728.partial") == "/data/x.jsonl"  # (export to /proc/x.jsonl: ENOENT there)
    assert target_of("/data/.s.duckdb.12.partial.wal") == "/data/s.duckdb"
    assert [target_of(p) for p in ("/data/.hidden", "/data/s.duckdb", None)] == ["/data/.hidden", "/data/s.duckdb", None]
