"""The store's SQL for browsing a run's neurons a page at a time: sorted, filtered and searched in DuckDB,
so a view never holds more rows than it shows. Mixed into neuronscope.core.store.Store.

Choosing each neuron's newest selected explanation and joining its score costs more than the sort itself (about
150 ms at GPT-2 XL scale, 307,200 neurons), so it is done once per connection into a temporary table, made again
whenever explanations, scores or runs changed since (a fingerprint of row counts, about 1 ms per query); sorts,
filters, counts and positions then read that one table (works on a read-only store too)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from neuronscope.core.ids import NeuronId
from neuronscope.core.records import FIRST_POSITION
from neuronscope.core.results import NeuronRow
from neuronscope.core.store.explanations import CHOSEN_POS_CTES
from neuronscope.core.store.schema import StoreError

#: Sort orders of the browser: columns of the browse table, each sorted with NULLS LAST and ties broken by position.
#: Unknown values (an imported run's density) are NULL in the browse table, so they sort last both ways.
BROWSE_ORDERS = {"layer": "layer", "score": "value", "max": "max_act", "density": "density",
                 "selectivity": "selectivity"}

#: Every neuron of a run with its newest selected pos-tail explanation and that explanation's headline score: the
#: joins every browse query needs, made once per connection into a temporary table (`_browse_table`).
_BROWSE_BASE = f"""
WITH {CHOSEN_POS_CTES}
SELECT n.layer, n.neuron, c.explanation_id, coalesce(c.text, '') AS text, h.value, h.ci_low, h.ci_high, n.max_act,
       CASE WHEN isnan(n.density) THEN NULL ELSE n.density END AS density, n.selectivity,
       {{first_peak}} AS first_peak, coalesce(c.role = 'user', false) AS human
FROM neurons n
LEFT JOIN chosen c ON c.layer = n.layer AND c.neuron = n.neuron
LEFT JOIN headline h ON h.explanation_id = c.explanation_id
WHERE n.run_id = ?
ORDER BY n.layer, n.neuron"""

#: What the browse table depends on: explanations and scores are only ever appended, neurons and runs only change
#: with whole runs; the last item says whether the table still exists (a rolled-back transaction drops it).
_FINGERPRINT = """SELECT (SELECT count(*) FROM explanations), (SELECT count(*) FROM scores),
    (SELECT count(*) FROM neurons), (SELECT max(run_id) FROM runs),
    (SELECT count(*) FROM duckdb_tables() WHERE temporary AND table_name = ?)"""

_ROW_COLUMNS = "layer, neuron, text, value, ci_low, ci_high, max_act, density, selectivity, human"


@dataclass(frozen=True)
class BrowseQuery:
    """What the browser shows: an order and the filters every row must pass."""

    order: str = "layer"
    """A key of BROWSE_ORDERS."""
    descending: bool = False
    """Largest first."""
    layers: tuple[int, int] | None = None
    """Inclusive layer range (None: all)."""
    score: tuple[float, float] | None = None
    """Inclusive range of the headline score; only scored neurons pass (None: no condition)."""
    explained: bool | None = None
    """True: only neurons with an explanation; False: only those without; None: both."""
    search: str | None = None
    """A substring the explanation must contain, case-insensitively (None: no condition)."""
    first_position: bool | None = None
    """False: hide the neurons whose top records peak at their first position (FIRST_POSITION of them or more, likely
    position artefacts); True: only those; None: both."""
    tag: str | None = None
    """Only the neurons tagged so, by anyone (None: no condition)."""

    @property
    def filtered(self) -> bool:
        """Whether any filter or search narrows the rows."""
        return any(x is not None for x in (self.layers, self.score, self.explained, self.search, self.first_position,
                                           self.tag))


def _like_pattern(text: str) -> str:
    """A substring pattern for ILIKE ... ESCAPE '\\' that matches `text` literally."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _row(r: tuple[Any, ...], tags: tuple[str, ...] = (), noted: bool = False) -> NeuronRow:
    return NeuronRow(layer=int(r[0]), neuron=int(r[1]), explanation=r[2], score=r[3], ci_low=r[4], ci_high=r[5],
                     max_act=float(r[6]), density=float("nan") if r[7] is None else float(r[7]),
                     selectivity=float(r[8] or 0.0), human=bool(r[9]),
                     tags=tags, noted=noted)


