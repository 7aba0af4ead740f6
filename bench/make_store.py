"""A synthetic store at GPT-2 XL scale, written through the real store API, and its size against the OpenAI release.

    python bench/make_store.py /tmp/xl.duckdb                          # 48 layers x 6400 neurons, 30 % explained
    python bench/make_store.py /tmp/small.duckdb --layers 4 --neurons 512

Per neuron: 20 top, 20 random and 20 quantile records (4 bins x 5) of 64 tokens pointing into a shared excerpt
pool, the statistics a collection writes, ten related tokens per token list and ten related neurons per neuron list
(as the release has them; --no-related leaves them out), and for a fraction of neurons a selected explanation (varied text from a
word list) with its test-split simulations and scores, plus the shuffled and token-baseline controls. Prints the
build time, the store's bytes per neuron, and the same content in the OpenAI release layout (`export --format
openai` of a sample of neurons: NeuronRecord, explanations, related tokens and neurons), extrapolated.
Measured in one run; absolute times are noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from neuronscope.core.explanation.score import METHODS
from neuronscope.core.ids import NeuronId
from neuronscope.core.layerdata import CELLS, HIST_EDGES, LayerResult, LayerSummary, Samples
from neuronscope.core.records import CollectSettings
from neuronscope.core.results import (
    NeuronResult,
    Score,
    ScoredExplanation,
    Simulation,
    SplitScores,
)
from neuronscope.core.store import Store

SETTINGS = CollectSettings(top_k=20, bottom_k=0, random_k=20, quantile_k=5)
LENGTH = SETTINGS.length
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no out up said what its about into "
         "than them can only other new some could time these two may first then do any like my now over such our "
         "man me even most made after also did many before must through back years where much your way well down "
         "should because each just those people how too little state good very make world still own see men work "
         "long here get both between life being under never day same another know while last might us great old "
         "year off come since against go came right used take three number plural verbs legal code python brackets "
         "quotes dates months names cities numbers units currency colours sports music chemistry medicine "
         "negation comparison question endings").split()
#: A word (as a substring) in most explanations, and one in about one in five thousand (for search benches).
COMMON_WORD, RARE_WORD = "the", "zeugma"
SIMULATOR, EXPLAINER = "local:qwen2.5-1.5b", "local:qwen2.5-1.5b"


def vocabulary(size: int = 50257) -> np.ndarray:
    """Token strings, GPT-2 like: words with and without a leading space, then numbered variants."""
    out = [(" " if i % 2 else "") + WORDS[(i // 2) % len(WORDS)] + (str(i // (2 * len(WORDS))) if i >= 2 * len(WORDS)
                                                                   else "") for i in range(size)]
    return np.array(out, dtype=object)


def write_pool(store: Store, run_id: int, n: int, rng: np.random.Generator) -> None:
    """The excerpt pool every record points into, Zipf-ish token ids, written in chunks."""
    vocab = vocabulary()
    for start in range(0, n, 20000):
        ids = np.arange(start, min(start + 20000, n), dtype=np.int64)
        tokens = (rng.pareto(1.1, (len(ids), LENGTH)) * 40).astype(np.int64) % len(vocab)
        store.write_excerpts(run_id, ids, tokens.astype(np.int32), vocab[tokens].tolist())


def _acts(rng: np.random.Generator, peak: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GELU-like excerpts [F, k, LENGTH] with one to three peaks of the given heights [F, k]; (acts, maxes, mins)."""
    f = len(peak)
    x = rng.standard_normal((f, k, LENGTH), dtype=np.float32) * 0.6 - 0.8
    acts = x * 0.5 * (1 + np.tanh(0.8 * x)) * (peak[..., None] * 0.05)
    for _ in range(2):
        pos = rng.integers(0, LENGTH, (f, k))
        acts[np.arange(f)[:, None], np.arange(k)[None], pos] = peak * rng.uniform(0.3, 0.9, (f, k)).astype(np.float32)
    pos = rng.integers(0, LENGTH, (f, k))
    acts[np.arange(f)[:, None], np.arange(k)[None], pos] = peak
    return acts, acts.max(-1), acts.min(-1)


