"""Helpers the tests share: GPT-2-shaped models with random weights, built by
transformers and saved with save_pretrained, so the real loading path is exercised;
and the smoke runs and output contract of the tutorial's projects."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

TINY = dict(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4)
ODD_HEADS = dict(vocab_size=50257, n_positions=64, n_embd=48, n_layer=3, n_head=3)  # n_head not a power of 2


def make_hf_model(folder: Path, seed: int = 0, dropout: float = 0.0, **cfg):
    """A random GPT2LMHeadModel saved into `folder`; returns (hf_model, folder).

    Biases and LayerNorm parameters are randomised too, so a swapped or
    untransposed tensor shows in the logits."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(**{**TINY, **cfg}, embd_pdrop=dropout, attn_pdrop=dropout, resid_pdrop=dropout)
    hf = GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.eval()
    hf.save_pretrained(folder)
    return hf, folder


# ---- the tutorial's projects (tests/test_projects_*.py) ----------------------------------------------------
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METRICS_KEYS = {"project", "metric", "higher_is_better", "before", "after", "model", "n", "seconds", "extra"}


def smoke_runs_of(projects, tmp_path_factory, *extra_args: str) -> dict:
    """Each project (its Project record) once with --smoke --seed 1: {name: (exit code, out folder)}."""
    runs = {}
    for project in projects:
        out = tmp_path_factory.mktemp(project.name)
        runs[project.name] = (project.main(["--smoke", "--out", str(out), "--seed", "1", *extra_args]), out)
    return runs


def check_project_contract(project, code: int, out: Path) -> dict:
    """What every project's run must leave: exit 0, metrics.json with the issue's keys, metric.png, samples.md
    with inputs before and after, and no half-written folder. Returns the metrics."""
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert set(metrics) == METRICS_KEYS
    assert metrics["project"] == project.name and metrics["model"] == "micro-random"
    assert isinstance(metrics["higher_is_better"], bool)
    for key in ("before", "after", "seconds"):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
    assert isinstance(metrics["n"], int) and metrics["n"] > 0
    assert (out / "metric.png").read_bytes().startswith(PNG_MAGIC)
    samples = (out / "samples.md").read_text(encoding="utf-8")
    assert samples.startswith("# ") and "**before**" in samples and "**after**" in samples
    assert not list(out.glob(".tmp-save-*"))
    return metrics


def help_text(project, capsys) -> str:
    """A project's --help (it must exit 0), whitespace folded to single spaces."""
    with pytest.raises(SystemExit) as e:
        project.main(["--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())
