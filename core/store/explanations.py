"""The store's SQL for explain/score jobs: jobs and their neurons, the LLM call log, explanations,
simulations and scores, and the queries that read them back. Mixed into neuronscope.core.store.Store."""

from __future__ import annotations

import datetime
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from neuronscope.core.choices import ASCENDING, Order
from neuronscope.core.ids import NeuronId
from neuronscope.core.results import NeuronSummary, Score, ScoredExplanation, Simulation, SplitScores
from neuronscope.core.store.runs import this_owner
from neuronscope.core.store.shared import now

#: Statistics a neuron filter may name, and their columns.
FILTER_FIELDS = {"selectivity": "selectivity", "kurtosis": "kurtosis", "skewness": "skewness", "max": "max_act",
                 "min": "min_act", "density": "density", "mean": "mean", "variance": "variance", "layer": "layer",
                 "neuron": "neuron", "first_peak": "first_peak"}
FILTER_OPS = ("<=", ">=", "!=", "<", ">", "=")
#: The SQL of each order of neuronscope.core.choices.ORDERS, in the direction choices.ASCENDING gives it (with NULLS
#: LAST): an unknown value (NaN: an imported run's density) as a missing one, last. Random: a shuffle by the seed (the
#: one parameter), the hash of (layer, neuron, seed) and a constant: DuckDB hashes 0, and a tuple of zeros, to 0,
#: which put L0/N0 first for seed 0, and the hash of layer * 1000003 + neuron + seed made seed s+1 the order of s
#: shifted.
ORDER_SQL: dict[Order, str] = {
    **{order: f"CASE WHEN isnan({column}) THEN NULL ELSE {column} END {'ASC' if order in ASCENDING else 'DESC'}"
       for order, column in (("selectivity", "selectivity"), ("kurtosis", "kurtosis"), ("max", "max_act"),
                             ("min", "min_act"), ("density", "density"))},
    "random": "hash(layer, neuron, ?::UBIGINT, 'neuronscope')"}


#: `chosen`: per neuron and tail, the newest selected explanation of a run (first parameter: the run id;
#: `{where}` adds conditions on `e`); `headline`: every explanation's test-split 'all' score.
CHOSEN_CTES = """chosen AS (
            SELECT * FROM explanations e WHERE run_id = ? AND selected{where}
            QUALIFY row_number() OVER (PARTITION BY layer, neuron, tail ORDER BY job_id DESC, explanation_id DESC) = 1
        ), headline AS (
            SELECT explanation_id, value, ci_low, ci_high, n, flags FROM scores WHERE split = 'test' AND method = 'all'
        )"""


#: The CTEs for the newest selected positive-tail explanation (a candidate or user sentence) of every neuron: what
#: the browser and the Parquet export show beside a neuron.
CHOSEN_POS_CTES = CHOSEN_CTES.format(where=" AND tail = 'pos' AND role IN ('candidate', 'user')")


