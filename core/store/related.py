"""The store's related-token and related-neuron lists shown beside a neuron (computed by
neuronscope.core.models.relations or imported). Mixed into neuronscope.core.store.Store.

The related table was added without a schema version bump (`RELATED_TABLES`, made with a new store and by
the first writable open of an older one); reading a store opened read-only that lacks it gives empty lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

RELATED_TABLES = """
CREATE TABLE IF NOT EXISTS related (
    run_id INTEGER, layer SMALLINT, neuron INTEGER, list VARCHAR, tokens VARCHAR[], other_layers SMALLINT[],
    other_neurons INTEGER[], "values" REAL[]);
"""


class RelatedMixin:
    """Related lists: one row per neuron and list, its entries in list columns."""

    con: Any
    _has_table: Any

    def write_related(self, run_id: int, lists: Sequence[tuple[int, int, dict[str, list[tuple[str, float]]],
                                                                dict[str, list[tuple[int, int, float]]]]]) -> None:
        """Replace the related lists of some neurons: (layer, neuron, token lists, neuron lists) each, in one
        transaction (lists a neuron is not given keep their rows)."""
        with self.transaction():  # type: ignore[attr-defined]
            self._write_related(run_id, lists, replace=True)

    def _write_related(self, run_id: int, lists: Sequence[tuple[int, int, dict[str, list[tuple[str, float]]],
                                                                dict[str, list[tuple[int, int, float]]]]],
                       *, replace: bool = False) -> None:
        """One row per neuron and list, its entries in list columns (a neuron's lists are one small read)."""
        import pyarrow as pa

        rows: list[tuple[Any, ...]] = [
            (layer, neuron, name, [t for t, _ in entries], None, None, [v for _, v in entries])
            for layer, neuron, token_lists, _ in lists for name, entries in token_lists.items()]
        rows += [(layer, neuron, name, None, [e[0] for e in entries], [e[1] for e in entries], [e[2] for e in entries])
                 for layer, neuron, _, neuron_lists in lists for name, entries in neuron_lists.items()]
        if not rows:
            return
        columns = list(zip(*rows))
        table = pa.table({
            "run_id": pa.array(np.full(len(rows), run_id, np.int32)),
            "layer": pa.array(columns[0], pa.int16()),
            "neuron": pa.array(columns[1], pa.int32()),
            "list": pa.array(columns[2], pa.string()),
            "tokens": pa.array(columns[3], pa.list_(pa.string())),
            "other_layers": pa.array(columns[4], pa.list_(pa.int16())),
            "other_neurons": pa.array(columns[5], pa.list_(pa.int32())),
            "values": pa.array(columns[6], pa.list_(pa.float32())),
        })
        if replace:
            self.con.register("_keys_in", table.select(["layer", "neuron", "list"]))
            self.con.execute("DELETE FROM related t USING _keys_in k WHERE t.run_id = ? AND t.layer = k.layer "
                             "AND t.neuron = k.neuron AND t.list = k.list", [run_id])
            self.con.unregister("_keys_in")
        self._insert("related", table)  # type: ignore[attr-defined]

    @staticmethod
    def _related_rows(rows: Sequence[tuple[Any, ...]]) -> tuple[dict[str, list[tuple[str, float]]],
                                                               dict[str, list[tuple[int, int, float]]]]:
        """(list, tokens, other_layers, other_neurons, values) rows as (token lists, neuron lists)."""
        tokens: dict[str, list[tuple[str, float]]] = {}
        neurons: dict[str, list[tuple[int, int, float]]] = {}
        for name, names, layers, indices, values in rows:
            if names is not None:
                tokens[name] = [(t, float(v)) for t, v in zip(names, values)]
            else:
                neurons[name] = [(int(a), int(b), float(v)) for a, b, v in zip(layers, indices, values)]
        return tokens, neurons

    def related(self, run_id: int, layer: int, neuron: int) -> tuple[dict[str, list[tuple[str, float]]],
                                                                      dict[str, list[tuple[int, int, float]]]]:
        """A neuron's related-token lists (name -> [(token, value)]) and related-neuron lists (name -> [(layer,
        neuron, weight)]), each in rank order."""
        if not self._has_table("related"):
            return {}, {}
        return self._related_rows(self.con.execute(
            'SELECT list, tokens, other_layers, other_neurons, "values" FROM related WHERE run_id = ? AND layer = ? '
            "AND neuron = ? ORDER BY list", [run_id, layer, neuron]).fetchall())

    def related_tokens(self, run_id: int, layer: int, neuron: int) -> dict[str, list[tuple[str, float]]]:
        """A neuron's related-token lists (see `related`)."""
        return self.related(run_id, layer, neuron)[0]

    def related_neurons(self, run_id: int, layer: int, neuron: int) -> dict[str, list[tuple[int, int, float]]]:
        """A neuron's related-neuron lists (see `related`)."""
        return self.related(run_id, layer, neuron)[1]
