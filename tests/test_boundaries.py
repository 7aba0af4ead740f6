"""The import boundaries DESIGN §2 fixes: core never pulls in textual or rich, tui never torch at import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(out.split())


def test_core_imports_no_ui_library() -> None:
    """Every core module, the LLM backends and the jobs included, imports without textual or rich."""
    root = Path(__file__).resolve().parent.parent / "core"
    modules = sorted("core." + p.relative_to(root).with_suffix("").as_posix().replace("/", ".")
                     for p in root.rglob("*.py") if p.name != "__init__.py")
    assert {"core.jobs", "core.llm.openai_api", "core.store.browse", "core.collect"} <= set(modules)
    loaded = _modules_after("import importlib; [importlib.import_module(m) for m in " + repr(modules) + "]")
    assert not {"textual", "rich"} & loaded


def test_cli_and_store_open_without_torch() -> None:
    loaded = _modules_after("import tui.cli, tui.render, core.store")
    assert "torch" not in loaded and "transformers" not in loaded


def test_help_runs_without_heavy_imports() -> None:
    loaded = _modules_after("import tui.cli; tui.cli.build_parser().format_help()")
    assert "torch" not in loaded
