"""Files and folders written under a hidden name beside their target and renamed onto it once complete (a store,
an export, a shard state, a compacted store): a failure leaves nothing half-written under the target's name. A
process killed outright (SIGKILL, the machine lost) leaves its hidden copy behind; the next one to stage the same
target removes what processes no longer running left."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def staged(target: Path, kind: str) -> Path:
    """`.NAME.PID.KIND` beside `target`, for this process; first, the `.NAME.PID.KIND*` of processes that are gone
    (DuckDB's .wal beside a store included) are removed. A process on another host sharing the folder is not seen:
    two hosts must not write one target at once (they would also replace each other's)."""
    head = f".{target.name}."
    try:
        entries = list(os.scandir(target.parent))
    except OSError:  # the folder is missing or unreadable: writing there will say so
        entries = []
    for entry in entries:
        pid, _, rest = entry.name.removeprefix(head).partition(".")
        if (entry.name.startswith(head) and pid.isdigit() and rest.startswith(kind) and int(pid) != os.getpid()
                and not _running(int(pid))):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                Path(entry.path).unlink(missing_ok=True)
    return target.with_name(f"{head}{os.getpid()}.{kind}")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def target_of(path: object) -> object:
    """The target a hidden copy (`staged`) is written for, else `path` as it is: what a message names."""
    name = os.path.basename(str(path)) if path else ""
    if name.startswith("."):
        parts = name[1:].split(".")
        for i in range(len(parts) - 2, 0, -1):
            if parts[i].isdigit():
                return os.path.join(os.path.dirname(str(path)), ".".join(parts[:i]))
    return path
