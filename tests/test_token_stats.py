"""Tests for the per-batch statistics kernel (core/collection/token_stats.py: compute_token_stats, hist_bins),
eager and as collections run it, compiled by torch.compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuronscope.core.collection.sampling import composite, excerpt_hash, keys_from, unit_hash
from neuronscope.core.collection.token_stats import (
    COMPILE_ELEMENTS,
    cell_bins,
    compute_token_stats,
    hist_bins,
    stats_compiled,
    token_stats_fn,
)
from neuronscope.core.layerdata import CELL_EDGES, HIST_EDGES

EDGES = torch.from_numpy(HIST_EDGES)


def awkward_values() -> torch.Tensor:
    """Every edge, the floats either side of it, signed zeros, subnormals, infinities, the largest floats, and a
    million values spread over 2^-40..2^40 in both signs."""
    inf = torch.full_like(EDGES, float("inf"))
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40, 3.4e38, -3.4e38, float("inf"), -float("inf")])
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(1_000_000, generator=g) * torch.exp2(torch.randn(1_000_000, generator=g) * 10)
    return torch.cat([EDGES, torch.nextafter(EDGES, inf), torch.nextafter(EDGES, -inf), special, spread])


def test_bins_are_bucketize_exactly() -> None:
    values = awkward_values()
    want = torch.bucketize(values, EDGES)
    got = hist_bins(values)
    assert got.dtype == torch.int32
    wrong = got != want
    assert not wrong.any(), (values[wrong][:5], got[wrong][:5], want[wrong][:5])
    assert got.min() == 0 and got.max() == len(HIST_EDGES)  # -inf and +inf land in the outermost bins
    # numpy's reading of the same rule, on a strided view as compute_token_stats passes it
    strided = values[: 900_000].view(1000, 900)[:, ::7]
    assert np.array_equal(hist_bins(strided).numpy(), np.searchsorted(HIST_EDGES, strided.numpy(), side="left"))
    cells = torch.from_numpy(CELL_EDGES)
    values = torch.cat([values, cells, torch.nextafter(cells, torch.full_like(cells, np.inf)),
                        torch.nextafter(cells, torch.zeros_like(cells))])
    assert torch.equal(cell_bins(values), torch.bucketize(values, cells))


def test_candidate_keys() -> None:
    """Per (unit, excerpt) candidate, in [units, excerpts] order: its extremes, and the composites that rank it in
    each sampler, as sampling.py defines them."""
    g = torch.Generator().manual_seed(2)
    acts = torch.randn(5, 12, 7, generator=g)
    ids = torch.tensor([40, 3, 17, 8, 25])
    hashes = unit_hash(3, 4, torch.arange(7))
    _, batch_max, batch_min, min_excerpt_max, _, extremes, top, bottom, random, cells = compute_token_stats(
        acts, ids, hashes, 4, torch.arange(7) * (len(HIST_EDGES) + 1))
    maxes, mins = acts.amax(1).t(), acts.amin(1).t()  # [7, 5]
    assert torch.equal(extremes, torch.stack([maxes.reshape(-1), mins.reshape(-1)], 1))
    assert torch.equal(top, composite(-maxes, ids.expand(7, 5)))
    assert torch.equal(bottom, composite(mins, ids.expand(7, 5)))
    assert torch.equal(random, composite(keys_from(hashes[:, None], excerpt_hash(ids)[None, :]), ids.expand(7, 5)))
    assert torch.equal(cells, torch.bucketize(maxes, torch.from_numpy(CELL_EDGES)))
    assert torch.equal(batch_max, acts.amax((0, 1))) and torch.equal(batch_min, acts.amin((0, 1)))
    assert torch.equal(min_excerpt_max, acts.amax(1).amin(0))


def test_token_stats_with_tokens_last() -> None:
    """The kernel on activations laid out [B, F, T] (tokens=2) gives what it gives on [B, T, F]: the same extremes,
    candidates, the same histogram entries in another order, and the power sums to float rounding."""
    g = torch.Generator().manual_seed(4)
    acts = torch.randn(6, 16, 9, generator=g) * torch.exp2(torch.randn(9, generator=g) * 3)
    ids, hashes = torch.arange(6) * 7, unit_hash(1, 3, torch.arange(9))
    offsets = (torch.arange(9) * (len(HIST_EDGES) + 1)).int()
    want = compute_token_stats(acts, ids, hashes, 4, offsets)
    got = compute_token_stats(acts.transpose(1, 2).contiguous(), ids, hashes, 4, offsets, tokens=2)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=0.0)  # float32 sums in another order
    assert torch.equal(got[4].reshape(-1).sort().values, want[4].reshape(-1).sort().values)
    for w, c in zip(want[1:4] + want[5:], got[1:4] + got[5:], strict=True):
        assert torch.equal(c, w)


@pytest.mark.slow
def test_compiled_token_stats_equal_eager() -> None:
    """Long collections run the kernel compiled: everything but the power sums is the eager kernel's exactly (hashes
    whose multiplications wrap around included), and the power sums agree to float rounding."""
    g = torch.Generator().manual_seed(1)
    acts = (torch.randn(8, 40, 96, generator=g) * torch.exp2(torch.randn(96, generator=g) * 4)).bfloat16()
    acts[0, :, 0] = 0.0
    acts[1, 3, 1] = -float("inf")
    offsets = torch.arange(96) * (len(HIST_EDGES) + 1)
    ids, hashes = torch.arange(100, 108), unit_hash(0, 2, torch.arange(96))
    compiled = torch.compile(compute_token_stats, dynamic=False)
    for stride in (1, 8):
        want = compute_token_stats(acts, ids, hashes, stride, offsets)
        got = compiled(acts, ids, hashes, stride, offsets)
        names = ("sums", "max", "min", "min excerpt max", "hist", "extremes", "top", "bottom", "random", "cells")
        for name, w, c in zip(names, want, got, strict=True):
            if name == "sums":
                finite = torch.isfinite(w).all(0)  # the neuron with -inf has none
                w, c = w[:, finite], c[:, finite]
                scale = w.abs().amax(1, keepdim=True)  # float32 sums in another order: rounding relative to a row
                assert ((c - w).abs() <= 1e-5 * scale + 1e-4 * w.abs()).all(), stride
            else:
                assert torch.equal(c, w), (name, stride)


def test_compile_decision_counts_activations(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU run compiles once it reads COMPILE_ELEMENTS activations, a GPU run always; NEURONSCOPE_COMPILE forces
    either way (0: the eager kernel itself)."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setenv("NEURONSCOPE_COMPILE", "auto")
    assert not stats_compiled(cpu, COMPILE_ELEMENTS - 1)
    assert stats_compiled(cpu, COMPILE_ELEMENTS)
    assert stats_compiled(cuda, 1)
    monkeypatch.setenv("NEURONSCOPE_COMPILE", "0")
    assert not stats_compiled(cpu, 10 * COMPILE_ELEMENTS)
    assert token_stats_fn(cpu, 10 * COMPILE_ELEMENTS) is compute_token_stats
    monkeypatch.setenv("NEURONSCOPE_COMPILE", "1")
    assert stats_compiled(cpu, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_pass_equals_the_torch_kernel_and_merges(dtype: torch.dtype) -> None:
    """A CPU collection folds a batch in compiled passes (cpu_update.py); a GPU's runs compute_token_stats and the
    fixed-shape merges. Over awkward values (every histogram and cell edge and the floats either side, signed zeros,
    subnormals, infinities, a NaN), 2,100 units (two spans of the statistics pass, and a whole block of 32 and part
    of one for the records), 11 tokens of which the first 2 are skipped, in uneven batches, both keep exactly the
    same records, extremes, histogram and cell counts, and power sums equal to float rounding. The CPU pass reads
    its batches as a hook gives them, behind a prefix position that is sliced off (in place, not copied), and also
    from transposed storage."""
    from sampling_data import LAYER

    from neuronscope.core.collection.accumulate import LayerAccumulator
    from neuronscope.core.collection.cpu_update import _contiguous
    from neuronscope.core.records import CollectSettings

    n, t, f = 90, 11, 2100
    g = torch.Generator().manual_seed(7)
    acts = torch.randn(n, t, f, generator=g) * torch.exp2(torch.randn(f, generator=g) * 4)
    values = awkward_values()
    edges = values[: 3 * len(EDGES)]  # every edge and the floats either side
    acts.view(-1)[torch.randperm(n * t * f, generator=g)[: n * t * f // 4]] = edges[
        torch.randint(len(edges), (n * t * f // 4,), generator=g)]
    special = values[3 * len(EDGES) : -1_000_000]  # signed zeros, subnormals, the largest floats, infinities
    block = acts[:, :, 7:10].contiguous()
    block.view(-1)[torch.randperm(n * t * 3, generator=g)[: n * t]] = special[
        torch.randint(len(special), (n * t,), generator=g)]
    acts[:, :, 7:10] = block
    acts[3, 4, 5] = float("nan")
    acts[:, :, 6] = float(CELL_EDGES[7])  # every excerpt max on a cell edge, and ties throughout
    acts = acts.to(dtype)
    hooked = torch.cat([torch.full((n, 1, f), float("inf"), dtype=dtype), acts], 1)[:, 1:, :]  # behind a prefix
    transposed = acts.transpose(1, 2).contiguous().transpose(1, 2)
    whole, first = _contiguous(hooked)
    assert first == 1 and whole.data_ptr() == hooked.data_ptr() - f * hooked.element_size()  # read in place
    ids = torch.from_numpy(np.random.default_rng(1).choice(10 * n, n, replace=False))
    settings = CollectSettings(length=t, top_k=7, bottom_k=5, random_k=4, quantile_k=2, seed=3, hist_stride=3,
                               skip_positions=2)
    results = []
    for fixed, batches in ((True, acts), (False, hooked), (False, transposed)):  # the GPU's path, then the CPU's
        acc = LayerAccumulator(LAYER, f, settings, dtype, torch.device("cpu"), fixed)
        for start, size in zip((0, 17, 18, 50), (17, 1, 32, 40)):
            acc.update(batches[start : start + size], ids[start : start + size])
        results.append(acc.result())
    torch_path, cpu, from_transposed = results
    assert cpu.count == torch_path.count == n * (t - 2)
    assert np.array_equal(from_transposed.sums, cpu.sums, equal_nan=True)
    for other in (cpu, from_transposed):
        for kind in ("top", "bottom", "random", "cell"):
            for field in ("ids", "acts", "maxes", "mins"):
                assert np.array_equal(getattr(other.samples[kind], field), getattr(torch_path.samples[kind], field),
                                      equal_nan=True), (kind, field)
        for name in ("max", "min", "min_excerpt_max", "histogram", "cell_counts"):
            assert np.array_equal(getattr(other, name), getattr(torch_path, name), equal_nan=True), name
    assert np.isnan(cpu.max[5]) and np.isnan(cpu.min[5])
    assert np.isinf(cpu.max[7:10]).all() and np.isinf(cpu.min[7:10]).all()
    finite = np.isfinite(torch_path.sums).all(0)
    assert finite.sum() > f // 2 and np.array_equal(finite, np.isfinite(cpu.sums).all(0))
    want, got = torch_path.sums[:, finite], cpu.sums[:, finite]
    assert (np.abs(got - want) <= 1e-5 * np.abs(want).max(1, keepdims=True) + 1e-4 * np.abs(want)).all()


def test_compiling_the_cpu_passes_first_leaves_nothing_to_compile_in_the_pass() -> None:
    """A CPU collection compiles its passes (a minute the first time on a machine) on a one-excerpt batch before
    its bar starts, reporting the stage "compile" while that takes long. That batch must give numba the same
    signatures as a collection's batches (bf16 and float32, contiguous or behind a sliced-off prefix), or the
    pass would compile again under a bar sitting at 0. Run in a fresh interpreter: a dispatcher keeps the
    signatures of every earlier test."""
    import json
    import subprocess
    import sys

    script = """
