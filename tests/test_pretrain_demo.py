"""The pre-training command (demos/pretrain.py) and the bundled model it made."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from demos.pretrain import MODEL_CONFIG, PROMPTS, SIZE_BUDGET, SMOKE_CONFIG, dev_blocks, heldout_loss, main
from minigpt import GPT, get_tokenizer
from minigpt.pretrained import bundled_dir

ROOT = Path(__file__).resolve().parents[1]


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """`python -m demos.pretrain --smoke` as a user runs it, into a fresh folder. In fp32: the default `auto`
    picks bf16 on CPUs with native bf16, and the summary's held-out loss is always an fp32 evaluation, which
    equals the training loop's last eval loss only when training ran in fp32 too."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    proc = subprocess.run([sys.executable, "-m", "demos.pretrain", "--smoke", "--out", str(out),
                           "--no-progress", "--precision", "fp32"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def test_smoke_writes_a_loadable_checkpoint_history_summary_and_plot(smoke_run):
    out, stdout = smoke_run
    model = GPT.from_pretrained(str(out))
    for key, value in SMOKE_CONFIG.items():
        assert getattr(model.config, key) == value, key
    assert model.config.vocab_size == 50257

    history = read(out / "history.json")["history"]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert evals and all(math.isfinite(v) for v in evals)
    summary = read(out / "summary.json")
    assert summary["heldout_loss"] == evals[-1] == history[-1]["eval_loss"]
    # A random init predicts ~uniformly over 50257 tokens; a few steps lower the held-out loss.
    assert abs(summary["heldout_loss_before"] - math.log(50257)) < 0.5
    assert summary["heldout_loss"] < summary["heldout_loss_before"]
    assert math.isfinite(summary["sst2_dev_loss"]) and summary["sst2_dev_loss"] < summary["sst2_dev_loss_before"]
    assert set(summary["samples_before"]) == set(summary["samples_after"]) == set(PROMPTS)
    assert all(summary["samples_after"][p].startswith(p) for p in PROMPTS)
    assert summary["training"]["steps"] == len(history)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert "expected wall time" in stdout
    assert f"held-out loss after {len(history)} steps: {summary['heldout_loss']:.3f}" in stdout
    for prompt in PROMPTS:
        assert f"before: {prompt!r}"[:-1] in stdout and f"after: {prompt!r}"[:-1] in stdout


def test_weights_goes_on_from_a_checkpoint(smoke_run, tmp_path):
    first, _ = smoke_run
    out = tmp_path / "more"
    assert main(["--smoke", "--weights", str(first), "--out", str(out), "--steps", "1", "--no-progress"]) == 0
    # Same seed, same block size: the same held-out blocks, so training starts where the first run ended.
    ended = read(first / "summary.json")["heldout_loss"]
    assert read(out / "summary.json")["heldout_loss_before"] == pytest.approx(ended, abs=1e-5)
    assert len(read(out / "history.json")["history"]) == 1


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--out", "--bundle", "--smoke", "--weights", "--device", "--seed", "--steps"):
        assert option in text


def one_error_line(capsys, *words):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for w in words:
        assert w in lines[0]


def test_smoke_cannot_replace_the_bundled_model(tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["--smoke", "--bundle", "--out", str(out)]) == 2
    one_error_line(capsys, "--smoke", "--bundle", "nothing was saved")
    assert not out.exists()


def test_missing_weights_folder_is_one_line(tmp_path, capsys):
    assert main(["--smoke", "--weights", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    one_error_line(capsys, "nope")


# ---- the bundled model ---------------------------------------------------------------------------
def test_bundled_tiny_model_loads_as_float32_with_its_config_within_budget():
    folder = bundled_dir("tiny")
    model = GPT.from_pretrained("tiny")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for key, value in MODEL_CONFIG.items():
        assert getattr(model.config, key) == value, key
    assert model.config.vocab_size == get_tokenizer().vocab_size == 50257

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    sizes = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    assert {"config.json", "model.safetensors", "README.md", "history.json"} <= set(sizes)
    assert sizes["model.safetensors"] <= SIZE_BUDGET and sum(sizes.values()) <= SIZE_BUDGET


def test_bundled_readme_carries_the_runs_numbers():
    folder = bundled_dir("tiny")
    summary, history = read(folder / "summary.json"), read(folder / "history.json")["history"]
    readme = (folder / "README.md").read_text(encoding="utf-8")
    if summary["training"].get("precision", "fp32") == "fp32":
        assert summary["heldout_loss"] == history[-1]["eval_loss"]
    else:  # trained under bf16 autocast: the summary re-evaluates in fp32, the loop's last eval was in bf16
        assert abs(summary["heldout_loss"] - history[-1]["eval_loss"]) < 0.01
    assert summary["training"]["steps"] == len(history)
    assert summary["command"].startswith("python -m demos.pretrain")
    assert "--bundle" in summary["command"]
    for text in (summary["command"], f"seed {summary['seed']}", f"{summary['heldout_loss']:.3f}",
                 f"{summary['sst2_dev_loss']:.3f}",
                 f"perplexity {summary['heldout_perplexity']:.1f}", f"{summary['training']['steps']} steps",
                 f"{summary['parameters']:,}", f"{(folder / 'model.safetensors').stat().st_size:,} bytes",
                 "public domain", "research use"):
        assert text in readme, text


def test_bundled_model_has_learned_english():
    """On SST-2 dev sentences, which pre-training never saw, the loss is far below a uniform guess over the
    vocabulary and close to the README's number (measured there on all the dev blocks)."""
    blocks = dev_blocks(get_tokenizer(), MODEL_CONFIG["n_positions"], smoke=False)[:2]
    model = GPT.from_pretrained("tiny")
    loss = heldout_loss(model, blocks, batch_size=2)
    summary = read(bundled_dir("tiny") / "summary.json")
    assert loss < 7.0 < math.log(50257) - 3
    assert abs(loss - summary["sst2_dev_loss"]) < 0.5


def test_transformers_reads_the_bundled_folder_to_the_same_logits():
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(str(bundled_dir("tiny")), torch_dtype=torch.float32).eval()
    ours = GPT.from_pretrained("tiny")
    x = torch.tensor([get_tokenizer().encode("ROMEO: the movie is a gem , and")])
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf(x).logits, atol=1e-4, rtol=1e-4)
