"""Shard states and layer files (core/collection/state.py): what they keep is what the store keeps, they are compact,
and merging them streams in bounded memory however many shards there are."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_env

from neuronscope.core.collection.state import (
    ShardMeta,
    ShardState,
    StateError,
    kept_ids,
    load_layer,
    save_layer,
    write_shard,
)
from neuronscope.core.layerdata import CELL_K, CELLS, HIST_EDGES, LayerResult, Samples
from neuronscope.core.records import CollectSettings
from neuronscope.core.store import Store

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("neuronscope_env")
SETTINGS = CollectSettings(length=64)
KS = {"top": SETTINGS.top_k, "bottom": SETTINGS.bottom_k, "random": SETTINGS.random_k, "cell": CELLS * CELL_K}


def synthetic_layer(rng: np.random.Generator, layer: int, neurons: int, part_ids: np.ndarray,
                    fill: float = 1.0) -> LayerResult:
    """A layer's state over the excerpts `part_ids`: distinct excerpts per neuron and kind, some slots empty."""
    samples = {}
    for kind, k in KS.items():
        offsets = rng.integers(0, len(part_ids), (neurons, 1))
        ids = part_ids[(offsets + np.arange(k) * 7) % len(part_ids)]  # 7 is prime to the sizes used: distinct
        ids = np.where(rng.random((neurons, k)) < fill, ids, -1)
        acts = rng.standard_normal((neurons, k, SETTINGS.length)).astype(np.float32) * 3
        acts[ids < 0] = 0.0
        samples[kind] = Samples.of(ids.astype(np.int64), acts, acts.max(2), acts.min(2))
    return LayerResult(layer=layer, sums=rng.standard_normal((5, neurons)), count=len(part_ids) * SETTINGS.length,
                       max=rng.standard_normal(neurons).astype(np.float32),
                       min=rng.standard_normal(neurons).astype(np.float32),
                       min_excerpt_max=rng.standard_normal(neurons).astype(np.float32),
                       histogram=rng.integers(0, 9, (neurons, len(HIST_EDGES) + 1)),
                       cell_counts=rng.integers(0, 9, (neurons, CELLS)), samples=samples)


def synthetic_shards(folder: Path, count: int, *, layers: int, neurons: int, per_shard: int) -> list[Path]:
    """`count` shard states of one collection whose part i holds the excerpts i, i + count, ..."""
    paths = []
    for index in range(count):
        rng = np.random.default_rng(index)
        part_ids = np.arange(index, count * per_shard, count, dtype=np.int64)
        tokens = rng.integers(0, 4000, (per_shard, SETTINGS.length), dtype=np.int32)
        meta = ShardMeta(model="synthetic", revision="r", corpus="c", settings=SETTINGS, layers=tuple(range(layers)),
                         neurons_per_layer=neurons, dtype="float32", index=index, count=count, n_excerpts=per_shard,
                         identity=str(index))
        paths.append(folder / f"all.shard-{index}-of-{count}")
        results = (synthetic_layer(rng, layer, neurons, part_ids) for layer in range(layers))
        write_shard(paths[-1], meta, results, tokens, part_ids, lambda ids, apart=False: [f"t{int(t)} " for t in ids])
    return paths


def test_a_layer_file_keeps_what_the_store_keeps(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    result = synthetic_layer(rng, 3, 40, np.arange(500, dtype=np.int64) * 3, fill=0.7)
    save_layer(tmp_path / "layer.npz", result)
    back = load_layer(tmp_path / "layer.npz", 3)
    for name in ("sums", "max", "min", "min_excerpt_max", "histogram", "cell_counts"):
        np.testing.assert_array_equal(getattr(back, name), getattr(result, name))
    assert back.count == result.count and back.layer == 3
    for kind in KS:
        a, b = result.samples[kind], back.samples[kind]
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.maxes, b.maxes)  # exact: the samplers choose by them
        np.testing.assert_array_equal(a.mins, b.mins)
        filled = a.ids >= 0
        assert 0 < filled.sum() < filled.size
        # The activations come back as the store keeps them: the same codes and scales, empty slots zero.
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_array_equal(a.scales, b.scales)
        assert not b.codes[~filled].any() and not b.scales[~filled].any()
    assert kept_ids(back).tolist() == sorted({int(i) for k in KS for i in result.samples[k].ids.ravel() if i >= 0})
    # The filled slots' codes only: the whole file is smaller than every slot's codes alone.
    dense = sum(result.samples[k].codes.nbytes for k in KS)
    assert (tmp_path / "layer.npz").stat().st_size < dense


