"""Collection throughput against the bare forward pass, store bytes per neuron, and peak memory.

    python bench/collect.py                      # default model, dtype and batch, 256 excerpts
    python bench/collect.py --dtype float32 --excerpts 512 --layers 0-29
    python bench/collect.py --excerpts 16384 --corpus /usr/lib/python3.11   # a longer run than the default corpus has
    python bench/collect.py --rss 500            # peak RSS of `neuronscope collect` at 500 and 2000 excerpts
    python bench/collect.py --random gpt2-xl --device cuda     # a random model of GPT-2 XL's shape (GPU machine)
    python bench/collect.py --random tiny --paths fixed filtered --check   # the same script, checked on a CPU
    python bench/collect.py --random llama-3.1-8b --sae-width 16          # latents of a 16x coder against neurons

With --random SHAPE (gpt2-xl, llama-3.1-8b, tiny; bench/shapes.py) nothing is downloaded and no store is written:
the model is randomly initialised, the tokenizer is the folder --tokenizer (see bench/gpu_local.py
--save-tokenizer), and it measures the collection pass alone against the bare forward pass, once per bookkeeping
path (`fixed`: fixed-shape merges, the GPU default; `filtered`: on a GPU, merges of the candidates that pass each
group's worst entry, in torch; on a CPU, the compiled pass that is the CPU's default), with the host reads back from
the GPU counted per batch. --check compares the two paths' results exactly on the first layers, the fixed
path's states taken in a second thread (as the store write takes them) with those taken in the calling thread, and
the compiled statistics kernel with eager on one batch. It runs from a plain checkout with torch and transformers
only. Prints JSON lines.

Everything is measured in one run on one machine and printed as ratios; absolute times are noise.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def throughput(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from neuronscope.core.collection.batching import auto_batch_size
    from neuronscope.core.collection.collect import collect
    from neuronscope.core.collection.corpus import CorpusSpec
    from neuronscope.core.collection.excerpts import cut_excerpts
    from neuronscope.core.collection.token_stats import stats_compiled
    from neuronscope.core.ids import parse_layers
    from neuronscope.core.models.loading import load_subject
    from neuronscope.core.records import CollectSettings
    from neuronscope.core.store import Store

    subject = load_subject(args.model, device=args.device, dtype=args.dtype)
    layers = parse_layers(args.layers, range(subject.n_layers)) or ()
    excerpts = cut_excerpts(CorpusSpec(args.corpus), subject.tokenizer, length=64, max_excerpts=args.excerpts, seed=0)
    batch = args.batch_size or auto_batch_size(subject, layers, 64)
    n = len(excerpts.excerpt_ids)
    last_layer = max(layers)  # the bare forward pass runs as far as the collection's does

    def sync() -> None:
        if subject.device.type == "cuda":
            torch.cuda.synchronize()

    def bare(start: int = 0, stop: int = n) -> float:
        started = time.perf_counter()
        for i in range(start, stop, batch):
            subject.bare_forward(torch.from_numpy(excerpts.token_ids[i : min(i + batch, stop)].astype(np.int64)),
                                 last_layer)
        sync()
        return time.perf_counter() - started

    bare(0, min(n, 2 * batch))  # warm-up (allocator, kernels; the measured bare batches run between the pass's)
    # The same compile decision as `neuronscope collect`, applied to the warm-up too.
    compiled = stats_compiled(subject.device, (n // batch) * batch * 64 * len(layers) * subject.n_neurons)
    os.environ["NEURONSCOPE_COMPILE"] = "1" if compiled else "0"
    cpu_pass = subject.device.type == "cpu" and os.environ.get("NEURONSCOPE_FIXED_SHAPES") != "1"
    stats_path = "in the CPU's compiled passes" if cpu_pass else "torch.compile" if compiled else "eager"
    with tempfile.TemporaryDirectory() as tmp:  # warm-up: compiles the statistics kernel once
        with Store.open(Path(tmp) / "warm.duckdb") as store:
            warm = type(excerpts)(excerpts.token_ids[: 2 * batch], excerpts.excerpt_ids[: 2 * batch], 64, "warm-up")
            collect(store, subject, warm, layers=layers, settings=CollectSettings(), batch_size=batch, reuse=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.duckdb"
        stages: dict[str, float] = {}
        marks: dict[str, float] = {}
        # Batch by batch, the collection's time and the bare forward pass's over the same excerpts, run in turn: the
        # machine's speed drifts (by a quarter within a minute on a shared 2-core VM), and so does the ratio of two
        # passes run one after the other. The bare batches run between the collection's, outside its clock.
        collect_batches: list[float] = []
        bare_batches: list[float] = []
        done_before = [0]

        def progress(stage: str, done: int, total: int) -> None:
            sync()
            now = time.perf_counter()
            if stage == "collect":
                if done:
                    collect_batches.append(now - marks["collect"])
                    bare_batches.append(bare(done_before[0], done))
                    now = time.perf_counter()
                marks["collect"], done_before[0] = now, done  # the clock restarts after the bare batch
            # The write's first report comes after its first layer: its clock starts when the pass ends.
            marks.setdefault(stage, marks["collect"] if stage == "write" else now)
            if done == total and stage != "collect":
                stages[stage] = now - marks[stage]

        with Store.open(path) as store, timed_updates() as updates:
            settings = CollectSettings(max_excerpts=args.excerpts)
            result = collect(store, subject, excerpts, layers=layers, settings=settings, batch_size=batch,
                             progress=progress, reuse=False)
            store.checkpoint()
        size = path.stat().st_size
    collect_s, bare_s = sum(collect_batches), sum(bare_batches)
    write_s = stages.get("write", 0.0)
    half = len(collect_batches) // 2  # later batches: few excerpts still enter the records, as in most of a long run
    later_collect, later_bare = sum(collect_batches[half:]), sum(bare_batches[half:])
    print(f"model {subject.name}  dtype {str(subject.dtype).replace('torch.', '')}  device {subject.device}  "
          f"batch {batch}  excerpts {n}  layers {len(layers)}  neurons {result.n_neurons}  "
          f"statistics {stats_path}")
    print(f"bare forward        {n * 64 / bare_s:10.0f} tok/s")
    print(f"collection pass     {n * 64 / collect_s:10.0f} tok/s   ratio to bare forward: {bare_s / collect_s:.2f}")
    print(f"  its second half   {(n - half * batch) * 64 / later_collect:10.0f} tok/s   ratio: {later_bare / later_collect:.2f}")
    print(f"pass + store write  {n * 64 / (collect_s + write_s):10.0f} tok/s   ratio: {bare_s / (collect_s + write_s):.2f}")
    print(f"store bytes per neuron: {size / result.n_neurons:,.0f}  ({size / 1e6:.1f} MB for {result.n_neurons} neurons)")
    print_phases(updates, collect_batches, bare_batches, len(layers))


@contextlib.contextmanager
def timed_updates():  # type: ignore[no-untyped-def]
    """The seconds of each Accumulator.update call made inside the block, in order (a wrapper timing the class's own
    method: on a CPU an update runs to completion before it returns)."""
    from neuronscope.core.collection.accumulate import Accumulator

    seconds: list[float] = []
    update = Accumulator.update

    def timed(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        update(self, *args, **kwargs)
        seconds.append(time.perf_counter() - started)

    Accumulator.update = timed  # type: ignore[method-assign]
    try:
        yield seconds
    finally:
        Accumulator.update = update  # type: ignore[method-assign]


def print_phases(updates: list[float], collect_batches: list[float], bare_batches: list[float], layers: int) -> None:
    """Per phase of the run, milliseconds per layer and batch: the bookkeeping (the updates), the forward pass inside
    the collection (the rest of its batch), and the bare forward pass. A run's first batches, while the records
    fill, cost the most; later ones approach the steady state. Only where each layer was updated on its own inside
    the pass (a CPU): on a GPU, layers are joined and updated after it."""
    import numpy as np

    n = len(collect_batches)
    if len(updates) < n * layers:
        return
    # The collection's own updates come last: before them, the one that has the CPU passes compiled (compile_passes).
    bookkeeping = np.array(updates[len(updates) - n * layers :]).reshape(n, layers).sum(1)
    print("per layer and batch, ms:   bookkeeping   forward in the pass   bare forward")
    for first, last in ((0, 0), (1, 7), (8, 15), (16, 31), (32, 63), (64, n - 1)):
        if first >= n:
            break
        at = slice(first, min(last, n - 1) + 1)
        kept, total, bare = (float(np.mean(x[at])) * 1e3 / layers
                             for x in (bookkeeping, np.array(collect_batches), np.array(bare_batches)))
        name = f"batch {first}" if first == last else f"batches {first}-{min(last, n - 1)}"
        print(f"  {name:<16} {kept:12.1f} {total - kept:21.1f} {bare:14.1f}")


def random_pass(args: argparse.Namespace) -> None:
    """The collection pass on a random model of a real shape, per bookkeeping path, against the bare forward."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from shapes import make_importable, random_subject
    from update_profile import compiled_against_eager, profile_update

    make_importable()
    import json
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch

    from neuronscope.core.collection.batching import auto_batch_size
    from neuronscope.core.collection.collect import accumulate
    from neuronscope.core.collection.corpus import CorpusSpec
    from neuronscope.core.collection.excerpts import cut_excerpts
    from neuronscope.core.ids import parse_layers
    from neuronscope.core.records import CollectSettings

    began = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    subject = random_subject(args.random, args.tokenizer, device, dtype, args.random_layers)
    layers = parse_layers(args.layers, range(subject.n_layers)) or ()
    # A corpus of the GPU machine's own (its Python's standard library, say) is read only as far as the run needs.
    excerpts = cut_excerpts(CorpusSpec(args.corpus), subject.tokenizer, length=64, max_excerpts=args.excerpts, seed=0,
                            max_tokens=None if args.corpus == "default" else args.excerpts * 64)
    batch = args.batch_size or auto_batch_size(subject, layers, 64)
    n = len(excerpts.excerpt_ids)
    half = (-(-n // batch) // 2) * batch  # the excerpts before the second half of the batches
    cuda = device.type == "cuda"
    if not cuda:  # as a CPU collection does, so that the bare forward pass runs on the same allocator (models/heap.py)
        from neuronscope.core.models.heap import keep_freed_memory

        keep_freed_memory()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def bare(start: int = 0, stop: int = n) -> float:
        sync()
        started = time.perf_counter()
        for i in range(start, stop, batch):
            subject.bare_forward(torch.from_numpy(excerpts.token_ids[i : min(i + batch, stop)].astype(np.int64)),
                                 max(layers))
        sync()
        return time.perf_counter() - started

    print(json.dumps({"shape": args.random, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                      "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__, "layers": len(layers),
                      "neurons": len(layers) * subject.n_neurons, "excerpts": n, "batch": batch,
                      "params": sum(p.numel() for p in subject.model.parameters()),
                      "setup_s": round(time.perf_counter() - began, 1)}), flush=True)
    bare(0, min(n, 2 * batch))  # warm-up (allocator, kernels)
    bare_s, later_bare_s = bare(0, half), bare(half, n)
    bare_s += later_bare_s
    settings = CollectSettings(max_excerpts=args.excerpts)
    warm = type(excerpts)(excerpts.token_ids[: 2 * batch], excerpts.excerpt_ids[: 2 * batch], 64, "warm-up")
    for path in args.paths:
        os.environ["NEURONSCOPE_FIXED_SHAPES"] = "1" if path == "fixed" else "0"
        report = lambda _stage, _done, _total: None  # noqa: E731
        for _ in accumulate(subject, warm, layers, settings, batch, "warm", None, report):  # compiles, allocates
            break
        sync()
        finished: list[float] = []
        halfway: list[float] = []

        def progress(stage: str, done: int, total: int) -> None:
            if stage == "collect" and (done == total or (done >= half and not halfway)):
                sync()  # twice a run: what it costs the pipelining is noise
                (finished if done == total else halfway).append(time.perf_counter())

        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            started = time.perf_counter()
            results = accumulate(subject, excerpts, layers, settings, batch, "bench", None, progress)
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
        syncs = sum("synchroniz" in str(w.message) for w in caught)
        pass_s = finished[0] - started
        later_s = finished[0] - (halfway or [started])[0]
        del results
        print(json.dumps({"path": path, "bare_forward_tok_s": round(n * 64 / bare_s),
                          "collection_tok_s": round(n * 64 / pass_s), "ratio_to_bare": round(bare_s / pass_s, 3),
                          "second_half_ratio": round(later_bare_s / later_s, 3) if halfway and half < n else None,
                          "host_syncs_per_batch": round(syncs / -(-n // batch), 1) if cuda else None,
                          "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 1) if cuda else None}),
              flush=True)
    if args.sae_width:
        sparse_against_neurons(subject, excerpts, settings, batch, args.sae_width, sync)
    if args.check:
        check_layers = layers[: max(1, min(len(layers), 4))]
        small = type(excerpts)(excerpts.token_ids[: 4 * batch], excerpts.excerpt_ids[: 4 * batch], 64, "check")
        got = {}
        for path in ("fixed", "filtered", "fixed, taken in a second thread"):
            os.environ["NEURONSCOPE_FIXED_SHAPES"] = "0" if path == "filtered" else "1"
            results = accumulate(subject, small, check_layers, settings, batch, "check", None, report)
            if path.endswith("second thread"):  # as the store write takes the states (store_write.write_run)
                with ThreadPoolExecutor(1) as pool:
                    got[path] = pool.submit(list, results).result()
            else:
                got[path] = list(results)
        print(json.dumps({"check": "states taken in a second thread == in the calling thread", "identical":
                          same_results(got["fixed"], got["fixed, taken in a second thread"], everything=True)}),
              flush=True)
        same = same_results(got["fixed"], got["filtered"], everything=False)
        print(json.dumps({"check": "fixed == filtered", "layers": len(check_layers), "excerpts": len(small.excerpt_ids),
                          "identical": same}), flush=True)
        print(json.dumps(compiled_against_eager(subject, small, check_layers[0], batch)), flush=True)
    if args.profile:
        profile_update(subject, excerpts, layers[0], batch, settings, sync)
    print(json.dumps({"total_s": round(time.perf_counter() - began, 1)}), flush=True)


def same_results(these, those, everything: bool) -> bool:  # type: ignore[no-untyped-def]
    """Whether two lists of LayerResult keep the same records (ids, codes, scales, maxima), histograms and cell
    counts; with `everything`, every array they hold (the power sums, which two bookkeeping paths round apart,
    included)."""
    import numpy as np

    fields = ("ids", "codes", "scales", "maxes") + (("mins",) if everything else ())
    arrays = ("histogram", "cell_counts") + (("sums", "max", "min", "min_excerpt_max") if everything else ())
    return len(these) == len(those) and all(
        all(np.array_equal(getattr(a.samples[k], f), getattr(b.samples[k], f), equal_nan=True)
            for k in a.samples for f in fields)
        and all(np.array_equal(getattr(a, name), getattr(b, name), equal_nan=True) for name in arrays)
        and (not everything or (a.layer, a.count, sorted(a.samples)) == (b.layer, b.count, sorted(b.samples)))
        for a, b in zip(these, those))


def sparse_against_neurons(subject, excerpts, settings, batch: int, multiple: int, sync) -> None:  # type: ignore[no-untyped-def]
    """Collection of a random TopK sparse coder (`multiple` x the MLP width, k=64, on the residual stream after the
    middle block, made in memory) against the MLP neurons of that layer alone, over the same excerpts."""
    import json

    import torch

    from neuronscope.core.collection.collect import accumulate
    from neuronscope.core.models.sparse import SparseCoder

    layer = subject.n_layers // 2
    hidden = int(subject.model.config.hidden_size)
    width = multiple * subject.n_neurons
    gen = torch.Generator().manual_seed(0)
    w_enc = torch.randn(hidden, width, generator=gen) / hidden**0.5
    coder = SparseCoder(layer=layer, point="resid_post", activation="topk", w_enc=w_enc, b_enc=torch.zeros(width),
                        w_dec=w_enc.T.contiguous(), b_dec=torch.zeros(hidden), subtract_b_dec=True, k=64,
                        source="random (bench)")
    report = lambda _stage, _done, _total: None  # noqa: E731
    seconds = {}
    for name, sparse in (("neurons", None), ("latents", coder)):
        for _ in accumulate(subject, excerpts, (layer,), settings, batch, "warm", None, report, sparse):
            break  # the first pass warms up (compiles, allocates)
        sync()
        started = time.perf_counter()
        for _ in accumulate(subject, excerpts, (layer,), settings, batch, "bench", None, report, sparse):
            break
        sync()
        seconds[name] = time.perf_counter() - started
    print(json.dumps({"sae": f"{multiple}x the MLP width, TopK 64, resid_post of layer {layer}", "latents": width,
                      "neurons": subject.n_neurons, "neurons_s": round(seconds["neurons"], 2),
                      "latents_s": round(seconds["latents"], 2),
                      "latents_throughput_ratio": round(seconds["neurons"] / seconds["latents"], 3)}), flush=True)


def peak_rss(args: argparse.Namespace) -> None:
    """Peak RSS of a CLI collection at N and 4N excerpts (memory must not grow with the corpus)."""
    rows = []
    for n in (args.rss, 4 * args.rss):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "neuronscope.tui.cli", "collect", "--store", str(Path(tmp) / "s.duckdb"),
                   "--max-excerpts", str(n), "--model", args.model, "--top", "1"]
            if args.layers:
                cmd += ["--layers", args.layers]
            if args.dtype:
                cmd += ["--dtype", args.dtype]
            # A fresh parent per measurement: RUSAGE_CHILDREN is the peak over all children waited for.
            probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
                     "stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
            started = time.perf_counter()
            peak = subprocess.run([sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True,
                                  env={**os.environ, "CI": "1"}).stdout.split()[-1]
            rows.append((n, int(peak) / 1024, time.perf_counter() - started))
    for n, mib, secs in rows:
        print(f"{n:7d} excerpts: peak RSS {mib:8.0f} MiB  ({secs:.0f} s)")
    print(f"peak RSS ratio 4N / N: {rows[1][1] / rows[0][1]:.2f} (1.00 = bounded by neurons x k x length)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--excerpts", type=int, default=256)
    parser.add_argument("--corpus", default="default", help="what `collect --corpus` takes (the default corpus has "
                        "5,639 excerpts; a longer run needs a larger one); with --random, only the first excerpts x 64 "
                        "tokens are read")
    parser.add_argument("--layers")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--device")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--rss", type=int, help="measure peak RSS at this many excerpts and 4x as many")
    parser.add_argument("--random", choices=("gpt2-xl", "llama-3.1-8b", "tiny"),
                        help="a randomly initialised model of this shape: the pass alone, per bookkeeping path")
    parser.add_argument("--random-layers", type=int, metavar="N",
                        help="with --random: only the first N layers, each of the real shape (a CPU's measure)")
    parser.add_argument("--tokenizer", type=Path, default=Path(__file__).resolve().parent.parent / ".gpu_tokenizer",
                        help="tokenizer folder for --random")
    parser.add_argument("--paths", nargs="+", choices=("fixed", "filtered"), default=["fixed", "filtered"],
                        help="bookkeeping paths to measure with --random")
    parser.add_argument("--check", action="store_true", help="with --random: the two paths' results are identical, and the compiled kernel is eager's")
    parser.add_argument("--sae-width", type=int, default=0, metavar="M",
                        help="with --random: also collect a random TopK sparse coder of M x the MLP width at the middle "
                             "layer against that layer's MLP neurons")
    parser.add_argument("--profile", action="store_true",
                        help="with --random: where one layer's bookkeeping spends its time, per path (torch.profiler)")
    args = parser.parse_args()
    if args.random:
        random_pass(args)
    elif args.rss:
        peak_rss(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
