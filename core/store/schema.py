"""The store's schema, its version, and the upgrade from older versions.

Version 2 replaced version 1's unused placeholder tables for explanations, simulations, scores, LLM
calls and jobs by the ones the explain/score jobs write; a version-1 store is upgraded in place the
first time a writing command opens it (its collections are kept as they are).
"""

from __future__ import annotations

from typing import Any

from neuronscope.core.errors import NeuronscopeError
from neuronscope.core.staging import target_of

SCHEMA_VERSION = 2


class StoreError(NeuronscopeError):
    """A store problem, as one line naming the problem and the fix."""


class StoreBusy(StoreError):
    """Another process holds the store (for writing, or it is open elsewhere and this open wants to write)."""

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid
        """The holder's process id, where the lock named it."""


#: The records' activations (int8 codes, 64 bytes a record at the default length) are compressed with zstd: DuckDB's
#: own choice for them, a dictionary with FSST, took twice as long to insert a collection's records (a store write's
#: largest part) for a file 3 % larger (DuckDB 2.0). DuckDB 1.2-1.4 keep them uncompressed (faster, 20 % larger).
_COLLECTION = """
CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE SEQUENCE run_ids START 1;
CREATE TABLE runs (
    run_id INTEGER PRIMARY KEY DEFAULT nextval('run_ids'), model VARCHAR, model_revision VARCHAR,
    corpus VARCHAR, settings VARCHAR, layers INTEGER[], neurons_per_layer INTEGER, dtype VARCHAR,
    shard VARCHAR, status VARCHAR, pid INTEGER, created_at TIMESTAMP DEFAULT current_timestamp,
    finished_at TIMESTAMP, n_excerpts BIGINT DEFAULT 0, error VARCHAR DEFAULT '');
CREATE TABLE excerpts (run_id INTEGER, excerpt_id BIGINT, token_ids INTEGER[], tokens VARCHAR[]);
CREATE TABLE neurons (
    run_id INTEGER, layer SMALLINT, neuron INTEGER, count BIGINT, mean DOUBLE, variance DOUBLE,
    skewness DOUBLE, kurtosis DOUBLE, max_act REAL, min_act REAL, density REAL, selectivity REAL,
    sums DOUBLE[], min_excerpt_max REAL, histogram BIGINT[], cell_counts BIGINT[], quantile_edges REAL[]);
CREATE TABLE records (
    run_id INTEGER, layer SMALLINT, neuron INTEGER, kind VARCHAR, rank SMALLINT, bin SMALLINT,
    excerpt_id BIGINT, max_act REAL, min_act REAL, scale REAL, acts BLOB USING COMPRESSION zstd);
"""

#: Tables written by explain/score jobs (version 2).
_RESULTS = """
CREATE SEQUENCE explanation_ids START 1;
CREATE TABLE explanations (
    explanation_id BIGINT PRIMARY KEY DEFAULT nextval('explanation_ids'), run_id INTEGER, layer SMALLINT,
    neuron INTEGER, tail VARCHAR, role VARCHAR, explainer VARCHAR, sample SMALLINT, selected BOOLEAN, text VARCHAR,
    source_layer SMALLINT, source_neuron INTEGER, job_id BIGINT, created_at TIMESTAMP DEFAULT current_timestamp);
CREATE TABLE simulations (
    explanation_id BIGINT, simulator VARCHAR, split VARCHAR, excerpt_id BIGINT, kind VARCHAR, predicted REAL[]);
CREATE TABLE scores (
    explanation_id BIGINT, simulator VARCHAR, split VARCHAR, method VARCHAR, value DOUBLE, ci_low DOUBLE,
    ci_high DOUBLE, n INTEGER, flags VARCHAR, created_at TIMESTAMP DEFAULT current_timestamp);
CREATE SEQUENCE call_ids START 1;
CREATE TABLE llm_calls (
    call_id BIGINT PRIMARY KEY DEFAULT nextval('call_ids'), cache_key VARCHAR, backend VARCHAR, model VARCHAR,
    kind VARCHAR, prompt VARCHAR, response VARCHAR, prompt_tokens INTEGER, completion_tokens INTEGER,
    latency_s DOUBLE, job_id BIGINT, created_at TIMESTAMP DEFAULT current_timestamp);
CREATE INDEX llm_calls_key ON llm_calls (cache_key);
CREATE SEQUENCE job_ids START 1;
CREATE TABLE jobs (
    job_id BIGINT PRIMARY KEY DEFAULT nextval('job_ids'), run_id INTEGER, kind VARCHAR, params VARCHAR,
    params_key VARCHAR, state VARCHAR, done BIGINT DEFAULT 0, failed BIGINT DEFAULT 0, total BIGINT DEFAULT 0,
    error VARCHAR DEFAULT '', pid INTEGER, created_at TIMESTAMP DEFAULT current_timestamp,
    updated_at TIMESTAMP DEFAULT current_timestamp);
CREATE TABLE job_neurons (
    job_id BIGINT, layer SMALLINT, neuron INTEGER, state VARCHAR, error VARCHAR,
    updated_at TIMESTAMP DEFAULT current_timestamp);
"""

