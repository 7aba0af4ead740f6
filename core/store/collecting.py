"""The lock that keeps a store (or a shard state) to one collection at a time: two would share its checkpoints,
each replacing the other's saved state, and write the same run twice. It is an flock on TARGET.collecting, which
names its holder, so other commands can also tell that a collection into a store is in progress."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from neuronscope.core.store.runs import named_process, this_owner
from neuronscope.core.store.schema import StoreBusy


class CollectionBusy(StoreBusy):
    """Another collection into the same store (or shard state) is in progress."""


def _lock_path(target: str | Path) -> Path:
    target = Path(target)
    return target.with_name(target.name + ".collecting")


def _holder(fd: int) -> int:
    """The process id a lock file names (0 where it names none)."""
    try:
        return int(json.loads(os.pread(fd, 200, 0) or b"[0]")[0])
    except (ValueError, TypeError, IndexError, OSError):
        return 0


@contextmanager
def only_collection(target: str | Path) -> Iterator[None]:
    """This process the only collection into `target` while the block runs (CollectionBusy naming the other one);
    the lock goes when the block ends or the process dies."""
    path = _lock_path(target)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            os.close(fd)
            raise CollectionBusy(f"another collection into {target} is in progress ({named_process(pid)}): wait for "
                                 "it to finish, or collect into another --store", pid or None) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # (else its last holder removed it between our open and our lock: again)
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(list(this_owner())).encode())
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def collecting_into(target: str | Path) -> int | None:
    """The process collecting into `target` now (0 where the lock names none), or None when no collection is."""
    try:
        fd = os.open(_lock_path(target), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(fd)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
