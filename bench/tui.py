"""The neuron browser at GPT-2 XL scale: app start, sorts, filters, positions and opening a neuron, against the
targets (a sort or filter under 100 ms at p95, opening a neuron under 50 ms).

    python bench/tui.py                                   # builds /tmp/neuronscope-xl.duckdb first if missing
    python bench/tui.py --store /tmp/xl.duckdb --repeat 20
    python bench/tui.py --store /tmp/small.duckdb --build --layers 4 --neurons 512
    python bench/tui.py --terminal --repeat 20           # key press to painted screen in tmux (bench/terminal.py)

The store is opened read-only, as the app opens it. Each operation runs --repeat times; the table shows the median
and the 95th percentile in ms. Measured in one run on one machine: the PASS/FAIL line compares with the targets,
nothing asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from neuronscope.core.store import Store
from neuronscope.core.store.browse import BROWSE_ORDERS, BrowseQuery

ROOT = Path(__file__).resolve().parents[1]

SORT_MS, OPEN_MS = 100.0, 50.0
#: Run in a fresh interpreter: prints seconds from its start to the app's first screen being mounted.
START_PROBE = """
import asyncio, sys, time
from neuronscope.tui.app import NeuronscopeApp

async def main() -> None:
    app = NeuronscopeApp(sys.argv[1])
    async with app.run_test(size=(160, 50)) as pilot:
        await pilot.pause()
        print("ready", flush=True)

