"""Which part of a collection this process takes when a launcher starts several (`collect --shard auto`):
torchrun's RANK, WORLD_SIZE and LOCAL_RANK, or a SLURM job array's task id and count. Each process writes a
shard state (core/collection/state.py) beside the store asked for; under torchrun the processes meet when all are done and rank
0 merges the shards into that store (a job array's tasks never meet: `neuronscope merge` in a job that depends on
the array does it)."""

from __future__ import annotations

import datetime
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from neuronscope.core.collection.collect import CollectError

#: How long a rank that finished waits for the others (a collection of hours: they may finish much later).
MEET_TIMEOUT = datetime.timedelta(days=7)
#: Seconds between looks at a wait in another thread (the longest a stop request waits to be taken there).
WAIT_STEP = 0.2


@dataclass(frozen=True)
class Rank:
    """This process's part: shard `index` of `count`."""

    index: int
    count: int
    local: int | None
    """The GPU of this node to use (torchrun's LOCAL_RANK), when the launcher says."""
    launcher: str
    """'torchrun' or 'slurm'."""
    local_count: int = 1
    """The ranks on this node (torchrun's LOCAL_WORLD_SIZE)."""

    def gpus(self, count: int) -> tuple[int, ...]:
        """The GPUs of the node's `count` this rank spreads its model over (--device-map): the node's GPUs split
        evenly between its ranks, in order (8 GPUs, 4 ranks: rank 1 takes GPUs 2 and 3). CollectError where the
        node has fewer GPUs than ranks."""
        local, ranks = self.local or 0, max(self.local_count, 1)
        each = count // ranks
        if count == 0:
            raise CollectError("--device-map spreads a model across GPUs, and this node has none: drop --device-map")
        if each == 0:
            raise CollectError(f"{ranks} ranks on a node with {count} GPU{'s' if count != 1 else ''}: with "
                               f"--device-map each rank spreads its model over GPUs of its own; start at most {count} "
                               f"a node (torchrun --nproc-per-node {count})")
        return tuple(range(local * each, (local + 1) * each))


def _whole(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    text = env.get(name)
    if text is None and default is not None:
        return default
    try:
        return int(text or "")
    except ValueError:
        raise CollectError(f"{name}={text!r} is not a whole number: fix the launcher's environment or pass "
                           "--shard i/n") from None


def from_environment(env: Mapping[str, str] = os.environ) -> Rank:
    """This process's part, from torchrun's variables, else a SLURM job array's; CollectError naming what to set."""
    if "RANK" in env and "WORLD_SIZE" in env:
        rank = Rank(_whole(env, "RANK"), _whole(env, "WORLD_SIZE"), _whole(env, "LOCAL_RANK", 0), "torchrun",
                    _whole(env, "LOCAL_WORLD_SIZE", 1))
    elif "SLURM_ARRAY_TASK_ID" in env:
        first = _whole(env, "SLURM_ARRAY_TASK_MIN", 0)
        rank = Rank(_whole(env, "SLURM_ARRAY_TASK_ID") - first, _whole(env, "SLURM_ARRAY_TASK_COUNT"), None, "slurm")
    else:
        raise CollectError("--shard auto found no launcher: run it under torchrun (RANK, WORLD_SIZE) or in a SLURM "
                           "job array (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT), or pass --shard i/n")
    if not 0 <= rank.index < rank.count:
        raise CollectError(f"--shard auto: {rank.launcher} gives rank {rank.index} of {rank.count}; an array must run "
                           "tasks 0..n-1 (or from SLURM_ARRAY_TASK_MIN, with no gaps)")
    return rank


def shard_path(store: str | Path, index: int | str, count: int | str) -> Path:
    """The folder where shard `index` of `count` of a collection into `store` writes its state: beside the store."""
    path = Path(store)
    return path.with_name(f"{path.stem}.shard-{index}-of-{count}")


def tokens_path(store: str | Path) -> Path:
    """The folder beside the store where the shards of a collection into it share the corpus's token ids."""
    path = Path(store)
    return path.with_name(f"{path.stem}.tokens")


def meet(rank: Rank) -> None:
    """Wait until every rank of a torchrun launch gets here (gloo, over the address torchrun gives); a job array's
    tasks do not wait. Ctrl-C and SIGTERM stop the wait (`_interruptible`)."""
    if rank.launcher != "torchrun" or rank.count == 1:
        return
    import torch.distributed as dist

    def together() -> None:  # joining waits for every rank to join too
        dist.init_process_group("gloo", timeout=MEET_TIMEOUT)
        dist.barrier()

    _interruptible(together)
    dist.destroy_process_group()  # (not after an interrupt: it would wait for the barrier)


def _interruptible(call: Callable[[], object]) -> None:
    """`call()` in a thread of its own, waited for a moment at a time. A signal's handler runs only in the main
    thread between Python steps, so a group joined or a barrier waited for in C++ held off Ctrl-C and SIGTERM (a
    scheduler's, or torchrun's when another rank failed) for as long as the slowest rank took: up to MEET_TIMEOUT.
    The thread is a daemon: an interrupted process exits without it."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as err:  # noqa: BLE001 - raised again in the waiting thread
            failed.append(err)

    thread = threading.Thread(target=run, name="neuronscope-meet", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(WAIT_STEP)
    if failed:
        raise failed[0]
