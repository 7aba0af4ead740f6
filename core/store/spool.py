"""The spool beside a store (`<store>.spool/`): where job processes write while other processes have the store open.

DuckDB lets one process write a file, and a writer excludes every reader. So a job never holds the store for
writing while it works: it opens the store read-only, like the app, `show` and `info`, and publishes each commit
as one segment, a folder of Parquet files (one per table with rows), written under a temporary name and renamed
into `segments/`, so a segment is whole or absent after `kill -9` at any moment. Every process with the store open
reads the store's tables with the segments laid over them (neuronscope.core.store.shared); the next process that
opens the store for writing, with nobody else in it, folds the segments into its tables and empties the spool.
A job that wants to fold as it works asks the others to close the store for a moment (`ask_fold`: a file naming
it, which every open store looks for; neuronscope.core.jobs.engine and the app step aside).

Ids that rows in several segments share (explanations, calls, jobs) come from counters kept here under a lock,
continuing the store's own sequences, so segments of different processes never collide. Jobs of several
processes split their neurons by claiming blocks with `flock`: a claim dies with its process, so the neurons of
a killed process's block go to whoever claims it next.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Where the rows of each segment table are read from: copied into memory by every open store (small tables that
#: browsing sorts and joins), or read in place from the Parquet files (large ones, read a neuron at a time).
COPIED = ("explanations", "scores", "job_neurons", "jobs", "job_events", "tags", "tag_removals", "lists")
IN_PLACE = ("simulations", "llm_calls")


#: How long a writer's request that the others close the store stands, and the pause before it asks again (it
#: doubles, up to the last, while some process keeps the store): neuronscope.core.store.spool.Asking.
ASK_SECONDS, ASK_AGAIN_SECONDS, ASK_AGAIN_MAX_SECONDS = 60.0, 60.0, 600.0


class Spool:
    """The spool folder of one store."""

    def __init__(self, store_path: Path) -> None:
        self.root = store_path.with_name(store_path.name + ".spool")
        self.segments = self.root / "segments"
        self.claims = self.root / "claims"
        self._published = 0
        self._thread_lock = threading.RLock()
        self._lock_fd: int | None = None

    def exists(self) -> bool:
        return self.segments.is_dir()

    def names(self) -> list[str]:
        """The published segments, oldest first (their names begin with the time they were written)."""
        try:
            return sorted(n for n in os.listdir(self.segments) if not n.startswith("."))
        except FileNotFoundError:
            return []

    def file(self, name: str, table: str) -> Path:
        return self.segments / name / f"{table}.parquet"

    def write(self, tables: Mapping[str, Any]) -> str:
        """Publish one segment of Arrow tables (the empty ones are left out); its name."""
        import time

        import pyarrow.parquet as pq

        self.segments.mkdir(parents=True, exist_ok=True)
        self._published += 1
        name = f"{time.time_ns():020d}-{os.getpid()}-{self._published:06d}"
        staged = self.segments / f".{name}"
        staged.mkdir()
        try:
            for table, data in tables.items():
                if data.num_rows:
                    pq.write_table(data, staged / f"{table}.parquet", compression="zstd")
            os.rename(staged, self.segments / name)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        return name

    @contextmanager
    def locked(self) -> Iterator[None]:
        """The spool's lock, across processes and threads (re-entrant): for the id counters and creating jobs."""
        with self._thread_lock:
            if self._lock_fd is not None:  # this thread holds it already
                yield
                return
            self.root.mkdir(exist_ok=True)
            fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._lock_fd = fd
                yield
            finally:
                self._lock_fd = None
                os.close(fd)  # closing releases the lock

    def allocate(self, counter: str, n: int, floor: int) -> int:
        """The first of `n` new consecutive ids of `counter`, none below `floor` (the store's next id). Call inside
        `locked`."""
        path = self.root / "ids.json"
        try:
            ids = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            ids = {}
        first = max(int(ids.get(counter, 0)), floor)
        ids[counter] = first + n
        staged = path.with_name(f".ids.{os.getpid()}")
        try:
            staged.write_text(json.dumps(ids))
            os.replace(staged, path)
        except BaseException:  # a full disk: no empty file left behind
            staged.unlink(missing_ok=True)
            raise
        return first

    def claim(self, job_id: int, block: int, *, wait: bool) -> int | None:
        """Claim a block of a job's neurons for this process: a file descriptor to `release`, or None when another
        process holds it (and `wait` is false). A claim ends with its process, however it ends."""
        self.claims.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.claims / f"{job_id}-{block}", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def release(fd: int) -> None:
        os.close(fd)

    # -- asking the others to step aside for a fold -----------------------------------------------------
    def ask_fold(self, waits_for: int | None = None) -> bool:
        """Ask every process with the store open to close it (`fold_asked`) until this one has opened it for writing
        (to fold the spool, or to write a collection), `waits_for` the one that holds it now; False when another live
        process asks already."""
        staged = self._request(waits_for)
        try:
            for _ in range(2):
                try:
                    os.link(staged, self.root / "fold")  # whole or absent: a reader never sees it half written
                    return True
                except FileExistsError:
                    if self.fold_asked() is not None:
                        return False
                    (self.root / "fold").unlink(missing_ok=True)  # its asker died: ask in its place
            return False
        finally:
            staged.unlink(missing_ok=True)

    def still_asking(self, waits_for: int | None) -> None:
        """This process's request (`ask_fold`) now waits for another process (one that has not closed the store yet:
        the app names it to the person)."""
        os.replace(self._request(waits_for), self.root / "fold")

    def _request(self, waits_for: int | None) -> Path:
        from neuronscope.core.store.runs import process_start

        self.root.mkdir(exist_ok=True)
        staged = self.root / f".fold.{os.getpid()}"
        staged.write_text(json.dumps([os.getpid(), process_start(os.getpid()), waits_for]))
        return staged

    def fold_asked(self) -> int | None:
        """The process asking the others to close the store, while one that still runs does (a stat when none does)."""
        request = self.fold_request()
        return request[0] if request else None

    def fold_request(self) -> tuple[int, int | None] | None:
        """The process asking the others to close the store, while one that still runs does, and the process it waits
        for (None when it did not say)."""
        from neuronscope.core.store.runs import owner_alive

        try:
            pid, started, *more = json.loads((self.root / "fold").read_text())
            pid, waits_for = int(pid), (int(more[0]) if more and more[0] is not None else None)
        except (FileNotFoundError, ValueError, TypeError):
            return None
        return (pid, waits_for) if owner_alive(pid, started) else None

    def end_fold(self) -> None:
        """This process's fold is over (done or given up): the others may open the store again."""
        (self.root / "fold").unlink(missing_ok=True)
        try:
            self.root.rmdir()  # a fold that emptied the spool leaves nothing else
        except OSError:
            pass

    def clear(self, folded: list[str]) -> None:
        """Delete folded segments, unfinished ones, the counters and the claims: only a process that holds the store
        for writing (so no other process has it open) may call this."""
        for name in folded:
            shutil.rmtree(self.segments / name, ignore_errors=True)
        for name in os.listdir(self.segments) if self.segments.is_dir() else ():
            if name.startswith("."):  # a segment whose writer died before publishing it
                shutil.rmtree(self.segments / name, ignore_errors=True)
        (self.root / "ids.json").unlink(missing_ok=True)
        for marker in self.root.glob(".fold.*"):  # an asker killed while it wrote its request (it held the store)
            marker.unlink(missing_ok=True)
        if self.fold_asked() is None:  # a request whose asker died
            (self.root / "fold").unlink(missing_ok=True)
        for claim in self.claims.iterdir() if self.claims.is_dir() else ():
            fd = self.claim(*map(int, claim.name.split("-")), wait=False)
            if fd is None:
                continue  # this process's own (no other has the store open): it stays the claim's file
            claim.unlink()
            self.release(fd)
        for folder in (self.segments, self.claims):
            try:
                folder.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                return  # a claim of this process's is still there: the spool stays
        (self.root / "lock").unlink(missing_ok=True)
        try:
            self.root.rmdir()
        except OSError:
            pass


