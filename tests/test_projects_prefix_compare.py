"""The side-by-side project (demos/projects/prefix_compare.py) on the micro random model (--smoke): it runs,
writes the frame's contract and its own table and figures, every method has the matched trainable-parameter count,
and its measures are what they say (label accuracy by hand, the matched sizes)."""
from __future__ import annotations

import pytest
import torch

from demos.projects import PROJECT_NAMES, prefix_compare
from demos.projects.prefix_compare import LABELS, METHODS, label_accuracy, matched_sizes
from helpers import PNG_MAGIC, check_project_contract, help_text
from minigpt import GPT, GPTConfig, get_tokenizer


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("prefix_compare")
    return prefix_compare.PROJECT.main(["--smoke", "--out", str(out), "--seed", "1", "--no-progress"]), out


def test_smoke_run_writes_the_contract_and_the_table(smoke):
    code, out = smoke
    metrics = check_project_contract(prefix_compare.PROJECT, code, out)
    rows = metrics["extra"]["methods"]
    assert [r["method"] for r in rows] == list(METHODS)
    count = metrics["extra"]["matched"]["count"]
    assert all(r["trainable"] == count for r in rows)                       # matched parameter counts
    mlp = next(r for r in rows if r["method"] == "prefix (MLP)")
    assert mlp["trainable_training"] > count                                 # the MLP trains more, folds to P_theta
    for r in rows:
        assert 0 <= r["e2e_bleu"] <= 100 and 0 <= r["sst2_accuracy"] <= 1
        assert r["step_peak_bytes"] > 0 and r["e2e_step_seconds"] > 0
        assert len(r["e2e_lr_grid"]) == 2 and r["e2e_lr"] in [float(k) for k in r["e2e_lr_grid"]]
    for name in ("comparison.png", "tradeoff.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    table = (out / "comparison.md").read_text()
    assert all(m in table for m in METHODS) and "peak memory" in table
    assert "prefix_compare" in PROJECT_NAMES


def test_matched_sizes_give_the_same_count():
    m = GPT(GPTConfig(vocab_size=64, n_positions=32, n_embd=64, n_layer=3, n_head=4))
    s = matched_sizes(m)                               # hs = 16: r = 4, P = 8
    assert (s["r"], s["P"], s["count"]) == (4, 8, 3 * 64 * 16)
    assert 3 * 4 * s["r"] * 64 == s["count"] == 2 * 3 * 64 * s["P"]
    with pytest.raises(ValueError, match="multiple of 4"):
        matched_sizes(GPT(GPTConfig(vocab_size=64, n_positions=32, n_embd=48, n_layer=1, n_head=8)))


def test_label_accuracy_counts_the_higher_label_word():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=50257, n_positions=32, n_embd=16, n_layer=1, n_head=2)).eval()
    tok = get_tokenizer()
    words = [tok.encode(w)[0] for w in LABELS]
    prompts = [tok.encode(t) for t in (" a b", " good film", " bad", " the end")]
    with torch.no_grad():
        picks = [int(m(torch.tensor([p])).logits[0, -1, words].argmax()) for p in prompts]
    assert label_accuracy(m, prompts, picks) == 1.0
    assert label_accuracy(m, prompts, [1 - y for y in picks]) == 0.0


def test_help_and_bad_data(tmp_path, capsys):
    text = help_text(prefix_compare.PROJECT, capsys)
    assert "--model" in text and "--smoke" in text and "--weights" in text and "--out" in text
    code = prefix_compare.PROJECT.main(["--smoke", "--out", str(tmp_path / "o"), "--data", str(tmp_path)])
    assert code != 0 and "missing" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_lr_cell_marks_a_best_lr_on_the_grids_edge():
    from demos.projects.prefix_compare import _lr_cell
    grid = {0.001: 4.0, 0.003: 3.0, 0.009: 3.5}
    assert _lr_cell({"e2e_lr": 0.003, "e2e_lr_grid": grid}, "e2e") == "0.003"
    assert _lr_cell({"e2e_lr": 0.009, "e2e_lr_grid": grid}, "e2e") == "0.009 †"
    assert _lr_cell({"e2e_lr": 0.001, "e2e_lr_grid": {str(k): v for k, v in grid.items()}}, "e2e") == "0.001 †"
    assert _lr_cell({"e2e_lr": 0.001, "e2e_lr_grid": {0.001: 4.0}}, "e2e") == "0.001"   # a one-point grid
