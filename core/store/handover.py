"""A writable store closed for a while and taken back in place: a collection's pass of hours leaves the store to
the app, `info` and jobs, and its write waits for whoever holds it then."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuronscope.core.store.schema import StoreBusy

if TYPE_CHECKING:
    from neuronscope.core.store import Store


class HandoverMixin:
    """`set_aside`, `reopen` and `take_back` of a Store."""

    con: Any
    path: Path
    read_only: bool
    shared: Any

    def set_aside(self) -> None:
        """Close this store for a while (a collection's pass of hours), so that other processes may open it meanwhile
        (the app, `info`, jobs); `take_back` opens it for writing."""
        self.con.close()
        self.__dict__.pop("_thread_cursors", None)
        self.__dict__["_aside"] = True

    def reopen(self) -> int | None:
        """Open a store that `set_aside` closed again, in place: for writing where no other process has it open,
        else read-only, shared with them (StoreBusy where one writes it); then the process id of one of them."""
        from neuronscope.core.store import Store

        if not self.__dict__.get("_aside"):
            return None
        try:
            self._adopt(Store.open(self.path, create=False))
        except StoreBusy as busy:
            self._adopt(Store.open(self.path, read_only=True))
            return busy.pid
        return None

    def take_back(self, waiting: Callable[[int | None], None] | None = None) -> bool:
        """Open a store that `set_aside` closed, for writing, in place (one not set aside stays as it is), waiting as
        `open_when_free` does; without `waiting`, whether it could (False while another process holds it)."""
        from neuronscope.core.store import Store

        if not self.__dict__.get("_aside"):
            return True
        try:
            self._adopt(Store.open_when_free(self.path, waiting, create=False))
        except StoreBusy:
            return False
        return True

    def _adopt(self, again: Store) -> None:
        """Another open of this store's file becomes this store's own, in place."""
        self.con, self.read_only, self.shared = again.con, again.read_only, again.shared
        self.__dict__["_aside"] = False
        self._forget_shape()  # type: ignore[attr-defined]