def layer_data(layer: int, f: int, n_excerpts: int, rng: np.random.Generator) -> tuple[LayerResult, LayerSummary]:
    """One layer's statistics and records, shaped like a collection's."""
    scale = rng.lognormal(0.5, 0.6, f).astype(np.float32)  # [F] a neuron's typical peak
    top_peak = np.sort(rng.uniform(0.5, 1.0, (f, SETTINGS.top_k)).astype(np.float32), 1)[:, ::-1] * scale[:, None]
    top = _acts(rng, np.ascontiguousarray(top_peak), SETTINGS.top_k)
    rand = _acts(rng, rng.exponential(0.1, (f, SETTINGS.random_k)).astype(np.float32) * scale[:, None], SETTINGS.random_k)
    bins = len(SETTINGS.quantiles) - 1
    edges = np.stack([np.zeros(f), *(scale * q for q in (0.1, 0.3, 0.6, 0.85))], 1).astype(np.float32)  # [F, Q]
    qpeak = np.repeat(edges[:, 1:], SETTINGS.quantile_k, 1) * rng.uniform(0.9, 1.0, (f, bins * SETTINGS.quantile_k))
    quant = _acts(rng, qpeak.astype(np.float32), bins * SETTINGS.quantile_k)

    def ids(k: int) -> np.ndarray:
        return rng.integers(0, n_excerpts, (f, k)).astype(np.int64)

    empty = Samples.of(np.zeros((f, 0), np.int64), np.zeros((f, 0, LENGTH), np.float32), np.zeros((f, 0), np.float32),
                       np.zeros((f, 0), np.float32))
    count = n_excerpts * LENGTH
    mean = (scale * 0.02).astype(np.float64)
    var = (scale * 0.15).astype(np.float64) ** 2
    skew, kurt = rng.lognormal(1.0, 0.5, f), rng.lognormal(3.0, 1.0, f)
    m2 = var + mean**2
    m3 = skew * var**1.5 + 3 * mean * m2 - 2 * mean**3
    m4 = kurt * var**2 + 4 * mean * m3 - 6 * mean**2 * m2 + 3 * mean**4
    density = rng.uniform(0.02, 0.2, f)
    centre = rng.uniform(20, 40, (f, 1))
    hist = np.exp(-((np.arange(len(HIST_EDGES) + 1)[None] - centre) ** 2) / 30) * count / 8
    cells = np.exp(-((np.arange(CELLS)[None] - centre / 2.5) ** 2) / 8) * n_excerpts / 4
    result = LayerResult(
        layer=layer, sums=np.stack([mean, m2, m3, m4, density]) * count, count=count,
        max=top[1][:, 0].copy(), min=np.minimum(top[2].min(1), rand[2].min(1)), min_excerpt_max=rand[1].min(1),
        histogram=hist.astype(np.int64), cell_counts=cells.astype(np.int64),
        samples={"top": Samples.of(ids(SETTINGS.top_k), *top), "bottom": empty,
                 "random": Samples.of(ids(SETTINGS.random_k), *rand)},
    )
    summary = LayerSummary(
        mean=mean, variance=var, skewness=skew, kurtosis=kurt, density=density.astype(np.float32),
        selectivity=rng.lognormal(1.5, 0.7, f).astype(np.float32), quantile_edges=edges,
        quantile=Samples.of(ids(bins * SETTINGS.quantile_k), *quant), first_peak=np.zeros(f, np.float32),
    )
    return result, summary


def _text(rng: np.random.Generator, weights: np.ndarray) -> str:
    words = [WORDS[i] for i in rng.choice(len(WORDS), int(rng.integers(3, 8)), p=weights)]
    if rng.random() < 1 / 5000:
        words.insert(int(rng.integers(0, len(words))), RARE_WORD)
    return f"{' '.join(words[:2])} tokens, especially '{words[2]}'" + (f" after {' '.join(words[3:])}" if len(words) > 3 else "")


