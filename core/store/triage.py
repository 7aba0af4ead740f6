"""The store's SQL for a person's triage: tags and notes on neurons, and named lists of neurons (the app's marks),
with who wrote them and when. Mixed into neuronscope.core.store.Store.

The tables are made by any writable open (no schema version bump). A store open read-only beside others (the app,
a job) writes them through the spool like a job's results (neuronscope.core.store.shared): a tag taken off there
is a removal row that hides every earlier tagging of it until the next writable open folds it into a delete. A
list is saved whole each time; its newest save is the list."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from neuronscope.core.ids import NeuronId
from neuronscope.core.results import Tag

#: The tags offered first (any word of letters, digits, - and _ is a tag).
SUGGESTED_TAGS = ("good", "wrong", "unclear", "polysemantic")
TAG_PATTERN = re.compile(r"[\w-]{1,40}")
#: The list the app keeps its marks in, saved as they change and shown again when it opens.
MARKS_LIST = "marked"


def tag_problem(tag: str) -> str | None:
    """Why a text is not a tag (None when it is one)."""
    if TAG_PATTERN.fullmatch(tag):
        return None
    return f"{tag!r} is not a tag: use a word of letters, digits, - and _ (e.g. {', '.join(SUGGESTED_TAGS)})"


TRIAGE_TABLES = """
CREATE TABLE IF NOT EXISTS tags (
    run_id INTEGER, layer SMALLINT, neuron INTEGER, tag VARCHAR, note VARCHAR, author VARCHAR,
    created_at TIMESTAMP DEFAULT current_timestamp);
CREATE TABLE IF NOT EXISTS lists (
    run_id INTEGER, name VARCHAR, layer SMALLINT, neuron INTEGER, author VARCHAR,
    saved_at TIMESTAMP DEFAULT current_timestamp);
