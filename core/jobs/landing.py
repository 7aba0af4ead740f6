"""How a job's work reaches the store: the call log that keeps new calls until their commit, and the batch of
neurons that landed since the last commit, written with those calls in one transaction (neuronscope.core.jobs.engine
runs the neurons)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from neuronscope.core.ids import NeuronId
from neuronscope.core.llm.base import CallLog
from neuronscope.core.records import Call
from neuronscope.core.results import NeuronResult
from neuronscope.core.store import Store


class JobCancelled(Exception):
    """Raised at the next LLM call once a job's stop event is set (so a cancel need not wait for a whole neuron)."""


#: Called after each neuron of a job lands (is committed): the neuron and its error ('' when it succeeded).
Landed = Callable[[NeuronId, str], None]

#: What lands is committed at most this often (and whenever COMMIT_NEURONS wait), with the calls made meanwhile;
#: into the spool beside a store that others share (neuronscope.core.store.spool), less often, as each commit is
#: a segment there that every reader reads until the next writable open folds them.
COMMIT_SECONDS = 0.25
SEGMENT_SECONDS = 2.0
COMMIT_NEURONS = 512
#: Prefixes of keys committed since the store's were read are merged into them when this many wait.
MERGE_PREFIXES = 65_536


def key_prefix(key: str) -> int | None:
    """The first 64 bits of a call's key (a sha256 hex digest), as Store.call_prefixes gives them."""
    try:
        return int(key[:16], 16)
    except ValueError:
        return None


class StoreCallLog(CallLog):
    """The call log in the store: lookups read the calls not committed yet, then `llm_calls` (each thread on its own
    cursor); new calls wait in memory for the job's next commit (`take`, then `committed`). After `index()`, a
    lookup reads the store only for keys whose prefix it holds (a new job's requests cost no query)."""

    def __init__(self, store: Store, job_id: int | None, max_tokens: int | None = None,
                 stop: threading.Event | None = None) -> None:
        super().__init__(max_tokens)
        self.store = store
        self.job_id = job_id
        self.stop = stop
        self._pending: dict[str, Call] = {}
        self._stored: np.ndarray | None = None  # sorted prefixes of the keys in the store's table, once indexed
        self._since: set[int] = set()  # prefixes of the keys committed since

    def index(self) -> None:
        """Read which keys the store's table holds; again whenever that table changes other than by `committed`
        (a fold of the spool)."""
        stored = self.store.call_prefixes()
        with self._lock:
            self._stored, self._since = stored, set()

    def _maybe_stored(self, key: str) -> bool:
        prefix = key_prefix(key)
        with self._lock:
            if self._stored is None or prefix is None or prefix in self._since:
                return True
            at = int(np.searchsorted(self._stored, prefix))
            return at < len(self._stored) and int(self._stored[at]) == prefix

    def lookup(self, key: str) -> str | None:
        if self.stop is not None and self.stop.is_set():
            raise JobCancelled("cancelled")
        with self._lock:
            call = self._pending.get(key)
        if call is not None:
            return call.response
        return self.store.lookup_call(key, stored=self._maybe_stored(key))

    def save(self, key: str, call: Call) -> None:
        with self._lock:
            self._pending[key] = call

    def take(self) -> list[tuple[str, Call]]:
        """The calls to commit now (they stay answerable from memory until `committed`)."""
        with self._lock:
            return list(self._pending.items())

    def committed(self, calls: Sequence[tuple[str, Call]]) -> None:
        """The calls are in the store: drop them from memory."""
        with self._lock:
            for key, _ in calls:
                self._pending.pop(key, None)
                prefix = key_prefix(key)
                if prefix is not None:
                    self._since.add(prefix)
            if self._stored is not None and len(self._since) >= MERGE_PREFIXES:
                self._stored = np.union1d(self._stored, np.fromiter(self._since, np.uint64, len(self._since)))
                self._since = set()


class Landing:
    """What landed since the last commit, committed together (with the calls made meanwhile) when due."""

    def __init__(self, store: Store, job_id: int, run_id: int, log: StoreCallLog, retried: set[NeuronId],
                 landed: Landed | None, *, every: float = COMMIT_SECONDS) -> None:
        self.store, self.job_id, self.run_id, self.log = store, job_id, run_id, log
        self.every = every
        self.last_committed: list[NeuronId] = []  # the neurons of the latest commit
        self.retried, self.landed = retried, landed
        self.results: list[NeuronResult] = []
        self.failed: dict[NeuronId, str] = {}
        self.last = time.monotonic()
        self.failures = 0  # neurons failed in this session
        self.recovered = 0  # neurons failed before and done now
        self.count = 0  # neurons committed in this session, done or failed

    def done(self, result: NeuronResult) -> None:
        self.results.append(result)

    def fail(self, neuron: NeuronId, error: str) -> None:
        self.failed[neuron] = error

    def commit_if_due(self) -> bool:
        """Commit if enough waits or the last commit is old enough; whether any neuron was committed."""
        if len(self.results) + len(self.failed) >= COMMIT_NEURONS or time.monotonic() - self.last >= self.every:
            return self.commit()
        return False

    def commit(self) -> bool:
        """Commit what landed and the calls made, in one transaction; then tell `landed`. Whether any neuron was."""
        calls = self.log.take()
        self.last = time.monotonic()
        if not (calls or self.results or self.failed):
            return False
        results, failed = self.results, self.failed
        self.results, self.failed = [], {}
        self.store.save_batch(self.job_id, self.run_id, results, failed, calls, self.retried)
        self.log.committed(calls)
        self.failures += len(failed)
        self.count += len(results) + len(failed)
        self.last_committed = [NeuronId(r.layer, r.neuron) for r in results] + list(failed)
        self.recovered += sum(NeuronId(r.layer, r.neuron) in self.retried for r in results)
        if self.landed is not None:
            for r in results:
                self.landed(NeuronId(r.layer, r.neuron), "")
            for neuron, error in failed.items():
                self.landed(neuron, error)
        return bool(results or failed)

    def any_failed(self) -> bool:
        """Whether the job has failed neurons (earlier sessions' not done since, or this one's)."""
        return self.failures > 0 or self.recovered < len(self.retried)
