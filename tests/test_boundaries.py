"""The layering (README, "Layout"). The import-linter contracts in pyproject.toml say which package may import
which (checked here, so in CI); the hand-written checks below cover what a contract cannot say: which heavy
libraries are loaded at start-up, where imports are lazy."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(out.split())


def test_import_contracts_hold() -> None:
    """Every import points down the pipeline; core is headless; the store and the shared records stay plain."""
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "4 kept, 0 broken" in result.stdout


def test_every_core_package_and_module_has_a_layer() -> None:
    """A new package or shared module under core/ must be placed in the layers contract, or nothing checks it."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in config if c["id"] == "pipeline")["layers"]
    named = {name.strip() for layer in layers for name in layer.replace(":", "|").split("|")}
    core = ROOT / "core"
    parts = {p.name for p in core.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    parts |= {p.stem for p in core.glob("*.py") if p.name != "__init__.py"}
    assert {"jobs", "store", "records"} <= parts and {f"neuronscope.core.{p}" for p in parts} <= named


def test_cli_and_store_open_without_torch() -> None:
    loaded = _modules_after("import neuronscope.tui.cli, neuronscope.tui.render, neuronscope.core.store")
    assert "torch" not in loaded and "transformers" not in loaded


def test_help_runs_without_heavy_imports() -> None:
    loaded = _modules_after("import neuronscope.tui.cli; neuronscope.tui.cli.build_parser().format_help()")
    assert "torch" not in loaded and "textual" not in loaded


def test_numba_is_imported_by_a_cpu_collection_alone() -> None:
    """numba (about a second to import) is the CPU collection's: importing the accumulators and collection leaves it."""
    loaded = _modules_after("import neuronscope.core.collection.accumulate, neuronscope.core.collection.collect")
    assert "torch" in loaded and "numba" not in loaded
