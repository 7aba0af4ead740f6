"""The local backend batches the work of concurrent callers (one thread per neuron in a job).

Exactness: on the tiny model in fp32, a simulation batched with other callers' prompts (right padding) equals
the same simulation alone within 1e-4 on the 0-9 scale (padding and batch shape change only the blocking of
the matrix products; observed gaps are ~1e-6), and a greedy explanation batched with others (left padding,
positions from the attention mask) is the same text as alone. In bf16 the rounding of differently shaped
products can flip a near-tie of a random model's greedy choice, so these tests use fp32 (bench/local_batching.py
reports the gaps on qwen-0.5b in bf16).

To make coalescing certain on a loaded machine, the tests tell the worker how many callers to wait for
(`expected_callers`) and let it wait longer for them than it does in a job.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from neuronscope.core.llm.base import CallLog, LLMError, make_backend
from neuronscope.core.llm.batching import Batcher, BatcherClosed
from neuronscope.core.llm.local import LocalBackend, default_batch_tokens
from neuronscope.core.llm.prompts import Example, explain_prompt

pytestmark = pytest.mark.usefixtures("neuronscope_env")

#: Largest difference allowed between a value simulated in a batch and alone (0-9 scale, fp32).
ATOL = 1e-4

WORDS = ("The", " lighthouse", " keeper", " climbed", " the", " stairs", " river", " rose", " over", " banks",
         " bread", " yeast", " sugar", " coins", " silver", " harbour", "\n", " [/INST]", "\t", ",")


def excerpts_for(seed: int, count: int = 2) -> list[tuple[str, ...]]:
    """Deterministic excerpts of different lengths (so a batch's rows need padding)."""
    rng = np.random.default_rng(seed)
    return [tuple(WORDS[int(i)] for i in rng.integers(0, len(WORDS), size=3 + (seed + j) % 5)) for j in range(count)]


@pytest.fixture(scope="module")
def backend(tiny_model: Path) -> Iterator[LocalBackend]:
    """The tiny model's backend (fp32), torch on one thread: the tiny model gains nothing from two, and on a busy
    2-core machine two intra-op threads wait on each other at every op (about 8x slower here)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    b = make_backend(f"local:{tiny_model}", device="cpu", dtype="float32")
    assert isinstance(b, LocalBackend)
    yield b
    b.close()
    torch.set_num_threads(threads)


@pytest.fixture
def fresh(backend: LocalBackend) -> Iterator[LocalBackend]:
    """The backend with a fresh call log, its budget and row limit restored afterwards."""
    saved = (backend.batch_tokens, backend.batch_size)
    backend.bind(CallLog())
    yield backend
    backend.batch_tokens, backend.batch_size = saved


def concurrently(backend: LocalBackend, fns: list[Callable[[], Any]]) -> list[Any]:
    """Call every function from its own thread, all released together, with a worker that waits (up to 2 s) for
    all of them to join a batch; results in order (exceptions returned, not raised). A fresh call log first, so
    nothing is answered from the cache."""
    backend.bind(CallLog())
    gate = threading.Barrier(len(fns))
    saved = backend.batcher.linger, backend.batcher.max_linger, backend.batcher.expected_callers
    backend.batcher.linger, backend.batcher.max_linger, backend.batcher.expected_callers = 0.5, 2.0, len(fns)

    def call(fn: Callable[[], Any]) -> Any:
        gate.wait()
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - returned for the test to inspect
            return err

    try:
        with ThreadPoolExecutor(max_workers=len(fns)) as pool:
            futures = [pool.submit(call, fn) for fn in fns]
            return [f.result(timeout=120) for f in futures]
    finally:
        backend.batcher.linger, backend.batcher.max_linger, backend.batcher.expected_callers = saved


def test_concurrent_simulations_equal_serial_ones_and_share_batches(fresh: LocalBackend) -> None:
    b = fresh
    jobs = [(f"explanation number {i}", excerpts_for(i)) for i in range(6)]
    serial = []
    for explanation, excerpts in jobs:
        serial.append(b.simulate(explanation, excerpts))
    before, history_at = b.batches_run, len(b.batcher.history)
    together = concurrently(b, [partial(b.simulate, e, x) for e, x in jobs])
    for alone, batched in zip(serial, together):
        assert not isinstance(batched, Exception), batched
        for a, c in zip(alone, batched):
            np.testing.assert_allclose(c, a, atol=ATOL, rtol=0)
    forward = [r for r in b.batcher.history[history_at:] if r.group == "forward"]
    assert b.batches_run - before == len(forward) < len(jobs)  # coalesced: fewer forward passes than calls
    assert max(r.rows for r in forward) > 1


def test_rating_and_simulation_share_forward_passes(fresh: LocalBackend) -> None:
    from neuronscope.core.llm.rating import Item

    b = fresh
    items = [Item(tokens) for tokens in excerpts_for(11, 3)]
    alone_rate = b.rate("detect", "rivers", items)
    alone_sim = b.simulate("rivers", excerpts_for(12))
    history_at = len(b.batcher.history)
    rated, simulated = concurrently(b, [lambda: b.rate("detect", "rivers", items),
                                        lambda: b.simulate("rivers", excerpts_for(12))])
    np.testing.assert_allclose(rated, alone_rate, atol=ATOL, rtol=0)
    for a, c in zip(alone_sim, simulated):
        np.testing.assert_allclose(c, a, atol=ATOL, rtol=0)
    rows = len(b._rating_request("detect", "rivers", items)[1]) + len(b._simulation_prompts("rivers", excerpts_for(12)))
    assert [r.rows for r in b.batcher.history[history_at:]] == [rows]  # one forward pass for both callers


def test_batches_stay_within_the_token_budget(fresh: LocalBackend) -> None:
    b = fresh
    jobs = [(f"budget {i}", excerpts_for(20 + i, 1)) for i in range(8)]
    rows = [len(p.ids) for e, x in jobs for p in b._simulation_prompts(e, x)]
    serial = [b.simulate(e, x) for e, x in jobs]
    b.batch_tokens = 3 * max(rows)  # room for about three rows per batch
    history_at = len(b.batcher.history)
    together = concurrently(b, [partial(b.simulate, e, x) for e, x in jobs])
    batches = b.batcher.history[history_at:]
    assert all(r.tokens <= b.batch_tokens for r in batches)
    assert max(r.rows for r in batches) > 1 and sum(r.rows for r in batches) == len(rows)
    for alone, batched in zip(serial, together):
        np.testing.assert_allclose(batched[0], alone[0], atol=ATOL, rtol=0)
    # A row larger than the budget still runs, alone.
    b.batch_tokens = min(rows) // 2
    history_at = len(b.batcher.history)
    again = concurrently(b, [partial(b.simulate, e, x) for e, x in jobs[:3]])
    assert [r.rows for r in b.batcher.history[history_at:]] == [1, 1, 1]
    for alone, batched in zip(serial, again):
        np.testing.assert_allclose(batched[0], alone[0], atol=ATOL, rtol=0)


def test_greedy_explanations_batched_equal_alone(fresh: LocalBackend) -> None:
    b = fresh
    prompts = []
    for i in range(3):
        tokens = [t for j in range(1 + i % 2) for t in excerpts_for(30 + i + j, 1)]
        examples = [Example(j, "top", t, np.linspace(0, 1 + i, len(t), dtype=np.float32)) for j, t in enumerate(tokens)]
        prompts.append(explain_prompt(examples, b.count_tokens, 10_000))
    # The raw answers (before clean_explanation, which may reject a random model's text).
    alone = [b._explain(p, 1, 0) for p in prompts]
    sampled_alone = b._explain(prompts[0], 3, 5)
    history_at = len(b.batcher.history)
    calls: list[Callable[[], Any]] = [partial(b._explain, p, 1, 0) for p in prompts]
    calls.append(partial(b._explain, prompts[0], 3, 5))  # seeded samples in flight with them: run alone
    *together, sampled = concurrently(b, calls)
    assert together == alone
    assert sampled == sampled_alone
    batches = b.batcher.history[history_at:]
    assert any(r.group == "greedy" and r.rows > 1 for r in batches)
    assert [r.rows for r in batches if r.group == "sample"] == [1]


def test_a_failing_batch_fails_every_caller_and_the_backend_recovers(fresh: LocalBackend,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    b = fresh
    jobs = [(f"doomed {i}", excerpts_for(40 + i)) for i in range(4)]

    def broken(_prompts: Any) -> Any:
        raise RuntimeError("the device fell over")

    monkeypatch.setattr(b, "_forward", broken)
    history_at = len(b.batcher.history)
    errors = concurrently(b, [partial(b.simulate, e, x) for e, x in jobs])
    assert all(isinstance(err, RuntimeError) and "fell over" in str(err) for err in errors), errors
    assert max(r.rows for r in b.batcher.history[history_at:]) > 1  # the failure hit a shared batch
    assert b.log.new_calls == 0 and b.log.used_tokens == 0  # nothing recorded, reservations given back
    monkeypatch.undo()
    assert len(b.simulate(*jobs[0])) == 2  # the worker survived


def test_the_first_line_stop_reads_tokens_as_the_decoded_text(backend: LocalBackend) -> None:
    """The stopping rule, judged token by token, agrees with the decoded text's (a non-blank line, then a newline)
    at every step of random sequences rich in blanks and newlines."""
    import torch

    from neuronscope.core.llm.local import _FirstLineDone

    tok = backend.lm.tokenizer
    vocab = list(range(len(tok)))
    blank = [i for i in vocab if not tok.decode([i]).strip()]
    assert any("\n" in tok.decode([i]) for i in blank)
    rng = np.random.default_rng(0)
    prompt = [int(i) for i in rng.integers(0, len(tok), size=5)]
    for _ in range(40):
        rows = [[int(rng.choice(blank)) if rng.random() < 0.6 else int(rng.integers(0, len(tok))) for _ in range(10)]
                for _ in range(3)]
        rule = _FirstLineDone(backend._token_kind, len(prompt))
        for step in range(1, 11):
            ids = torch.tensor([prompt + row[:step] for row in rows])
            got = rule(ids, None).tolist()
            texts = tok.batch_decode(ids[:, len(prompt):], skip_special_tokens=True)
            assert got == ["\n" in text.lstrip() for text in texts], (rows, step)


def test_batch_tokens_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NEURONSCOPE_BATCH_TOKENS", raising=False)
    assert default_batch_tokens("cuda") > default_batch_tokens("cpu") > 0
    monkeypatch.setenv("NEURONSCOPE_BATCH_TOKENS", "1234")
    assert default_batch_tokens("cuda") == default_batch_tokens("cpu") == 1234
    monkeypatch.setenv("NEURONSCOPE_BATCH_TOKENS", "lots")
    with pytest.raises(LLMError, match="NEURONSCOPE_BATCH_TOKENS"):
        default_batch_tokens("cpu")


# -- the batcher on its own ------------------------------------------------------------------------------

class Recorder:
    """A batch function that records its batches and can be held at a gate."""

    def __init__(self) -> None:
        self.batches: list[tuple[Hashable, list[Any]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, group: Hashable, payloads: list[Any]) -> list[Any]:
        self.entered.set()
        assert self.gate.wait(30)
        self.batches.append((group, list(payloads)))
        if any(p == "boom" for p in payloads):
            raise ValueError("boom")
        return [(group, p) for p in payloads]


def submit_later(batcher: Batcher[Any, Any], group: Hashable, rows: list[tuple[int, Any]], *,
                 alone: bool = False) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def go() -> None:
        try:
            out.append(batcher.submit(group, rows, alone=alone))
        except Exception as err:  # noqa: BLE001 - kept for the test
            out.append(err)

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread, out


def wait_queued(batcher: Batcher[Any, Any], count: int) -> None:
    deadline = time.monotonic() + 10
    while batcher._queue.qsize() < count:
        assert time.monotonic() < deadline, "rows never queued"
        time.sleep(0.001)


def test_batcher_groups_budget_alone_and_order() -> None:
    rec = Recorder()
    batcher: Batcher[Any, Any] = Batcher(rec, budget=lambda: 100, max_rows=lambda: 3)
    rec.gate.clear()
    first, _ = submit_later(batcher, "a", [(10, "hold")])  # occupies the worker while the others queue
    assert rec.entered.wait(10)
    calls = [("a", [(30, "a1"), (10, "a2")], False), ("b", [(5, "b1")], False), ("a", [(30, "a3")], True),
             ("a", [(20, "a4"), (20, "a5"), (60, "a6"), (5, "a7")], False)]
    threads, queued = [], 0
    for group, rows, alone in calls:  # queued one caller after another, so the order is known
        threads.append(submit_later(batcher, group, rows, alone=alone))
        queued += len(rows)
        wait_queued(batcher, queued)
    rec.gate.set()
    for thread, _out in threads:
        thread.join(10)
    first.join(10)
    # The oldest row's group first; then its group's rows longest first while rows x longest row <= 100 and at
    # most 3 rows (a6 would make 2 x 60); a3 alone; b1 waits for its turn, never mixed into an "a" batch.
    assert rec.batches == [("a", ["hold"]), ("a", ["a1", "a4", "a5"]), ("a", ["a2", "a7"]), ("b", ["b1"]),
                           ("a", ["a3"]), ("a", ["a6"])]
    assert [out for _, out in threads] == [[[("a", "a1"), ("a", "a2")]], [[("b", "b1")]], [[("a", "a3")]],
                                           [[("a", "a4"), ("a", "a5"), ("a", "a6"), ("a", "a7")]]]
    assert [(r.rows, r.width) for r in batcher.history] == [(1, 10), (3, 30), (2, 10), (1, 5), (1, 30), (1, 60)]
    assert batcher.batches_run == 6 and batcher.rows_run == 9
    batcher.close()


def test_batcher_errors_reach_every_caller_of_the_batch_only() -> None:
    rec = Recorder()
    batcher: Batcher[Any, Any] = Batcher(rec, budget=lambda: 1000)
    rec.gate.clear()
    first, _ = submit_later(batcher, "g", [(1, "hold")])
    assert rec.entered.wait(10)
    doomed = [submit_later(batcher, "g", [(1, "boom")]), submit_later(batcher, "g", [(1, "fine")])]
    other = submit_later(batcher, "h", [(1, "other")])
    wait_queued(batcher, 3)
    rec.gate.set()
    for thread, out in [*doomed, other]:
        thread.join(10)
        assert out
    assert all(isinstance(out[0], ValueError) for _, out in doomed)
    assert other[1] == [[("h", "other")]]
    assert batcher.submit("g", [(1, "after")]) == [("g", "after")]
    batcher.close()


def test_close_fails_queued_work_and_refuses_more() -> None:
    rec = Recorder()
    batcher: Batcher[Any, Any] = Batcher(rec, budget=lambda: 1000)
    rec.gate.clear()
    running, running_out = submit_later(batcher, "g", [(1, "running")])
    assert rec.entered.wait(10)
    queued, queued_out = submit_later(batcher, "h", [(1, "queued")])
    wait_queued(batcher, 1)
    closer = threading.Thread(target=batcher.close)
    closer.start()
    rec.gate.set()
    closer.join(10)
    running.join(10)
    queued.join(10)
    assert running_out == [[("g", "running")]]  # the batch being run finishes
    assert isinstance(queued_out[0], BatcherClosed)
    with pytest.raises(BatcherClosed):
        batcher.submit("g", [(1, "late")])
    assert batcher._thread is not None and not batcher._thread.is_alive()


def test_a_lone_caller_is_not_held_up() -> None:
    batcher: Batcher[Any, Any] = Batcher(lambda g, ps: ps, budget=lambda: 1000, linger=1.0, max_linger=1.0)
    start = time.perf_counter()
    for i in range(50):
        assert batcher.submit("g", [(1, i)]) == [i]
    # Nobody else used the batcher lately, so it never lingers (a second per call if it did).
    assert (time.perf_counter() - start) / 50 < 0.05
    other = threading.Thread(target=batcher.submit, args=("g", [(1, -1)]))
    other.start()
    other.join()
    start = time.perf_counter()
    batcher.submit("g", [(1, 0)])  # a second thread was seen lately: the worker waits a while for it to join
    assert time.perf_counter() - start >= 0.9
    batcher.recent = 0.0  # it no longer counts
    start = time.perf_counter()
    batcher.submit("g", [(1, 0)])
    assert time.perf_counter() - start < 0.5
    batcher.close()


def test_an_idle_worker_ends_so_an_unclosed_owner_is_freed() -> None:
    import gc
    import weakref

    class Owner:
        def __init__(self) -> None:
            self.batcher: Batcher[Any, Any] = Batcher(self.run, budget=lambda: 1000)
            self.batcher.idle_exit = 0.05

        def run(self, group: Hashable, payloads: list[Any]) -> list[Any]:
            return payloads

    def ended(batcher: Batcher[Any, Any]) -> None:
        deadline = time.monotonic() + 10
        while batcher._thread is not None:
            assert time.monotonic() < deadline, "the idle worker never ended"
            time.sleep(0.01)

    owner = Owner()
    assert owner.batcher.submit("g", [(1, 1)]) == [1]
    ended(owner.batcher)
    assert owner.batcher.submit("g", [(1, 2)]) == [2]  # a new worker starts
    ended(owner.batcher)
    ref = weakref.ref(owner)
    del owner
    gc.collect()
    assert ref() is None
