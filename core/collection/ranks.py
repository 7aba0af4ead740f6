"""Which part of a collection this process takes when a launcher starts several (`collect --shard auto`):
torchrun's RANK, WORLD_SIZE and LOCAL_RANK, the tasks of an srun step (SLURM_PROCID, SLURM_STEP_NUM_TASKS,
SLURM_LOCALID), or a SLURM job array's task id and count. Each process writes a shard state
(core/collection/state.py) beside the store asked for, and rank 0 merges the shards into that store once every
rank is done: torchrun's ranks meet over gloo (`meet`); an srun step's tasks each leave a report beside the store,
which rank 0 waits for (`report`, `gather`: they need no network, only the shared file system the shards are
written to already). A job array's tasks never meet: `neuronscope merge` in a job that depends on the array does
it."""

from __future__ import annotations

import datetime
import json
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from neuronscope.core.collection.collect import CollectError

#: How long a rank that finished waits for the others (a collection of hours: they may finish much later).
MEET_TIMEOUT = datetime.timedelta(days=7)
#: Seconds between looks at a wait in another thread (the longest a stop request waits to be taken there).
WAIT_STEP = 0.2
#: Seconds between rank 0's looks for the other srun tasks' reports (files on a shared file system).
GATHER_STEP = 1.0


@dataclass(frozen=True)
class Rank:
    """This process's part: shard `index` of `count`."""

    index: int
    count: int
    local: int | None
    """The GPU of this node to use (torchrun's LOCAL_RANK), when the launcher says."""
    launcher: str
    """'torchrun', 'srun' (the tasks of one srun step) or 'slurm' (a job array's tasks)."""
    local_count: int = 1
    """The ranks on this node (torchrun's LOCAL_WORLD_SIZE; the step's tasks on this node under srun)."""
    launch: str = ""
    """Which launch this is, where the launcher says (an srun step: its job, step and restart count), so that rank 0
    never takes a report left by an earlier one (`gather`)."""
    node_gpus: int | None = None
    """The job's GPUs on this node, where the launcher says (srun's SLURM_GPUS_ON_NODE). A process that sees fewer
    was given GPUs of its own (srun --gpus-per-task or --gpu-bind: Slurm sets each task's CUDA_VISIBLE_DEVICES) and
    uses all it sees; one that sees them all shares them with the node's other ranks."""

    def _own(self, count: int) -> bool:
        return self.node_gpus is not None and count < self.node_gpus

    def device(self, count: int) -> int:
        """Which of the `count` GPUs this process sees it runs its model on (without --device-map): its own of the
        node's (LOCAL_RANK), or the first of those the launcher gave it alone."""
        return 0 if self._own(count) else (self.local or 0) % max(count, 1)

    def gpus(self, count: int) -> tuple[int, ...]:
        """The GPUs of the `count` this process sees that it spreads its model over (--device-map): the node's GPUs
        split evenly between its ranks, in order (8 GPUs, 4 ranks: rank 1 takes GPUs 2 and 3), or all of them where
        the launcher gave it GPUs of its own. CollectError where the node has fewer GPUs than ranks."""
        local, ranks = (0, 1) if self._own(count) else (self.local or 0, max(self.local_count, 1))
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


def _tasks_on_node(env: Mapping[str, str]) -> int:
    """The srun step's tasks on this node: SLURM_STEP_TASKS_PER_NODE ('4(x2),3': four on each of the first two
    nodes, three on the third) at this node's index (SLURM_NODEID)."""
    text, node = env.get("SLURM_STEP_TASKS_PER_NODE", ""), _whole(env, "SLURM_NODEID", 0)
    parts = [re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip()) for part in text.split(",")]
    counts = [int(found.group(1)) for found in parts if found for _ in range(int(found.group(2) or 1))]
    if not all(parts) or not 0 <= node < len(counts):
        raise CollectError(f"SLURM_STEP_TASKS_PER_NODE={text!r} is not srun's list of tasks per node with node "
                           f"{node} in it: fix the launcher's environment or pass --shard i/n")
    return counts[node]