class Asking:
    """A writer's requests, while it waits for its store, that the processes sharing it close it (`Spool.ask_fold`):
    each stands for ASK_SECONDS, and the next comes after a pause that doubles (up to ASK_AGAIN_MAX_SECONDS) while a
    process that does not close it keeps it (an app running a job of its own): the others then open it again and go
    on meanwhile, and all of them are asked again later. A request names the process the writer waits for."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.since: float | None = None  # when the standing request was made
        self.waits_for: int | None = None
        self.next_at = 0.0
        self.pause = ASK_AGAIN_SECONDS

    def held_by(self, pid: int | None) -> bool:
        """The store is still held, by `pid` now: ask, say whom the request waits for, or end it and pause; whether a
        request lapsed now (the writer may say it still waits)."""
        import time

        now, lapsed = time.monotonic(), False
        try:
            if self.since is not None and now - self.since >= ASK_SECONDS:
                self.end()
                self.next_at, self.pause = now + self.pause, min(2 * self.pause, ASK_AGAIN_MAX_SECONDS)
                lapsed = True
            if self.since is None and now >= self.next_at:
                if self.spool.ask_fold(pid):
                    self.since, self.waits_for = now, pid
            elif self.since is not None and pid != self.waits_for:
                self.spool.still_asking(pid)
                self.waits_for = pid
        except OSError:  # a folder it may not write in: it waits without asking
            pass
        return lapsed

    def end(self) -> None:
        """The writer has the store, or stops waiting: the others may open it again."""
        if self.since is not None:
            self.since = None
            self.spool.end_fold()
