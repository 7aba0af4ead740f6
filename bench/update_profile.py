"""Where one layer's update spends its time, and the statistics kernel's checks, for bench/collect.py --random
(--profile, --check). Imported from bench/collect.py, which puts this folder on sys.path; torch and transformers only.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any


def profile_update(subject, excerpts, layer: int, batch: int, settings, sync) -> None:  # type: ignore[no-untyped-def]
    """Where one layer's bookkeeping spends its time, per path: the last two of up to ten batches' updates (after the
    others have filled the samplers, as later in a run) under torch.profiler, the operators that take the most device
    time (CPU time on a CPU), and the wall time per update without the profiler. Then the statistics kernel's
    variants, and the three ways to count the histogram's bins of one batch."""
    import json

    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from neuronscope.core.collection.accumulate import Accumulator
    from neuronscope.core.collection.token_stats import token_stats_fn
    from neuronscope.core.layerdata import HIST_EDGES

    device = subject.device
    cuda = device.type == "cuda"
    count = min(10, len(excerpts.excerpt_ids) // batch)
    if count < 4:
        print(json.dumps({"profile": "skipped: fewer than 4 batches of excerpts"}), flush=True)
        return
    parts = [slice(i * batch, (i + 1) * batch) for i in range(count)]
    acts = [subject.activations(torch.from_numpy(excerpts.token_ids[p].astype(np.int64)), (layer,))[layer]
            for p in parts]
    eids = [torch.from_numpy(excerpts.excerpt_ids[p].astype(np.int64)).to(device) for p in parts]
    stats = token_stats_fn(device, 1 << 40)  # compiled where a collection would compile it
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]

    def updated(fixed: bool, profiled: bool) -> tuple[float, Any, dict[str, int] | None]:
        acc = Accumulator((layer,), subject.n_neurons, settings, subject.dtype, device, fixed)
        for i in range(count - 2):
            acc.update(acts[i], eids[i], stats)
        acc._settle()
        sync()
        with profile(activities=activities) if profiled else contextlib.nullcontext() as prof:
            started = time.perf_counter()
            for i in (count - 2, count - 1):
                acc.update(acts[i], eids[i], stats)
            acc._settle()
            sync()
            wall = (time.perf_counter() - started) / 2
        return wall, prof, dict(acc._widths) if fixed else None

    def own(event: Any) -> float:  # microseconds of the operator's own time, on the device where there is one
        if not cuda:
            return float(event.self_cpu_time_total)
        return float(getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0))

    for path in ("fixed", "filtered"):
        updated(path == "fixed", False)  # warm-up
        wall, _, widths = updated(path == "fixed", False)
        _, prof, _ = updated(path == "fixed", True)
        events = sorted(prof.key_averages(), key=own, reverse=True)
        # On a GPU an operator and its kernels both carry the kernels' time: the total counts kernels alone.
        kernels = [e for e in events if not cuda or str(getattr(e, "device_type", "")).endswith("CUDA")]
        print(json.dumps({"profile": path, "layer": layer, "units": subject.n_neurons, "batch": batch,
                          "batches_before": count - 2, "widths": widths,
                          "wall_ms_per_update": round(wall * 1e3, 2),
                          "own_ms_per_update": round(sum(own(e) for e in kernels) / 2e3, 2),
                          "top": [[e.key[:70], round(own(e) / 2e3, 3), e.count // 2] for e in events[:14]]}),
              flush=True)
    # The statistics kernel alone, against reading the layer's activations once (a sum of them): its floor. Then the
    # candidates for a faster one: compiled with inductor's coordinate-descent tuning of its block sizes, and run
    # on the activations laid out tokens last ([B, F, T], reductions along contiguous memory) after a copy.
    from neuronscope.core.collection.sampling import unit_hash
    from neuronscope.core.collection.token_stats import compute_token_stats

    units = torch.arange(subject.n_neurons, device=device)
    args = (acts[2], eids[2], unit_hash(0, layer, units), settings.hist_stride, (units * (len(HIST_EDGES) + 1)).int())
    kernel = {"statistics kernel": lambda: stats(*args), "one read of the activations": lambda: acts[2].sum()}
    if cuda:
        tuned = torch.compile(compute_token_stats, dynamic=False, options={"coordinate_descent_tuning": True})
        on_last = torch.compile(compute_token_stats, dynamic=False)
        last = acts[2].transpose(1, 2).contiguous()
        kernel.update({"tuned statistics kernel": lambda: tuned(*args),
                       "copy to tokens last": lambda: acts[2].transpose(1, 2).contiguous(),
                       "statistics kernel on tokens last": lambda: on_last(last, *args[1:], tokens=2)})
    print(json.dumps({"median_ms": {name: round(median_ms(way, sync), 3) for name, way in kernel.items()},
                      "activations_mb": round(acts[2].numel() * acts[2].element_size() / 1e6)}), flush=True)
    index = (torch.randint(0, len(HIST_EDGES) + 1, (batch, 8, subject.n_neurons), device=device, dtype=torch.int32)
             + (units * (len(HIST_EDGES) + 1)).int()).reshape(-1)
    size = subject.n_neurons * (len(HIST_EDGES) + 1)
    ones = torch.ones((), dtype=torch.int64, device=device).expand(len(index))
    ways = {"index_put_ accumulate": lambda c: c.index_put_((index.long(),), ones, accumulate=True),
            "scatter_add_": lambda c: c.scatter_add_(0, index.long(), ones),
            "bincount": lambda c: c.add_(torch.bincount(index, minlength=size))}
    timed, results = {}, []
    for name, way in ways.items():
        counts = torch.zeros(size, dtype=torch.int64, device=device)
        way(counts)
        results.append(counts)
        timed[name] = round(median_ms(lambda way=way: way(torch.zeros_like(counts)), sync), 3)
    print(json.dumps({"histogram counts of one batch": len(index), "median_ms": timed,
                      "equal": all(torch.equal(results[0], r) for r in results[1:])}), flush=True)


def median_ms(way, sync) -> float:  # type: ignore[no-untyped-def]
    """The median of five timed calls, in milliseconds (after one untimed)."""
    way()
    times = []
    for _ in range(5):
        sync()
        started = time.perf_counter()
        way()
        sync()
        times.append(time.perf_counter() - started)
    return sorted(times)[2] * 1e3


def compiled_against_eager(subject, excerpts, layer: int, batch: int) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """The statistics kernel compiled (as a GPU collection runs it) against eager, on one batch of a layer's real
    activations: everything but the power sums equal, the power sums to float rounding."""
    import numpy as np
    import torch

    from neuronscope.core.collection.sampling import unit_hash
    from neuronscope.core.collection.token_stats import compute_token_stats
    from neuronscope.core.layerdata import HIST_EDGES

    acts = subject.activations(torch.from_numpy(excerpts.token_ids[:batch].astype(np.int64)), (layer,))[layer]
    units = torch.arange(acts.shape[2], device=acts.device)
    args = (acts, torch.from_numpy(excerpts.excerpt_ids[:batch]).to(acts.device), unit_hash(0, layer, units), 8,
            (units * (len(HIST_EDGES) + 1)).int())
    want = compute_token_stats(*args)
    got = torch.compile(compute_token_stats, dynamic=False)(*args)
    finite = torch.isfinite(want[0]).all(0)
    rel = ((got[0] - want[0]).abs()[:, finite] / want[0].abs()[:, finite].amax(1, keepdim=True).clamp_min(1e-30))
    return {"check": "compiled statistics kernel == eager", "layer": layer, "excerpts": int(acts.shape[0]),
            "identical_but_sums": all(torch.equal(w, g) for w, g in zip(want[1:], got[1:], strict=True)),
            "sums_max_relative_error": float(rel.max()) if rel.numel() else 0.0}
