"""Launchers that start several collecting processes (`collect --shard auto`): torchrun's ranks and an srun step's
tasks each collect a shard and rank 0 merges them; the variables each launcher sets; waits for the other ranks that a
stop request ends."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import FAST, assert_one_line_error, assert_same_collection, cli_command, cli_env, run_cli

from neuronscope.core.collection import ranks
from neuronscope.core.collection.collect import CollectError
from neuronscope.core.collection.ranks import Rank, from_environment, gather, report, report_path
from neuronscope.core.collection.state import ShardState
from neuronscope.core.store import Store

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("neuronscope_env")
#: The job and step an srun step's tasks are told they belong to.
JOB = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0"}


def _srun(args: list[str], tasks: int, folder: Path) -> tuple[int, list[str]]:
    """What `srun --ntasks TASKS neuronscope ARGS` starts on one node: a process per task, with the variables srun
    gives each. srun's exit status (the highest of its tasks') and each task's stderr."""
    logs = [folder / f"task-{i}.err" for i in range(tasks)]
    procs = []
    for i, log in enumerate(logs):
        with open(log, "w") as err:
            env = cli_env(SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_NODEID="0", SLURM_STEP_NUM_TASKS=str(tasks),
                          SLURM_STEP_TASKS_PER_NODE=str(tasks), **JOB)
            procs.append(subprocess.Popen(cli_command(args), stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=ROOT))
    try:
        codes = [proc.wait(timeout=600) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    return max(codes), [log.read_text() for log in logs]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_ranks_collect_shards_and_rank_0_merges_them(launcher: str, tiny_model: Path, corpus_dir: Path,
                                                     tmp_path: Path) -> None:
    """`torchrun --nproc-per-node 2 … collect --shard auto`, or `srun --ntasks 2 …`: each rank collects its shard
    beside the store, they meet (torchrun's over gloo on CPU, srun's tasks through reports beside the store), and rank 0
    merges them into a store equal to one process's collection (batches of one, so the forward pass is the same in any
    batch)."""
    args = ["collect", "--model", tiny_model, "--corpus", corpus_dir, "--max-excerpts", "64", "--batch-size", "1",
            *FAST]
    single = tmp_path / "single.duckdb"
    assert run_cli([*args, "--store", single], timeout=300).code == 0
    store = tmp_path / "ranks.duckdb"
    command = [*map(str, args), "--store", str(store), "--shard", "auto"]
    if launcher == "torchrun":
        torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2",
                    "-m", "neuronscope.tui.cli"]
        proc = subprocess.run([*torchrun, *command], capture_output=True, text=True, timeout=600, env=cli_env(),
                              cwd=ROOT)
        code, stderr = proc.returncode, proc.stderr
    else:  # rank 0 takes no word left by an earlier launch
        report_path(store, 1, 2).write_text(json.dumps({"launch": "4241.0.", "error": "an earlier launch's"}))
        code, errs = _srun(command, 2, tmp_path)
        stderr = "".join(errs)
    assert code == 0, stderr[-3000:]
    for i in range(2):
        assert ShardState(tmp_path / f"ranks.shard-{i}-of-2").meta.index == i
    assert not report_path(store, 1, 2).exists()  # rank 0 took rank 1's report of this launch away
    # The ranks share a terminal: rank 0 alone shows its progress; rank 1 prints its result, named.
    lines = stderr.splitlines()
    assert sum(line.startswith("cutting ") for line in lines) == 1, stderr
    assert sum(line == "collecting excerpts: 32/32" for line in lines) == 1, stderr
    results = [found.group(0) for found in re.finditer(r"^(rank \d: )?shard \d/2: ", stderr, re.MULTILINE)]
    assert sorted(results) == ["rank 1: shard 1/2: ", "shard 0/2: "], stderr
    # Rank 0 says what the merged store no longer needs beside it, and its size.
    left = re.search(r"the store holds the 2 shard states now: they can be deleted, with the shards' token ids in "
                     r"\S+ranks.tokens \(([\d.,]+) MB in all\)", stderr)
    folders = [tmp_path / "ranks.shard-0-of-2", tmp_path / "ranks.shard-1-of-2", tmp_path / "ranks.tokens"]
    size = sum(file.stat().st_size for folder in folders for file in folder.rglob("*") if file.is_file())
    assert left and left.group(1) == f"{size / 1e6:,.1f}", stderr
    with Store.open(store, read_only=True) as merged:
        (run,) = merged.runs()
        assert run.shard == "" and run.n_excerpts == 64
    assert_same_collection(single, store)