class BrowseMixin:
    con: Any
    _has_column: Any

    def _browse_table(self, run_id: int) -> str:
        """The name of the run's browse table on this connection, (re)made when the store changed since."""
        name = f"_browse_run{int(run_id)}"
        made: dict[int, tuple[Any, tuple[Any, ...]]] = self.__dict__.setdefault("_browse_tables", {})
        fingerprint = tuple(self.con.execute(_FINGERPRINT, [name]).fetchall()[0])
        known = made.get(run_id)
        if known is None or known[0] is not self.con or known[1] != fingerprint:
            first_peak = "n.first_peak" if self._has_column("first_peak", "neurons") else "NULL"
            self.con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS {_BROWSE_BASE.format(first_peak=first_peak)}",
                             [run_id, run_id])
            made[run_id] = (self.con, (*fingerprint[:-1], 1))
        return name

    def _browse_sql(self, columns: str, run_id: int, query: BrowseQuery) -> tuple[str, list[Any]]:
        sql = f"SELECT {columns} FROM {self._browse_table(run_id)} b WHERE true"
        params: list[Any] = []
        if query.tag is not None:
            sql += (" AND EXISTS (SELECT 1 FROM tags t WHERE t.run_id = ? AND t.tag = ? AND t.layer = b.layer "
                    "AND t.neuron = b.neuron)")
            params += [run_id, query.tag]
        if query.layers is not None:
            sql += " AND layer BETWEEN ? AND ?"
            params += [query.layers[0], query.layers[1]]
        if query.score is not None:
            sql += " AND value BETWEEN ? AND ?"
            params += [query.score[0], query.score[1]]
        if query.search:
            sql += " AND explanation_id IS NOT NULL AND text ILIKE ? ESCAPE '\\'"
            params.append(_like_pattern(query.search))
        if query.explained is not None:
            sql += " AND explanation_id IS NOT NULL" if query.explained else " AND explanation_id IS NULL"
        if query.first_position is not None:
            sql += f" AND coalesce(first_peak, 0) {'>=' if query.first_position else '<'} ?"
            params.append(FIRST_POSITION)
        return sql, params

    @staticmethod
    def _order_keys(query: BrowseQuery) -> str:
        if query.order not in BROWSE_ORDERS:
            raise StoreError(f"cannot order by {query.order!r}: use one of {', '.join(BROWSE_ORDERS)}")
        direction = "DESC" if query.descending else "ASC"
        column = BROWSE_ORDERS[query.order]
        ties = f", neuron {direction}" if query.order == "layer" else ", layer, neuron"
        return f"{column} {direction} NULLS LAST{ties}"

    def neuron_rows(self, run_id: int, query: BrowseQuery = BrowseQuery(), *, offset: int = 0,
                    limit: int = 200) -> list[NeuronRow]:
        """One page of a run's neurons in the query's order, filtered."""
        keys = self._order_keys(query)
        sql, params = self._browse_sql(_ROW_COLUMNS, run_id, query)
        rows = self.con.execute(f"{sql} ORDER BY {keys} LIMIT ? OFFSET ?", [*params, limit, offset]).fetchall()
        triage: dict[tuple[int, int], tuple[tuple[str, ...], bool]] = {}
        if rows:  # the page's tags and notes, read after it is cut: a sort never reads the tags table
            triage = {(int(r[0]), int(r[1])): (tuple(r[2] or ()), bool(r[3])) for r in self.con.execute(
                "SELECT layer, neuron, list(DISTINCT tag ORDER BY tag) FILTER (WHERE tag <> ''), bool_or(note <> '') "
                "FROM tags WHERE run_id = ? AND list_contains(?, [layer::INTEGER, neuron]) GROUP BY ALL",
                [run_id, [[r[0], r[1]] for r in rows]]).fetchall()}
        return [_row(r, *triage.get((int(r[0]), int(r[1])), ((), False))) for r in rows]

    def neuron_count(self, run_id: int, query: BrowseQuery = BrowseQuery()) -> int:
        """How many neurons `neuron_rows` pages through."""
        sql, params = self._browse_sql("count(*)", run_id, query)
        return int(self.con.execute(sql, params).fetchall()[0][0])

    def neuron_keys(self, run_id: int, query: BrowseQuery = BrowseQuery()) -> list[NeuronId]:
        """The neuron of every row the query shows, in its order (the scope of a job on a filter)."""
        keys = self._order_keys(query)
        sql, params = self._browse_sql("layer, neuron", run_id, query)
        return [NeuronId(int(a), int(b)) for a, b in self.con.execute(f"{sql} ORDER BY {keys}", params).fetchall()]

    def _positions(self, run_id: int, query: BrowseQuery) -> tuple[str, list[Any]]:
        """The query's rows numbered from 0 in its order, as SQL over (pos, layer, neuron, explained)."""
        keys = self._order_keys(query)
        sql, params = self._browse_sql(
            f"row_number() OVER (ORDER BY {keys}) - 1 AS pos, layer, neuron, explanation_id IS NOT NULL AS explained",
            run_id, query)
        return sql, params

    def neuron_position(self, run_id: int, query: BrowseQuery, layer: int, neuron: int) -> int | None:
        """Where a neuron sits in the query's rows (None if the filters hide it)."""
        sql, params = self._positions(run_id, query)
        row = self.con.execute(f"SELECT pos FROM ({sql}) WHERE layer = ? AND neuron = ?",
                               [*params, layer, neuron]).fetchall()
        return int(row[0][0]) if row else None

    def next_unexplained(self, run_id: int, query: BrowseQuery, after: int) -> int | None:
        """The position of the first neuron without an explanation past `after` (wrapping round; None if none)."""
        sql, params = self._positions(run_id, query)
        row = self.con.execute(
            f"SELECT pos FROM ({sql}) WHERE NOT explained ORDER BY pos <= ?, pos LIMIT 1", [*params, after]).fetchall()
        return int(row[0][0]) if row else None