asyncio.run(main())
"""

Row = tuple[str, str, list[float], float]  # group, name, seconds, target ms


def stats(times: list[float]) -> tuple[float, float]:
    """(median, p95) in ms."""
    ms = np.array(times) * 1000
    return float(np.median(ms)), float(np.percentile(ms, 95))


def repeat(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def wall(cmd: list[str], n: int, until: str | None = None) -> list[float]:
    """Seconds from spawning `cmd` to its exit (or to it printing a line starting with `until`)."""
    env = {**os.environ, "TEXTUAL": ""}
    out = []
    for _ in range(n):
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        if until is not None:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(until):
                    break
        elapsed = time.perf_counter() - started
        _, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd[:3])} failed: {err.strip().splitlines()[-1:]}")
        out.append(elapsed if until is not None else time.perf_counter() - started)
    return out


def bench_start(path: Path, n: int) -> list[Row]:
    help_cmd = [sys.executable, "-m", "neuronscope.tui.cli", "--help"]
    app_cmd = [sys.executable, "-c", START_PROBE, str(path)]
    return [("start", "neuronscope --help (process)", wall(help_cmd, n), 2000.0),
            ("start", "app first screen (process, headless)", wall(app_cmd, n, until="ready"), 2000.0)]


def bench_queries(store: Store, run_id: int, n: int) -> list[Row]:
    from make_store import COMMON_WORD, RARE_WORD

    rows: list[Row] = []
    store.neuron_count(run_id)  # one warm-up: the first query of a connection loads the catalog

    def page_rows(group: str, name: str, query: BrowseQuery) -> None:
        rows.append((group, f"{name}: count + first page",
                     repeat(lambda: (store.neuron_count(run_id, query), store.neuron_rows(run_id, query, limit=200)), n),
                     SORT_MS))
        total = store.neuron_count(run_id, query)
        deep = min(150_000, max(total - 200, 0))
        if deep > 1000:
            rows.append((group, f"{name}: page at {deep:,}",
                         repeat(lambda: store.neuron_rows(run_id, query, offset=deep, limit=200), n), SORT_MS))

    for order in BROWSE_ORDERS:
        for descending in (False, True):
            page_rows("sort", f"{order} {'desc' if descending else 'asc'}", BrowseQuery(order=order, descending=descending))
    filters = {
        "layers 10-20": BrowseQuery(layers=(10, 20)),
        "score 0.3-0.6, by score": BrowseQuery(order="score", descending=True, score=(0.3, 0.6)),
        "explained, by score": BrowseQuery(order="score", descending=True, explained=True),
        "unexplained": BrowseQuery(explained=False),
        f"search '{COMMON_WORD}'": BrowseQuery(search=COMMON_WORD),
        f"search '{RARE_WORD}', by score": BrowseQuery(order="score", descending=True, search=RARE_WORD),
        "layers 10-20 + search + explained": BrowseQuery(order="max", descending=True, layers=(10, 20),
                                                          search="tokens", explained=True),
    }
    for name, query in filters.items():
        page_rows("filter", name, query)
    rng = np.random.default_rng(0)
    layers = store.run(run_id).layers
    per_layer = store.run(run_id).neurons_per_layer
    picks = [(int(rng.choice(layers)), int(rng.integers(per_layer))) for _ in range(n)]
    for name, query in (("layer", BrowseQuery()), ("score desc", BrowseQuery(order="score", descending=True)),
                        ("selectivity desc", BrowseQuery(order="selectivity", descending=True))):
        it = iter(picks * 2)
        rows.append(("position", f"neuron_position, {name}",
                     repeat(lambda q=query: store.neuron_position(run_id, q, *next(it)), n), SORT_MS))  # type: ignore[misc]
        after = iter(rng.integers(0, store.neuron_count(run_id, query), n).tolist())
        rows.append(("position", f"next_unexplained, {name}",
                     repeat(lambda q=query: store.next_unexplained(run_id, q, next(after)), n), SORT_MS))  # type: ignore[misc]
    return rows


def neuron_sample(store: Store, run_id: int, n: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """n explained and n unexplained neurons spread over the run."""
    total = store.neuron_count(run_id, BrowseQuery(explained=True))
    rng = np.random.default_rng(1)
    explained = [(r.layer, r.neuron) for off in rng.integers(0, max(total - 1, 1), n).tolist()
                 for r in store.neuron_rows(run_id, BrowseQuery(explained=True), offset=off, limit=1)]
    total = store.neuron_count(run_id, BrowseQuery(explained=False))
    plain = [(r.layer, r.neuron) for off in rng.integers(0, max(total - 1, 1), n).tolist()
             for r in store.neuron_rows(run_id, BrowseQuery(explained=False), offset=off, limit=1)]
    return explained, plain


def bench_open_queries(store: Store, run_id: int, neurons: list[tuple[int, int]], label: str) -> list[Row]:
    """What NeuronScreen.compose asks the store, and the renderables it builds, without Textual."""
    from neuronscope.tui.render import (
        explanation_renderables,
        histogram_text,
        record_line,
        related_lines,
        scale_of,
        stats_table,
    )

    run = store.run(run_id)
    parts: dict[str, list[float]] = {"neuron_stats": [], "records": [], "explanations": [], "related": [],
                                     "renderables": []}
    for layer, neuron in neurons:
        t0 = time.perf_counter()
        stats_ = store.neuron_stats(run_id, layer, neuron)
        t1 = time.perf_counter()
        records = store.records(run_id, layer, neuron)
        t2 = time.perf_counter()
        explanations = store.explanations(run_id, layer, neuron)
        t3 = time.perf_counter()
        related = store.related(run_id, layer, neuron)
        t3b = time.perf_counter()
        scale = scale_of(records)
        assert stats_ is not None
        stats_table(stats_, run.settings.quantiles)
        histogram_text(stats_)
        explanation_renderables(explanations, records, scale, 5)
        related_lines(*related)
        for rec in records:
            record_line(rec, scale)
        t4 = time.perf_counter()
        for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t3b - t3, t4 - t3b)):
            parts[key].append(value)
    total = [sum(v) for v in zip(*parts.values())]
    return [("open", f"{label}: {key}", value, OPEN_MS) for key, value in parts.items()] + [
        ("open", f"{label}: store + renderables", total, OPEN_MS)]


def bench_open_screen(path: Path, neurons: dict[str, list[tuple[int, int]]]) -> list[Row]:
    """Open neurons in the real app (headless) as enter does, and wait until the screen is idle; beside it, the
    same wait for an empty screen: Textual's own floor for any screen in this harness, not the neuron's cost."""
    from textual.screen import Screen

    from neuronscope.tui.app import NeuronscopeApp

    rows: list[Row] = []

    async def run() -> None:
        app = NeuronscopeApp(path)
        async with app.run_test(size=(160, 50)) as pilot:
            await pilot.pause()
            times = []
            for _ in range(max(len(c) for c in neurons.values())):
                started = time.perf_counter()
                await app.push_screen(Screen())
                await pilot.pause()
                times.append(time.perf_counter() - started)
                await app.pop_screen()
                await pilot.pause()
            rows.append(("screen", "empty screen pushed + idle (harness floor)", times, float("inf")))
            for label, chosen in neurons.items():
                times = []
                for layer, neuron in chosen:
                    started = time.perf_counter()
                    app.open_neuron(layer, neuron)
                    await pilot.pause()
                    times.append(time.perf_counter() - started)
                    app.pop_screen()
                    await pilot.pause()
                rows.append(("screen", f"{label}: neuron screen opened + idle", times, float("inf")))

    asyncio.run(run())
    return rows


def report(rows: list[Row]) -> None:
    print(f"\n{'group':9} {'operation':52} {'median ms':>10} {'p95 ms':>9} {'target':>8}")
    worst: dict[str, float] = {}
    for group, name, times, target in rows:
        med, p95 = stats(times)
        worst[group] = max(worst.get(group, 0.0), p95)
        flag = "" if p95 < target else "  over"
        print(f"{group:9} {name:52} {med:10.1f} {p95:9.1f} {target:8.0f}{flag}")
    checks = [("sort", SORT_MS), ("filter", SORT_MS), ("position", SORT_MS), ("open", OPEN_MS)]
    verdicts = [f"{g} worst p95 {worst[g]:.0f} ms < {t:.0f}: {'PASS' if worst[g] < t else 'FAIL'}"
                for g, t in checks if g in worst]
    over = [name for group, name, times, target in rows if group == "terminal" and stats(times)[1] >= target]
    if any(group == "terminal" for group, *_ in rows):
        verdicts.append("terminal: every p95 within its target" if not over else f"terminal over: {', '.join(over)}")
    ok = all(worst[g] < t for g, t in checks if g in worst) and not over
    print(f"\n{'PASS' if ok else 'FAIL'}: " + "; ".join(verdicts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=Path("/tmp/neuronscope-xl.duckdb"))
    parser.add_argument("--build", action="store_true", help="build the store even if it exists (replacing it)")
    parser.add_argument("--layers", type=int, default=48, help="for a build")
    parser.add_argument("--neurons", type=int, default=6400, help="for a build")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--starts", type=int, default=5, help="process starts to time")
    parser.add_argument("--skip", default="", help="comma-separated groups to skip: start, queries, open")
    parser.add_argument("--terminal", action="store_true",
                        help="only the real-terminal measures: `neuronscope browse` in tmux, key to painted screen")
    parser.add_argument("--search", default="tokens", help="the word the terminal measure searches for")
    args = parser.parse_args()
    if args.build or not args.store.exists():
        from make_store import build

        args.store.unlink(missing_ok=True)
        t = build(args.store, layers=args.layers, neurons=args.neurons, log=lambda _msg: None)
        print(f"built {args.store}: {t['neurons']:,.0f} neurons in {t['build']:.0f} s, "
              f"{t['bytes'] / t['neurons']:,.0f} bytes per neuron")
    if args.terminal:
        from terminal import measure

        with Store.open(args.store, read_only=True) as store:
            run = store.run()
            layers = (min(run.layers), sorted(run.layers)[min(1, len(run.layers) - 1)])
            print(f"store {args.store}: {store.neuron_count(run.run_id):,} neurons; tmux 120x40")
        report(measure(args.store, args.repeat, args.search, layers))
        return
    skip = set(args.skip.split(","))
    rows: list[Row] = []
    if "start" not in skip:
        rows += bench_start(args.store, args.starts)
    with Store.open(args.store, read_only=True) as store:
        run_id = store.run().run_id
        print(f"store {args.store}: {store.neuron_count(run_id):,} neurons, "
              f"{store.neuron_count(run_id, BrowseQuery(explained=True)):,} explained")
        if "queries" not in skip:
            rows += bench_queries(store, run_id, args.repeat)
        explained, plain = neuron_sample(store, run_id, args.repeat)
        if "open" not in skip:
            rows += bench_open_queries(store, run_id, explained, "explained")
            rows += bench_open_queries(store, run_id, plain, "unexplained")
    if "open" not in skip:
        rows += bench_open_screen(args.store, {"explained": explained, "unexplained": plain})
    report(rows)


if __name__ == "__main__":
    main()
