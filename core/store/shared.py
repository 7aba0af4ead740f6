"""A store opened read-only, shared with other processes, with the spool's segments laid over its tables.

A read-only open attaches the store file read-only to an in-memory database, whose views, named like the store's
tables, add the rows of the spool's segments (neuronscope.core.store.spool): so every query of the store reads the
same SQL whether or not jobs are writing beside it, on any cursor. The small tables that browsing sorts and joins
are copied into memory a segment at a time (`refresh`); simulations and the call log are read in place. Such a
store also writes, as a job does: each transaction becomes one segment (a person's tags, notes and lists too:
neuronscope.core.store.triage). A writable open folds the segments into the store (`fold`). Mixed into neuronscope.core.store.Store.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from neuronscope.core.store.schema import SCHEMA_VERSION
from neuronscope.core.store.spool import COPIED, IN_PLACE, Spool
from neuronscope.core.store.triage import PRUNE_LISTS, TRIAGE_FOLD, TRIAGE_SPOOLED, TRIAGE_VIEWS

#: The tables of ids that segments share, and the counters the spool keeps for them (the store's sequences).
ID_COLUMNS = {"explanation_ids": ("explanations", "explanation_id"), "call_ids": ("llm_calls", "call_id"),
              "job_ids": ("jobs", "job_id")}
#: The time a row was written, where the store's tables have a default for it.
STAMPED = {"explanations": "created_at", "scores": "created_at", "llm_calls": "created_at",
           "job_neurons": "updated_at", "jobs": "created_at", "tags": "created_at", "tag_removals": "created_at",
           "lists": "saved_at"}
#: How often a process waiting on a fold (its own, or another's it stepped aside for) looks again.
FOLD_POLL_SECONDS = 0.1
_EVENT_COLUMNS = "job_id BIGINT, state VARCHAR, error VARCHAR, pid INTEGER, owner_start DOUBLE, updated_at TIMESTAMP"


def now() -> datetime.datetime:
    """The time a spooled row is stamped with: local time without a zone, as the store's defaults are."""
    return datetime.datetime.now()


@dataclass
class Shared:
    """What all cursors of one read-only open share: the spool, the segments already loaded, where each spooled call
    is, and the rows of the transaction being written."""

    spool: Spool
    columns: dict[str, list[str]]
    folded: set[str]  # segments in the store already (a fold killed before it deleted them)
    loaded: set[str] = field(default_factory=set)
    lock: threading.RLock = field(default_factory=threading.RLock)
    files: dict[str, list[str]] = field(default_factory=lambda: {t: [] for t in IN_PLACE})
    calls: dict[str, str] = field(default_factory=dict)  # cache key -> the llm_calls file it is in
    ranges: list[tuple[int, int, str]] = field(default_factory=list)  # simulations files' explanation id ranges
    floors: dict[str, int] = field(default_factory=dict)
    seq: int = 0  # refreshes that took in segments (a reader redraws when it moves)
    pending: dict[str, list[Any]] | None = None


