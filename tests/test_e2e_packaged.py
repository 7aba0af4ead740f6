"""End to end on the real packaged models (SmolLM2-135M, Gemma-3-270m): collect a small slice of the default corpus and
check that stored top excerpts peak where the store says they do."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuronscope.core.collection.collect import collect
from neuronscope.core.collection.corpus import CorpusSpec
from neuronscope.core.collection.excerpts import cut_excerpts
from neuronscope.core.models.loading import load_subject
from neuronscope.core.records import CollectSettings
from neuronscope.core.store import Store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def collected(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    subject = load_subject("smollm2-135m", device="cpu", dtype="float32")  # fp32: exact top-k
    excerpts = cut_excerpts(CorpusSpec("default"), subject.tokenizer, length=32, max_excerpts=96, seed=1)
    settings = CollectSettings(length=32, top_k=8, bottom_k=8, random_k=4, quantile_k=2, max_excerpts=96, seed=1)
    layers = (3, 17)
    store = Store.open(tmp_path_factory.mktemp("e2e") / "s.duckdb")
    result = collect(store, subject, excerpts, layers=layers, settings=settings, batch_size=16)
    yield subject, store, result
    store.close()


def test_real_model_collects_every_neuron_of_the_chosen_layers(collected) -> None:  # type: ignore[no-untyped-def]
    subject, store, result = collected
    assert (subject.n_layers, subject.n_neurons, subject.architecture) == (30, 1536, "llama")
    run = store.run(result.run_id)
    assert run.status == "complete" and run.layers == (3, 17) and run.n_excerpts == 96
    assert store.run_counts(result.run_id)["neurons"] == 2 * 1536


@pytest.mark.parametrize("layer", [3, 17])
def test_top_excerpts_peak_where_the_store_says(collected, layer: int) -> None:  # type: ignore[no-untyped-def]
    subject, store, result = collected
    ranked = [s for s in store.top_neurons(result.run_id, limit=400) if s.layer == layer][:3]
    assert ranked, "no neurons of this layer among the most selective"
    for stats in ranked:
        records = store.records(result.run_id, layer, stats.index, kinds=("top",))
        assert len(records) == 8
        maxima = [r.max for r in records]
        assert maxima == sorted(maxima, reverse=True)
        top = records[0]
        excerpt = store.excerpts(result.run_id, [top.excerpt_id])[top.excerpt_id]
        fresh = subject.activations(torch.tensor([excerpt[0]]), (layer,))[layer][0, :, stats.index].numpy()
        stored = np.array(top.activations)
        tolerance = abs(stored).max() / 127 + 1e-4  # int8 codes with a per-record scale
        assert int(np.argmax(fresh)) == int(np.argmax(stored))
        assert np.allclose(fresh, stored, atol=tolerance)
        assert abs(float(fresh.max()) - stats.max) < 1e-4  # the stored statistic is exact
        assert list(top.tokens) == subject.token_strings(excerpt[0])


def test_packaged_gemma_collects_with_its_bos(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The second packaged subject: Gemma's tokenizer adds <bos>, which is fed but never recorded."""
    subject = load_subject("gemma3-270m", device="cpu", dtype="float32")
    assert (subject.n_layers, subject.n_neurons, subject.prefix_ids) == (18, 2048, [subject.tokenizer.bos_token_id])
    excerpts = cut_excerpts(CorpusSpec("default"), subject.tokenizer, length=16, max_excerpts=24, seed=0)
    settings = CollectSettings(length=16, top_k=4, bottom_k=4, random_k=2, quantile_k=1, max_excerpts=24)
    with Store.open(tmp_path / "g.duckdb") as store:
        result = collect(store, subject, excerpts, layers=(5,), settings=settings, batch_size=8)
        stats = store.top_neurons(result.run_id, limit=1)[0]
        top = store.records(result.run_id, 5, stats.index, kinds=("top",))[0]
        token_ids = store.excerpts(result.run_id, [top.excerpt_id])[top.excerpt_id][0]
    assert len(top.tokens) == 16 and "<bos>" not in top.tokens
    with_bos = torch.tensor([[subject.tokenizer.bos_token_id, *token_ids]])
    manual = {}
    hook = subject.projections[5].register_forward_pre_hook(lambda _m, args: manual.update(x=args[0]))
    try:
        with torch.inference_mode():
            subject.model(input_ids=with_bos)
    finally:
        hook.remove()
    expected = manual["x"][0, 1:, stats.index].float().numpy()
    assert np.allclose(np.array(top.activations), expected, atol=abs(expected).max() / 127 + 1e-4)
    assert abs(top.max - float(expected.max())) < 1e-4


def test_processes_started_together_dequantise_a_packaged_model_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Processes that load a packaged GGUF into an empty cache at once (torchrun's ranks on a fresh machine): one
    dequantises it and writes its safetensors copy while the other waits, then reads that copy. Both dequantising
    held the float32 model twice and wrote into the same files."""
    import os
    import subprocess
    import sys

    code = "from neuronscope.core.models.loading import load_subject; load_subject('smollm2-135m', status=print)"
    env = {**os.environ, "NEURONSCOPE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    said = [proc.communicate(timeout=600) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], said
    assert sorted("first time: dequantising" in out for out, _err in said) == [False, True], said
    assert sorted("from the safetensors cache" in out for out, _err in said) == [False, True], said