"""
#: The rows a shared open spools for triage, whether or not the store has the tables yet: their columns.
TRIAGE_SPOOLED = {
    "tags": "run_id INTEGER, layer SMALLINT, neuron INTEGER, tag VARCHAR, note VARCHAR, author VARCHAR, "
            "created_at TIMESTAMP",
    "tag_removals": "run_id INTEGER, layer SMALLINT, neuron INTEGER, tag VARCHAR, created_at TIMESTAMP",
    "lists": "run_id INTEGER, name VARCHAR, layer SMALLINT, neuron INTEGER, author VARCHAR, saved_at TIMESTAMP",
}
_ARROW_TYPES = {"INTEGER": "int32", "SMALLINT": "int16", "VARCHAR": "string", "TIMESTAMP": "timestamp[us]"}
#: The Arrow type of each spooled column (every segment's files agree, even where a column is all null).
_ARROW = {table: {name: _ARROW_TYPES[kind] for name, kind in (c.split() for c in columns.split(", "))}
          for table, columns in TRIAGE_SPOOLED.items()}
#: The view of each triage table on a shared open, over the store's rows (`{store}`) and the spooled ones.
#: A removal `r` takes the tag of tagging `t` off: its note, if it has one, stays, as a note alone.
_REMOVES = ("r.run_id = t.run_id AND r.layer = t.layer AND r.neuron = t.neuron AND r.tag = t.tag AND "
            "r.created_at >= t.created_at")
_NOTED = "coalesce(t.note, '') <> ''"
TRIAGE_VIEWS = {
    "tags": "SELECT run_id, layer, neuron, CASE WHEN removed THEN '' ELSE tag END AS tag, note, author, created_at "
            "FROM (SELECT *, EXISTS (SELECT 1 FROM spool_tag_removals r WHERE " + _REMOVES + ") AS removed FROM "
            "({store} UNION ALL BY NAME SELECT * FROM spool_tags) t) t WHERE NOT removed OR " + _NOTED,
    "lists": "{store} UNION ALL BY NAME SELECT * FROM spool_lists",
}
#: What folding a spool's triage rows does after inserting them: removals take the tags they hide off (a tagging
#: with a note keeps the note), and a list's older saves go.
TRIAGE_FOLD = {
    "tag_removals": "UPDATE tags t SET tag = '' FROM {source} r WHERE " + _REMOVES + " AND " + _NOTED + "; "
                    "DELETE FROM tags t USING {source} r WHERE " + _REMOVES,
}
PRUNE_LISTS = ("DELETE FROM lists l USING (SELECT run_id, name, max(saved_at) AS newest FROM lists GROUP BY ALL) n "
                "WHERE l.run_id = n.run_id AND l.name = n.name AND l.saved_at < n.newest")
#: The newest save of each list, as CTE `saved`.
_NEWEST = ("saved AS (SELECT * FROM lists WHERE run_id = ? QUALIFY saved_at = max(saved_at) OVER "
           "(PARTITION BY name))")


class TriageMixin:
    con: Any
    shared: Any
    _segment: Any
    _spool_rows: Any

    def add_tags(self, run_id: int, neurons: Sequence[NeuronId], tag: str, note: str, author: str) -> None:
        """Tag the neurons (tag '' for a note alone), with a note, by an author, now; one transaction."""
        rows = {"run_id": [run_id] * len(neurons), "layer": [n.layer for n in neurons],
                "neuron": [n.neuron for n in neurons], "tag": [tag] * len(neurons), "note": [note] * len(neurons),
                "author": [author] * len(neurons)}
        self._write_triage("tags", rows)

    def remove_tags(self, run_id: int, neurons: Sequence[NeuronId], tag: str) -> int:
        """Take a tag off the neurons (every author's; a note written with it stays); how many taggings lost it."""
        pairs = [[n.layer, n.neuron] for n in neurons]
        gone = int(self.con.execute("SELECT count(*) FROM tags WHERE run_id = ? AND tag = ? AND "
                                    "list_contains(?, [layer::INTEGER, neuron])", [run_id, tag, pairs]).fetchall()[0][0])
        if self.shared is not None:
            self._write_triage("tag_removals", {"run_id": [run_id] * len(neurons), "layer": [p[0] for p in pairs],
                                                "neuron": [p[1] for p in pairs], "tag": [tag] * len(neurons)})
        else:
            hit = "run_id = ? AND tag = ? AND list_contains(?, [layer::INTEGER, neuron])"
            self.con.execute(f"UPDATE tags t SET tag = '' WHERE {hit} AND {_NOTED}", [run_id, tag, pairs])
            self.con.execute(f"DELETE FROM tags WHERE {hit}", [run_id, tag, pairs])
        return gone

    def tags(self, run_id: int, neurons: Sequence[NeuronId] | None = None, tag: str | None = None) -> list[Tag]:
        """Tags and notes of a run (of some neurons, or with one tag), oldest first."""
        sql = ("SELECT layer, neuron, tag, note, author, strftime(created_at, '%Y-%m-%d %H:%M') FROM tags "
               "WHERE run_id = ?")
        params: list[Any] = [run_id]
        if neurons is not None:
            sql += " AND list_contains(?, [layer::INTEGER, neuron])"
            params.append([[n.layer, n.neuron] for n in neurons])
        if tag is not None:
            sql += " AND tag = ?"
            params.append(tag)
        rows = self.con.execute(sql + " ORDER BY created_at, layer, neuron", params).fetchall()
        return [Tag(int(r[0]), int(r[1]), r[2], r[3], r[4], r[5]) for r in rows]

    def save_list(self, run_id: int, name: str, neurons: Sequence[NeuronId], author: str) -> None:
        """Save a named list of neurons (replacing the list of that name; an empty list is kept as empty)."""
        members = sorted(set(neurons)) or [None]
        self._write_triage("lists", {"run_id": [run_id] * len(members), "name": [name] * len(members),
                                     "layer": [None if n is None else n.layer for n in members],
                                     "neuron": [None if n is None else n.neuron for n in members],
                                     "author": [author] * len(members)})
        if self.shared is None:
            self.con.execute(PRUNE_LISTS)

    def list_neurons(self, run_id: int, name: str) -> list[NeuronId] | None:
        """The neurons of a named list (None: no list of that name)."""
        rows = self.con.execute(f"WITH {_NEWEST} SELECT layer, neuron FROM saved WHERE name = ? "
                                "ORDER BY layer NULLS FIRST, neuron", [run_id, name]).fetchall()
        if not rows:
            return None
        return [NeuronId(int(a), int(b)) for a, b in rows if a is not None]

    def saved_lists(self, run_id: int) -> list[tuple[str, int, str, str]]:
        """The run's named lists: name, how many neurons, who saved it last and when, newest first."""
        rows = self.con.execute(f"WITH {_NEWEST} SELECT name, count(layer), any_value(author), "
                                "strftime(max(saved_at), '%Y-%m-%d %H:%M') FROM saved GROUP BY name "
                                "ORDER BY max(saved_at) DESC, name", [run_id]).fetchall()
        return [(str(r[0]), int(r[1]), str(r[2]), str(r[3])) for r in rows]

    def _write_triage(self, table: str, columns: dict[str, list[Any]]) -> None:
        """Insert rows into a triage table: directly, or as one spool segment on a shared open (time-stamped)."""
        import pyarrow as pa

        data = pa.table({name: pa.array(values, _ARROW[table][name]) for name, values in columns.items()})
        if self.shared is not None:
            with self._segment():
                self._spool_rows(table, data)
            return
        self.con.register("_triage_in", data)
        try:
            self.con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _triage_in")
        finally:
            self.con.unregister("_triage_in")