def test_a_damaged_layer_file_is_named_not_a_crash(tmp_path: Path) -> None:
    """A layer file cut short (a disk error, a copy stopped part-way) in a shard state is a one-line StateError
    naming it; in a checkpoint, the collection is told, and starts from the beginning."""
    from neuronscope.core.collection.checkpoint import Checkpoints

    (path,) = synthetic_shards(tmp_path, 1, layers=1, neurons=8, per_shard=40)
    with open(path / "layer-0.npz", "r+b") as file:
        file.truncate(1000)  # numpy's zip reader raises BadZipFile, which is no OSError
    with pytest.raises(StateError, match=r"layer 0 cannot be read \(BadZipFile\): the shard state is damaged"):
        ShardState(path).layer(0)
    heard: list[str] = []
    points = Checkpoints(tmp_path / "s.duckdb", 60.0, warn=heard.append)
    assert points.save("this collection", 40, [synthetic_layer(np.random.default_rng(0), 0, 8, np.arange(40))])
    (layer_file,) = (tmp_path / "s.duckdb.checkpoint").glob("*/layer-0.npz")
    with open(layer_file, "r+b") as file:
        file.truncate(1000)
    assert points.load("this collection") is None
    assert len(heard) == 1 and "(BadZipFile): the saved state is damaged, so this collection starts from the " \
        "beginning" in heard[0]


def test_a_shard_state_keeps_only_the_excerpts_its_records_use(tmp_path: Path) -> None:
    (path,) = synthetic_shards(tmp_path, 1, layers=2, neurons=8, per_shard=5_000)
    state = ShardState(path)
    used = np.unique(np.concatenate([kept_ids(state.layer(layer)) for layer in (0, 1)]))
    assert len(np.load(path / "excerpt_ids.npy")) == len(used) < 5_000
    chunks = list(state.excerpts(used[::2]))
    ids = np.concatenate([c[0] for c in chunks])
    assert ids.tolist() == used[::2].tolist()
    _ids, tokens, strings = chunks[0]
    assert strings[0] == [f"t{t} " for t in tokens[0]]
    assert not list(path.parent.glob(".*partial"))  # written under a temporary name, then renamed


def _peak_rss_of_merge(shards: list[Path], output: Path) -> int:
    """Peak resident memory (bytes) of a `neuronscope merge` process."""
    code = ("import resource, sys\nfrom neuronscope.tui.cli import main\nrc = main(['merge', *sys.argv[2:], '--output', "
            "sys.argv[1]])\nprint('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(rc)")
    # DuckDB's own cache is bounded by its memory limit (2GB by default): kept small here, so that it does not hide
    # what the merge itself holds.
    proc = subprocess.run([sys.executable, "-c", code, str(output), *map(str, shards)], capture_output=True, text=True,
                          timeout=600, env=cli_env(NEURONSCOPE_DUCKDB_MEMORY="64MB"), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split("peak")[-1]) * 1024


@pytest.mark.slow
def test_merge_memory_stays_bounded_as_the_shards_grow(tmp_path: Path) -> None:
    """Merging 8 shards' worth of state takes little more memory than 2 shards' worth: a layer and a chunk of
    excerpts at a time, never every shard's excerpts at once (as Python objects, the 96,000 more excerpts of 8 shards
    would take ~250 MB more here, half as much again as the whole merge of 2 shards)."""
    sizes = {"layers": 2, "neurons": 512, "per_shard": 16_000}
    two = synthetic_shards(tmp_path / "two", 2, **sizes)
    eight = synthetic_shards(tmp_path / "eight", 8, **sizes)
    extra = sum(f.stat().st_size for p in eight[2:] for f in p.iterdir())
    small = _peak_rss_of_merge(two, tmp_path / "two.duckdb")
    large = _peak_rss_of_merge(eight, tmp_path / "eight.duckdb")
    with Store.open(tmp_path / "eight.duckdb", read_only=True) as store:
        (run,) = store.runs()
        assert run.status == "complete" and run.n_excerpts == 8 * 16_000
        excerpts = store.counts()["excerpts"]
    print(f"peak RSS: 2 shards {small / 2**20:.0f} MiB, 8 shards {large / 2**20:.0f} MiB; "
          f"8 shards hold {extra / 2**20:.0f} MiB more on disk; {excerpts:,} excerpts merged", file=sys.stderr)
    assert large < 1.2 * small, (small, large, extra)


def test_merge_finds_the_shards_beside_the_output(tmp_path: Path) -> None:
    synthetic_shards(tmp_path, 2, layers=1, neurons=4, per_shard=300)
    os.makedirs(tmp_path / "all.shard-9-of-9-not-a-shard")  # never picked: the pattern is STORE.shard-i-of-n
    proc = subprocess.run([sys.executable, "-m", "neuronscope.tui.cli", "merge", "--output", str(tmp_path / "all.duckdb")],
                          capture_output=True, text=True, timeout=300, env=cli_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "merged from 2 shards" in proc.stderr
