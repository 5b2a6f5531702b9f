"""benchmarks/timing.py's profile split: the matrix multiplies are counted apart from the rest."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from timing import GEMM_OPS, print_profile_split, profile_split  # noqa: E402


def test_profile_split_counts_matrix_multiplies_apart(capsys):
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    split = profile_split({"gemm": lambda: a @ b, "exp": lambda: torch.exp(a)})
    assert split["gemm"]["gemm"] > 0 and split["gemm"]["total"] >= split["gemm"]["gemm"]
    assert split["exp"]["gemm"] == 0 and split["exp"]["total"] > 0
    assert split["exp"]["top_rest"][0][0] == "aten::exp"
    assert all(name not in GEMM_OPS for name, _ in split["gemm"]["top_rest"])
    print_profile_split(split)
    out = capsys.readouterr().out
    assert "for 1.2x exp's step, gemm's non-GEMM time would have to be" in out
