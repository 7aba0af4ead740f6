"""The store's runs: registering a collection or import, its status, and who is writing it (a process id and
that process's start time, so a reused id is not taken for a live writer). Mixed into neuronscope.core.store.Store."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from functools import cache
from pathlib import Path
from typing import Any

from neuronscope.core.records import CollectSettings, RunInfo
from neuronscope.core.store.schema import StoreError

_RUN_COLUMNS = (
    "run_id, model, model_revision, corpus, settings, layers, neurons_per_layer, status, "
    "strftime(created_at, '%Y-%m-%d %H:%M:%S'), n_excerpts, shard, dtype, error, pid, {units}"
)


def settings_to_json(settings: CollectSettings) -> str:
    """Stable JSON of collection settings (a setting added later is left out at its default, so a run's settings read
    as they did before it existed)."""
    data = asdict(settings)
    if not data["skip_positions"]:
        del data["skip_positions"]
    return json.dumps(data, sort_keys=True)


def settings_from_json(text: str) -> CollectSettings:
    """Inverse of settings_to_json."""
    data = json.loads(text)
    data["quantiles"] = tuple(data["quantiles"])
    return CollectSettings(**data)


def process_start(pid: int) -> float | None:
    """When a process started, in epoch seconds (Linux /proc; None elsewhere or when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def named_process(pid: int | None) -> str:
    """A process as a person recognises it: "PID 4242 (neuronscope browse s.duckdb)", its command line with the
    interpreter and folders left out, at most 60 characters (Linux /proc; elsewhere only the PID); "another process"
    without an id."""
    if not pid:
        return "another process"
    try:
        words = [word for word in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
                 if word]
    except OSError:
        words = []
    if words and Path(words[0]).name.startswith("python"):
        words = words[1:]
        if words[:1] == ["-m"]:
            words = words[1:]
    text = " ".join([Path(words[0]).name, *words[1:]]) if words else ""
    text = text if len(text) <= 60 else text[:59] + "…"
    return f"PID {pid} ({text})" if text else f"PID {pid}"


def unfinished_advice(run: RunInfo) -> str:
    """What to do about a run that is not complete (a collection still in its pass, or one that stopped)."""
    if run.status == "running":
        return "it is being collected, and its data lands when the pass ends; `neuronscope info` lists the runs"
    return "finish it with the command that made it, or `neuronscope collect`; `neuronscope info` lists the runs"


@cache
def this_owner() -> tuple[int, float | None]:
    """This process as an owner: its id and start time."""
    return os.getpid(), process_start(os.getpid())


def owner_alive(pid: int | None, started: float | None) -> bool:
    """Whether the process that wrote a running row still runs: its id exists and, where both start times are
    known, it is the same process (not a later one given the same id)."""
    if not pid:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = process_start(pid)
    return started is None or now is None or abs(now - started) < 2.0


class RunsMixin:
    """Runs and their owners."""

    con: Any
    path: Path
    def create_run(
        self,
        *,
        model: str,
        revision: str,
        corpus: str,
        settings: CollectSettings,
        layers: tuple[int, ...],
        neurons_per_layer: int,
        dtype: str,
        shard: str = "",
        units: str = "",
    ) -> int:
        """Register a run as 'running' (committed at once, so an interruption is visible)."""
        row = self.con.execute(
            "INSERT INTO runs (model, model_revision, corpus, settings, layers, neurons_per_layer, dtype, shard, "
            "status, pid, owner_start, units) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'running', ?, ?, ?) RETURNING run_id",
            [model, revision, corpus, settings_to_json(settings), list(layers), neurons_per_layer, dtype, shard,
             *this_owner(), units],
        ).fetchall()
        return int(row[0][0])

    @property
    def _run_columns(self) -> str:
        """The run columns read, units as '' where an older store, opened read-only, lacks the column."""
        return _RUN_COLUMNS.format(units="units" if self._has_column("units") else "''")

    def _has_column(self, column: str, table: str = "runs") -> bool:
        """Whether a table has a column added without a version bump (a writable open adds them to older stores;
        asked once per open store)."""
        key = f"_column_{table}_{column}"
        if key not in self.__dict__:
            rows = self.con.execute("SELECT count(*) FROM information_schema.columns WHERE table_name = ? "
                                    "AND column_name = ?", [table, column]).fetchall()
            self.__dict__[key] = bool(rows[0][0])
        return bool(self.__dict__[key])

    def _has_table(self, table: str) -> bool:
        """Whether the store has a table added without a version bump (related lists, tags: a writable open makes
        them, nothing drops them; asked once per open store)."""
        key = f"_table_{table}"
        if key not in self.__dict__:
            rows = self.con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?",
                                    [table]).fetchall()
            self.__dict__[key] = bool(rows[0][0])
        return bool(self.__dict__[key])

    def _claim(self, table: str, key: str, row_id: int) -> None:
        """Record this process as the owner of a running run or job (its id and start time)."""
        self.con.execute(f"UPDATE {table} SET pid = ?, owner_start = ? WHERE {key} = ?", [*this_owner(), row_id])

    def _owner_gone(self, table: str, key: str, row_id: int, pid: int | None) -> bool:
        """Whether a running run's or job's owner has stopped (by its id and, where recorded, its start time)."""
        if pid == os.getpid():
            return False
        started = None
        if self._has_owner_start():
            rows = self.con.execute(f"SELECT owner_start FROM {table} WHERE {key} = ?", [row_id]).fetchall()
            started = rows[0][0] if rows else None
        return not owner_alive(pid, started)

    def _has_owner_start(self) -> bool:
        """Whether the store records owners' start times (a writable open adds the columns to older stores)."""
        return self._has_column("owner_start")

    def _require_neurons(self, run_id: int) -> None:
        """A run is complete only if it holds a neuron: an empty 'complete' run would become the default run."""
        if not self.con.execute("SELECT count(*) FROM neurons WHERE run_id = ?", [run_id]).fetchall()[0][0]:
            raise StoreError(f"run {run_id} holds no neuron, so it cannot be marked complete")

    def finish_run(self, run_id: int, n_excerpts: int) -> None:
        """Mark a run complete (call inside the transaction that wrote its data)."""
        self._require_neurons(run_id)
        self.con.execute(
            "UPDATE runs SET status = 'complete', n_excerpts = ?, finished_at = current_timestamp WHERE run_id = ?",
            [n_excerpts, run_id],
        )

    def fail_run(self, run_id: int, status: str, error: str = "") -> None:
        """Mark a run interrupted or failed and drop any of its rows."""
        with self.transaction():  # type: ignore[attr-defined]
            self._delete_run_data(run_id)
            self.con.execute("UPDATE runs SET status = ?, error = ? WHERE run_id = ?", [status, error, run_id])

    def _delete_run_data(self, run_id: int) -> None:
        tables = ["excerpts", "neurons", "records"] + (["related"] if self._has_table("related") else [])
        for table in tables:
            self.con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])

    def remove_unfinished_runs(self) -> list[RunInfo]:
        """Remove the runs that did not finish (interrupted or failed, a stale 'running' included) with everything
        they hold and every job on them; the runs removed."""
        self.mark_stale_runs()
        self.mark_stale_jobs()  # type: ignore[attr-defined]
        gone = [r for r in self.runs() if r.status in ("interrupted", "failed")]
        with self.transaction():  # type: ignore[attr-defined]
            for run in gone:
                self._delete_run_data(run.run_id)
                jobs = "SELECT job_id FROM jobs WHERE run_id = ?"
                explained = "SELECT explanation_id FROM explanations WHERE run_id = ?"
                for sql in (f"DELETE FROM simulations WHERE explanation_id IN ({explained})",
                            f"DELETE FROM scores WHERE explanation_id IN ({explained})",
                            "DELETE FROM explanations WHERE run_id = ?",
                            f"DELETE FROM job_neurons WHERE job_id IN ({jobs})",
                            "DELETE FROM jobs WHERE run_id = ?",
                            "DELETE FROM runs WHERE run_id = ?"):
                    self.con.execute(sql, [run.run_id])
        return gone

    def set_run_status(self, run_id: int, status: str, *, n_excerpts: int | None = None) -> None:
        """Set a run's status (and, when given, its excerpt count; 'complete' also stamps the finish time). A run
        set running or importing is this process's."""
        if status == "complete":
            self._require_neurons(run_id)
        if status in ("running", "importing"):
            self._claim("runs", "run_id", run_id)
        self.con.execute(
            "UPDATE runs SET status = ?, n_excerpts = coalesce(?, n_excerpts), finished_at = CASE WHEN ? = 'complete' "
            "THEN current_timestamp ELSE finished_at END WHERE run_id = ?", [status, n_excerpts, status, run_id])

    def set_run_shape(self, run_id: int, layers: tuple[int, ...], neurons_per_layer: int) -> None:
        """Change the layers and width a run holds (an import that adds layers)."""
        self.con.execute("UPDATE runs SET layers = ?, neurons_per_layer = ? WHERE run_id = ?",
                         [list(layers), neurons_per_layer, run_id])

    def find_run(self, model: str, corpus: str) -> int | None:
        """The newest run of a model over a corpus, whatever its status."""
        rows = self.con.execute("SELECT run_id FROM runs WHERE model = ? AND corpus = ? ORDER BY run_id DESC LIMIT 1",
                                [model, corpus]).fetchall()
        return int(rows[0][0]) if rows else None

    def mark_stale_runs(self) -> None:
        """Runs left 'running' by a process that no longer runs become 'interrupted'; imports left 'importing' keep
        what they wrote (the same command resumes them) and become 'interrupted' too."""
        for run_id, pid, status in self.con.execute(
                "SELECT run_id, pid, status FROM runs WHERE status IN ('running', 'importing')").fetchall():
            if self._owner_gone("runs", "run_id", run_id, pid):
                if status == "running":
                    self.fail_run(run_id, "interrupted", "the collecting process stopped before it finished")
                else:
                    self.con.execute("UPDATE runs SET status = 'interrupted', error = ? WHERE run_id = ?",
                                     ["the import stopped before it finished: run the same import-openai command "
                                      "to resume it", run_id])

    def runs(self) -> list[RunInfo]:
        """Every run, oldest first; a 'running' run whose process is gone shows as interrupted."""
        rows = self.con.execute(f"SELECT {self._run_columns} FROM runs ORDER BY run_id").fetchall()
        return [self._run_info(r) for r in rows]

    def run(self, run_id: int | None = None) -> RunInfo:
        """One run by id, or the newest complete one; StoreError if there is none."""
        if run_id is None:
            rows = self.con.execute(
                f"SELECT {self._run_columns} FROM runs WHERE status = 'complete' ORDER BY run_id DESC LIMIT 1"
            ).fetchall()
            if not rows:
                runs = self.runs()
                if not runs:
                    raise StoreError(f"{self.path} has no complete run: run `neuronscope collect` first")
                last = runs[-1]
                raise StoreError(f"{self.path} has no complete run (run {last.run_id} is {last.status}"
                                 f"{': ' + last.error if last.error else ''}): {unfinished_advice(last)}")
        else:
            rows = self.con.execute(f"SELECT {self._run_columns} FROM runs WHERE run_id = ?", [run_id]).fetchall()
            if not rows:
                raise StoreError(f"{self.path} has no run {run_id}: `neuronscope info` lists the runs")
        return self._run_info(rows[0])

    def find_complete_run(self, revision: str, corpus: str, settings: CollectSettings,
                          layers: tuple[int, ...], shard: str, units: str = "") -> RunInfo | None:
        """A complete run with exactly these inputs, if one exists."""
        rows = self.con.execute(
            f"SELECT {self._run_columns} FROM runs WHERE status = 'complete' AND model_revision = ? AND corpus = ? "
            "AND settings = ? AND layers = ? AND shard = ? ORDER BY run_id DESC",
            [revision, corpus, settings_to_json(settings), list(layers), shard],
        ).fetchall()
        found = [info for info in map(self._run_info, rows) if info.units == units]
        return found[0] if found else None

    def _run_info(self, row: tuple) -> RunInfo:  # type: ignore[type-arg]
        status = row[7]
        if status in ("running", "importing") and self._owner_gone("runs", "run_id", row[0], row[13]):
            status = "interrupted"
        return RunInfo(
            run_id=row[0], model=row[1], model_revision=row[2], corpus=row[3],
            settings=settings_from_json(row[4]), layers=tuple(row[5]), neurons_per_layer=row[6], status=status,
            created_at=row[8], n_excerpts=row[9], shard=row[10] or "", dtype=row[11] or "", error=row[12] or "",
            units=row[14] or "",
        )
