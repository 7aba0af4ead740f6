"""Jobs against a real llama.cpp server (`llama-server`): neurons per minute with one request in flight against N,
the server started with `--parallel 1` and then `--parallel N`.

    python bench/llamacpp_parallel.py --server /path/to/llama-server            # the packaged SmolLM2-135M GGUF
    python bench/llamacpp_parallel.py --server llama-server --model m.gguf --parallel 4 --neurons 16

llama-server is not a dependency (build it from llama.cpp's source: `cmake -B build -DLLAMA_CURL=OFF && cmake
--build build --target llama-server`). For each setting this starts the server on a free port (context 2,048
tokens per slot, all cores), runs a `run` job (`quotes` mode unless --mode) with the openai backend as explainer and
simulator over fresh neurons of a small synthetic store (bench/make_store.py), and prints neurons per minute, the
server's slots and the job's concurrency. Each level uses neurons no earlier level used, so nothing is answered
from the call log. Absolute rates are this machine's; read the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_store import build  # noqa: E402
from scale import cpu_model  # noqa: E402

from neuronscope.core.ids import NeuronId  # noqa: E402
from neuronscope.core.jobs.engine import Job, JobSettings, Selection  # noqa: E402
from neuronscope.core.store import Store  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(binary: str, model: Path, parallel: int, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "--parallel", str(parallel),
               "-c", str(2048 * parallel), "-t", str(os.cpu_count() or 2)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if json.load(r).get("status") == "ok":
                    return proc, url
        except OSError:
            pass
        if proc.poll() is not None:
            sys.exit(f"llama-server exited ({proc.returncode}): see {log}")
        time.sleep(0.5)
    proc.kill()
    sys.exit(f"llama-server did not become ready in 120 s: see {log}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True, help="the llama-server binary")
    parser.add_argument("--model", type=Path, help="a GGUF (default: the packaged SmolLM2-135M's)")
    parser.add_argument("--parallel", type=int, default=4, help="slots of the parallel level (default 4)")
    parser.add_argument("--neurons", type=int, default=12, help="neurons per level (default 12)")
    parser.add_argument("--mode", default="quotes", help="simulation mode: quotes (one request a neuron, the "
                        "explanation) or lines (also the simulations)")
    args = parser.parse_args()
    if args.model is None:
        from neuronscope.core.models.packaged import PACKAGED

        args.model = PACKAGED["smollm2-135m"].path()
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores); model {args.model.name}; {args.mode} mode")
    folder = Path(tempfile.mkdtemp(prefix="neuronscope-llamacpp-"))
    try:
        store_path = folder / "store.duckdb"
        build(store_path, layers=1, neurons=4 * args.neurons, explained=0.0, excerpts=4_000, related=False,
              log=lambda *_: None)
        neurons = [NeuronId(0, n) for n in range(4 * args.neurons)]
        rows = []
        with Store.open(store_path) as store:
            run = store.run()
            for level, (slots, concurrency) in enumerate(((1, 1), (args.parallel, args.parallel))):
                proc, url = start_server(args.server, args.model, slots, folder / f"server-{slots}.log")
                try:
                    spec = f"openai:{args.model.stem}@{url}"
                    settings = JobSettings(kind="run", explainer=spec, simulator=spec, simulation=args.mode)
                    chosen = tuple(neurons[level * args.neurons:(level + 1) * args.neurons])
                    job = Job(store, run, settings, Selection(neurons=chosen))
                    started = time.perf_counter()
                    try:
                        report = job.run(concurrency=concurrency)
                    finally:
                        job.close()
                    wall = time.perf_counter() - started
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)
                rate = 60 * report.done / wall
                rows.append(rate)
                print(f"--parallel {slots}, concurrency {concurrency}: {report.done}/{len(chosen)} neurons in "
                      f"{wall:.0f} s = {rate:.2f} neurons/min ({len(report.failed)} failed, {report.new_calls} calls)",
                      flush=True)
                if report.failed:
                    print(f"  first failure: {next(iter(report.failed.values()))}", flush=True)
        print(f"ratio {rows[1] / rows[0]:.2f}x" if rows[0] else "no ratio: no neuron finished at --parallel 1")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