@pytest.mark.slow
def test_rank_0_of_an_srun_step_stops_when_another_task_fails(tiny_model: Path, corpus_dir: Path,
                                                              tmp_path: Path) -> None:
    """srun lets the other tasks of a step run on when one fails, so rank 0 would have waited for its shard until the
    job's time limit. The task says why it stopped beside the store; rank 0, done with its own shard, stops waiting and
    names it, with status 2. (The third task finds the finished shard of another collection where its own goes.)"""
    store = tmp_path / "ranks.duckdb"
    args = ["collect", "--model", str(tiny_model), "--corpus", str(corpus_dir), "--max-excerpts", "6", *FAST,
            "--store", str(store)]
    assert run_cli([*args, "--shard", "2/3", "--seed", "1"], timeout=300).code == 0
    code, errs = _srun([*args, "--shard", "auto"], 3, tmp_path)
    assert code == 2, errs
    refusal = (f"{tmp_path / 'ranks.shard-2-of-3'} holds shard 2/3 of another collection, with other settings "
               "(--seed 1, not 0): merge it or move it away first, or pass --force to replace it")
    assert f"rank 2: error: {refusal}" in errs[2]
    error = [line for line in errs[0].splitlines() if line.startswith("error: ")]
    assert error == [f"error: rank 2 of 3 stopped without its shard ({refusal}): once that is mended, run the same "
                     "command again (finished shards are kept, the others go on from their checkpoints)"], errs[0]
    assert ShardState(tmp_path / "ranks.shard-1-of-3").meta.index == 1 and not store.exists()


def test_rank_0_of_an_srun_step_waits_for_the_reports_of_this_launch(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ranks, "GATHER_STEP", 0.02)
    store = tmp_path / "all.duckdb"

    def task(index: int, launch: str) -> Rank:
        return Rank(index, 3, index, "srun", 3, launch)

    report(task(1, "7.0."), store, None)
    report(task(2, "6.0."), store, "an earlier launch's error")  # not this launch's: not taken
    late = threading.Timer(0.3, report, (task(2, "7.0."), store, None))
    late.start()
    started, told = time.monotonic(), []
    gather(task(0, "7.0."), store, lambda done, total: told.append((done, total)))
    assert time.monotonic() - started >= 0.3 and told == [(0, 2), (1, 2), (2, 2)]
    assert not report_path(store, 1, 3).exists() and not report_path(store, 2, 3).exists()  # taken away
    report(task(2, "8.0."), store, "stopped by SIGTERM")
    with pytest.raises(CollectError, match=r"^rank 2 of 3 stopped without its shard \(stopped by SIGTERM\): "):
        gather(task(0, "8.0."), store)  # (task 1 has not said yet in this launch)
    with pytest.raises(CollectError, match=r"^cannot write \S+all.shard-1-of-3.report \(No such file or directory\): "
                                           "rank 0 waits for this task's word there"):
        report(task(1, "8.0."), tmp_path / "gone" / "all.duckdb", None)


def test_rank_0_waiting_for_srun_tasks_stops_on_sigterm(tmp_path: Path) -> None:
    code = """
import sys
from neuronscope.core.collection.ranks import Rank, gather
from neuronscope.core.errors import Terminated
from neuronscope.tui.console import terminate_as_interrupt
with terminate_as_interrupt():
    try:
        print("waiting", flush=True)
        gather(Rank(0, 2, 0, "srun", 2, "1.0."), sys.argv[1])
    except Terminated:
        print("stopped", flush=True)
        sys.exit(130)
"""
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "all.duckdb")], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT, env=cli_env())
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "waiting\n"
        time.sleep(0.5)
        assert proc.poll() is None, "rank 0 did not wait for rank 1"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 130 and proc.stdout.read() == "stopped\n"
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("other", ["joined", "late"])
def test_a_rank_waiting_for_the_others_stops_on_sigterm(other: str) -> None:
    """A rank done before the others waits for them (gloo's barrier, in C++). SIGTERM there (torchrun's, when another
    rank failed, or a scheduler's) stops it at once with status 130, as the CLI takes it: the barrier had held the
    signal off until the last rank came, days later on a long collection; so did joining the group while another
    rank had not (`late`)."""
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    code = """
import datetime, sys, time
import torch.distributed as dist
from neuronscope.core.collection.ranks import MEET_TIMEOUT, Rank, meet
from neuronscope.core.errors import Terminated
from neuronscope.tui.console import terminate_as_interrupt
rank = int(sys.argv[1])
if rank == 1:  # in the group but never at the barrier, or not even in the group
    if sys.argv[2] == "joined":
        dist.init_process_group("gloo", timeout=MEET_TIMEOUT)
    time.sleep(120)
with terminate_as_interrupt():
    try:
        print("waiting", flush=True)
        meet(Rank(0, 2, 0, "torchrun", 2))
    except Terminated:
        print("stopped", flush=True)
        sys.exit(130)
"""
    procs = [subprocess.Popen([sys.executable, "-c", code, str(rank), other], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env=cli_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                                          WORLD_SIZE="2"))
             for rank in (0, 1)]
    try:
        assert procs[0].stdout is not None and procs[0].stdout.readline() == "waiting\n"
        time.sleep(2)  # into the wait
        assert procs[0].poll() is None, "rank 0 did not wait for rank 1"
        procs[0].send_signal(signal.SIGTERM)
        assert procs[0].wait(timeout=10) == 130 and procs[0].stdout.read() == "stopped\n"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_a_rank_that_another_speaks_for_names_itself_and_shows_no_progress(capsys: pytest.CaptureFixture[str]) -> None:
    """Under torchrun, a rank other than its node's first prints no status lines, progress or skipped files into the
    shared terminal; its results, warnings and errors carry its name."""
    from rich.text import Text

    from neuronscope.tui.console import Skipped, progress_bars, say, speak_as, status, summary, warning

    speak_as("rank 3")
    try:
        status("loading the model")
        with progress_bars() as progress:
            progress("collect", 5, 10)
        skipped = Skipped()
        skipped("a.bin", "binary")
        skipped.finish()
        warning("cannot write a checkpoint: disk full")
        summary("shard 3/4: 12 neurons over 32 excerpts")
        say(Text("error: ", style="bold red") + Text("out of memory"))
    finally:
        speak_as(None)
    status("rank 0 again")
    assert capsys.readouterr().err.splitlines() == [
        "rank 3: cannot write a checkpoint: disk full", "rank 3: shard 3/4: 12 neurons over 32 excerpts",
        "rank 3: error: out of memory", "rank 0 again"]


