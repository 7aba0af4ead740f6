"""The distribution: built as a wheel (what a non-editable `pip install .` installs), it holds every module of
core/ and tui/ under the `neuronscope` namespace, the packaged data, and the console script, and claims no
generic top-level name such as `core` or `tui`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_installs_everything_under_one_namespace(tmp_path: Path) -> None:
    source = tmp_path / "src"  # a clean copy: an in-tree build/ folder would carry files of earlier builds
    for name in ("core", "tui", "data"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "--disable-pip-version-check", "-w", str(tmp_path), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(tmp_path.glob("neuronscope-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"neuronscope"}
    sources = {f"neuronscope/{p.relative_to(ROOT).as_posix()}" for folder in ("core", "tui", "data")
               for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert sources - names == set()  # a package missing from pyproject's list would be missing here
    assert any(n.startswith("neuronscope/data/fewshot/") and n.endswith(".json") for n in names)
    assert any(n.startswith("neuronscope/data/corpus/") for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "neuronscope = neuronscope.tui.cli:main" in text


def test_the_console_script_and_packaged_data_work() -> None:
    """The installed command runs, and the few-shot examples and the default corpus load as package data."""
    script = Path(sys.executable).with_name("neuronscope")
    result = subprocess.run([str(script), "models"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "smollm2-135m" in result.stdout, result.stderr
    code = ("from neuronscope.core.llm.prompts import fewshot; from neuronscope.core.collection.default_corpus import "
            "default_corpus_text; print(len(fewshot('explain')), len(default_corpus_text()) > 1000)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.split()[-1] == "True" and int(result.stdout.split()[0]) > 0, \
        result.stderr
