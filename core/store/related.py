"""The store's imported neurons and related tokens/neurons: runs filled from another tool's files (core.importer)
and the related-token and related-neuron lists shown beside a neuron. Mixed into core.store.Store.

The two related tables were added without a schema version bump (`RELATED_TABLES`, made with a new store and by
the first writable open of an older one); reading a store opened read-only that lacks them gives empty lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from core.layerdata import quantize
from core.records import ActivationRecord, ImportedNeuron
from core.results import NeuronBundle, NeuronResult, ScoredExplanation
from core.rows import decode
from core.store.results import CHOSEN_CTES

RELATED_TABLES = """
CREATE TABLE IF NOT EXISTS related_tokens (
    run_id INTEGER, layer SMALLINT, neuron INTEGER, list VARCHAR, rank SMALLINT, token VARCHAR, value REAL);
CREATE TABLE IF NOT EXISTS related_neurons (
    run_id INTEGER, layer SMALLINT, neuron INTEGER, list VARCHAR, rank SMALLINT, other_layer SMALLINT,
    other_neuron INTEGER, value REAL);
"""


_CHOSEN_POS = CHOSEN_CTES.format(where=" AND tail = 'pos' AND role IN ('candidate', 'user')")


def _quantized(rows: Sequence[Sequence[float]]) -> tuple[list[float], list[bytes]]:
    """Each row's int8 codes and scale (core.layerdata.quantize), rows of one length quantised together."""
    scales: list[float] = [0.0] * len(rows)
    blobs: list[bytes] = [b""] * len(rows)
    by_length: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        by_length.setdefault(len(row), []).append(i)
    for members in by_length.values():
        scale, codes = quantize(np.asarray([rows[i] for i in members], np.float32))
        for i, s, c in zip(members, scale.tolist(), codes):
            scales[i], blobs[i] = s, c.tobytes()
    return scales, blobs


