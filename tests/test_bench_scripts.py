"""The shell scripts in bench/ that a session runs on a lent machine in one go (bench/gpu_checks.sh): a syntax error
there costs a whole device session, so every one of them must at least parse."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.sh")))
def test_bench_shell_scripts_parse(script: str) -> None:
    result = subprocess.run(["bash", "-n", str(BENCH / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
