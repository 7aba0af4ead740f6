"""What tests of jobs in several processes watch: a store's spool emptying and filling again while they run."""

from __future__ import annotations

from pathlib import Path


class SpoolWatch:
    """Watches a store's spool while jobs run: `folded_midway` once it emptied (a fold) and then filled again
    while they still ran (so not a process's fold as it exits). Call `look()` often."""

    def __init__(self, store: Path) -> None:
        from neuronscope.core.store.spool import Spool

        self.spool = Spool(store)
        self.last, self.folded, self.resumed = 0, False, False

    def look(self) -> None:
        published = len(self.spool.names())
        self.resumed |= self.folded and published > self.last
        self.folded |= published < self.last
        self.last = published

    @property
    def folded_midway(self) -> bool:
        return self.folded and self.resumed