class SharedMixin:
    con: Any
    path: Any
    shared: Shared | None
    owner: Any  # (Store | None: the Store whose connection this one is a cursor of)
    turn: threading.RLock
    closed = False  # closed for another process (close_shared) until it opens again
    paused = False  # a cursor closed while its owner steps aside (step_aside)
    writer: int | None = None  # the process that held the store for writing when it last tried to open again

    # -- opening ------------------------------------------------------------------------------------
    def _share(self, spool: Spool) -> None:
        """Lay the spool over the attached store `store`: memory tables for the copied rows, views for every table."""
        rows = self.con.execute("SELECT table_name, column_name FROM information_schema.columns "
                                "WHERE table_catalog = 'store' AND table_schema = 'main' "
                                "ORDER BY table_name, ordinal_position").fetchall()
        columns: dict[str, list[str]] = {}
        for table, column in rows:
            columns.setdefault(table, []).append(column)
        folded = set()
        if "spool_folded" in columns:
            folded = {r[0] for r in self.con.execute("SELECT name FROM store.main.spool_folded").fetchall()}
        version = self.con.execute("SELECT value FROM store.main.meta WHERE key = 'schema_version'").fetchall() \
            if "meta" in columns else []
        if version != [(str(SCHEMA_VERSION),)]:  # not a store of this version: the version check says what to do
            for table in columns:
                self.con.execute(f"CREATE VIEW main.{table} AS SELECT * FROM store.main.{table}")
            return
        self.shared = Shared(spool, columns, folded)
        for table in ("explanations", "scores", "jobs"):
            self.con.execute(f"CREATE TABLE spool_{table} AS SELECT * FROM store.main.{table} LIMIT 0")
        self.con.execute("CREATE TABLE spool_job_neurons AS SELECT *, ''::VARCHAR AS prev, 0::BIGINT AS seq "
                         "FROM store.main.job_neurons LIMIT 0")
        self.con.execute(f"CREATE TABLE spool_job_events ({_EVENT_COLUMNS}, seq BIGINT)")
        for table in columns:
            if table != "spool_folded":
                self._view(table)
        for table, spooled in TRIAGE_SPOOLED.items():  # laid over the store's, or alone where it has none yet
            self.con.execute(f"CREATE TABLE spool_{table} ({spooled})")
        for table, view in TRIAGE_VIEWS.items():
            stored = f"SELECT * FROM store.main.{table}" if table in columns else f"SELECT * FROM spool_{table} WHERE false"
            self.con.execute(f"CREATE OR REPLACE VIEW main.{table} AS {view.format(store=stored)}")
        self.refresh()

    def _view(self, table: str) -> None:
        """(Re)define the view of one table: the store's rows, and the spool's."""
        assert self.shared is not None
        columns = self.shared.columns[table]
        sql = f"SELECT * FROM store.main.{table}"
        if table in ("explanations", "scores"):
            sql += f" UNION ALL SELECT * FROM spool_{table}"
        elif table in IN_PLACE and self.shared.files[table]:
            files = ", ".join(sql_literal(f) for f in self.shared.files[table])
            sql += f" UNION ALL BY NAME SELECT * FROM read_parquet([{files}])"
        elif table == "job_neurons":
            sql = (f"{sql} b WHERE NOT EXISTS (SELECT 1 FROM spool_job_neurons s WHERE s.job_id = b.job_id "
                   "AND s.layer = b.layer AND s.neuron = b.neuron) UNION ALL SELECT * EXCLUDE (prev, seq) FROM "
                   "spool_job_neurons QUALIFY row_number() OVER (PARTITION BY job_id, layer, neuron ORDER BY seq DESC) = 1")
        elif table == "jobs":
            latest = {"state": "coalesce(e.state, j.state)", "error": "coalesce(e.error, j.error)",
                      "pid": "coalesce(e.pid, j.pid)", "owner_start": "coalesce(e.owner_start, j.owner_start)",
                      "updated_at": "coalesce(e.updated_at, j.updated_at)",
                      "done": "j.done + coalesce(d.done, 0)", "failed": "j.failed + coalesce(d.failed, 0)"}
            picked = ", ".join(f"{latest.get(c, 'j.' + c)} AS {c}" for c in columns)
            sql = (f"WITH j AS ({sql} UNION ALL SELECT * FROM spool_jobs), "
                   f"{_LATEST_EVENTS.format(source='spool_job_events')}, {_DELTAS.format(source='spool_job_neurons')} "
                   f"SELECT {picked} FROM j LEFT JOIN e USING (job_id) LEFT JOIN d USING (job_id)")
        self.con.execute(f"CREATE OR REPLACE VIEW main.{table} AS {sql}")

    def refresh(self) -> bool:
        """Take in the segments published since the last refresh; whether there were any. Cheap when there are
        none (one directory listing)."""
        shared = self.shared
        if shared is None:
            return False
        with shared.lock:
            new = [n for n in shared.spool.names() if n not in shared.loaded and n not in shared.folded]
            if not new:
                return False
            shared.seq += 1
            for table in COPIED + IN_PLACE:
                paths = [str(p) for p in (shared.spool.file(n, table) for n in new) if p.exists()]
                if not paths or (table not in shared.columns and table != "job_events" and table not in TRIAGE_SPOOLED):
                    continue
                source = f"read_parquet([{', '.join(map(sql_literal, paths))}], filename = true, file_row_number = true)"
                if table in ("job_neurons", "job_events"):  # in the order written
                    self.con.execute(f"INSERT INTO spool_{table} BY NAME SELECT * EXCLUDE (filename, file_row_number), "
                                     f"{shared.seq * 1_000_000_000} + row_number() OVER (ORDER BY filename, "
                                     f"file_row_number) AS seq FROM {source}")
                elif table in COPIED:
                    self.con.execute(f"INSERT INTO spool_{table} BY NAME SELECT * EXCLUDE (filename, file_row_number) "
                                     f"FROM {source}")
                else:
                    shared.files[table].extend(paths)
                    self._view(table)
                    if table == "llm_calls":  # where each call is, for lookups by key
                        shared.calls.update(self.con.execute(f"SELECT cache_key, filename FROM {source}").fetchall())
                    else:  # each file's explanation ids, to read a neuron's simulations from its files only
                        shared.ranges.extend(self.con.execute(
                            f"SELECT min(explanation_id), max(explanation_id), filename FROM {source} "
                            "GROUP BY filename").fetchall())
            shared.loaded.update(new)
            return True

    # -- writing as a job ---------------------------------------------------------------------------
    @contextmanager
    def _segment(self) -> Iterator[None]:
        """Collect the rows written inside into one segment, published at the end (nothing if it fails)."""
        assert self.shared is not None
        with self.shared.lock:
            if self.shared.pending is not None:  # nested: the outer one publishes
                yield
                return
            self.shared.pending = {}
            try:
                yield
                batch = self.shared.pending
            finally:
                self.shared.pending = None
            if batch:
                import pyarrow as pa

                self.shared.spool.write({t: pa.concat_tables(parts) for t, parts in batch.items()})
                self.refresh()

    def _spool_rows(self, table: str, data: Any) -> None:
        """Add an Arrow table of rows to the segment being written (stamped with the time, and only the columns this
        store has)."""
        import pyarrow as pa

        assert self.shared is not None and self.shared.pending is not None
        if table not in COPIED + IN_PLACE:
            from neuronscope.core.store.schema import StoreError

            raise StoreError(f"{self.path} is open read-only, and only jobs write beside it: close the other "
                             "processes that have it open, then run the command again")
        stamp = STAMPED.get(table)
        known = self.shared.columns.get(table)
        if stamp and stamp not in data.column_names and (known is None or stamp in known):
            data = data.append_column(stamp, pa.array([now()] * data.num_rows, pa.timestamp("us")))
        if known is not None:
            data = data.select([c for c in data.column_names if c in known or c == "prev"])
        self.shared.pending.setdefault(table, []).append(data)

    def _spool_ids(self, counter: str, n: int) -> int:
        """The first of n new ids of one of the store's sequences, unique across every process of the spool."""
        assert self.shared is not None
        shared = self.shared
        if counter not in shared.floors:
            table, column = ID_COLUMNS[counter]
            rows = self.con.execute(f"SELECT coalesce(max({column}), 0) + 1 FROM store.main.{table}").fetchall()
            shared.floors[counter] = int(rows[0][0])
        with shared.spool.locked():
            return shared.spool.allocate(counter, n, shared.floors[counter])

    def simulations_of(self, ids: Sequence[int]) -> str:
        """The table to read these explanations' simulations from: on a shared store, the store's and only the
        segment files whose ids (a commit's, a narrow range) may hold them."""
        if self.shared is None:
            return "simulations"
        files = [path for lo, hi, path in self.shared.ranges if any(lo <= i <= hi for i in ids)]
        if not files:
            return "store.main.simulations"
        return (f"(SELECT * FROM store.main.simulations UNION ALL BY NAME SELECT * FROM "
                f"read_parquet([{', '.join(map(sql_literal, files))}]))")

    def _spool_lookup(self, cursor: Any, key: str, *, stored: bool = True) -> str | None:
        """A logged call's response: in the store (unless `stored` is False), else in the segment the spool index
        names."""
        if stored:
            rows = cursor.execute("SELECT response FROM store.main.llm_calls WHERE cache_key = ? LIMIT 1",
                                  [key]).fetchall()
            if rows:
                return str(rows[0][0])
        assert self.shared is not None
        path = self.shared.calls.get(key)
        if path is None:
            return None
        rows = cursor.execute("SELECT response FROM read_parquet(?) WHERE cache_key = ? LIMIT 1", [path, key]).fetchall()
        return str(rows[0][0]) if rows else None

    def claim(self, job_id: int, block: int) -> int | None:
        """Claim a block of a job's neurons for this process (neuronscope.core.jobs.claims): a claim to `release`, or
        None while another process holds it. A writable store has no other process to share with."""
        return self.shared.spool.claim(job_id, block, wait=False) if self.shared is not None else -1

    @staticmethod
    def release(claim: int) -> None:
        if claim >= 0:
            Spool.release(claim)

    def resettle(self, wait: float = 0.0) -> bool:
        """Fold the spool into the store if no other process has it open, then open it read-only again, in place;
        whether it folded. With `wait`, it first asks the others to step aside (Spool.ask_fold, `step_aside`) and
        tries for up to that many seconds while they finish what they are doing. For a store's own connection,
        with no other thread using it or its cursors meanwhile."""
        from neuronscope.core.store import Store

        spool = Spool(self.path)
        asked = bool(wait) and spool.ask_fold()
        self.close_shared()
        deadline = time.monotonic() + wait
        try:
            while True:
                if Store.settle(self.path):
                    return True
                if not asked or time.monotonic() >= deadline:
                    return False
                time.sleep(FOLD_POLL_SECONDS)
        finally:
            if asked:
                spool.end_fold()
            self._reopen()

    def _reopen(self, lock_wait: float | None = None) -> None:
        """Open a shared store closed for a while (`close_shared`) again, read-only, in place (StoreBusy while a
        process holds it for writing, after `lock_wait` seconds: by default Store.open's)."""
        from neuronscope.core.store import Store

        again = Store.open(self.path, read_only=True, **({} if lock_wait is None else {"lock_wait": lock_wait}))
        with self.turn:
            self.con, self.shared, self.closed, self.writer = again.con, again.shared, False, None

    def fold_asked(self) -> int | None:
        """The process that asks everyone to step aside (for its fold of the spool, or its write), if another does."""
        asker = self.shared.spool.fold_asked() if self.shared is not None else None
        return asker if asker is not None and asker != os.getpid() else None

    def fold_waits_for(self) -> int | None:
        """The process that the one asking everyone to step aside waits for now, where it says."""
        request = self.shared.spool.fold_request() if self.shared is not None else None
        return request[1] if request is not None else None

    def step_aside(self, waiting: Callable[[int], None] | None = None,
                   stopped: Callable[[], bool] | None = None) -> None:
        """Close the store while another process asks everyone to (`fold_asked`: a fold of the spool into the store,
        or a collection's write), then open it read-only again, in place, once the request is over and nobody holds
        the store for writing (a collection's write takes minutes), `waiting` told each asker or writer meanwhile. For
        a store's own connection, with no other thread using it or its cursors meanwhile, or for a cursor (`_pause`)."""
        if self.shared is None:
            return
        if self.owner is not None:
            self._pause(waiting, stopped)
            return
        self.close_shared()
        told: list[int] = []
        while True:
            holder = self.fold_asked() or self.open_shared()
            if holder is None:
                return
            if waiting is not None and told[-1:] != [holder]:
                told.append(holder)
                waiting(holder)
            time.sleep(FOLD_POLL_SECONDS)

    def _pause(self, waiting: Callable[[int], None] | None, stopped: Callable[[], bool] | None) -> None:
        """`step_aside` for a cursor of another Store's connection (a job's in the app): the cursor closes, and the
        owner closes its connection once each of its cursors that writes has paused (the app: StoreAside); then a
        new cursor of the owner's connection, once the request is over and the owner has opened it again (at once
        where it did not close it), `waiting` told each asker or writer meanwhile. StoreError, the cursor closed,
        once `stopped` (the app quits meanwhile: its job ends without the store, and shows as interrupted)."""
        from neuronscope.core.store.schema import StoreError

        owner = self.owner
        with owner.turn:
            self.con.close()
            self.paused = True
        told: list[int] = []
        while True:
            with owner.turn:
                holder = self.fold_asked()
                if holder is None and not owner.closed:
                    self.con, self.shared, self.paused = owner.con.cursor(), owner.shared, False
                    self.__dict__.pop("_thread_cursors", None)
                    return
            if stopped is not None and stopped():
                raise StoreError(f"stopped while another process wrote {self.path}")
            holder = holder or owner.writer
            if waiting is not None and holder is not None and told[-1:] != [holder]:
                told.append(holder)
                waiting(holder)
            time.sleep(FOLD_POLL_SECONDS)

    def close_shared(self) -> None:
        """Close a shared store for a while (`step_aside`); `open_shared` opens it again."""
        with self.turn:
            self.con.close()
            self.__dict__.pop("_thread_cursors", None)
            self.closed = True

    def open_shared(self) -> int | None:
        """`_reopen` at once: None, or the process id of the process that holds the store for writing (then it stays
        closed)."""
        from neuronscope.core.store.schema import StoreBusy

        try:
            self._reopen(lock_wait=0)
        except StoreBusy as busy:
            self.writer = busy.pid
            return busy.pid
        return None

    # -- folding ------------------------------------------------------------------------------------
    def fold(self, spool: Spool) -> int:
        """Move every published segment into the store's tables in one transaction, then empty the spool; the number
        of segments. Only a writable open may do this (no other process then has the store open). Idempotent: the
        folded names are recorded in the same transaction, so a fold killed at any moment is done again or not at
        all."""
        done: set[str] = set()
        if self.con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'spool_folded'"
                            ).fetchall()[0][0]:
            done = {r[0] for r in self.con.execute("SELECT name FROM spool_folded").fetchall()}
        names = [n for n in spool.names() if n not in done]
        if not names and not done:
            spool.clear([])
            return 0
        self.con.execute("CREATE TABLE IF NOT EXISTS spool_folded (name VARCHAR)")
        if names:
            self.con.execute("BEGIN")
            try:
                self._fold(spool, names)
                self.con.executemany("INSERT INTO spool_folded VALUES (?)", [[n] for n in names])
            except BaseException:
                self.con.execute("ROLLBACK")
                raise
            self.con.execute("COMMIT")
        spool.clear(sorted(done | set(names)))
        self.con.execute("DELETE FROM spool_folded")
        return len(names)

    def _fold(self, spool: Spool, names: Sequence[str]) -> None:
        def files(table: str) -> str | None:
            found = [sql_literal(spool.file(n, table)) for n in names if spool.file(n, table).exists()]
            return f"read_parquet([{', '.join(found)}], file_row_number = true, filename = true)" if found else None

        for table in ("jobs", "explanations", "simulations", "scores", "llm_calls"):
            source = files(table)
            if source:
                self.con.execute(f"INSERT INTO {table} BY NAME SELECT * EXCLUDE (file_row_number, filename) "
                                 f"FROM {source}")
        source = files("job_neurons")
        if source:
            self.con.execute(f"CREATE TEMP TABLE fold_neurons AS SELECT * EXCLUDE (filename, file_row_number), "
                             f"row_number() OVER (ORDER BY filename, file_row_number) AS seq FROM {source}")
            self.con.execute(f"WITH {_DELTAS.format(source='fold_neurons')} UPDATE jobs SET done = jobs.done + d.done, "
                             "failed = jobs.failed + d.failed FROM d WHERE jobs.job_id = d.job_id")
            self.con.execute("CREATE TEMP TABLE fold_latest AS SELECT job_id, layer, neuron, state, error, updated_at "
                             "FROM fold_neurons QUALIFY row_number() OVER (PARTITION BY job_id, layer, neuron "
                             "ORDER BY seq DESC) = 1")
            self.con.execute("DELETE FROM job_neurons b USING fold_latest l WHERE b.job_id = l.job_id "
                             "AND b.layer = l.layer AND b.neuron = l.neuron")
            self.con.execute("INSERT INTO job_neurons BY NAME SELECT * FROM fold_latest")
            self.con.execute("DROP TABLE fold_neurons; DROP TABLE fold_latest")
        source = files("job_events")
        if source:
            events = f"SELECT * EXCLUDE (filename, file_row_number), row_number() OVER (ORDER BY filename, file_row_number) AS seq FROM {source}"
            self.con.execute(f"WITH {_LATEST_EVENTS.format(source=f'({events})')} UPDATE jobs SET state = e.state, "
                             "error = e.error, pid = e.pid, owner_start = e.owner_start, updated_at = e.updated_at "
                             "FROM e WHERE jobs.job_id = e.job_id")
        for table in TRIAGE_SPOOLED:
            source = files(table)
            if source and table in TRIAGE_FOLD:
                self.con.execute(TRIAGE_FOLD[table].format(source=source))
            elif source:
                self.con.execute(f"INSERT INTO {table} BY NAME SELECT * EXCLUDE (file_row_number, filename) "
                                 f"FROM {source}")
        self.con.execute(PRUNE_LISTS)
        for counter, (table, column) in ID_COLUMNS.items():  # the store's sequences pass every folded id
            top = self.con.execute(f"SELECT max({column}) FROM {table}").fetchall()[0][0]
            current = int(self.con.execute(f"SELECT nextval('{counter}')").fetchall()[0][0])
            if top is not None and top > current:
                self.con.execute(f"SELECT max(nextval('{counter}')) FROM range(?)", [int(top) - current]).fetchall()


#: The newest state change of each job in `source` (with a seq column), as CTE `e`.
_LATEST_EVENTS = ("e AS (SELECT job_id, state, error, pid, owner_start, updated_at FROM {source} "
                  "QUALIFY row_number() OVER (PARTITION BY job_id ORDER BY seq DESC) = 1)")
#: How the neuron states in `source` move each job's counts (a retried neuron's new state replaces a failure), as
#: CTE `d`.
_DELTAS = ("d AS (SELECT job_id, count(*) FILTER (WHERE state = 'done') AS done, "
           "count(*) FILTER (WHERE state = 'failed') - count(*) FILTER (WHERE prev = 'failed') AS failed "
           "FROM {source} GROUP BY job_id)")


def sql_literal(path: object) -> str:
    """A file path as an SQL string literal (paths are the user's; quotes are doubled, never interpreted)."""
    return "'" + str(path).replace("'", "''") + "'"
