#!/usr/bin/env bash
# `collect --shard auto` under a real Slurm: a one-node cluster on this machine (slurmctld, slurmd and munge,
# started from a folder of their own and stopped at the end), then the checks a cluster user meets:
#   1. a batch script is no launcher of several tasks (it has SLURM_PROCID and SLURM_NTASKS, and no step);
#   2. `srun --ntasks 2 … collect --shard auto`: rank 0 merges the tasks' shards into the store one process writes;
#   3. a task that stops without its shard: rank 0 stops waiting, names it, and srun exits 2;
#   4. `scancel` mid-collection: every task saves its state (exit 130), and the same job resumes and merges;
#   5. GPUs (four stand-ins: character devices Slurm hands out as it would GPUs, setting each task's
#      CUDA_VISIBLE_DEVICES): each task's GPU, and its share under --device-map, never another task's;
#   6. a time limit's warning (`--signal=TERM@60`) under `srun --kill-on-bad-exit=1`: the first task to have saved
#      exits 130, srun sends the other its SIGTERM again, and that one still saves and exits 130.
#
#   apt-get install slurm-wlm munge      # Debian 12: Slurm 22.05; run as root (the daemons)
#   bash bench/slurm_local.sh            # about seven minutes on two cores
#
# Nothing is downloaded: the packaged default model and corpus. Prints what each check saw; exits non-zero at the
# first that fails.
set -euo pipefail
cd "$(dirname "$0")/.."
NS=${NEURONSCOPE:-$PWD/.venv/bin/neuronscope}
PY=${PYTHON:-$PWD/.venv/bin/python}
HERE=$(mktemp -d /tmp/neuronscope-slurm.XXXXXX)
NODE=$(hostname -s)
export SLURM_CONF=$HERE/slurm.conf
MUNGE_SOCKET=$HERE/munge.socket

for tool in srun sbatch scancel slurmctld slurmd munged; do
    command -v "$tool" > /dev/null || { echo "error: $tool is missing: apt-get install slurm-wlm munge"; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "error: the daemons of a local cluster need root: run it as root"; exit 2; }