def test_shard_auto_reads_the_launchers_variables(tiny_model: Path, corpus_dir: Path, tmp_path: Path) -> None:
    from neuronscope.core.collection.ranks import Rank

    assert from_environment({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Rank(1, 4, 1, "torchrun")
    assert from_environment({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4",
                             "SLURM_ARRAY_TASK_COUNT": "3"}) == Rank(1, 3, None, "slurm")
    # With --device-map, a node's ranks split its GPUs between them, in order.
    second = from_environment({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"})
    assert second.local_count == 4 and second.gpus(8) == (2, 3) and second.gpus(9) == (2, 3)
    with pytest.raises(CollectError, match=r"4 ranks on a node with 2 GPUs: .* start at most 2 a node"):
        second.gpus(2)
    with pytest.raises(CollectError, match="this node has none: drop --device-map"):
        second.gpus(0)
    # A task of an srun step: its node's second, of four there.
    step = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
            "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_NTASKS": "8", **JOB}
    task = from_environment(step)
    assert task == Rank(5, 8, 1, "srun", 4, "4242.0.") and task.device(8) == 1 and task.gpus(8) == (2, 3)
    assert from_environment({**step, "SLURM_STEP_TASKS_PER_NODE": "3,2(x2)", "SLURM_NODEID": "2"}).local_count == 2
    with pytest.raises(CollectError, match=r"SLURM_STEP_TASKS_PER_NODE='4\*2' is not srun's list of tasks per node"):
        from_environment({**step, "SLURM_STEP_TASKS_PER_NODE": "4*2"})
    # srun --gpus-per-task (or --gpu-bind): a task that sees fewer than the job's GPUs on its node was given them
    # alone (as Slurm 22.05 does: CUDA_VISIBLE_DEVICES=2,3 for the second task of two on four GPUs) and uses them all.
    gpus = from_environment({**step, "SLURM_GPUS_ON_NODE": "8"})
    assert gpus.device(2) == 0 and gpus.gpus(2) == (0, 1)
    assert gpus.device(8) == 1 and gpus.gpus(8) == (2, 3)  # all eight visible: shared with the node's tasks
    # The innermost launcher says: torchrun started by srun, an srun step in an array task.
    assert from_environment({**step, "RANK": "3", "WORLD_SIZE": "4"}).launcher == "torchrun"
    assert from_environment({**step, "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"}).launcher == "srun"
    # A batch script, or a step of one task, is no step of several.
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "1", **JOB}
    assert from_environment({**batch, "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"}) == Rank(
        1, 2, None, "slurm")
    with pytest.raises(CollectError, match="found no launcher"):
        from_environment(batch)
    with pytest.raises(CollectError, match="rank 7 of 3; an array must run tasks 0..n-1"):
        from_environment({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "3"})
    with pytest.raises(CollectError, match="RANK='x' is not a whole number"):
        from_environment({"RANK": "x", "WORLD_SIZE": "2"})
    result = run_cli(["collect", "--model", tiny_model, "--corpus", corpus_dir, "--store", tmp_path / "s.duckdb",
                      "--shard", "auto", *FAST])
    assert_one_line_error(result, "--shard auto found no launcher: run it under torchrun")




@pytest.mark.parametrize("how", ["own", "called"])
def test_a_stop_signal_once_the_command_is_over_is_ignored(how: str) -> None:
    """A launcher's SIGTERM again (srun --kill-on-bad-exit, torchrun, once another rank stopped) can reach a rank that
    has saved its state while it prints so or shuts down. The process's own command line (`main()`) ends with its
    own status, here 2, not killed (143); a call of main with arguments, as in-process tests make, leaves the default
    behind."""
    code = """
import os, signal, sys, time
from neuronscope.tui.cli import main
args = ["show", "twelve/3", "--store", "/nonexistent/never-opened.duckdb"]
sys.argv = ["neuronscope", *args]
status = main() if os.environ["HOW"] == "own" else main(args)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.2)
print("ended", status)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=cli_env(HOW=how), cwd=ROOT)
    expected = (0, "ended 2") if how == "own" else (-signal.SIGTERM, "")
    assert (done.returncode, done.stdout.strip()) == expected, done.stderr
