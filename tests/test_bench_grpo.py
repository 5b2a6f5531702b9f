"""benchmarks/bench_grpo.py runs end to end (tiny model, one precision): both sides take real GRPO steps, of the
same size, and the table carries every part. No timing is asserted."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
pytest.importorskip("trl")


def test_bench_grpo_quick_tiny_runs_both_sides(capsys):
    import bench_grpo
    results, peaks = bench_grpo.main(["--quick", "--tiny", "--threads", "1", "--precisions", "fp32"])
    out = capsys.readouterr().out
    ours, trl = results["fp32"]["ours"], results["fp32"]["trl"]
    assert len(ours) == len(trl) == 2 and peaks == {}
    # the same step on both sides: 2 prompts x G=4 completions; --quick sets 16 new tokens, none stopped early
    assert [s["tokens"] for s in ours] == [s["tokens"] for s in trl] == [2 * 4 * 16] * 2
    for side in (ours, trl):
        assert all(s[k] > 0 for s in side for k in bench_grpo.PARTS)
    for part in (*bench_grpo.PARTS, "total"):
        assert f"| fp32 | s / step: {part} |" in out