def _explained(layer: int, result: LayerResult, picks: np.ndarray, rng: np.random.Generator,
               weights: np.ndarray) -> list[NeuronResult]:
    """Results like an explain+score job's for the picked neurons of a layer (k=1, test split only)."""
    texts = [_text(rng, weights) for _ in picks]
    out = []
    for i, neuron in enumerate(picks.tolist()):
        top_ids = result.samples["top"].ids[neuron, 1::4]  # the test slots of the train/test/train/select deal
        rand_ids = result.samples["random"].ids[neuron, 0:10:2]
        examples = [(int(e), "top") for e in top_ids] + [(int(e), "random") for e in rand_ids]
        partner = int(picks[(i + 1) % len(picks)])

        def scored(text: str, role: str, explainer: str, simulator: str, centre: float, *, selected: bool = False,
                   source: tuple[int, int] | None = None) -> ScoredExplanation:
            sims = tuple(Simulation(e, kind, "test", tuple(np.round(rng.uniform(0, 9, LENGTH) * (rng.random(LENGTH) < 0.1),
                                                                     2).tolist()))
                         for e, kind in examples)
            value = float(np.clip(rng.normal(centre, 0.15), -1, 1))
            scores = tuple(Score(m, value if m == "all" else float(rng.uniform(-0.2, 0.8)), value - 0.1, value + 0.1,
                                 len(examples) * LENGTH) for m in METHODS)
            return ScoredExplanation(text=text, explainer=explainer, role=role, selected=selected, source=source,
                                     simulations=sims, splits=(SplitScores("test", simulator, scores),))

        lookup = ", ".join(f"'{w}'" for w in rng.choice(WORDS, 3).tolist())
        out.append(NeuronResult(layer, neuron, "pos", (
            scored(texts[i], "candidate", EXPLAINER, SIMULATOR, 0.3, selected=True),
            scored(texts[(i + 1) % len(texts)], "shuffled", EXPLAINER, SIMULATOR, 0.02, source=NeuronId(layer, partner)),
            scored(lookup, "baseline", "baseline", "baseline", 0.35),
        )))
    return out


def write_related(store: Store, run_id: int, layer: int, layers: int, neurons: int, rng: np.random.Generator) -> None:
    """Ten related tokens per token list and ten related neurons per neuron list, for every neuron of a layer, as
    the OpenAI release has them."""
    vocab = vocabulary()
    lists = []
    for neuron in range(neurons):
        tokens = {name: [(str(vocab[i]), float(v)) for i, v in zip(rng.integers(0, len(vocab), 10),
                                                                      np.sort(rng.normal(0, 1, 10))[::-1])]
                  for name in ("input_positive", "input_negative", "output_positive", "output_negative", "lookup")}
        related = {}
        for side, other in (("upstream", layer - 1), ("downstream", layer + 1)):
            if 0 <= other < layers:
                for sign, flip in (("positive", 1.0), ("negative", -1.0)):
                    related[f"{side}_{sign}"] = [(other, int(i), flip * float(v)) for i, v in
                                                 zip(rng.integers(0, neurons, 10), np.sort(rng.random(10))[::-1])]
        lists.append((layer, neuron, tokens, related))
    store.write_related(run_id, lists)


def _rounded(obj: Any, digits: int) -> Any:
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, list):
        return [_rounded(x, digits) for x in obj]
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    return obj


def openai_json_bytes(store: Store, run_id: int, neurons: list[tuple[int, int]]) -> tuple[float, float]:
    """Mean bytes of one neuron in the OpenAI release layout (`export --format openai` of the sampled neurons:
    records, statistics, explanations, related tokens and neurons), with numbers as exported and rounded to 3
    decimals."""
    from neuronscope.core.interop.export import export_openai

    with tempfile.TemporaryDirectory() as folder:
        export_openai(store, run_id, Path(folder) / "release", neurons=neurons)
        files = [p for p in Path(folder).rglob("*") if p.is_file()]
        full = sum(p.stat().st_size for p in files)
        short = sum(len(json.dumps(_rounded(json.loads(p.read_text()), 3), ensure_ascii=False).encode()) for p in files)
    return full / len(neurons), short / len(neurons)