#: Indexes added without a version bump: made with a new store, and by the first writable open of an older one
#: (a read-only open works without them, only slower). Excerpts by id: opening a neuron reads its records'
#: excerpts, at 100,000 excerpts in half the time with the index.
INDEXES = "CREATE INDEX IF NOT EXISTS excerpt_ids ON excerpts (excerpt_id);"

#: Columns added without a version bump, like INDEXES: when the process that owns a running run or job started
#: (epoch seconds), so a process id reused by another process is not taken for the owner.
OWNER_COLUMNS = ("ALTER TABLE runs ADD COLUMN IF NOT EXISTS owner_start DOUBLE; "
                 "ALTER TABLE jobs ADD COLUMN IF NOT EXISTS owner_start DOUBLE; "
                 # What a run's units are: '' for MLP neurons, else the sparse coder whose latents it holds.
                 "ALTER TABLE runs ADD COLUMN IF NOT EXISTS units VARCHAR DEFAULT ''; "
                 # The share of a neuron's top records that peak at their first (counted) position: NULL before.
                 "ALTER TABLE neurons ADD COLUMN IF NOT EXISTS first_peak REAL;")

SCHEMA = _COLLECTION + _RESULTS + INDEXES

#: Version 1's placeholders, never written by that version's code.
_V1_RESULT_TABLES = ("explanations", "simulations", "scores", "llm_calls", "jobs", "job_neurons")
_V1_SEQUENCES = ("explanation_ids", "call_ids", "job_ids")


def migrate(con: Any, version: int) -> None:
    """Upgrade a store of an older, supported version to SCHEMA_VERSION in one transaction."""
    con.execute("BEGIN")
    try:
        if version == 1:
            for table in _V1_RESULT_TABLES:
                con.execute(f"DROP TABLE IF EXISTS {table}")
            for sequence in _V1_SEQUENCES:
                con.execute(f"DROP SEQUENCE IF EXISTS {sequence}")
            con.execute(_RESULTS)
        con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


#: DuckDB and file-system messages -> what happened and what to do.
_FAILURES = (
    (("no space left", "disk quota", "enospc"),
     "the disk is full", "free space there (or write elsewhere), then run the same command again"),
    (("permission denied", "eacces", "operation not permitted"),
     "permission denied", "check the permissions of the file and of its folder (a writable store also needs to "
                          "create its .wal file beside it)"),
    (("read-only file system",),
     "the file system is read-only", "write the store or output somewhere writable"),
    (("not a valid duckdb database", "corrupt", "checksum", "serialization error", "failed to deserialize",
      "internal error", "unexpected end of file", "could not read enough bytes"),
     "the store is damaged", "restore it from a copy, or collect into a new --store"),
    (("out of memory",),
     "DuckDB ran out of memory", "raise NEURONSCOPE_DUCKDB_MEMORY (e.g. 4GB) or free memory"),
    (("input/output error", "i/o error"),
     "the disk failed to read or write", "check the disk, then run the same command again"),
)


def is_duckdb_error(exc: BaseException) -> bool:
    """Whether an exception comes from DuckDB (without importing it)."""
    return type(exc).__module__.split(".")[0] in ("duckdb", "_duckdb")


def storage_failure(exc: BaseException, path: object = None) -> StoreError | None:
    """A DuckDB or file-system failure as one line: what happened, where, and what to do, with the underlying
    message kept after a colon; None for anything else."""
    if not (is_duckdb_error(exc) or isinstance(exc, OSError)):
        return None
    detail = " ".join(str(exc).split()) or type(exc).__name__
    where = target_of(getattr(exc, "filename", None) or path)  # a hidden copy's target, not the copy
    text = f"{detail} {getattr(exc, 'strerror', '') or ''}".lower()
    for needles, what, fix in _FAILURES:
        if any(n in text for n in needles):
            return StoreError(f"{what}{f' ({where})' if where else ''}: {fix}: {detail}")
    if isinstance(exc, OSError):
        return StoreError(f"cannot read or write {where or 'a file'}: check that its folder exists and can be "
                          f"written, or pass another path: {detail}")
    return None
