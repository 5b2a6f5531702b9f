"""`python -m techniques.grpo train` (issue 27): --help, a tiny run on a micro random GPT that writes history.json,
curves.png, samples.json and a peft-format adapter that `minigpt generate --lora` loads (and that changes the
logits), and the bad inputs: each one line `error: ...`, exit 2, and no OUT left behind."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import PNG_MAGIC, make_hf_model

from minigpt import GPT
from minigpt.__main__ import _load
from minigpt.__main__ import build_parser as minigpt_parser
from techniques.grpo.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Hello", "A story", "The cat", "Once", "My friend", "In the"]


# ---- rewards named on the command line as module:function (this module is importable as test_grpo_cli) ----
def low_ids(texts):
    """A reward a micro random model can learn: the share of characters in the first half of the alphabet."""
    return [sum(c in "abcdefghijklm" for c in t.lower()) / max(1, len(t)) for t in texts]


def wrong_count(texts):
    return [0.5] * (len(texts) - 1)


def nan_reward(texts):
    return [float("nan")] * len(texts)


def not_a_number(texts):
    return ["good"] * len(texts)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("grpo_cli_model"), seed=0)[1]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("grpo_cli_prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n", encoding="utf-8")
    return path


def argv(micro, prompts, out, *more):
    return ["train", "--weights", str(micro), "--device", "cpu", "--prompts", str(prompts), "--out", str(out),
            "--reward", "test_grpo_cli:low_ids", "--steps", "3", "-G", "4", "--max-completion-length", "6",
            "--r", "4", "--lr", "3e-2", "--no-progress", *more]


def test_help_lists_the_options():
    out = subprocess.run([sys.executable, "-m", "techniques.grpo", "train", "--help"], cwd=ROOT,
                         capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for opt in ("--prompts", "--reward", "--discrim", "--bag", "--num-generations", "--max-completion-length",
                "--beta", "--epsilon-low", "--epsilon-high", "--num-iterations", "--loss-type", "--scale-rewards",
                "--temperature", "--top-k", "--top-p", "--lr", "--steps", "--batch-prompts", "--seed", "--device",
                "--eval-prompts", "--r", "--alpha", "--targets"):
        assert opt in text, opt


def test_a_tiny_run_writes_its_files_and_an_adapter_generate_loads(micro, prompts_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(argv(micro, prompts_file, out)) == 0
    printed = capsys.readouterr().out
    assert "held-out reward" in printed
    record = json.loads((out / "history.json").read_text(encoding="utf-8"))
    assert [h["step"] for h in record["history"]] == [1, 2, 3]
    for h in record["history"]:
        for key in ("reward_mean", "reward_std", "kl", "clip_frac", "completion_length", "loss"):
            assert math.isfinite(h[key]), key
    ev = record["eval"]
    assert ev["n_prompts"] == 1 and ev["n_completions"] == 4   # the last 20% of 6 prompts: 1 prompt, G = 4
    assert ev["before"]["kl"] < 1e-6 < ev["after"]["kl"]       # B starts at 0: the policy is the base, then moves
    samples = json.loads((out / "samples.json").read_text(encoding="utf-8"))["samples"]
    assert samples and samples[0]["prompt"] == "In the" and {"before", "after"} <= set(samples[0])
    assert (out / "curves.png").read_bytes().startswith(PNG_MAGIC)
    assert not list(tmp_path.glob(".*-save-*"))

    # `minigpt generate --lora OUT/adapter` loads it, and the logits are not the base's
    args = minigpt_parser().parse_args(["generate", "Hi", "--weights", str(micro), "--device", "cpu",
                                        "--lora", str(out / "adapter")])
    tuned = _load(args)[0].eval()
    base = GPT.from_pretrained(str(micro)).eval()
    ids = torch.tensor([[15496, 11, 314, 716]])
    with torch.no_grad():
        diff = (tuned(ids).logits - base(ids).logits).abs().max().item()
    assert diff > 1e-4, diff


@pytest.mark.parametrize("more, lines, message", [
    (["-G", "1"], PROMPTS, "G >= 2"),
    ([], [], "has no prompts"),
    ([], ["word " * 70] + PROMPTS, "exceeds the model's context of 64"),
    (["--reward", "vader"], PROMPTS, "unknown --reward 'vader'"),
    (["--reward", "test_grpo_cli:wrong_count"], PROMPTS, "returned 3 values for 4 completions"),
    (["--reward", "test_grpo_cli:nan_reward"], PROMPTS, "NaN"),
    (["--reward", "test_grpo_cli:not_a_number"], PROMPTS, "not a number"),
    (["--reward", "test_grpo_cli:missing"], PROMPTS, "cannot load the reward"),
])
def test_bad_input_is_one_line_and_leaves_no_out(micro, tmp_path, capsys, more, lines, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(lines), encoding="utf-8")
    out = tmp_path / "run"
    assert main(argv(micro, prompts, out, *more)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert "nothing was saved" in err
    assert not out.exists() and not list(tmp_path.glob(".*-save-*"))
