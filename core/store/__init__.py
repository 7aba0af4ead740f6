"""The DuckDB store: the only module that writes SQL.

One file per project. Schema version in `meta`; a file of another version or a foreign file gets a
StoreError naming the fix. DuckDB allows one writing process: a second one gets "in use by PID".
Bulk data goes in through Arrow tables, never row by row; untrusted text only ever as parameters.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from neuronscope.core.choices import COLLECTED_KINDS, RecordKind
from neuronscope.core.ids import NeuronId
from neuronscope.core.layerdata import LayerResult, LayerSummary
from neuronscope.core.records import ActivationRecord, NeuronStats
from neuronscope.core.staging import staged as staged_path
from neuronscope.core.store.browse import BrowseMixin
from neuronscope.core.store.bulk import BulkMixin
from neuronscope.core.store.collecting import collecting_into
from neuronscope.core.store.compare import CompareMixin
from neuronscope.core.store.explanations import ORDER_SQL, ExplanationsMixin
from neuronscope.core.store.handover import HandoverMixin
from neuronscope.core.store.interop import InteropMixin
from neuronscope.core.store.related import RELATED_TABLES, RelatedMixin
from neuronscope.core.store.rows import decode_many, layer_tables, lists
from neuronscope.core.store.runs import RunsMixin, named_process
from neuronscope.core.store.schema import (
    INDEXES,
    OWNER_COLUMNS,
    SCHEMA,
    SCHEMA_VERSION,
    StoreBusy,
    StoreError,
    migrate,
    storage_failure,
)
from neuronscope.core.store.shared import Shared, SharedMixin, sql_literal
from neuronscope.core.store.spool import Asking, Spool
from neuronscope.core.store.triage import TRIAGE_TABLES, TriageMixin

DEFAULT_STORE = "neuronscope.duckdb"


#: How long a read-only open waits for a process that holds the store for writing (a job folding its spool).
LOCK_WAIT_SECONDS = 5.0
#: How often a writer that waits for the store (`Store.open_when_free`) tries it again.
WAIT_POLL_SECONDS = 1.0


class Store(RunsMixin, ExplanationsMixin, BrowseMixin, BulkMixin, RelatedMixin, InteropMixin, SharedMixin, TriageMixin,
            CompareMixin, HandoverMixin):
    """An open store. Use `Store.open`; close it (or use it as a context manager) when done."""

    def __init__(self, con, path: Path, read_only: bool, shared: Shared | None = None,  # type: ignore[no-untyped-def]
                 owner: Store | None = None) -> None:
        self.con = con
        self.path = path
        self.read_only = read_only
        self.shared = shared
        self.owner = owner  # the Store this one is a cursor of (for_thread), whose connection it uses
        self.turn = threading.RLock()  # an owner's: its closing for a writer against its cursors' coming back

    # -- opening --------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, read_only: bool = False, create: bool = True,
             lock_wait: float = LOCK_WAIT_SECONDS) -> Store:
        """Open (and with create, initialise) a store; StoreError on every known failure. A read-only open waits up
        to `lock_wait` seconds while another process holds the store for writing."""
        import duckdb

        path = Path(path)
        if not path.exists() and (read_only or not create):
            if (collector := collecting_into(path)) is not None:
                raise StoreError(f"no store at {path} yet: a collection into it is in progress "
                                 f"({named_process(collector)}), and the store appears when its pass ends")
            raise StoreError(f"no store at {path}: run `neuronscope collect --store {path}` first")
        if path.is_dir():
            raise StoreError(f"{path} is a folder, not a store file: pass a file path with --store")
        fresh = not path.exists() or path.stat().st_size == 0
        # Bounded memory: big transactions spill to disk instead of growing with the collection.
        limit = os.environ.get("NEURONSCOPE_DUCKDB_MEMORY", "2GB")
        if not re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]i?B", limit):
            raise StoreError(f"NEURONSCOPE_DUCKDB_MEMORY={limit!r} is not a size like 2GB or 512MiB")
        deadline = time.monotonic() + (lock_wait if read_only else 0)
        while True:
            try:
                if read_only:  # shared with other readers and with jobs (neuronscope.core.store.shared)
                    con = duckdb.connect(":memory:")
                    try:
                        con.execute(f"ATTACH {sql_literal(path)} AS store (READ_ONLY)")
                    except BaseException:
                        con.close()
                        raise
                else:
                    con = duckdb.connect(str(path))
                break
            except duckdb.Error as err:
                msg = " ".join(str(err).split())
                pid = re.search(r"PID (\d+)", msg)
                if pid and time.monotonic() < deadline:  # most likely a job folding the spool: a moment
                    time.sleep(0.1)
                    continue
                if pid:
                    raise StoreBusy(
                        f"store {path} is in use by PID {pid.group(1)}: wait for it to finish or close it, "
                        "or use another --store", int(pid.group(1))
                    ) from None
                if "not a valid duckdb database" in msg.lower():
                    raise StoreError(f"{path} is not a neuronscope store (not a DuckDB file): pass another --store") from None
                raise storage_failure(err, path) or StoreError(f"cannot open {path}: {msg}; pass another --store") from None
        con.execute(f"SET memory_limit = '{limit}'")
        store = cls(con, path, read_only)
        try:
            if read_only:
                store._share(Spool(path))
            if fresh and not read_only:
                store._initialise()
            store._check_version()
            if not read_only and Spool(path).root.exists():
                store.fold(Spool(path))
        except BaseException:
            con.close()
            raise
        return store

    @classmethod
    def open_when_free(cls, path: str | Path, waiting: Callable[[int | None], None] | None = None, *,
                       create: bool = True) -> Store:
        """Open a store for writing. While another process holds it: StoreBusy, or with `waiting`, wait as long as
        it takes (Ctrl-C stops it), `waiting` told each new holder's process id (and again each time a request
        lapses). Meanwhile it asks the processes that share the store to close it (`Asking`): the app and jobs do,
        and open it again once this write is over."""
        told: list[int | None] = []
        asking = Asking(Spool(Path(path)))
        try:
            while True:
                try:
                    return cls.open(path, create=create)
                except StoreBusy as busy:
                    if waiting is None:
                        raise
                    lapsed = asking.held_by(busy.pid)  # (then said again: it still waits, and asks again later)
                    if told[-1:] != [busy.pid] or lapsed:
                        told.append(busy.pid)
                        waiting(busy.pid)
                    time.sleep(WAIT_POLL_SECONDS)
        finally:
            asking.end()

    @classmethod
    def settle(cls, path: str | Path) -> bool:
        """Fold the spool that jobs left beside a store into it, if no other process has the store open (a writable
        open folds); whether it could."""
        try:
            cls.open(path, create=False).close()
        except StoreBusy:
            return False
        return True

    @classmethod
    @contextmanager
    def output(cls, path: str | Path, waiting: Callable[[int | None], None] | None = None) -> Iterator[Store]:
        """A store to write into. An existing store is opened as it is (with `waiting`, once no other process holds
        it: `open_when_free`); a new one is built under a hidden name beside `path` and renamed onto it only when the
        block completes, so a failure or Ctrl-C leaves no store behind."""
        path = Path(path)
        if path.exists():
            with cls.open_when_free(path, waiting) as store:
                yield store
                store.checkpoint()
            return
        staged = staged_path(path, "partial")
        wal = staged.with_name(staged.name + ".wal")
        try:
            store = cls.open(staged)
            try:
                yield store
                store.checkpoint()
            finally:
                store.close()
            os.replace(staged, path)
        except BaseException:
            staged.unlink(missing_ok=True)
            wal.unlink(missing_ok=True)
            raise

    def _initialise(self) -> None:
        self.con.execute("BEGIN")
        self.con.execute(SCHEMA + RELATED_TABLES + OWNER_COLUMNS + TRIAGE_TABLES)
        self.con.execute("INSERT INTO meta VALUES ('schema_version', ?), ('app', 'neuronscope')", [str(SCHEMA_VERSION)])
        self.con.execute("COMMIT")

    def _check_version(self) -> None:
        tables = {r[0] for r in self.con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if "meta" not in tables:
            raise StoreError(f"{self.path} is a DuckDB file but not a neuronscope store: pass another --store")
        row = self.con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
        if not row:
            raise StoreError(f"{self.path} records no schema version: it is damaged or not a neuronscope store; "
                             "pass another --store")
        try:
            version = int(row[0][0])
        except (TypeError, ValueError):
            raise StoreError(f"{self.path} has an unreadable schema version: it is damaged; pass another --store") from None
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this neuronscope's {SCHEMA_VERSION}: "
                "upgrade neuronscope (git pull, then ./setup.sh)"
            )
        if version == 1 and not self.read_only:
            migrate(self.con, version)
            version = SCHEMA_VERSION
        if version == 1:
            raise StoreError(
                f"{self.path} has schema version 1: open it once with a writing command (e.g. `neuronscope run`) "
                "to upgrade it in place"
            )
        if version < SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}, older than this neuronscope's {SCHEMA_VERSION}: "
                "collect into a new --store, or use the neuronscope version that wrote it"
            )
        if not self.read_only:
            self.con.execute(INDEXES + RELATED_TABLES + OWNER_COLUMNS + TRIAGE_TABLES)

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self.con.close()

    def for_thread(self) -> Store:
        """The same store on a new cursor, for use by one other thread (close it there when done)."""
        return Store(self.con.cursor(), self.path, self.read_only, self.shared, owner=self.owner or self)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All statements inside commit together or not at all (on a shared store: are one segment of the spool)."""
        if self.shared is not None:
            with self._segment():
                yield
            return
        self.con.execute("BEGIN")
        try:
            yield
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.con.execute("COMMIT")

    def compact(self) -> None:
        """Rewrite the store into a fresh file, dropping the space that deleted rows left behind (DuckDB does not
        give it back on its own), then reopen it. The copy is renamed over the store only when complete."""
        if self.read_only:
            raise StoreError(f"{self.path} is open read-only: compact needs a writable open")
        staged = staged_path(self.path, "compact")
        database = self.con.execute("SELECT current_database()").fetchall()[0][0]
        closed = False
        spool = Spool(self.path)  # those aside stay so until the new file is open here (else some kept the old one)
        asked = spool.ask_fold()
        try:
            self.con.execute("ATTACH ? AS compacted", [str(staged)])
            self.con.execute(f'COPY FROM DATABASE "{database}" TO compacted')
            self.con.execute("DETACH compacted")
            self.con.close()
            closed = True
            os.replace(staged, self.path)
        except BaseException:
            staged.unlink(missing_ok=True)
            staged.with_name(staged.name + ".wal").unlink(missing_ok=True)
            raise
        finally:
            try:
                if closed:  # (a reader that opened it meanwhile, `info` say, is waited for)
                    self.con = Store.open_when_free(self.path, lambda _pid: None, create=False).con
            finally:
                if asked:
                    spool.end_fold()
        self._forget_shape()

    def _forget_shape(self) -> None:
        """Forget which tables and columns the store has (`_has_table`, `_has_column`): a writable open may add them."""
        for key in [key for key in self.__dict__ if key.startswith(("_table_", "_column_"))]:
            self.__dict__.pop(key)

    # -- writing a collection ---------------------------------------------------------------------
    def write_layer(self, run_id: int, result: LayerResult, summary: LayerSummary) -> None:
        """Insert one layer's neurons and records (in the caller's transaction)."""
        self.insert_layer(*layer_tables(run_id, result, summary))

    def insert_layer(self, neurons: Any, records: Any) -> None:
        """Insert one layer's tables from rows.layer_tables (in the caller's transaction): a collection builds the
        next layer's while this one's are inserted."""
        for name, table, rows in (("neurons", "_neurons_in", neurons), ("records", "_records_in", records)):
            self.con.register(table, rows)
            self.con.execute(f"INSERT INTO {name} SELECT * FROM {table}")
            self.con.unregister(table)

    def write_excerpts(self, run_id: int, excerpt_ids: np.ndarray, token_ids: np.ndarray, tokens: list[list[str]]) -> None:
        """Insert excerpts (in the caller's transaction)."""
        import pyarrow as pa

        table = pa.table({
            "run_id": pa.array(np.full(len(excerpt_ids), run_id, np.int32)),
            "excerpt_id": pa.array(excerpt_ids.astype(np.int64)),
            "token_ids": lists(token_ids.astype(np.int32)),
            "tokens": pa.array(tokens, type=pa.list_(pa.string())),
        })
        self.con.register("_excerpts_in", table)
        self.con.execute("INSERT INTO excerpts SELECT * FROM _excerpts_in")
        self.con.unregister("_excerpts_in")

    # -- reading ------------------------------------------------------------------------------------
    def excerpts(self, run_id: int, excerpt_ids: list[int] | None = None) -> dict[int, tuple[list[int], list[str]]]:
        """excerpt id -> (token ids, token strings); an imported run's excerpts have no token ids ([])."""
        if excerpt_ids is None:
            rows = self.con.execute(
                "SELECT excerpt_id, token_ids, tokens FROM excerpts WHERE run_id = ? ORDER BY excerpt_id", [run_id]
            ).fetchall()
        else:
            rows = self.con.execute(
                "SELECT excerpt_id, token_ids, tokens FROM excerpts WHERE run_id = ? AND list_contains(?, excerpt_id)",
                [run_id, list(excerpt_ids)],
            ).fetchall()
        return {r[0]: (list(r[1] or ()), list(r[2])) for r in rows}

    def neuron_stats(self, run_id: int, layer: int, neuron: int) -> NeuronStats | None:
        """One neuron's statistics, or None if the run has no such neuron."""
        rows = self._stats_query("WHERE run_id = ? AND layer = ? AND neuron = ?", [run_id, layer, neuron])
        return rows[0] if rows else None

    def maxima(self, run_id: int, layers: Sequence[int], width: int) -> np.ndarray:
        """[len(layers), width] every unit's largest collected activation (nan for a unit the run lacks)."""
        out = np.full((len(layers), width), np.nan, np.float32)
        rows = self.con.execute("SELECT layer, neuron, max_act FROM neurons WHERE run_id = ? AND list_contains(?, layer)",
                                [run_id, list(layers)]).fetchnumpy()
        at = {layer: i for i, layer in enumerate(layers)}
        index = np.array([at[int(layer)] for layer in rows["layer"]], np.int64)
        keep = rows["neuron"] < width
        out[index[keep], rows["neuron"][keep]] = rows["max_act"][keep]
        return out

    def top_neurons(self, run_id: int, limit: int = 20, order: str = "selectivity", seed: int = 0) -> list[NeuronStats]:
        """Neurons in one of the ORDERS of neuronscope.core.choices (each has one direction everywhere)."""
        if order not in ORDER_SQL:
            raise StoreError(f"cannot order by {order!r}: use one of {', '.join(ORDER_SQL)}")
        params: list[Any] = [run_id] + ([seed] if order == "random" else []) + [limit]
        return self._stats_query(f"WHERE run_id = ? ORDER BY {ORDER_SQL[order]} NULLS LAST, layer, neuron LIMIT ?", params)

    def _stats_query(self, where: str, params: list) -> list[NeuronStats]:  # type: ignore[type-arg]
        first = "first_peak" if self._has_column("first_peak", "neurons") else "NULL"
        rows = self.con.execute(
            "SELECT layer, neuron, count, mean, variance, skewness, kurtosis, max_act, min_act, density, "
            f"selectivity, histogram, quantile_edges, {first} FROM neurons {where}", params
        ).fetchall()
        return [
            NeuronStats(layer=r[0], index=r[1], count=r[2], mean=r[3], variance=r[4], skewness=r[5], kurtosis=r[6],
                        max=r[7], min=r[8], density=r[9], selectivity=r[10], histogram=tuple(r[11] or ()),
                        quantile_edges=tuple(r[12] or ()), first_peak=r[13])
            for r in rows
        ]

    def records(self, run_id: int, layer: int, neuron: int,
                kinds: tuple[RecordKind, ...] = COLLECTED_KINDS) -> list[ActivationRecord]:
        """A neuron's activation records with their tokens, ordered by kind then rank."""
        rows = self.con.execute(
            "SELECT kind, rank, bin, excerpt_id, scale, acts, max_act, min_act FROM records "
            "WHERE run_id = ? AND layer = ? AND neuron = ? AND list_contains(?, kind)", [run_id, layer, neuron, list(kinds)]
        ).fetchall()
        # Then the tokens of just those excerpts, named as an IN list of constants (integers read from the store)
        # so the excerpt_ids index serves it: a third of the time of a join at 100,000 excerpts.
        ids = ", ".join(str(int(r[3])) for r in rows)
        tokens = {e: tuple(t) for e, t in self.con.execute(
            f"SELECT excerpt_id, tokens FROM excerpts WHERE run_id = ? AND excerpt_id IN ({ids})", [run_id]
        ).fetchall()} if rows else {}
        return _activation_records(rows, tokens, kinds)

    def records_many(self, run_id: int, neurons: Sequence[tuple[int, int]],
                     ranks: Mapping[RecordKind, int]) -> dict[NeuronId, list[ActivationRecord]]:
        """The best `ranks[kind]` records of each kind named, of many neurons, in two queries (a job prefetches the
        neurons it is about to start), ordered as `records` orders them."""
        import pyarrow as pa

        kinds = tuple(ranks)
        wanted_ranks = " OR ".join("(kind = ? AND rank < ?)" for _ in kinds)

        wanted = pa.table({"layer": pa.array([n[0] for n in neurons], pa.int16()),
                           "neuron": pa.array([n[1] for n in neurons], pa.int32())})
        cursor = self.con.cursor()  # a registered table is per connection: this one's own, closed below
        try:
            cursor.register("_wanted", wanted)
            rows = cursor.execute(
                "SELECT r.layer, r.neuron, kind, rank, bin, excerpt_id, scale, acts, max_act, min_act FROM records r "
                "JOIN _wanted w ON r.layer = w.layer AND r.neuron = w.neuron "
                f"WHERE run_id = ? AND ({wanted_ranks})", [run_id, *(v for k in kinds for v in (k, ranks[k]))]
            ).fetchall()
            ids = ", ".join(str(int(i)) for i in {r[5] for r in rows})
            tokens = {e: tuple(t) for e, t in cursor.execute(
                f"SELECT excerpt_id, tokens FROM excerpts WHERE run_id = ? AND excerpt_id IN ({ids})", [run_id]
            ).fetchall()} if rows else {}
        finally:
            cursor.close()
        grouped: dict[NeuronId, list[tuple[Any, ...]]] = {NeuronId(*n): [] for n in neurons}
        for r in rows:
            grouped[NeuronId(int(r[0]), int(r[1]))].append(r[2:])
        return {n: _activation_records(found, tokens, kinds) for n, found in grouped.items()}

    def counts(self) -> dict[str, int]:
        """Rows per table."""
        tables = ("runs", "excerpts", "neurons", "records", "explanations", "scores", "llm_calls", "jobs")
        return {t: int(self.con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0]) for t in tables}

    def run_counts(self, run_id: int) -> dict[str, int]:
        """Neurons, records and excerpts stored for one run."""
        return {
            t: int(self.con.execute(f"SELECT count(*) FROM {t} WHERE run_id = ?", [run_id]).fetchall()[0][0])
            for t in ("neurons", "records", "excerpts")
        }

    def checkpoint(self) -> None:
        """Flush the write-ahead log into the file (so its size is the data's size)."""
        if self.shared is None:
            self.con.execute("CHECKPOINT")


def _activation_records(rows: Sequence[tuple[Any, ...]], tokens: dict[int, tuple[str, ...]],
                        kinds: tuple[RecordKind, ...]) -> list[ActivationRecord]:
    """Record rows (kind, rank, bin, excerpt_id, scale, acts, max_act, min_act) with their excerpts' tokens (one
    tuple shared by all the records of an excerpt), ordered by kind then rank (a record whose excerpt is missing is
    left out)."""
    kept = [r for r in rows if r[3] in tokens]
    out = [ActivationRecord(kind=r[0], rank=r[1], excerpt_id=r[3], tokens=tokens[r[3]], bin=r[2],
                            activations=tuple(values), exact_max=r[6], exact_min=r[7])
           for r, values in zip(kept, decode_many([r[4] for r in kept], [r[5] for r in kept]))]
    return sorted(out, key=lambda rec: (kinds.index(rec.kind), rec.rank))