stop() {
    for pid in "$HERE"/*.pid; do [ -f "$pid" ] && kill "$(cat "$pid")" 2> /dev/null || true; done
}
trap stop EXIT

mkdir -p "$HERE"/{spool,state,runs}
cat > "$SLURM_CONF" <<EOF
ClusterName=neuronscope
SlurmctldHost=$NODE
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmUser=root
SlurmdUser=root
SlurmctldPort=16817
SlurmdPort=16818
SlurmctldPidFile=$HERE/slurmctld.pid
SlurmdPidFile=$HERE/slurmd.pid
SlurmdSpoolDir=$HERE/spool
StateSaveLocation=$HERE/state
SlurmctldLogFile=$HERE/slurmctld.log
SlurmdLogFile=$HERE/slurmd.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
NodeName=$NODE CPUs=$(nproc) Gres=gpu:4 State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
minor=(3 5 7 8)  # /dev/null, zero, full and random's numbers: four distinct harmless devices
for i in 0 1 2 3; do mknod "$HERE/gpu$i" c 1 "${minor[$i]}"; done
echo "NodeName=$NODE Name=gpu File=$HERE/gpu[0-3]" > "$HERE/gres.conf"
dd if=/dev/urandom of="$HERE/munge.key" bs=1024 count=1 status=none
chmod 400 "$HERE/munge.key"
munged --force --key-file "$HERE/munge.key" --socket "$MUNGE_SOCKET" --pid-file "$HERE/munged.pid" \
    --log-file "$HERE/munged.log" --seed-file "$HERE/munged.seed"
slurmctld
slurmd
for _ in $(seq 30); do sinfo -h -o %t 2> /dev/null | grep -q idle && break; sleep 1; done
sinfo -h -o "%P %t %D node(s) of %c CPUs" | sed 's/^/cluster: /'

RUNS=$HERE/runs
ARGS=(collect --layers 0-1 --max-excerpts 64 --batch-size 1 --dtype float32 --length 16)
fail() { echo "FAILED: $*"; exit 1; }

echo "1. a batch script of two tasks runs one process, which finds no launcher of several"
cat > "$HERE/batch.sbatch" <<EOF
#!/bin/bash
#SBATCH --ntasks=2 --output=$RUNS/batch.out --error=$RUNS/batch.err
$NS ${ARGS[*]} --shard auto --store $RUNS/batch.duckdb
EOF
sbatch --wait "$HERE/batch.sbatch" > /dev/null && fail "the batch script's collect exited 0"
grep -q "found no launcher" "$RUNS/batch.err" || fail "$(tail -1 "$RUNS/batch.err")"
echo "   $(tail -1 "$RUNS/batch.err" | cut -c1-110)…"

echo "2. srun --ntasks 2: the tasks' shards merged by rank 0 equal one process's collection"
$NS "${ARGS[@]}" --store "$RUNS/single.duckdb" > /dev/null 2>&1
srun --ntasks 2 --kill-on-bad-exit=1 "$NS" "${ARGS[@]}" --shard auto --store "$RUNS/ranks.duckdb" \
    > /dev/null 2> "$RUNS/ranks.err" || fail "srun exited $?: $(tail -3 "$RUNS/ranks.err")"
grep -E "^(rank 1: )?shard [01]/2|merged from" "$RUNS/ranks.err" | sed 's/^/   /'
"$PY" - "$RUNS/single.duckdb" "$RUNS/ranks.duckdb" <<'EOF'
import sys
from neuronscope.core.store import Store

rows = []
for path in sys.argv[1:]:
    with Store.open(path, read_only=True) as store:
        (run,) = store.runs()
        rows.append([store.con.execute(f"SELECT {what} FROM {table} WHERE run_id = ? ORDER BY ALL", [run.run_id])
                     .fetchall() for table, what in (("neurons", "layer, neuron, count, max_act, min_act, histogram"),
                                                     ("records", "layer, neuron, kind, rank, excerpt_id, acts"))])
assert rows[0] == rows[1], "the merged store differs from the single process's"
print(f"   equal: {len(rows[0][0]):,} neurons, {len(rows[0][1]):,} records")
EOF
[ ! -e "$RUNS/ranks.shard-1-of-2.report" ] || fail "rank 1's report was left beside the store"

echo "3. srun --ntasks 3 over two excerpts: the third task has none; rank 0 names it and srun exits 2"
set +e
srun --ntasks 3 --overcommit "$NS" "${ARGS[@]}" --max-excerpts 2 --shard auto --store "$RUNS/three.duckdb" \
    > /dev/null 2> "$RUNS/three.err"
code=$?
set -e
[ "$code" = 2 ] || fail "srun exited $code: $(tail -3 "$RUNS/three.err")"
grep -q "^error: rank 2 of 3 stopped without its shard (this shard of the corpus has no excerpts" "$RUNS/three.err" \
    || fail "rank 0 did not name rank 2: $(grep error "$RUNS/three.err")"
grep "^error: rank 2" "$RUNS/three.err" | cut -c1-110 | sed 's/^/   /;s/$/…/'

echo "4. scancel mid-collection: each task saves its state; the same job again resumes and merges"
cat > "$HERE/long.sbatch" <<EOF
#!/bin/bash
#SBATCH --ntasks=2 --output=$RUNS/long-%j.out --error=$RUNS/long-%j.err
srun --kill-on-bad-exit=1 $NS collect --layers 0-11 --max-excerpts 2048 --batch-size 32 --checkpoint-every 5s \
    --shard auto --store $RUNS/long.duckdb
EOF
job=$(sbatch --parsable "$HERE/long.sbatch")
for _ in $(seq 300); do grep -q "last checkpoint" "$RUNS/long-$job.err" 2> /dev/null && break; sleep 1; done
sleep 5
scancel "$job"
for _ in $(seq 60); do squeue -h -j "$job" 2> /dev/null | grep -q . || break; sleep 1; done
grep -c "^\(rank 1: \)\?interrupted: the collection's state after" "$RUNS/long-$job.err" | grep -qx 2 \
    || fail "the tasks did not both save their state: $(tail -4 "$RUNS/long-$job.err")"
grep "interrupted: " "$RUNS/long-$job.err" | cut -c1-110 | sed 's/^/   /;s/$/…/'
again=$(sbatch --parsable --wait "$HERE/long.sbatch") || fail "the resubmitted job failed: $(tail -3 "$RUNS"/long-*.err)"
grep -E "^resumed from a checkpoint \(excerpts\): |merged from" "$RUNS/long-$again.err" | sed 's/^/   /'
echo "5. GPUs: each task's own under srun, alone (--gpus-per-task) or shared (--gpus)"
cat > "$HERE/gpus.py" <<'EOF'
import os

from neuronscope.core.collection.ranks import from_environment

seen = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
rank = from_environment()
print(f"task {rank.index} sees {','.join(seen)}: runs on {seen[rank.device(len(seen))]}, --device-map over "
      f"{','.join(seen[gpu] for gpu in rank.gpus(len(seen)))}")
EOF
for gpus in "--gpus-per-task=1|runs on 0, --device-map over 0;runs on 1, --device-map over 1" \
            "--gpus-per-task=2|runs on 0, --device-map over 0,1;runs on 2, --device-map over 2,3" \
            "--gpus=4|runs on 0, --device-map over 0,1;runs on 1, --device-map over 2,3"; do
    option=${gpus%%|*} expected=${gpus#*|}
    said=$(srun --ntasks 2 --overcommit "$option" "$PY" "$HERE/gpus.py" | sort)
    echo "$said" | sed "s/^/   $option: /"
    [ "$(echo "$said" | sed 's/^task [01] sees [0-9,]*: //' | paste -sd';')" = "$expected" ] \
        || fail "expected $expected"
done
echo "6. a time limit's SIGTERM a minute early (--signal=TERM@60), srun --kill-on-bad-exit=1 passing it on again"
cat > "$HERE/limit.sbatch" <<EOF
#!/bin/bash
#SBATCH --ntasks=2 --time=2 --signal=TERM@60 --output=$RUNS/limit.out --error=$RUNS/limit.err
srun --kill-on-bad-exit=1 $NS collect --layers 0-11 --max-excerpts 8192 --batch-size 32 --shard auto \
    --store $RUNS/limit.duckdb
EOF
sbatch --wait "$HERE/limit.sbatch" > /dev/null && fail "the job ended with status 0 before its time limit"
grep "interrupted: \|task [01]: " "$RUNS/limit.err" | cut -c1-110 | sed 's/^/   /'
[ "$(grep -c "task [01]: Exited with exit code 130" "$RUNS/limit.err")" = 2 ] \
    || fail "a task did not save and exit 130: $(grep "task [01]" "$RUNS/limit.err")"
echo "all six checks passed (Slurm $(srun --version | cut -d' ' -f2), $(nproc) CPUs)"
stop
trap - EXIT
rm -rf "$HERE"  # (left for a look where a check failed)
