"""The store's SQL for a person's triage: tags and notes on neurons, with who wrote them and when. Mixed into
neuronscope.core.store.Store. The table is made by any writable open (no schema version bump); a store opened
read-only before one was made has none, and reads as having no tags."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from neuronscope.core.ids import NeuronId
from neuronscope.core.results import Tag

TRIAGE_TABLES = """
CREATE TABLE IF NOT EXISTS tags (
    run_id INTEGER, layer SMALLINT, neuron INTEGER, tag VARCHAR, note VARCHAR, author VARCHAR,
    created_at TIMESTAMP DEFAULT current_timestamp);
"""


class TriageMixin:
    con: Any
    _has_table: Any

    def add_tags(self, run_id: int, neurons: Sequence[NeuronId], tag: str, note: str, author: str) -> None:
        """Tag the neurons (tag '' for a note alone), with a note, by an author, now; one transaction."""
        self.con.executemany("INSERT INTO tags (run_id, layer, neuron, tag, note, author) VALUES (?, ?, ?, ?, ?, ?)",
                             [[run_id, n.layer, n.neuron, tag, note, author] for n in neurons])

    def remove_tags(self, run_id: int, neurons: Sequence[NeuronId], tag: str) -> int:
        """Take a tag off the neurons (every author's); how many taggings went."""
        pairs = [[n.layer, n.neuron] for n in neurons]
        before = self._count(run_id, tag)
        self.con.execute("DELETE FROM tags WHERE run_id = ? AND tag = ? AND list_contains(?, [layer::INTEGER, neuron])",
                         [run_id, tag, pairs])
        return before - self._count(run_id, tag)

    def _count(self, run_id: int, tag: str) -> int:
        return int(self.con.execute("SELECT count(*) FROM tags WHERE run_id = ? AND tag = ?", [run_id, tag])
                   .fetchall()[0][0])

    def tags(self, run_id: int, neurons: Sequence[NeuronId] | None = None, tag: str | None = None) -> list[Tag]:
        """Tags and notes of a run (of some neurons, or with one tag), oldest first."""
        if not self._has_table("tags"):
            return []
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
