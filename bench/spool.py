"""What the spool costs: a job writing beside a store that other processes have open, readers reading through it,
and the fold that empties it (neuronscope.core.store.spool and shared).

    python bench/spool.py                       # 4 x 1024 neurons, 25 % explained; 100, 500 and 2000 segments
    python bench/spool.py --segments 100,1000 --neurons-per-segment 16

Builds a synthetic store (bench/make_store.py), then opens it read-only, as a job does, and commits the stored
results of its explained neurons again as a new job's, one segment of N neurons per commit (real explanations,
simulations and scores, with N x 4 logged calls of realistic size). At each segment count it prints, for a new
read-only open (as `show`, `info` or the app make): the open, one neuron's explanations with their simulations
and scores (the neuron screen), the ranked summaries of the new job (the browse table), the job list (`info`) and a
logged call's lookup; then how long a writable open takes to fold the whole spool. Medians of 5; absolute times
are this machine's, so read them against the first row.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_store import build  # noqa: E402
from scale import cpu_model  # noqa: E402

from neuronscope.core.records import Call  # noqa: E402
from neuronscope.core.results import NeuronResult  # noqa: E402
from neuronscope.core.store import Store  # noqa: E402
from neuronscope.core.store.spool import Spool  # noqa: E402


def median_ms(fn: Callable[[], Any], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--neurons", type=int, default=1024, help="neurons per layer")
    parser.add_argument("--segments", default="100,500,2000", help="segment counts to measure at (ascending)")
    parser.add_argument("--neurons-per-segment", type=int, default=8)
    args = parser.parse_args()
    counts = sorted(int(c) for c in args.segments.split(","))
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores)")
    folder = Path(tempfile.mkdtemp(prefix="neuronscope-spool-"))
    path = folder / "store.duckdb"
    try:
        build(path, layers=args.layers, neurons=args.neurons, explained=0.25, excerpts=20_000, related=False,
              log=lambda *_: None)
        with Store.open(path, read_only=True) as store:
            run_id = store.run().run_id
            explained = store.con.execute("SELECT DISTINCT layer, neuron FROM explanations ORDER BY 1, 2").fetchall()
            results = [NeuronResult(layer, neuron, "pos", tuple(store.explanations(run_id, layer, neuron)))
                       for layer, neuron in explained[:256]]
        n = args.neurons_per_segment
        print(f"store: {args.layers * args.neurons:,} neurons, {len(explained):,} explained, "
              f"{path.stat().st_size / 1e6:.0f} MB; a segment = {n} neurons' explanations, simulations and scores "
              f"and {4 * n} logged calls of 3 kB\n")
        print("| segments | commit ms (median of the last 100) | open ms | neuron screen ms | browse summaries ms | "
              "info job list ms | call lookup ms | reader's memory copy MB |")
        print("|---|---|---|---|---|---|---|---|")
        prompt = "x" * 3000
        written = 0
        with Store.open(path, read_only=True) as job_store:
            job_id = job_store.create_job(run_id, "run", "{}", "bench", counts[-1] * n)
            for count in counts:
                commits = []
                while written < count:
                    batch = [results[(written * n + k) % len(results)] for k in range(n)]
                    batch = [NeuronResult(r.layer, (r.neuron + written * 7919) % args.neurons, r.tail,
                                          r.explanations) for r in batch]
                    calls = [(f"key-{written}-{k}", Call("openai", "m", "simulate", prompt, prompt[:500], 900, 10, 0.5))
                             for k in range(4 * n)]
                    t0 = time.perf_counter()
                    job_store.save_batch(job_id, run_id, batch, calls=calls)
                    commits.append(time.perf_counter() - t0)
                    written += 1
                t0 = time.perf_counter()
                reader = Store.open(path, read_only=True)
                opened = 1000 * (time.perf_counter() - t0)
                try:
                    neuron = results[0]
                    screen = median_ms(lambda: reader.explanations(run_id, neuron.layer, neuron.neuron))
                    browse = median_ms(lambda: reader.summaries(run_id, job_id=job_id, limit=100))
                    jobs = median_ms(lambda: reader.jobs())
                    lookup = median_ms(lambda: reader.lookup_call(f"key-{written // 2}-1"))
                    assert reader.lookup_call(f"key-{written // 2}-1") == prompt[:500]
                    memory = reader.con.execute("SELECT sum(memory_usage_bytes) FROM duckdb_memory()").fetchall()[0][0]
                finally:
                    reader.close()
                print(f"| {count:,} | {1000 * statistics.median(commits[-100:]):.1f} | {opened:.0f} | {screen:.1f} | "
                      f"{browse:.1f} | {jobs:.1f} | {lookup:.2f} | {memory / 1e6:.0f} |", flush=True)
        t0 = time.perf_counter()
        folded = Store.settle(path)
        fold = time.perf_counter() - t0
        assert folded and not Spool(path).names()
        with Store.open(path, read_only=True) as store:
            rows = store.con.execute("SELECT count(*) FROM job_neurons WHERE job_id = ?", [job_id]).fetchall()[0][0]
        print(f"\nfold of {written:,} segments by a writable open: {fold:.1f} s; {rows:,} neuron states of the job "
              "in the store after it")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
