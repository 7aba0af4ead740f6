"""The store's side of interop: runs filled from another tool's files (neuronscope.core.interop.importer), and
the bulk reads that exports make (neuronscope.core.interop.export). Mixed into neuronscope.core.store.Store."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from neuronscope.core.choices import RECORD_KINDS
from neuronscope.core.ids import NeuronId
from neuronscope.core.layerdata import quantize
from neuronscope.core.records import ActivationRecord, ImportedNeuron
from neuronscope.core.results import NeuronBundle, NeuronResult, ScoredExplanation
from neuronscope.core.store.explanations import CHOSEN_POS_CTES
from neuronscope.core.store.rows import decode


def _quantized(rows: Sequence[Sequence[float]]) -> tuple[list[float], list[bytes]]:
    """Each row's int8 codes and scale (neuronscope.core.layerdata.quantize), rows of one length quantised together."""
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


class InteropMixin:
    """Imports and exports."""

    con: Any

    def next_excerpt_id(self, run_id: int) -> int:
        """The first excerpt id a run has not used."""
        return int(self.con.execute("SELECT coalesce(max(excerpt_id) + 1, 0) FROM excerpts WHERE run_id = ?",
                                    [run_id]).fetchall()[0][0])

    def excerpt_texts(self, run_id: int, batch: int = 10_000) -> Iterator[tuple[int, tuple[str, ...]]]:
        """Every excerpt of a run as (excerpt id, tokens), read `batch` rows at a time (a resumed import of the whole
        GPT-2 XL release holds millions); nothing else may use the connection until the iteration ends."""
        cursor = self.con.execute("SELECT excerpt_id, tokens FROM excerpts WHERE run_id = ?", [run_id])
        while rows := cursor.fetchmany(batch):
            for excerpt_id, tokens in rows:
                yield int(excerpt_id), tuple(tokens)

    def import_neurons(self, run_id: int, job_id: int, excerpts: dict[int, tuple[str, ...]],
                       neurons: Sequence[ImportedNeuron], results: Sequence[NeuronResult], *,
                       failed: Mapping[NeuronId, str] | None = None, retried: Collection[NeuronId] = (),
                       replace: Collection[NeuronId] = (), n_excerpts: int | None = None) -> None:
        """Write imported neurons (the excerpts their records are the first to use, statistics, records, related
        lists) and their explanations with scores, and the job's state of each, in one transaction: a neuron is
        either wholly in the store or not at all. Neurons in `failed` (a file of theirs was skipped; those not in
        `neurons` were not readable at all) are marked failed, the others done; `retried`: those the job had marked
        failed before. `replace`: neurons the run holds already, whose rows (and the explanations imports wrote for
        them, with their simulations and scores) are removed first. `n_excerpts`: the run's excerpts so far."""
        import pyarrow as pa

        failed = failed or {}
        records = [(n.stats.layer, n.stats.index, r) for n in neurons for r in n.records]
        with self.transaction():  # type: ignore[attr-defined]
            if replace:
                self._drop_imported(run_id, replace)
            states = [(n.stats.layer, n.stats.index, "done", "") for n in neurons
                      if NeuronId(n.stats.layer, n.stats.index) not in failed]
            states += [(n.layer, n.neuron, "failed", error) for n, error in failed.items()]
            if states:
                self._mark(job_id, states, retried)  # type: ignore[attr-defined]
                self._settle_other_imports(run_id, job_id, {NeuronId(s[0], s[1]) for s in states if s[2] == "done"})
            if n_excerpts is not None:
                self.con.execute("UPDATE runs SET n_excerpts = ? WHERE run_id = ?", [n_excerpts, run_id])
            if not neurons:
                return
            if excerpts:
                self._insert("excerpts", pa.table({  # type: ignore[attr-defined]
                    "run_id": pa.array(np.full(len(excerpts), run_id, np.int32)),
                    "excerpt_id": pa.array(list(excerpts), pa.int64()),
                    "token_ids": pa.array([None] * len(excerpts), pa.list_(pa.int32())),
                    "tokens": pa.array([list(t) for t in excerpts.values()], pa.list_(pa.string())),
                }))
            if records:
                scales, blobs = _quantized([r.activations for _, _, r in records])
                self._insert("records", pa.table({  # type: ignore[attr-defined]
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
            self._insert("neurons", pa.table({  # type: ignore[attr-defined]
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
            related = [(n.stats.layer, n.stats.index, n.related_tokens, n.related_neurons) for n in neurons]
            self._write_related(run_id, related)  # type: ignore[attr-defined]
            self._write_results(job_id, run_id, results)  # type: ignore[attr-defined]

    def _drop_imported(self, run_id: int, neurons: Collection[NeuronId]) -> None:
        """Remove what imports wrote of some neurons of a run: statistics, records, related lists, and the
        explanations of import jobs with their simulations and scores (a person's or a job's own stay). Their
        excerpts stay: the records written again point at them."""
        pairs = ", ".join(f"({int(a)}, {int(b)})" for a, b in neurons)
        related = self._has_table("related")  # type: ignore[attr-defined]
        tables = ["neurons", "records"] + (["related"] if related else [])
        for table in tables:
            self.con.execute(f"DELETE FROM {table} WHERE run_id = ? AND (layer, neuron) IN ({pairs})", [run_id])
        imported = (f"SELECT explanation_id FROM explanations WHERE run_id = ? AND (layer, neuron) IN ({pairs}) "
                    "AND job_id IN (SELECT job_id FROM jobs WHERE run_id = ? AND kind = 'import')")
        for table in ("simulations", "scores", "explanations"):
            self.con.execute(f"DELETE FROM {table} WHERE explanation_id IN ({imported})", [run_id, run_id])

    def _settle_other_imports(self, run_id: int, job_id: int, done: set[NeuronId]) -> None:
        """Neurons that other import jobs of the run (another --layers) recorded failed, read whole now by this one:
        done in those jobs too (`info` counts them there no more as failed)."""
        rows = self.con.execute(
            "SELECT n.job_id, n.layer, n.neuron FROM job_neurons n JOIN jobs j USING (job_id) WHERE j.run_id = ? AND "
            "j.kind = 'import' AND n.job_id <> ? AND n.state = 'failed'", [run_id, job_id]).fetchall()
        settled: dict[int, list[NeuronId]] = {}
        for other, layer, neuron in rows:
            if NeuronId(layer, neuron) in done:
                settled.setdefault(other, []).append(NeuronId(layer, neuron))
        for other, neurons in settled.items():
            self._mark(other, [(n.layer, n.neuron, "done", "") for n in neurons], set(neurons))  # type: ignore[attr-defined]

    def import_failures(self, run_id: int) -> set[NeuronId]:
        """The neurons of a run whose newest state in its import jobs is failed (a file of theirs was skipped):
        the next import of the folder reads them again."""
        rows = self.con.execute(
            "SELECT layer, neuron FROM (SELECT n.layer, n.neuron, n.state, row_number() OVER (PARTITION BY n.layer, "
            "n.neuron ORDER BY n.updated_at DESC, n.state = 'done' DESC) AS k FROM job_neurons n JOIN jobs j "
            "USING (job_id) WHERE j.run_id = ? AND j.kind = 'import') WHERE k = 1 AND state = 'failed'",
            [run_id]).fetchall()
        return {NeuronId(int(a), int(b)) for a, b in rows}

    def import_layers(self, run_id: int) -> tuple[int, ...] | None:
        """The layers the newest import job of a run was asked for (None: all, or no import job)."""
        rows = self.con.execute("SELECT params FROM jobs WHERE run_id = ? AND kind = 'import' ORDER BY job_id DESC "
                                "LIMIT 1", [run_id]).fetchall()
        layers = json.loads(rows[0][0]).get("layers") if rows else None
        return tuple(int(x) for x in layers) if layers is not None else None

    def export_tables(self, run_id: int, layers: Sequence[int] | None = None) -> dict[str, Any]:
        """A run's tables for a Parquet export, as Arrow tables: `neurons` (statistics, each with its newest selected
        positive-tail explanation and that explanation's test score), `explanations` (every explanation, one row per
        score: split, simulator, method, value, interval), `related` (a neuron's related lists, one row per list) and
        `tags` (a person's tags and notes, with author and time) and `lists` (named lists of neurons: the app's marks
        and those saved under a name), the last three where the run has rows. `layers`: only the neurons of these
        layers (None: every layer)."""
        only, wanted = ("", []) if layers is None else (" AND list_contains(?, layer)", [[int(x) for x in layers]])
        out = {
            "neurons": self.con.sql(
                f"WITH {CHOSEN_POS_CTES} "
                "SELECT n.layer, n.neuron, n.count, n.mean, n.variance, n.skewness, n.kurtosis, n.max_act, n.min_act, "
                "n.density, n.selectivity, n.quantile_edges, c.text AS explanation, c.explainer, h.value AS score, "
                "h.ci_low AS score_low, h.ci_high AS score_high FROM neurons n "
                "LEFT JOIN chosen c ON c.layer = n.layer AND c.neuron = n.neuron "
                "LEFT JOIN headline h ON h.explanation_id = c.explanation_id "
                f"WHERE n.run_id = ?{only.replace('layer', 'n.layer')} ORDER BY n.layer, n.neuron",
                params=[run_id, run_id, *wanted]).to_arrow_table(),
            "explanations": self.con.sql(
                "SELECT e.layer, e.neuron, e.tail, e.explanation_id, e.role, e.explainer, e.sample, e.selected, "
                "e.text, e.source_layer, e.source_neuron, e.job_id, s.split, s.simulator, s.method, s.value, s.ci_low, "
                "s.ci_high, s.n, s.flags FROM explanations e LEFT JOIN scores s USING (explanation_id) "
                f"WHERE e.run_id = ?{only.replace('layer', 'e.layer')} ORDER BY e.layer, e.neuron, e.tail, "
                "e.explanation_id, s.split, s.simulator, s.method", params=[run_id, *wanted]).to_arrow_table(),
        }
        if self._has_table("related"):  # type: ignore[attr-defined]
            out["related"] = self.con.sql(f"SELECT * EXCLUDE (run_id) FROM related WHERE run_id = ?{only} "
                                          "ORDER BY layer, neuron, list", params=[run_id, *wanted]).to_arrow_table()
        if self.tags(run_id):  # type: ignore[attr-defined]
            out["tags"] = self.con.sql("SELECT layer, neuron, tag, note, author, created_at FROM tags WHERE run_id = ?"
                                       f"{only} ORDER BY created_at, layer, neuron",
                                       params=[run_id, *wanted]).to_arrow_table()
        if self.saved_lists(run_id):  # type: ignore[attr-defined]
            out["lists"] = self.con.sql("SELECT * FROM (SELECT name, layer, neuron, author, saved_at FROM lists "
                                        "WHERE run_id = ? AND layer IS NOT NULL QUALIFY saved_at = max(saved_at) OVER "
                                        f"(PARTITION BY name)) WHERE true{only} ORDER BY name, layer, neuron",
                                        params=[run_id, *wanted]).to_arrow_table()
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
            "SELECT explanation_id, text, explainer, role, sample, selected, source_layer, source_neuron, tail, "
            "job_id, neuron "
            f"FROM explanations WHERE {where} ORDER BY neuron, job_id DESC, explanation_id", params).fetchall()
        explanations: dict[int, dict[str, list[ScoredExplanation]]] = {}
        for row, scored in zip(rows, self._scored(rows)):  # type: ignore[attr-defined]
            explanations.setdefault(int(row[10]), {}).setdefault(row[8], []).append(scored)
        related: dict[int, list[tuple[Any, ...]]] = {}
        if self._has_table("related"):  # type: ignore[attr-defined]
            for row in self.con.execute(
                    f'SELECT neuron, list, tokens, other_layers, other_neurons, "values" FROM related WHERE {where} '
                    "ORDER BY neuron, list", params).fetchall():
                related.setdefault(int(row[0]), []).append(row[1:])
        order = {kind: i for i, kind in enumerate(RECORD_KINDS)}
        out = []
        for stat in stats:
            token_lists, neuron_lists = self._related_rows(related.get(stat.index, []))  # type: ignore[attr-defined]
            out.append(NeuronBundle(
                stats=stat,
                records=tuple(sorted(records.get(stat.index, []), key=lambda r: (order.get(r.kind, 9), r.rank))),
                explanations={tail: tuple(found) for tail, found in explanations.get(stat.index, {}).items()},
                related_tokens=token_lists, related_neurons=neuron_lists))
        return out

    def run_neurons(self, run_id: int) -> list[NeuronId]:
        """Every neuron a run holds, in order."""
        rows = self.con.execute("SELECT layer, neuron FROM neurons WHERE run_id = ? ORDER BY layer, neuron",
                                [run_id]).fetchall()
        return [NeuronId(int(r[0]), int(r[1])) for r in rows]
