"""The store's writes of job results: neurons' explanations, simulations and scores with their job state, in one
transaction through Arrow tables. A job saves one neuron at a time (`save_neuron`); imports and synthetic stores
save thousands at once. Mixed into neuronscope.core.store.Store."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from neuronscope.core.results import NeuronResult


class BulkMixin:
    con: Any

    def save_neurons(self, job_id: int, run_id: int, results: Sequence[NeuronResult]) -> None:
        """Write many neurons' results and mark them done, in one transaction: the same rows `save_neuron`
        writes for each (explanation ids from the same sequence, in the same order)."""
        with self.transaction():  # type: ignore[attr-defined]
            self._write_results(job_id, run_id, results)

    def _write_results(self, job_id: int, run_id: int, results: Sequence[NeuronResult]) -> None:
        """save_neurons' rows, in the caller's transaction."""
        import pyarrow as pa

        pairs = [(r, ex) for r in results for ex in r.explanations]
        ids = self.con.execute("SELECT nextval('explanation_ids') FROM range(?)", [len(pairs)]).fetchnumpy()
        eids = np.sort(np.asarray(next(iter(ids.values())), np.int64)) if pairs else np.zeros(0, np.int64)
        if pairs:
            self._insert("explanations", "explanation_id, run_id, layer, neuron, tail, role, explainer, sample, "
                         "selected, text, source_layer, source_neuron, job_id", pa.table({
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
            self._insert("simulations", "explanation_id, simulator, split, excerpt_id, kind, predicted", pa.table({
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
            self._insert("scores", "explanation_id, simulator, split, method, value, ci_low, ci_high, n, flags",
                         pa.table({
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
        keys = pa.table({"layer": pa.array([r.layer for r in results], pa.int16()),
                         "neuron": pa.array([r.neuron for r in results], pa.int32())})
        self.con.register("_done_in", keys)
        self.con.execute("DELETE FROM job_neurons j USING _done_in d WHERE j.job_id = ? AND j.layer = d.layer "
                         "AND j.neuron = d.neuron", [job_id])
        self.con.execute("INSERT INTO job_neurons (job_id, layer, neuron, state, error) "
                         "SELECT DISTINCT ?, layer, neuron, 'done', '' FROM _done_in", [job_id])
        self.con.unregister("_done_in")
        self._count_job(job_id)  # type: ignore[attr-defined]

    def _insert(self, table: str, columns: str, data: Any) -> None:
        self.con.register("_bulk_in", data)
        try:
            self.con.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM _bulk_in")
        finally:
            self.con.unregister("_bulk_in")