import json, torch
from neuronscope.core.collection import cpu_kernels, cpu_statistics
from neuronscope.core.collection.accumulate import Accumulator, compile_cpu_passes
from neuronscope.core.records import CollectSettings
passes = (cpu_statistics.statistics, cpu_kernels.offers, cpu_kernels.copy_rows)
settings, reports, counts = CollectSettings(length=9, top_k=3, skip_positions=1), [], []
for dtype in (torch.bfloat16, torch.float32):
    compile_cpu_passes(settings, dtype, lambda *report: reports.append(report), 0.0)
    before = [len(p.signatures) for p in passes]
    acc = Accumulator((2, 3), 40, settings, dtype, torch.device("cpu"))
    hooked = torch.randn(5, 10, 80).to(dtype)[:, 1:, :]
    acc.update(hooked, torch.arange(5))
    acc.update(hooked.contiguous()[:3], torch.arange(5, 8))
    counts.append((before, [len(p.signatures) for p in passes]))
print(json.dumps({"reports": reports, "counts": counts}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=True)
    found = json.loads(done.stdout.splitlines()[-1])
    assert found["reports"] == [["compile", 0, 0], ["compile", 1, 1]] * 2  # after 0 s: reported as slow
    (bf16_before, bf16_after), (fp32_before, fp32_after) = found["counts"]
    assert bf16_before == bf16_after == [1, 1, 1]
    assert fp32_before == fp32_after == [2, 1, 2]  # the records pass reads the same statistics either way
