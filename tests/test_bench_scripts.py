"""The bench scripts' parts that a session relies on: the shell scripts run on a lent machine in one go
(bench/gpu_checks.sh), where a syntax error costs a whole device session, so every one of them must at least parse;
and bench/collect.py's phases of a pass."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.sh")))
def test_bench_shell_scripts_parse(script: str) -> None:
    result = subprocess.run(["bash", "-n", str(BENCH / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_collect_bench_prints_the_phases_of_a_pass_after_the_compile_warm_up(capsys: pytest.CaptureFixture[str]) -> None:
    """bench/collect.py times every Accumulator.update of a collection, and a CPU collection makes one more, before
    its batches, to have its passes compiled: the phases are the last batches x layers updates (they once printed
    nothing when the counts differed)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_collect", BENCH / "collect.py")
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    batches, layers = 10, 3
    updates = [9.0] + [0.001 * (1 + b) for b in range(batches) for _ in range(layers)]  # the warm-up first
    bench.print_phases(updates, [0.1] * batches, [0.06] * batches, layers)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines[1:]] == [["batch", "0"], ["batches", "1-7"], ["batches", "8-9"]]
    # batch 0: 1 ms of bookkeeping a layer, and the rest of its 100 ms / 3 layers is forward pass
    assert [float(x) for x in lines[1].split()[2:]] == pytest.approx([1.0, 32.3, 20.0], abs=0.05)
    assert float(lines[3].split()[2]) == pytest.approx(9.5)
