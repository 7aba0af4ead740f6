"""The store's writes of job results: neurons' explanations, simulations and scores with their job state, and the
LLM calls that made them, in one transaction through Arrow tables. A job commits the neurons that landed since its
last commit (`save_batch`); imports and synthetic stores save thousands at once. Nothing here grows with the
job's size: the job's counts move by the batch's neurons instead of being recounted. Mixed into
neuronscope.core.store.Store."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from neuronscope.core.ids import NeuronId
from neuronscope.core.records import Call
from neuronscope.core.results import NeuronResult


class BulkMixin:
    con: Any
    shared: Any
    _spool_ids: Any

    def save_neurons(self, job_id: int, run_id: int, results: Sequence[NeuronResult]) -> None:
        """Write many neurons' results and mark them done, in one transaction (neurons the job has not recorded)."""
        self.save_batch(job_id, run_id, results)

    def save_batch(self, job_id: int, run_id: int, results: Sequence[NeuronResult] = (),
                   failed: Mapping[NeuronId, str] | None = None, calls: Sequence[tuple[str, Call]] = (),
                   retried: Collection[NeuronId] = ()) -> None:
        """One commit of a job: LLM calls to log, neurons done (their rows) and neurons failed (their errors).
        `retried`: those of them the job had recorded as failed before (their old state is replaced); any other is
        new to the job."""
        failed = failed or {}
        with self.transaction():  # type: ignore[attr-defined]
            if calls:
                self._save_calls(calls, job_id)
            if results:
                self._write_results(job_id, run_id, results)
            if results or failed:
                self._mark(job_id, [(r.layer, r.neuron, "done", "") for r in results]
                           + [(n[0], n[1], "failed", e) for n, e in failed.items()], retried)

    def _mark(self, job_id: int, states: Sequence[tuple[int, int, str, str]], retried: Collection[NeuronId]) -> None:
        """Record neurons' job states; the job's done and failed counts move by the change."""
        import pyarrow as pa

        again = [NeuronId(layer, neuron) for layer, neuron, _, _ in states if NeuronId(layer, neuron) in retried]
        rows = pa.table({
            "job_id": pa.array([job_id] * len(states), pa.int64()),
            "layer": pa.array([s[0] for s in states], pa.int16()),
            "neuron": pa.array([s[1] for s in states], pa.int32()),
            "state": pa.array([s[2] for s in states], pa.string()),
            "error": pa.array([s[3] for s in states], pa.string()),
        })
        if self.shared is not None:  # a segment: each state says what it replaces, and the counts follow from that
            prev = ["failed" if NeuronId(s[0], s[1]) in retried else "" for s in states]
            self._insert("job_neurons", rows.append_column("prev", pa.array(prev, pa.string())))
            return
        if again:  # only failed neurons are retried (done ones are skipped), so each removes one failure
            pairs = ", ".join(f"({int(a)}, {int(b)})" for a, b in again)
            self.con.execute(f"DELETE FROM job_neurons WHERE job_id = ? AND (layer, neuron) IN ({pairs})", [job_id])
        self._insert("job_neurons", rows)
        done = sum(s[2] == "done" for s in states)
        self.con.execute("UPDATE jobs SET done = done + ?, failed = failed + ?, updated_at = current_timestamp "
                         "WHERE job_id = ?", [done, len(states) - done - len(again), job_id])

    def _save_calls(self, calls: Sequence[tuple[str, Call]], job_id: int | None) -> None:
        """Append LLM calls to the log."""
        import pyarrow as pa

        ids = {"call_id": pa.array(np.arange(len(calls), dtype=np.int64) + self._spool_ids("call_ids", len(calls)))
               } if self.shared is not None else {}
        self._insert("llm_calls", pa.table({
            "cache_key": pa.array([k for k, _ in calls], pa.string()),
            "backend": pa.array([c.backend for _, c in calls], pa.string()),
            "model": pa.array([c.model for _, c in calls], pa.string()),
            "kind": pa.array([c.kind for _, c in calls], pa.string()),
            "prompt": pa.array([c.prompt for _, c in calls], pa.string()),
            "response": pa.array([c.response for _, c in calls], pa.string()),
            "prompt_tokens": pa.array([c.prompt_tokens for _, c in calls], pa.int32()),
            "completion_tokens": pa.array([c.completion_tokens for _, c in calls], pa.int32()),
            "latency_s": pa.array([c.latency_s for _, c in calls], pa.float64()),
            "job_id": pa.array([job_id] * len(calls), pa.int64()),
            **ids,
        }))

    def _write_results(self, job_id: int, run_id: int, results: Sequence[NeuronResult]) -> None:
        """The results' explanations, simulations and scores, in the caller's transaction."""
        import pyarrow as pa

        pairs = [(r, ex) for r in results for ex in r.explanations]
        if self.shared is not None:
            eids = np.arange(len(pairs), dtype=np.int64) + (self._spool_ids("explanation_ids", len(pairs)) if pairs else 0)
        else:
            ids = self.con.execute("SELECT nextval('explanation_ids') FROM range(?)", [len(pairs)]).fetchnumpy()
            eids = np.sort(np.asarray(next(iter(ids.values())), np.int64)) if pairs else np.zeros(0, np.int64)
        if pairs:
            self._insert("explanations", pa.table({
                "explanation_id": pa.array(eids),
                "run_id": pa.array(np.full(len(pairs), run_id, np.int32)),
                "layer": pa.array([r.layer for r, _ in pairs], pa.int16()),
                "neuron": pa.array([r.neuron for r, _ in pairs], pa.int32()),
                "tail": pa.array([r.tail for r, _ in pairs], pa.string()),
                "role": pa.array([ex.role for _, ex in pairs], pa.string()),
                "explainer": pa.array([ex.explainer for _, ex in pairs], pa.string()),
                "sample": pa.array([ex.sample for _, ex in pairs], pa.int16()),
                "selected": pa.array([ex.selected for _, ex in pairs], pa.bool_()),
                "text": pa.array([ex.text for _, ex in pairs], pa.string()),
                "source_layer": pa.array([ex.source.layer if ex.source else None for _, ex in pairs],
                                         pa.int16()),
                "source_neuron": pa.array([ex.source.neuron if ex.source else None for _, ex in pairs],
                                          pa.int32()),
                "job_id": pa.array(np.full(len(pairs), job_id, np.int64)),
            }))
        sims = [(eid, ex.splits[0].simulator if ex.splits else "", s)
                for eid, (_, ex) in zip(eids.tolist(), pairs) for s in ex.simulations]
        if sims:
            lengths = np.array([len(s.predicted) for _, _, s in sims], np.int32)
            flat = np.fromiter((v for _, _, s in sims for v in s.predicted), np.float32, int(lengths.sum()))
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            self._insert("simulations", pa.table({
                "explanation_id": pa.array([e for e, _, _ in sims], pa.int64()),
                "simulator": pa.array([m for _, m, _ in sims], pa.string()),
                "split": pa.array([s.split for _, _, s in sims], pa.string()),
                "excerpt_id": pa.array([s.excerpt_id for _, _, s in sims], pa.int64()),
                "kind": pa.array([s.kind for _, _, s in sims], pa.string()),
                "predicted": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)),
            }))
        scores = [(eid, split.simulator, split.split, s) for eid, (_, ex) in zip(eids.tolist(), pairs)
                  for split in ex.splits for s in split.scores]
        if scores:
            self._insert("scores", pa.table({
                "explanation_id": pa.array([e for e, _, _, _ in scores], pa.int64()),
                "simulator": pa.array([m for _, m, _, _ in scores], pa.string()),
                "split": pa.array([sp for _, _, sp, _ in scores], pa.string()),
                "method": pa.array([s.method for *_, s in scores], pa.string()),
                "value": pa.array([s.value for *_, s in scores], pa.float64()),
                "ci_low": pa.array([s.ci_low for *_, s in scores], pa.float64()),
                "ci_high": pa.array([s.ci_high for *_, s in scores], pa.float64()),
                "n": pa.array([s.n for *_, s in scores], pa.int32()),
                "flags": pa.array([s.flags for *_, s in scores], pa.string()),
            }))

    def _insert(self, table: str, data: Any) -> None:
        """Insert an Arrow table's rows into the table's columns of the same names (on a shared store: into the
        segment being written)."""
        if self.shared is not None:
            self._spool_rows(table, data)  # type: ignore[attr-defined]
            return
        columns = ", ".join(f'"{name}"' for name in data.column_names)
        self.con.register("_bulk_in", data)
        try:
            self.con.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM _bulk_in")
        finally:
            self.con.unregister("_bulk_in")