class RelatedMixin:
    con: Any

    def _has_related(self) -> bool:
        rows = self.con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'related_tokens'")
        return bool(rows.fetchall()[0][0])

    def next_excerpt_id(self, run_id: int) -> int:
        """The first excerpt id a run has not used."""
        return int(self.con.execute("SELECT coalesce(max(excerpt_id) + 1, 0) FROM excerpts WHERE run_id = ?",
                                    [run_id]).fetchall()[0][0])

    def stored_neurons(self, run_id: int) -> set[tuple[int, int]]:
        """(layer, neuron) of every neuron a run holds."""
        rows = self.con.execute("SELECT layer, neuron FROM neurons WHERE run_id = ?", [run_id]).fetchall()
        return {(int(r[0]), int(r[1])) for r in rows}

    def set_run_status(self, run_id: int, status: str, *, n_excerpts: int | None = None) -> None:
        """Set a run's status (and, when given, its excerpt count; 'complete' also stamps the finish time)."""
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

    def import_neurons(self, run_id: int, job_id: int, excerpts: dict[int, tuple[str, ...]],
                       neurons: Sequence[ImportedNeuron], results: Sequence[NeuronResult]) -> None:
        """Write imported neurons (the excerpts their records are the first to use, statistics, records, related
        lists) and their explanations with scores, in one transaction: a neuron is either wholly in the store or
        not at all."""
        import pyarrow as pa

        records = [(n.stats.layer, n.stats.index, r) for n in neurons for r in n.records]
        with self.transaction():  # type: ignore[attr-defined]
            if excerpts:
                self._insert("excerpts", "run_id, excerpt_id, token_ids, tokens", pa.table({  # type: ignore[attr-defined]
                    "run_id": pa.array(np.full(len(excerpts), run_id, np.int32)),
                    "excerpt_id": pa.array(list(excerpts), pa.int64()),
                    "token_ids": pa.array([None] * len(excerpts), pa.list_(pa.int32())),
                    "tokens": pa.array([list(t) for t in excerpts.values()], pa.list_(pa.string())),
                }))
            if records:
                scales, blobs = _quantized([r.activations for _, _, r in records])
                self._insert("records", "run_id, layer, neuron, kind, rank, bin, excerpt_id, max_act, min_act, scale, "  # type: ignore[attr-defined]
                             "acts", pa.table({
                                 "run_id": pa.array(np.full(len(records), run_id, np.int32)),
                                 "layer": pa.array([layer for layer, _, _ in records], pa.int16()),
                                 "neuron": pa.array([neuron for _, neuron, _ in records], pa.int32()),
                                 "kind": pa.array([r.kind for _, _, r in records], pa.string()),
                                 "rank": pa.array([r.rank for _, _, r in records], pa.int16()),
                                 "bin": pa.array([r.bin for _, _, r in records], pa.int16()),
                                 "excerpt_id": pa.array([r.excerpt_id for _, _, r in records], pa.int64()),
                                 "max_act": pa.array([r.max for _, _, r in records], pa.float32()),
                                 "min_act": pa.array([r.min for _, _, r in records], pa.float32()),
                                 "scale": pa.array(scales, pa.float32()),
                                 "acts": pa.array(blobs, pa.binary()),
                             }))
            stats = [n.stats for n in neurons]
            self._insert("neurons", "run_id, layer, neuron, count, mean, variance, skewness, kurtosis, max_act, "  # type: ignore[attr-defined]
                         "min_act, density, selectivity, quantile_edges", pa.table({
                             "run_id": pa.array(np.full(len(stats), run_id, np.int32)),
                             "layer": pa.array([s.layer for s in stats], pa.int16()),
                             "neuron": pa.array([s.index for s in stats], pa.int32()),
                             "count": pa.array([s.count for s in stats], pa.int64()),
                             **{name: pa.array([getattr(s, name) for s in stats], pa.float64())
                                for name in ("mean", "variance", "skewness", "kurtosis")},
                             "max_act": pa.array([s.max for s in stats], pa.float32()),
                             "min_act": pa.array([s.min for s in stats], pa.float32()),
                             "density": pa.array([s.density for s in stats], pa.float32()),
                             "selectivity": pa.array([s.selectivity for s in stats], pa.float32()),
                             "quantile_edges": pa.array([list(s.quantile_edges) for s in stats], pa.list_(pa.float32())),
                         }))
            self._write_related(run_id, [(n.stats.layer, n.stats.index, n.related_tokens, n.related_neurons)
                                         for n in neurons])
            self._write_results(job_id, run_id, results)  # type: ignore[attr-defined]

    def write_related(self, run_id: int, lists: Sequence[tuple[int, int, dict[str, list[tuple[str, float]]],
                                                                dict[str, list[tuple[int, int, float]]]]]) -> None:
        """Replace the related lists of some neurons: (layer, neuron, token lists, neuron lists) each, in one
        transaction (lists a neuron is not given keep their rows)."""
        with self.transaction():  # type: ignore[attr-defined]
            self._write_related(run_id, lists, replace=True)

    def _write_related(self, run_id: int, lists: Sequence[tuple[int, int, dict[str, list[tuple[str, float]]],
                                                                dict[str, list[tuple[int, int, float]]]]],
                       *, replace: bool = False) -> None:
        import pyarrow as pa

        tokens = [(layer, neuron, name, rank, token, value) for layer, neuron, token_lists, _ in lists
                  for name, entries in token_lists.items() for rank, (token, value) in enumerate(entries)]
        others = [(layer, neuron, name, rank, other, index, value) for layer, neuron, _, neuron_lists in lists
                  for name, entries in neuron_lists.items() for rank, (other, index, value) in enumerate(entries)]
        if replace:
            for table, rows in (("related_tokens", tokens), ("related_neurons", others)):
                keys = sorted({(row[0], row[1], row[2]) for row in rows})
                if keys:
                    self.con.register("_keys_in", pa.table({
                        "layer": pa.array([k[0] for k in keys], pa.int16()),
                        "neuron": pa.array([k[1] for k in keys], pa.int32()),
                        "list": pa.array([k[2] for k in keys], pa.string())}))
                    self.con.execute(f"DELETE FROM {table} t USING _keys_in k WHERE t.run_id = ? AND t.layer = k.layer "
                                     "AND t.neuron = k.neuron AND t.list = k.list", [run_id])
                    self.con.unregister("_keys_in")
        if tokens:
            self._insert("related_tokens", "run_id, layer, neuron, list, rank, token, value", pa.table({  # type: ignore[attr-defined]
                "run_id": pa.array(np.full(len(tokens), run_id, np.int32)),
                "layer": pa.array([t[0] for t in tokens], pa.int16()),
                "neuron": pa.array([t[1] for t in tokens], pa.int32()),
                "list": pa.array([t[2] for t in tokens], pa.string()),
                "rank": pa.array([t[3] for t in tokens], pa.int16()),
                "token": pa.array([t[4] for t in tokens], pa.string()),
                "value": pa.array([t[5] for t in tokens], pa.float32()),
            }))
        if others:
            self._insert("related_neurons", "run_id, layer, neuron, list, rank, other_layer, other_neuron, value",  # type: ignore[attr-defined]
                         pa.table({
                             "run_id": pa.array(np.full(len(others), run_id, np.int32)),
                             "layer": pa.array([t[0] for t in others], pa.int16()),
                             "neuron": pa.array([t[1] for t in others], pa.int32()),
                             "list": pa.array([t[2] for t in others], pa.string()),
                             "rank": pa.array([t[3] for t in others], pa.int16()),
                             "other_layer": pa.array([t[4] for t in others], pa.int16()),
                             "other_neuron": pa.array([t[5] for t in others], pa.int32()),
                             "value": pa.array([t[6] for t in others], pa.float32()),
                         }))

    def related_tokens(self, run_id: int, layer: int, neuron: int) -> dict[str, list[tuple[str, float]]]:
        """A neuron's related-token lists: name -> [(token, value)] in rank order."""
        if not self._has_related():
            return {}
        out: dict[str, list[tuple[str, float]]] = {}
        for name, token, value in self.con.execute(
                "SELECT list, token, value FROM related_tokens WHERE run_id = ? AND layer = ? AND neuron = ? "
                "ORDER BY list, rank", [run_id, layer, neuron]).fetchall():
            out.setdefault(name, []).append((token, float(value)))
        return out

    def related_neurons(self, run_id: int, layer: int, neuron: int) -> dict[str, list[tuple[int, int, float]]]:
        """A neuron's related-neuron lists: name -> [(layer, neuron, weight)] in rank order."""
        if not self._has_related():
            return {}
        out: dict[str, list[tuple[int, int, float]]] = {}
        for name, other, index, value in self.con.execute(
                "SELECT list, other_layer, other_neuron, value FROM related_neurons WHERE run_id = ? AND layer = ? "
                "AND neuron = ? ORDER BY list, rank", [run_id, layer, neuron]).fetchall():
            out.setdefault(name, []).append((int(other), int(index), float(value)))
        return out

    def export_tables(self, run_id: int) -> dict[str, Any]:
        """A run's tables for a Parquet export, as Arrow tables: `neurons` (statistics, each with its newest selected
        positive-tail explanation and that explanation's test score), `explanations` (every explanation, one row per
        score: split, simulator, method, value, interval), `related_tokens` and `related_neurons`."""
        out = {
            "neurons": self.con.sql(
                f"WITH {_CHOSEN_POS} "
                "SELECT n.layer, n.neuron, n.count, n.mean, n.variance, n.skewness, n.kurtosis, n.max_act, n.min_act, "
                "n.density, n.selectivity, n.quantile_edges, c.text AS explanation, c.explainer, h.value AS score, "
                "h.ci_low AS score_low, h.ci_high AS score_high FROM neurons n "
                "LEFT JOIN chosen c ON c.layer = n.layer AND c.neuron = n.neuron "
                "LEFT JOIN headline h ON h.explanation_id = c.explanation_id "
                "WHERE n.run_id = ? ORDER BY n.layer, n.neuron", params=[run_id, run_id]).to_arrow_table(),
            "explanations": self.con.sql(
                "SELECT e.layer, e.neuron, e.tail, e.explanation_id, e.role, e.explainer, e.sample, e.selected, e.text, "
                "e.source_layer, e.source_neuron, e.job_id, s.split, s.simulator, s.method, s.value, s.ci_low, "
                "s.ci_high, s.n, s.flags FROM explanations e LEFT JOIN scores s USING (explanation_id) "
                "WHERE e.run_id = ? ORDER BY e.layer, e.neuron, e.tail, e.explanation_id, s.split, s.simulator, "
                "s.method", params=[run_id]).to_arrow_table(),
        }
        if self._has_related():
            for table in ("related_tokens", "related_neurons"):
                out[table] = self.con.sql(f"SELECT * EXCLUDE (run_id) FROM {table} WHERE run_id = ? "
                                          "ORDER BY layer, neuron, list, rank", params=[run_id]).to_arrow_table()
        return out

    def neuron_bundles(self, run_id: int, layer: int, first: int, last: int) -> list[NeuronBundle]:
        """Everything on the neurons first..last of a layer (those the run holds), in a handful of queries: what
        exports read, neuron by neuron, at a thousandth of the queries `records` and `explanations` would take."""
        where, params = "run_id = ? AND layer = ? AND neuron BETWEEN ? AND ?", [run_id, layer, first, last]
        stats = self._stats_query(f"WHERE {where} ORDER BY neuron", params)  # type: ignore[attr-defined]
        records: dict[int, list[ActivationRecord]] = {}
        for neuron, kind, rank, bin_, excerpt, scale, acts, high, low, tokens in self.con.execute(
                "SELECT r.neuron, r.kind, r.rank, r.bin, r.excerpt_id, r.scale, r.acts, r.max_act, r.min_act, e.tokens "
                "FROM records r JOIN excerpts e ON e.run_id = r.run_id AND e.excerpt_id = r.excerpt_id "
                "WHERE r.run_id = ? AND r.layer = ? AND r.neuron BETWEEN ? AND ? ORDER BY r.neuron, r.kind, r.rank",
                params).fetchall():
            records.setdefault(int(neuron), []).append(ActivationRecord(
                kind=kind, rank=rank, excerpt_id=excerpt, tokens=tuple(tokens), bin=bin_,
                activations=tuple(decode(scale, acts).tolist()), exact_max=high, exact_min=low))
        rows = self.con.execute(
            "SELECT explanation_id, text, explainer, role, sample, selected, source_layer, source_neuron, tail, neuron "
            f"FROM explanations WHERE {where} ORDER BY neuron, job_id DESC, explanation_id", params).fetchall()
        explanations: dict[int, dict[str, list[ScoredExplanation]]] = {}
        for row, scored in zip(rows, self._scored(rows)):  # type: ignore[attr-defined]
            explanations.setdefault(int(row[9]), {}).setdefault(row[8], []).append(scored)
        token_lists: dict[int, dict[str, list[tuple[str, float]]]] = {}
        neuron_lists: dict[int, dict[str, list[tuple[int, int, float]]]] = {}
        if self._has_related():
            for neuron, name, token, value in self.con.execute(
                    f"SELECT neuron, list, token, value FROM related_tokens WHERE {where} ORDER BY neuron, list, rank",
                    params).fetchall():
                token_lists.setdefault(int(neuron), {}).setdefault(name, []).append((token, float(value)))
            for neuron, name, other, index, value in self.con.execute(
                    "SELECT neuron, list, other_layer, other_neuron, value FROM related_neurons "
                    f"WHERE {where} ORDER BY neuron, list, rank", params).fetchall():
                neuron_lists.setdefault(int(neuron), {}).setdefault(name, []).append(
                    (int(other), int(index), float(value)))
        order = {kind: i for i, kind in enumerate(("top", "bottom", "random", "quantile", "scored"))}
        return [NeuronBundle(
            stats=s, records=tuple(sorted(records.get(s.index, []), key=lambda r: (order.get(r.kind, 9), r.rank))),
            explanations={tail: tuple(found) for tail, found in explanations.get(s.index, {}).items()},
            related_tokens=token_lists.get(s.index, {}), related_neurons=neuron_lists.get(s.index, {}))
            for s in stats]

    def run_neurons(self, run_id: int) -> list[tuple[int, int]]:
        """(layer, neuron) of every neuron a run holds, in order."""
        rows = self.con.execute("SELECT layer, neuron FROM neurons WHERE run_id = ? ORDER BY layer, neuron",
                                [run_id]).fetchall()
        return [(int(r[0]), int(r[1])) for r in rows]
