"""Job throughput against a batching inference server: neurons per second at rising concurrency, against the ideal.

    python bench/scale.py                       # latency 1 s, capacity 256; concurrency 1, 16, 64, 256; ~7 minutes
    python bench/scale.py --quick               # concurrency 1 and 64 only, shorter levels; ~1.5 minutes
    python bench/scale.py --modes quotes --levels 1,64 --latency 0.5
    python bench/scale.py --profile             # also cProfile the client-bound level (every thread)
    python bench/scale.py --shared              # the store opened read-only, as CLI jobs do: commits go to the spool

A loopback OpenAI-compatible server (bench/loopback_server.py, its own process) answers every request after a fixed
latency L plus a cost per prompt token, serving up to C requests at once and queueing the rest, as a batching server
does. `run` jobs (the openai backend as explainer and simulator) go through it in the `quotes` and `lines` simulation
modes, each level on neurons no earlier level touched, so nothing is answered from the call log. For every level it
prints neurons per second beside the server-bound ideal min(c, C) / (L x requests per neuron), where the requests per
neuron come from the server's counter and L is the mean service time it applied (the latency plus the per-token cost);
the mean number of requests the server was serving (its request-seconds over the wall time: below min(c, C), the
client is not keeping it fed); the client's own CPU milliseconds per neuron (`time.process_time` of this process,
every thread, over the job) and the server's; the speed-up over the serial level (concurrency 1) of the same run. A last level runs with a ~0 latency server, so the
client is the limit. The store is a synthetic one of bench/make_store.py (4 layers x 5,120 neurons, built once under
/tmp and copied for each run). Goals: at least 0.8 of the ideal at concurrency 64 with a 1 s latency in both modes, at
least 20 neurons/s in `quotes` mode where the client is the limit. A level's rate includes its start (the first
requests on their way) and its end (the last neurons finishing with fewer in flight), about one neuron's chain of
requests in all (4 s in `lines` mode), which a job of hours does not feel: levels last about 40 s at the ideal rate
(--quick's 8 s levels understate the rate, `lines` most).

The concurrency goes to the engine as `Job.run(concurrency=N)`.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import os
import pstats
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loopback_server import LoopbackServer  # noqa: E402
from make_store import build  # noqa: E402

from neuronscope.core.ids import NeuronId  # noqa: E402
from neuronscope.core.jobs.engine import Job, JobSettings  # noqa: E402
from neuronscope.core.jobs.selection import Selection  # noqa: E402
from neuronscope.core.records import RunInfo  # noqa: E402
from neuronscope.core.store import Store  # noqa: E402

#: Requests per neuron assumed before the serial level has counted them (quotes: the explanation; lines: the
#: explanation and a packed echo per simulated explanation).
RPN_GUESS = {"quotes": 1.0, "lines": 4.0}
GOAL_RATIO, GOAL_CLIENT = 0.8, 20.0


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown (no lscpu)"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def pristine_store(path: Path, layers: int, neurons: int, excerpts: int) -> Path:
    """The synthetic store, built once (into a temporary name, then renamed) and reused by later runs."""
    if not path.exists():
        print(f"building {path} ({layers} x {neurons} neurons, {excerpts:,} excerpts; once)...", flush=True)
        partial = path.with_suffix(".building")
        partial.unlink(missing_ok=True)
        started = time.perf_counter()
        build(partial, layers=layers, neurons=neurons, explained=0.0, excerpts=excerpts, related=False,
              log=lambda _line: None)
        partial.rename(path)
        print(f"built in {time.perf_counter() - started:.0f} s", flush=True)
    return path


@dataclass
class Level:
    """One measured job."""

    mode: str
    concurrency: int
    capacity: int
    neurons: int
    wall: float = 0.0
    cpu: float = 0.0
    server_cpu: float = 0.0
    requests: dict[str, int] = field(default_factory=dict)
    service: float = 0.0
    failed: int = 0
    error: str = ""
    max_in_flight: int = 0
    simulation_route: str = ""

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    @property
    def rate(self) -> float:
        return (self.neurons - self.failed) / self.wall if self.wall else math.nan

    @property
    def per_neuron(self) -> float:
        return self.total_requests / self.neurons if self.neurons else math.nan

    @property
    def latency(self) -> float:
        """Mean service time the server applied per request."""
        return self.service / self.total_requests if self.total_requests else math.nan

    @property
    def ideal(self) -> float:
        return min(self.concurrency, self.capacity) / (self.latency * self.per_neuron)


class Neurons:
    """Hands out neurons no earlier level has used, from a fixed shuffle of the store's."""

    def __init__(self, layers: tuple[int, ...], per_layer: int, seed: int = 0) -> None:
        order = np.random.default_rng(seed).permutation(len(layers) * per_layer)
        self.all = [NeuronId(layers[int(i) // per_layer], int(i) % per_layer) for i in order]
        self.used = 0

    def take(self, n: int) -> tuple[NeuronId, ...]:
        if self.used + n > len(self.all):
            sys.exit(f"the store has too few neurons left for {n} more ({self.used:,} of {len(self.all):,} used): "
                     "pass --store-neurons larger (and a new --store path), or fewer --levels")
        out = tuple(self.all[self.used:self.used + n])
        self.used += n
        return out


class ThreadProfiles:
    """cProfile in every thread started while active (Python 3.11's cProfile sees only the thread enabling it)."""

    def __init__(self) -> None:
        self.profiles: list[cProfile.Profile] = []
        self._lock = threading.Lock()

    def _start(self, *_: Any) -> None:
        profile = cProfile.Profile(time.thread_time)  # CPU time of the thread: waits do not count
        with self._lock:
            self.profiles.append(profile)
        profile.enable()  # replaces this hook in the thread

    def __enter__(self) -> ThreadProfiles:
        threading.setprofile(self._start)
        self._start()
        return self

    def __exit__(self, *exc: object) -> None:
        threading.setprofile(None)
        for profile in self.profiles:
            profile.disable()

    def report(self, lines: int = 30) -> str:
        out = io.StringIO()
        stats = pstats.Stats(*self.profiles, stream=out)
        total = stats.total_tt  # type: ignore[attr-defined]
        out.write(f"{len(self.profiles)} threads profiled, {total:.1f} s of profiled time (CPU time of each thread; "
                  "waits excluded)\n")
        stats.sort_stats("tottime").print_stats(lines)
        stats.sort_stats("cumulative").print_stats(lines)
        return out.getvalue()


def run_level(store: Store, run: RunInfo, server: LoopbackServer, mode: str, concurrency: int,
              neurons: tuple[NeuronId, ...], *, profile: ThreadProfiles | None = None) -> Level:
    """One `run` job over the given neurons at a concurrency, timed, with the server's counts over it."""
    spec = f"openai:loopback@{server.url}"
    settings = JobSettings(kind="run", explainer=spec, simulator=spec, simulation=mode)
    level = Level(mode, concurrency, server.settings.capacity, len(neurons))
    job = Job(store, run, settings, Selection(neurons=neurons))
    errors: list[str] = []

    def landed(_neuron: NeuronId, error: str) -> None:
        if error:
            errors.append(error)

    options: dict[str, Any] = {"landed": landed, "concurrency": concurrency}
    before, server_cpu = server.stats(), server.cpu_seconds()
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        if profile is not None:
            with profile:
                job.run(**options)
        else:
            job.run(**options)
        level.wall = time.perf_counter() - wall
        level.cpu = time.process_time() - cpu
        backend = job.backend(spec)
        level.simulation_route = str(getattr(backend, "mode", "") or "")
    finally:
        job.close()
    after = server.stats()
    level.server_cpu = server.cpu_seconds() - server_cpu
    level.requests = {k: v - before["requests"].get(k, 0) for k, v in after["requests"].items()
                      if v - before["requests"].get(k, 0)}
    level.service = after["service_s"] - before["service_s"]
    level.max_in_flight = int(after["max_in_flight"])
    level.failed = len(errors)
    level.error = errors[0] if errors else ""
    return level


def row(level: Level, serial: Level | None, *, client_bound: bool = False) -> str:
    speedup = f"{level.rate / serial.rate:.1f}x" if serial and serial.rate else "-"
    ideal = "-" if client_bound else f"{level.ideal:.2f}"
    share = "-" if client_bound else f"{level.rate / level.ideal:.2f}"
    route = f" ({level.simulation_route})" if level.mode == "lines" and level.simulation_route else ""
    return (f"| {level.mode}{route} | {level.concurrency} | {level.neurons:,} | {level.wall:.1f} | {level.rate:.2f} | "
            f"{ideal} | {share} | {speedup} | {level.per_neuron:.2f} | {level.latency:.3f} | "
            f"{level.service / level.wall:.1f} | {1000 * level.cpu / level.neurons:.1f} | "
            f"{1000 * level.server_cpu / level.neurons:.1f} |" + (f" {level.failed} failed" if level.failed else ""))


HEADER = ("| mode | concurrency | neurons | wall s | neurons/s | ideal | of ideal | vs serial | requests/neuron | "
          "service s | in flight | client CPU ms/neuron | server CPU ms/neuron |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="concurrency 1 and 64 only, ~8 s levels, a shorter "
                                                             "client-bound level (about 1.5 minutes)")
    parser.add_argument("--latency", type=float, help="server seconds per request (default 1)")
    parser.add_argument("--per-token", type=float, default=20e-6, help="server seconds per prompt token")
    parser.add_argument("--capacity", type=int, default=256, help="requests the server serves at once (default 256)")
    parser.add_argument("--levels", help="concurrencies, comma-separated, 1 first (default 1,16,64,256; 1,64 with "
                                         "--quick)")
    parser.add_argument("--modes", default="quotes,lines", help="simulation modes (comma-separated)")
    parser.add_argument("--seconds", type=float, help="target seconds per level at the ideal rate (default 40; 8 "
                                                      "with --quick)")
    parser.add_argument("--max-neurons", type=int, help="most neurons in a level (default 2048; 512 with --quick)")
    parser.add_argument("--client-neurons", type=int, help="neurons of the client-bound level (default 2000; 400 "
                                                           "with --quick; 0 leaves it out)")
    parser.add_argument("--client-latency", type=float, default=0.001, help="server latency of the client-bound level")
    parser.add_argument("--client-concurrency", type=int, default=64)
    parser.add_argument("--client-mode", default="quotes", help="simulation mode of the client-bound level (the goal "
                                                                 "is stated for quotes)")
    parser.add_argument("--store", type=Path, default=Path("/tmp/neuronscope-scale.duckdb"),
                        help="the synthetic store (built there once)")
    parser.add_argument("--store-layers", type=int, default=4)
    parser.add_argument("--store-neurons", type=int, default=5120, help="neurons per layer of the synthetic store")
    parser.add_argument("--store-excerpts", type=int, default=20_000)
    parser.add_argument("--pad-top", action="store_true", help="the server pads echoed top logprobs to the number "
                                                               "asked for (20 per token, as vLLM sends)")
    parser.add_argument("--profile", action="store_true", help="cProfile the client-bound level in every thread")
    parser.add_argument("--shared", action="store_true", help="open the store read-only, as a CLI job does, so "
                        "commits go to segments in the spool beside it (the default writes the store directly)")
    args = parser.parse_args()
    latency = args.latency if args.latency is not None else 1.0
    seconds = args.seconds if args.seconds is not None else (8.0 if args.quick else 40.0)
    max_neurons = args.max_neurons or (512 if args.quick else 2048)
    client_neurons = args.client_neurons if args.client_neurons is not None else (400 if args.quick else 2000)
    levels = [int(c) for c in (args.levels or ("1,64" if args.quick else "1,16,64,256")).split(",") if c.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores)")
    print("columns: ideal = min(concurrency, capacity) / (service s x requests/neuron); in flight = the server's "
          "request-seconds / wall (mean requests it was serving); CPU ms per neuron of this process (every thread) and "
          "of the server's", flush=True)
    pristine = pristine_store(args.store, args.store_layers, args.store_neurons, args.store_excerpts)
    work = Path(f"{args.store}.work-{os.getpid()}")
    shutil.copyfile(pristine, work)
    results: list[Level] = []
    client: Level | None = None
    try:
        with Store.open(work, read_only=args.shared) as store:
            run = store.run()
            pool = Neurons(run.layers, run.neurons_per_layer)
            print(f"store: {len(pool.all):,} neurons; server: latency {latency:g} s + {args.per_token * 1e6:g} us "
                  f"per prompt token, capacity {args.capacity}", flush=True)
            print(HEADER, flush=True)
            with LoopbackServer(latency, args.per_token, args.capacity, args.pad_top) as server:
                for mode in modes:
                    serial: Level | None = None
                    for c in levels:
                        rpn = serial.per_neuron if serial else RPN_GUESS.get(mode, 1.0)
                        service = serial.latency if serial else latency
                        waves = max(1, round(seconds / (service * rpn)))
                        n = max(4, min(max_neurons, c * waves)) if c > 1 else max(4, waves)
                        level = run_level(store, run, server, mode, c, pool.take(n))
                        results.append(level)
                        serial = serial or (level if c == 1 else None)
                        print(row(level, serial), flush=True)
                        if level.error:
                            print(f"  first failure: {level.error}", flush=True)
            if client_neurons:
                with LoopbackServer(args.client_latency, args.per_token, args.capacity, args.pad_top) as server:
                    profile = ThreadProfiles() if args.profile else None
                    client = run_level(store, run, server, args.client_mode, args.client_concurrency,
                                       pool.take(client_neurons), profile=profile)
                    print(row(client, None, client_bound=True) + " (client-bound)", flush=True)
                    if profile is not None:
                        print(profile.report())
    finally:
        work.unlink(missing_ok=True)
        Path(f"{work}.wal").unlink(missing_ok=True)
        shutil.rmtree(f"{work}.spool", ignore_errors=True)

    print(f"\n{HEADER}")
    serials = {r.mode: r for r in results if r.concurrency == 1}
    for r in results:
        print(row(r, serials.get(r.mode)))
    if client is not None:
        print(row(client, None, client_bound=True) + f" client-bound (latency {args.client_latency:g} s)")
    print()
    for mode in modes:
        at64 = [r for r in results if r.mode == mode and r.concurrency == 64]
        if at64:
            r = at64[0]
            verdict = "PASS" if r.rate >= GOAL_RATIO * r.ideal else "FAIL"
            note = "" if latency == 1.0 else f" (latency {latency:g} s, the goal is stated at 1 s)"
            print(f"{verdict}: {mode} at concurrency 64: {r.rate:.2f} neurons/s = {r.rate / r.ideal:.2f} of the ideal "
                  f"{r.ideal:.2f} (goal >= {GOAL_RATIO}){note}")
    if client is not None:
        verdict = "PASS" if client.rate >= GOAL_CLIENT or args.client_mode != "quotes" else "FAIL"
        print(f"{verdict}: {args.client_mode}, client-bound (latency {args.client_latency:g} s, concurrency "
              f"{args.client_concurrency}): {client.rate:.1f} neurons/s (goal >= {GOAL_CLIENT:g}); client CPU "
              f"{1000 * client.cpu / client.neurons:.1f} ms per neuron")


if __name__ == "__main__":
    main()
