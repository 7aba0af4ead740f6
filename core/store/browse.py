"""The store's SQL for browsing a run's neurons a page at a time: sorted, filtered and searched in DuckDB,
so a view never holds more rows than it shows. Mixed into core.store.Store."""

from __future__ import annotations

from typing import Any

from core.results import NeuronRow
from core.store.results import CHOSEN_CTES
from core.store.schema import StoreError

#: Sort orders of the browser: column expressions, each sorted with NULLS LAST and ties broken by position.
BROWSE_ORDERS = {"layer": "n.layer", "score": "h.value", "max": "n.max_act", "density": "n.density",
                 "selectivity": "n.selectivity"}

_BROWSE_FROM = f"""
WITH {CHOSEN_CTES.format(where=" AND tail = 'pos' AND role IN ('candidate', 'user')")}
SELECT {{columns}}
FROM neurons n
LEFT JOIN chosen c ON c.layer = n.layer AND c.neuron = n.neuron
LEFT JOIN headline h ON h.explanation_id = c.explanation_id
WHERE n.run_id = ?"""


def _like_pattern(text: str) -> str:
    """A substring pattern for ILIKE ... ESCAPE '\\' that matches `text` literally."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class BrowseMixin:
    con: Any

    def _browse_sql(self, columns: str, run_id: int, layers: tuple[int, int] | None, search: str | None,
                    explained: bool | None) -> tuple[str, list[Any]]:
        sql = _BROWSE_FROM.format(columns=columns)
        params: list[Any] = [run_id, run_id]
        if layers is not None:
            sql += " AND n.layer BETWEEN ? AND ?"
            params += [layers[0], layers[1]]
        if search:
            sql += " AND c.text ILIKE ? ESCAPE '\\'"
            params.append(_like_pattern(search))
        if explained is not None:
            sql += " AND c.explanation_id IS NOT NULL" if explained else " AND c.explanation_id IS NULL"
        return sql, params

    def neuron_rows(self, run_id: int, *, order: str = "layer", descending: bool = False,
                    layers: tuple[int, int] | None = None, search: str | None = None, explained: bool | None = None,
                    offset: int = 0, limit: int = 200) -> list[NeuronRow]:
        """One page of a run's neurons, sorted and filtered; search matches explanations case-insensitively."""
        if order not in BROWSE_ORDERS:
            raise StoreError(f"cannot order by {order!r}: use one of {', '.join(BROWSE_ORDERS)}")
        direction = "DESC" if descending else "ASC"
        column = BROWSE_ORDERS[order]
        keys = f"{column} {direction} NULLS LAST" + (f", n.neuron {direction}" if order == "layer" else ", n.layer, n.neuron")
        sql, params = self._browse_sql(
            "n.layer, n.neuron, coalesce(c.text, ''), h.value, h.ci_low, h.ci_high, n.max_act, n.density, "
            "n.selectivity", run_id, layers, search, explained)
        rows = self.con.execute(f"{sql} ORDER BY {keys} LIMIT ? OFFSET ?", [*params, limit, offset]).fetchall()
        return [NeuronRow(layer=int(r[0]), neuron=int(r[1]), explanation=r[2], score=r[3], ci_low=r[4], ci_high=r[5],
                          max_act=float(r[6]), density=float(r[7]), selectivity=float(r[8] or 0.0)) for r in rows]

    def neuron_count(self, run_id: int, *, layers: tuple[int, int] | None = None, search: str | None = None,
                     explained: bool | None = None) -> int:
        """How many neurons `neuron_rows` pages through with these filters."""
        sql, params = self._browse_sql("count(*)", run_id, layers, search, explained)
        return int(self.con.execute(sql, params).fetchall()[0][0])
