"""Import and export throughput, and store size against the OpenAI release's JSON for the same content.

    python bench/import_release.py                          # 2 layers x 1000 neurons
    python bench/import_release.py --layers 4 --neurons 2000 --keep /tmp/release

Builds a synthetic store shaped like GPT-2 XL's (bench/make_store.py: 20 top + 20 random + 20 quantile records of 64
tokens per neuron, 30 % explained) and writes it in the release layout (`export --format openai`), with related
tokens and neurons for every neuron as the release has them. Then imports that folder into a fresh store, as
`neuronscope import-openai` does, and reports: release bytes per neuron, imported store bytes per neuron and their
ratio (goal: at most a tenth), import and export neurons per second, Parquet and JSONL export times. Measured in
one run on one machine; absolute times are noise, ratios less so.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from make_store import build

from neuronscope.core.interop.export import export_jsonl, export_openai, export_parquet
from neuronscope.core.interop.importer import import_release
from neuronscope.core.store import Store


def folder_bytes(path: Path) -> int:
    """Bytes of every file under a folder (or of one file)."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--neurons", type=int, default=1000, help="neurons per layer (default: 1000)")
    parser.add_argument("--workers", type=int, default=1, help="reading processes of the import (default: 1)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep what it writes (default: a temp folder)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="neuronscope-import-"))
    work.mkdir(parents=True, exist_ok=True)
    n = args.layers * args.neurons
    try:
        source = work / "synthetic.duckdb"
        if not source.exists():
            build(source, layers=args.layers, neurons=args.neurons, excerpts=max(5000, n * 20), log=lambda _m: None)
        release = work / "release"
        for old in (release, work / "parquet"):
            shutil.rmtree(old, ignore_errors=True)
        (work / "neurons.jsonl").unlink(missing_ok=True)
        with Store.open(source, read_only=True) as store:
            run_id = store.run().run_id
            t0 = time.perf_counter()
            export_openai(store, run_id, release)
            t_export = time.perf_counter() - t0
        target = work / "imported.duckdb"
        target.unlink(missing_ok=True)
        with Store.open(target) as store:
            t0 = time.perf_counter()
            report = import_release(store, release, workers=args.workers)
            store.checkpoint()
            t_import = time.perf_counter() - t0
            assert report.complete and report.imported == n and report.problems == 0, report
            t0 = time.perf_counter()
            export_parquet(store, report.run_id, work / "parquet")
            t_parquet = time.perf_counter() - t0
            t0 = time.perf_counter()
            export_jsonl(store, report.run_id, work / "neurons.jsonl")
            t_jsonl = time.perf_counter() - t0
        release_bytes = folder_bytes(release) / n
        store_bytes = folder_bytes(target) / n
        print(f"{n:,} neurons ({args.layers} x {args.neurons}): 20 top + 20 random + 20 quantile records of 64 tokens, "
              "30 % explained, related tokens and neurons for all")
        print(f"release layout (OpenAI JSON): {release_bytes:,.0f} bytes per neuron, "
              f"{release_bytes * 307_200 / 1e9:.1f} GB at GPT-2 XL's 307,200")
        print(f"imported store: {store_bytes:,.0f} bytes per neuron; store / JSON = {store_bytes / release_bytes:.3f} "
              "(goal <= 0.100)")
        print(f"import ({args.workers} reading process{'es' if args.workers > 1 else ''}) {n / t_import:,.0f} neurons/s ({t_import:.1f} s; {307_200 / (n / t_import) / 3600:.1f} h for "
              f"GPT-2 XL); export openai {n / t_export:,.0f} neurons/s, jsonl {n / t_jsonl:,.0f} neurons/s, "
              f"parquet {t_parquet:.1f} s")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
