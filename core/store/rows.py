"""Numpy arrays of a collected layer as Arrow columns for bulk inserts (and back): no SQL here."""

from __future__ import annotations

import numpy as np

from neuronscope.core.layerdata import LayerResult, LayerSummary, Samples, dequantize


def lists(matrix: np.ndarray):  # type: ignore[no-untyped-def]
    """A 2-D numpy array as an Arrow list column, one row each."""
    import pyarrow as pa

    rows, width = matrix.shape[0], (matrix.shape[1] if matrix.ndim > 1 else 0)
    flat = pa.array(np.ascontiguousarray(matrix).reshape(-1))
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * width)
    return pa.ListArray.from_arrays(offsets, flat)


def blobs(codes: np.ndarray):  # type: ignore[no-untyped-def]
    """Rows of an int8 matrix as an Arrow binary column, without a Python loop."""
    import pyarrow as pa

    rows, width = codes.shape
    offsets = pa.py_buffer((np.arange(rows + 1, dtype=np.int32) * width).tobytes())
    return pa.Array.from_buffers(pa.binary(), rows, [None, offsets, pa.py_buffer(np.ascontiguousarray(codes).tobytes())])


def decode(scale: float, blob: bytes) -> np.ndarray:
    """One record's stored activations."""
    codes = np.frombuffer(blob, np.int8)[None, :]
    return dequantize(np.array([scale], np.float32), codes)[0]


def decode_many(scales: list[float], blobs: list[bytes]) -> list[list[float]]:
    """Many records' stored activations as Python floats, in one numpy pass when they have one length (a run's
    excerpts do): what `decode` gives each, for a job's thousands of records without a Python step per value."""
    if not blobs:
        return []
    width = len(blobs[0])
    if any(len(b) != width for b in blobs):
        return [decode(s, b).tolist() for s, b in zip(scales, blobs)]
    codes = np.frombuffer(b"".join(blobs), np.int8).reshape(len(blobs), width)
    return dequantize(np.asarray(scales, np.float32), codes).tolist()  # type: ignore[no-any-return]


def record_rows(run_id: int, layer: int, kind: str, samples: Samples, bin_size: int):  # type: ignore[no-untyped-def]
    """Arrow rows for the filled slots of one kind; activations as int8 codes with a per-record scale."""
    import pyarrow as pa

    neuron, slot = np.nonzero(samples.ids >= 0)
    return pa.table({
        "run_id": pa.array(np.full(len(slot), run_id, np.int32)),
        "layer": pa.array(np.full(len(slot), layer, np.int16)),
        "neuron": pa.array(neuron.astype(np.int32)),
        "kind": pa.array([kind] * len(slot), pa.string()),
        "rank": pa.array(slot.astype(np.int16)),
        "bin": pa.array((slot // bin_size if bin_size else np.full(len(slot), -1)).astype(np.int16)),
        "excerpt_id": pa.array(samples.ids[neuron, slot].astype(np.int64)),
        "max_act": pa.array(samples.maxes[neuron, slot].astype(np.float32)),
        "min_act": pa.array(samples.mins[neuron, slot].astype(np.float32)),
        "scale": pa.array(samples.scales[neuron, slot].astype(np.float32, copy=False)),
        "acts": blobs(samples.codes[neuron, slot]),
    })


def layer_tables(run_id: int, result: LayerResult, summary: LayerSummary):  # type: ignore[no-untyped-def]
    """One finished layer's rows of the neurons and records tables, as Arrow tables."""
    import pyarrow as pa

    n = len(result.max)
    layer = result.layer
    neurons = pa.table({
        "run_id": pa.array(np.full(n, run_id, np.int32)),
        "layer": pa.array(np.full(n, layer, np.int16)),
        "neuron": pa.array(np.arange(n, dtype=np.int32)),
        "count": pa.array(np.full(n, result.count, np.int64)),
        "mean": summary.mean, "variance": summary.variance, "skewness": summary.skewness,
        "kurtosis": summary.kurtosis,
        "max_act": result.max.astype(np.float32), "min_act": result.min.astype(np.float32),
        "density": summary.density.astype(np.float32), "selectivity": summary.selectivity,
        "sums": lists(result.sums.T.astype(np.float64)),
        "min_excerpt_max": result.min_excerpt_max.astype(np.float32),
        "histogram": lists(result.histogram.astype(np.int64)),
        "cell_counts": lists(result.cell_counts.astype(np.int64)),
        "quantile_edges": lists(summary.quantile_edges.astype(np.float32)),
        "first_peak": summary.first_peak.astype(np.float32),
    })
    parts = [record_rows(run_id, layer, kind, result.samples[kind], bin_size=0) for kind in ("top", "bottom", "random")]
    bins = max(summary.quantile_edges.shape[1] - 1, 1)
    parts.append(record_rows(run_id, layer, "quantile", summary.quantile, bin_size=summary.quantile.ids.shape[1] // bins))
    return neurons, pa.concat_tables([p for p in parts if p.num_rows])