def from_environment(env: Mapping[str, str] = os.environ) -> Rank:
    """This process's part, from torchrun's variables, else an srun step's of several tasks, else a SLURM job
    array's: the innermost launcher says (an srun step inside an array task splits that task's collection);
    CollectError naming what to set."""
    if "RANK" in env and "WORLD_SIZE" in env:
        rank = Rank(_whole(env, "RANK"), _whole(env, "WORLD_SIZE"), _whole(env, "LOCAL_RANK", 0), "torchrun",
                    _whole(env, "LOCAL_WORLD_SIZE", 1))
    elif "SLURM_PROCID" in env and _whole(env, "SLURM_STEP_NUM_TASKS", 1) > 1:  # (a batch script is no step)
        launch = ".".join(env.get(name, "") for name in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT"))
        rank = Rank(_whole(env, "SLURM_PROCID"), _whole(env, "SLURM_STEP_NUM_TASKS"), _whole(env, "SLURM_LOCALID", 0),
                    "srun", _tasks_on_node(env), launch, _whole(env, "SLURM_GPUS_ON_NODE", 0) or None)
    elif "SLURM_ARRAY_TASK_ID" in env:
        first = _whole(env, "SLURM_ARRAY_TASK_MIN", 0)
        rank = Rank(_whole(env, "SLURM_ARRAY_TASK_ID") - first, _whole(env, "SLURM_ARRAY_TASK_COUNT"), None, "slurm")
    else:
        raise CollectError("--shard auto found no launcher: run it under torchrun (RANK, WORLD_SIZE), srun (SLURM_PROCID, "
                           "SLURM_STEP_NUM_TASKS) or in a SLURM job array (SLURM_ARRAY_TASK_ID, "
                           "SLURM_ARRAY_TASK_COUNT), or pass --shard i/n")
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


def report_path(store: str | Path, index: int, count: int) -> Path:
    """The file beside the store where task `index` of an srun step says how its shard ended (`report`)."""
    folder = shard_path(store, index, count)
    return folder.with_name(f"{folder.name}.report")


def report(rank: Rank, store: str | Path, error: str | None) -> None:
    """Say, beside the store, that this srun task's shard is written (`error` None) or that the task stopped without
    it, and why: rank 0 waits for every other task's word (`gather`). Written whole under a temporary name and then
    renamed; CollectError where the disk refuses it (rank 0 would wait on: the task must fail where srun sees it)."""
    path = report_path(store, rank.index, rank.count)
    staged = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        staged.write_text(json.dumps({"launch": rank.launch, "error": error}))
        os.replace(staged, path)
    except OSError as err:
        staged.unlink(missing_ok=True)
        raise CollectError(f"cannot write {path} ({err.strerror or err}): rank 0 waits for this task's word there; "
                           "once the folder takes it, run the same command again (the shard is kept)") from None


def gather(rank: Rank, store: str | Path, progress: Callable[[int, int], None] | None = None) -> None:
    """Rank 0 of an srun step: wait until every other task has reported, in this launch, that its shard is written
    (`report`), and take those reports away; CollectError naming a task that stopped without its shard, and why (that
    report stays). `progress(done, total)` is told how many have, whenever that changes. Ctrl-C and SIGTERM stop the
    wait (it sleeps in the main thread)."""
    waiting = set(range(rank.count)) - {rank.index}
    total, told = len(waiting), -1
    folder = report_path(store, 0, rank.count).parent
    while True:
        if progress is not None and total - len(waiting) != told:
            told = total - len(waiting)
            progress(told, total)
        try:  # one listing a look, not a read per task (thousands of tasks, a shared file system)
            present = {entry.name for entry in os.scandir(folder)}
        except OSError:
            present = set()
        for index in sorted(waiting):
            path = report_path(store, index, rank.count)
            if path.name not in present:
                continue
            try:
                said = json.loads(path.read_text())
            except (OSError, ValueError):  # not yet (or half-copied by a file system that shows it early)
                continue
            if not isinstance(said, dict) or said.get("launch") != rank.launch:
                continue  # an earlier launch's
            if said.get("error"):
                raise CollectError(f"rank {index} of {rank.count} stopped without its shard ({said['error']}): once "
                                   "that is mended, run the same command again (finished shards are kept, the others "
                                   "go on from their checkpoints)")
            waiting.discard(index)
            path.unlink(missing_ok=True)
        if not waiting:
            if progress is not None:
                progress(total, total)
            return
        time.sleep(GATHER_STEP)


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