class ExplanationsMixin:
    con: Any
    shared: Any
    simulations_of: Any
    _thread_cursors: threading.local

    def _cursor(self) -> Any:
        """A cursor for the calling thread (DuckDB connections are not shared across threads)."""
        if threading.current_thread() is threading.main_thread():
            return self.con
        local = self.__dict__.setdefault("_thread_cursors", threading.local())
        if not hasattr(local, "cursor"):
            local.cursor = self.con.cursor()
        return local.cursor

    # -- choosing neurons -----------------------------------------------------------------------
    def choose_neurons(self, run_id: int, *, layers: Sequence[int] | None, order: str,
                       where: Sequence[tuple[str, str, float]], limit: int | None, seed: int = 0) -> list[NeuronId]:
        """Neurons of a run, filtered by typed conditions, ordered, limited."""
        sql = "SELECT layer, neuron FROM neurons WHERE run_id = ?"
        params: list[Any] = [run_id]
        if layers is not None:
            sql += " AND list_contains(?, layer)"
            params.append(list(layers))
        for field, op, value in where:
            if field not in FILTER_FIELDS or op not in FILTER_OPS:
                raise ValueError(f"bad filter {field} {op}")
            sql += f" AND {FILTER_FIELDS[field]} {op} ?"
            params.append(float(value))
        sql += f" ORDER BY {ORDER_SQL[order]} NULLS LAST, layer, neuron"
        if order == "random":
            params.append(seed)
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [NeuronId(int(a), int(b)) for a, b in self.con.execute(sql, params).fetchall()]

    # -- jobs -------------------------------------------------------------------------------------
    def create_job(self, run_id: int, kind: str, params: str, params_key: str, total: int) -> int:
        """Register a running job (committed at once). On a shared store, a job with these parameters that another
        process registered meanwhile is taken instead, so processes started together share one job."""
        if self.shared is not None:
            import pyarrow as pa

            with self.shared.spool.locked():
                self.refresh()  # type: ignore[attr-defined]
                found = self.find_job(params_key)
                if found:
                    return found[0]
                job_id = self._spool_ids("job_ids", 1)  # type: ignore[attr-defined]
                pid, start = this_owner()
                with self.transaction():  # type: ignore[attr-defined]
                    self._insert("jobs", pa.table({  # type: ignore[attr-defined]
                        "job_id": pa.array([job_id], pa.int64()), "run_id": pa.array([run_id], pa.int32()),
                        "kind": [kind], "params": [params], "params_key": [params_key], "state": ["running"],
                        "done": pa.array([0], pa.int64()), "failed": pa.array([0], pa.int64()),
                        "total": pa.array([total], pa.int64()), "error": [""], "pid": pa.array([pid], pa.int32()),
                        "owner_start": pa.array([start], pa.float64()), "updated_at": pa.array([now()], pa.timestamp("us"))}))
            return job_id
        row = self.con.execute(
            "INSERT INTO jobs (run_id, kind, params, params_key, state, total, pid, owner_start) "
            "VALUES (?, ?, ?, ?, 'running', ?, ?, ?) RETURNING job_id",
            [run_id, kind, params, params_key, total, *this_owner()]).fetchall()
        return int(row[0][0])

    def find_job(self, params_key: str) -> tuple[int, str] | None:
        """The newest job with these exact parameters: (job id, state)."""
        rows = self.con.execute("SELECT job_id, state FROM jobs WHERE params_key = ? ORDER BY job_id DESC LIMIT 1",
                                [params_key]).fetchall()
        return (int(rows[0][0]), rows[0][1]) if rows else None

    def set_job_state(self, job_id: int, state: str, error: str = "") -> None:
        """Change a job's state (running also takes this process as its owner)."""
        if self.shared is not None:
            import pyarrow as pa

            pid, start = this_owner()
            with self.transaction():  # type: ignore[attr-defined]
                self._insert("job_events", pa.table({  # type: ignore[attr-defined]
                    "job_id": pa.array([job_id], pa.int64()), "state": [state], "error": [error],
                    "pid": pa.array([pid], pa.int32()), "owner_start": pa.array([start], pa.float64()),
                    "updated_at": pa.array([now()], pa.timestamp("us"))}))
            return
        self.con.execute("UPDATE jobs SET state = ?, error = ?, updated_at = current_timestamp WHERE job_id = ?",
                         [state, error, job_id])
        self._claim("jobs", "job_id", job_id)  # type: ignore[attr-defined]

    def job_neuron_states(self, job_id: int) -> dict[NeuronId, tuple[str, str]]:
        """neuron -> (state, error) for every neuron the job has finished or failed."""
        rows = self.con.execute("SELECT layer, neuron, state, error FROM job_neurons WHERE job_id = ?", [job_id]).fetchall()
        return {NeuronId(int(r[0]), int(r[1])): (r[2], r[3] or "") for r in rows}

    def settled(self, job_id: int, neurons: Sequence[NeuronId], since: datetime.datetime) -> dict[NeuronId, str]:
        """Of these neurons of a job, the ones another process may have finished: neuron -> state, for those done
        and those that failed at `since` or later (older failures are there to retry)."""
        if not neurons:
            return {}
        pairs = ", ".join(f"({int(a)}, {int(b)})" for a, b in neurons)
        rows = self.con.execute(f"SELECT layer, neuron, state FROM job_neurons WHERE job_id = ? AND (layer, neuron) "
                                f"IN ({pairs}) AND (state = 'done' OR updated_at >= ?)", [job_id, since]).fetchall()
        return {NeuronId(int(a), int(b)): state for a, b, state in rows}

    def jobs(self, run_id: int | None = None) -> list[dict[str, Any]]:
        """Jobs, oldest first, as dicts (id, run, kind, state, done, failed, total, error, created)."""
        rows = self.con.execute(
            "SELECT job_id, run_id, kind, state, done, failed, total, error, pid, "
            "strftime(created_at, '%Y-%m-%d %H:%M:%S') FROM jobs "
            + ("WHERE run_id = ? " if run_id is not None else "") + "ORDER BY job_id",
            [run_id] if run_id is not None else []).fetchall()
        keys = ("job_id", "run_id", "kind", "state", "done", "failed", "total", "error", "pid", "created_at")
        out = [dict(zip(keys, r)) for r in rows]
        for job in out:
            if job["state"] == "running" and self._owner_gone("jobs", "job_id", job["job_id"], job["pid"]):  # type: ignore[attr-defined]
                job["state"] = "interrupted"
        return out

    def mark_stale_jobs(self) -> None:
        """Jobs left 'running' by a process that no longer exists become 'interrupted'."""
        for job_id, pid in self.con.execute("SELECT job_id, pid FROM jobs WHERE state = 'running'").fetchall():
            if self._owner_gone("jobs", "job_id", job_id, pid):  # type: ignore[attr-defined]
                self.set_job_state(job_id, "interrupted", "the process running it stopped before it finished")

    # -- the LLM call log -------------------------------------------------------------------------
    def lookup_call(self, key: str, *, stored: bool = True) -> str | None:
        """The response of a logged call with this cache key. stored=False: the caller knows the store's own table
        lacks it (`call_prefixes`), so only a shared store's spool is read."""
        if self.shared is not None:
            return self._spool_lookup(self._cursor(), key, stored=stored)  # type: ignore[attr-defined,no-any-return]
        if not stored:
            return None
        rows = self._cursor().execute("SELECT response FROM llm_calls WHERE cache_key = ? LIMIT 1", [key]).fetchall()
        return rows[0][0] if rows else None

    def call_prefixes(self) -> np.ndarray:
        """The first 64 bits of every logged call's key (sha256 hex), sorted, from the store's own table (not a
        shared store's spool): a key whose prefix is not among them is not logged there, found without a query
        (8 bytes a call: 16 MB for two million)."""
        table = "llm_calls" if self.shared is None else "store.main.llm_calls"
        found = self._cursor().execute(
            f"SELECT DISTINCT TRY_CAST('0x' || cache_key[1:16] AS UBIGINT) AS prefix FROM {table} "
            "WHERE prefix IS NOT NULL ORDER BY prefix").fetchnumpy()["prefix"]
        return np.asarray(found, np.uint64)

    def call_totals(self, job_id: int | None = None) -> tuple[int, int]:
        """(calls, tokens) logged, for one job or all."""
        sql = "SELECT count(*), coalesce(sum(prompt_tokens + completion_tokens), 0) FROM llm_calls"
        rows = self.con.execute(sql + (" WHERE job_id = ?" if job_id is not None else ""),
                                [job_id] if job_id is not None else []).fetchall()
        return int(rows[0][0]), int(rows[0][1])

    # -- reading results --------------------------------------------------------------------------
    def explanations(self, run_id: int, layer: int, neuron: int, *, role: str | None = None,
                     explainer: str | None = None, tail: str | None = None) -> list[ScoredExplanation]:
        """A neuron's explanations, newest job first, each with its simulations and scores."""
        sql = ("SELECT explanation_id, text, explainer, role, sample, selected, source_layer, source_neuron, tail, "
               "job_id FROM explanations WHERE run_id = ? AND layer = ? AND neuron = ?")
        params: list[Any] = [run_id, layer, neuron]
        for column, value in (("role", role), ("explainer", explainer), ("tail", tail)):
            if value is not None:
                sql += f" AND {column} = ?"
                params.append(value)
        rows = self.con.execute(sql + " ORDER BY job_id DESC, explanation_id", params).fetchall()
        return self._scored(rows)

    def _scored(self, rows: Sequence[tuple[Any, ...]]) -> list[ScoredExplanation]:
        """Explanation rows (explanation_id, text, explainer, role, sample, selected, source_layer, source_neuron,
        tail, job_id, ...) as ScoredExplanations with their simulations and scores, in the rows' order."""
        if not rows:
            return []
        # Their simulations and scores in one query each: the ids (integers from the store) as constants, and their
        # range, which lets DuckDB skip the row groups of other neurons (a neuron's rows are written together).
        ids = [int(r[0]) for r in rows]
        where = f"explanation_id BETWEEN {min(ids)} AND {max(ids)} AND explanation_id IN ({', '.join(map(str, ids))})"
        sims: dict[int, list[Simulation]] = {}
        for eid, excerpt, kind, split, predicted in self.con.execute(
                f"SELECT explanation_id, excerpt_id, kind, split, predicted FROM {self.simulations_of(ids)} "
                f"WHERE {where} "
                "ORDER BY split, kind DESC, excerpt_id").fetchall():
            sims.setdefault(int(eid), []).append(Simulation(int(excerpt), kind, split, tuple(float(v) for v in predicted)))
        splits: dict[int, dict[tuple[str, str], list[Score]]] = {}
        for eid, split, simulator, method, value, low, high, n, flags in self.con.execute(
                f"SELECT explanation_id, split, simulator, method, value, ci_low, ci_high, n, flags FROM scores "
                f"WHERE {where}").fetchall():
            splits.setdefault(int(eid), {}).setdefault((split, simulator), []).append(
                Score(method, value, low, high, n, flags or ""))
        return [ScoredExplanation(
                    text=r[1], explainer=r[2], role=r[3], sample=r[4], selected=bool(r[5]),
                    source=NeuronId(r[6], r[7]) if r[6] is not None else None, tail=r[8],
                    job=int(r[9]) if r[9] is not None else None,
                    simulations=tuple(sims.get(int(r[0]), ())),
                    splits=tuple(SplitScores(split, simulator, tuple(scores))
                                 for (split, simulator), scores in splits.get(int(r[0]), {}).items()))
                for r in rows]

    def candidate_texts(self, run_id: int, layer: int, neuron: int, *, tail: str, explainer: str,
                        role: str = "candidate") -> list[str]:
        """The newest job's candidate explanations of a neuron by an explainer, in sample order (role `output`: its
        output-centric ones)."""
        rows = self.con.execute(
            "SELECT text FROM explanations WHERE run_id = ? AND layer = ? AND neuron = ? AND tail = ? AND explainer = ? "
            "AND role = ? QUALIFY job_id = max(job_id) OVER () ORDER BY sample",
            [run_id, layer, neuron, tail, explainer, role]).fetchall()
        return list(dict.fromkeys(r[0] for r in rows))

    def summaries(self, run_id: int, *, job_id: int | None = None, limit: int | None = None) -> list[NeuronSummary]:
        """Per neuron and tail, the newest selected explanation with its controls from the same job, best score
        first."""
        params: list[Any] = [run_id]
        job_filter = ""
        if job_id is not None:
            job_filter = " AND e.job_id = ?"
            params.append(job_id)
        sql = f"""
        WITH {CHOSEN_CTES.format(where=job_filter)}
        SELECT c.layer, c.neuron, c.tail, c.text, c.explainer, h.value, h.ci_low, h.ci_high, h.n, h.flags,
               sh.value, sh.ci_low, sh.ci_high, sh.n, sh.flags, b.value, b.ci_low, b.ci_high, b.n, b.flags,
               n.selectivity
        FROM chosen c
        LEFT JOIN headline h ON h.explanation_id = c.explanation_id
        LEFT JOIN explanations se ON se.job_id = c.job_id AND se.layer = c.layer AND se.neuron = c.neuron
             AND se.tail = c.tail AND se.role = 'shuffled'
        LEFT JOIN headline sh ON sh.explanation_id = se.explanation_id
        LEFT JOIN explanations be ON be.job_id = c.job_id AND be.layer = c.layer AND be.neuron = c.neuron
             AND be.tail = c.tail AND be.role = 'baseline'
        LEFT JOIN headline b ON b.explanation_id = be.explanation_id
        LEFT JOIN neurons n ON n.run_id = c.run_id AND n.layer = c.layer AND n.neuron = c.neuron
        ORDER BY h.value DESC NULLS LAST, c.layer, c.neuron
        """
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        rows = self.con.execute(sql, params).fetchall()

        def score(values: Sequence[Any]) -> Score | None:
            return None if values[0] is None else Score("all", values[0], values[1], values[2], values[3], values[4] or "")

        return [NeuronSummary(layer=r[0], neuron=r[1], tail=r[2], text=r[3], explainer=r[4], score=score(r[5:10]),
                              shuffled=score(r[10:15]), baseline=score(r[15:20]), selectivity=r[20] or 0.0)
                for r in rows]

    def job_scores(self, job_id: int, split: str = "test") -> list[tuple[int, int, str, str, str, float]]:
        """Every score a job wrote on a split, as (layer, neuron, tail, role, method, value); of candidates, only
        the selected one's (for benchmarks that compare methods and controls across a job's neurons)."""
        rows = self.con.execute(
            "SELECT e.layer, e.neuron, e.tail, e.role, s.method, s.value FROM explanations e "
            "JOIN scores s ON s.explanation_id = e.explanation_id "
            "WHERE e.job_id = ? AND s.split = ? AND (e.role <> 'candidate' OR e.selected) "
            "ORDER BY e.layer, e.neuron, e.tail, e.role, s.method", [job_id, split]).fetchall()
        return [(int(a), int(b), c, d, m, float(v)) for a, b, c, d, m, v in rows]