def build(path: Path, *, layers: int = 48, neurons: int = 6400, explained: float = 0.3, seed: int = 0,
          excerpts: int = 100_000, related: bool = True, log: Any = print) -> dict[str, float]:
    """Write the synthetic store (one transaction per layer); returns timings in seconds and counts."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(WORDS) + 1)
    weights /= weights.sum()
    started = time.perf_counter()
    times = {"records": 0.0, "results": 0.0, "generate": 0.0}
    with Store.open(path) as store:
        run_id = store.create_run(model="gpt2-xl (synthetic)", revision=f"synthetic-{seed}", corpus="synthetic",
                                  settings=SETTINGS, layers=tuple(range(layers)), neurons_per_layer=neurons,
                                  dtype="float32")
        with store.transaction():
            write_pool(store, run_id, excerpts, rng)
        n_explained = int(round(neurons * explained))
        job_id = store.create_job(run_id, "run", json.dumps({"synthetic": seed}), f"synthetic-{seed}",
                                  n_explained * layers)
        for layer in range(layers):
            t0 = time.perf_counter()
            result, summary = layer_data(layer, neurons, excerpts, rng)
            picks = np.sort(rng.choice(neurons, n_explained, replace=False))
            results = _explained(layer, result, picks, rng, weights) if n_explained else []
            t1 = time.perf_counter()
            with store.transaction():
                store.write_layer(run_id, result, summary)
            if related:
                write_related(store, run_id, layer, layers, neurons, rng)
            t2 = time.perf_counter()
            if results:
                store.save_neurons(job_id, run_id, results)
            t3 = time.perf_counter()
            times["generate"] += t1 - t0
            times["records"] += t2 - t1
            times["results"] += t3 - t2
            log(f"layer {layer + 1}/{layers}: generate {t1 - t0:.1f} s, records {t2 - t1:.1f} s, "
                f"results {t3 - t2:.1f} s")
        store.set_job_state(job_id, "complete")
        with store.transaction():
            store.finish_run(run_id, excerpts)
        store.checkpoint()
        times["build"] = time.perf_counter() - started
    times["bytes"] = path.stat().st_size
    times["neurons"] = layers * neurons
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--neurons", type=int, default=6400)
    parser.add_argument("--explained", type=float, default=0.3, help="fraction of neurons with explanations")
    parser.add_argument("--excerpts", type=int, default=100_000, help="excerpt pool the records point into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-related", action="store_true", help="leave out the related tokens and neurons")
    parser.add_argument("--measure", action="store_true", help="measure a store this script built before (same "
                                                               "--layers and --neurons) instead of building one")
    parser.add_argument("--json-sample", type=int, default=200, help="neurons written as OpenAI JSON to measure")
    args = parser.parse_args()
    if args.measure:
        if not args.path.exists():
            sys.exit(f"no store at {args.path} to measure")
        t = {"bytes": float(args.path.stat().st_size), "neurons": float(args.layers * args.neurons)}
    elif args.path.exists():
        sys.exit(f"{args.path} exists: remove it, pass another path, or add --measure to measure it")
    else:
        t = build(args.path, layers=args.layers, neurons=args.neurons, explained=args.explained, seed=args.seed,
                  excerpts=args.excerpts, related=not args.no_related)
    n = int(t["neurons"])
    per_neuron = t["bytes"] / n
    rng = np.random.default_rng(args.seed + 1)
    sample = [(int(i) // args.neurons, int(i) % args.neurons) for i in rng.choice(n, min(args.json_sample, n), False)]
    with Store.open(args.path, read_only=True) as store:
        run_id = store.run().run_id
        full, short = openai_json_bytes(store, run_id, sample)
    print(f"\nneurons {n:,} ({args.layers} x {args.neurons}), excerpt pool {args.excerpts:,}, "
          f"explained {args.explained:.0%}")
    if "build" in t:
        print(f"build {t['build']:.0f} s (generate {t['generate']:.0f} s, records and related lists "
              f"{t['records']:.0f} s, results {t['results']:.0f} s)")
    print(f"store {t['bytes'] / 1e9:.2f} GB = {per_neuron:,.0f} bytes per neuron (records, stats, explanations, "
          "simulations, scores, related lists)")
    for label, size in (("numbers as exported", full), ("numbers rounded to 3 decimals", short)):
        print(f"OpenAI release layout of the same content, {label}: {size:,.0f} bytes per neuron, "
              f"{size * n / 1e9:.1f} GB for the model; store / JSON = {per_neuron / size:.3f} (goal <= 0.100)")


if __name__ == "__main__":
    main()
