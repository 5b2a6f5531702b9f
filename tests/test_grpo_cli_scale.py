"""`python -m techniques.grpo train` with the long-run options (issue 27): --precision bf16 with --grad-accum,
--save-every / --resume (an interrupted run resumed to the uninterrupted run's adapter, bit for bit), --dora,
--quantize nf4, and torchrun with 2 processes against 1 process with --grad-accum 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_hf_model
from safetensors.torch import load_file
from test_scale import clean_env, max_diff

from techniques.grpo.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Hello", "A story", "The cat", "Once", "My friend", "In the"]
STOP = {"at": None, "calls": 0}  # the reward below presses Ctrl-C at its STOP["at"]-th call


def low_ids(texts):
    """A reward a micro random model can learn (the share of characters in the first half of the alphabet); it
    raises KeyboardInterrupt at call STOP["at"], as a user's Ctrl-C would."""
    STOP["calls"] += 1
    if STOP["at"] is not None and STOP["calls"] == STOP["at"]:
        raise KeyboardInterrupt
    return [sum(c in "abcdefghijklm" for c in t.lower()) / max(1, len(t)) for t in texts]


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("grpo_scale_model"), seed=0)[1]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("grpo_scale_prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


def argv(micro, prompts, out, *more):
    return ["train", "--weights", str(micro), "--device", "cpu", "--prompts", str(prompts), "--out", str(out),
            "--reward", "test_grpo_cli_scale:low_ids", "--steps", "4", "-G", "3", "--max-completion-length", "5",
            "--r", "4", "--lr", "3e-2", "--batch-prompts", "2", "--no-progress", *more]


def adapter(out: Path) -> dict:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_bf16_with_grad_accum_runs_and_records_the_time_split(micro, prompts_file, tmp_path):
    assert main(argv(micro, prompts_file, tmp_path / "o", "--precision", "bf16", "--grad-accum", "2")) == 0
    history = json.loads((tmp_path / "o" / "history.json").read_text())["history"]
    assert len(history) == 4 and all(h["t_sample"] > 0 and h["t_update"] > 0 for h in history)


def test_resume_continues_an_interrupted_run_exactly(micro, prompts_file, tmp_path, capsys):
    """4 steps uninterrupted; the same command with --save-every 2 interrupted by Ctrl-C in step 3 (exit 130, the
    message names the checkpoint, no adapter written), then --resume: the same adapter, to the bit."""
    STOP.update(at=None, calls=0)
    assert main(argv(micro, prompts_file, tmp_path / "full")) == 0
    STOP.update(at=4, calls=0)  # call 1: the held-out evaluation before training; calls 2, 3: steps 1, 2
    assert main(argv(micro, prompts_file, tmp_path / "cut", "--save-every", "2")) == 130
    assert "the last checkpoint (step 2)" in capsys.readouterr().err
    assert not (tmp_path / "cut" / "adapter").exists()
    STOP.update(at=None, calls=0)
    ckpt = tmp_path / "cut" / "train_state"
    assert main(argv(micro, prompts_file, tmp_path / "cut", "--save-every", "2", "--resume", str(ckpt))) == 0
    assert max_diff(adapter(tmp_path / "full"), adapter(tmp_path / "cut")) == 0.0
    assert main(argv(micro, prompts_file, tmp_path / "x", "--resume", str(ckpt), "--r", "8")) == 2  # a different run
    assert "a checkpoint of a different run" in capsys.readouterr().err


@pytest.mark.parametrize("more, dora", [(["--dora"], True), (["--quantize", "nf4"], False)])
def test_dora_and_qlora_train_from_the_command_line(micro, prompts_file, tmp_path, more, dora):
    assert main(argv(micro, prompts_file, tmp_path / "o", "--steps", "2", "--beta", "0.04", *more)) == 0
    config = json.loads((tmp_path / "o" / "adapter" / "adapter_config.json").read_text())
    assert bool(config.get("use_dora")) is dora
    history = json.loads((tmp_path / "o" / "history.json").read_text())["history"]
    assert history[0]["kl"] < 1e-9  # π_ref = adapters off is the (quantised) base the policy starts from


def test_torchrun_two_processes_equal_one_with_grad_accum_two(micro, prompts_file, tmp_path):
    """`torchrun --nproc_per_node 2 -m techniques.grpo train` (gloo) for 2 steps of 2 prompts, one group per
    process, saves the adapter one process with --grad-accum 2 saves (the same micro-batches); rank 0 alone
    prints. (LoRA's rank is left at its default: torchrun's own parser would take --r for one of its options.)"""
    torchrun = Path(sys.executable).parent / "torchrun"
    launcher = [str(torchrun)] if torchrun.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    def no_r(a):
        i = a.index("--r")
        return a[:i] + a[i + 2:]
    args = ["-m", "techniques.grpo", *no_r(argv(micro, prompts_file, tmp_path / "two", "--steps", "2"))]
    args[args.index("test_grpo_cli_scale:low_ids")] = "tests.test_grpo_cli_scale:low_ids"
    env = clean_env(PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")
    two = subprocess.run([*launcher, "--standalone", "--nproc_per_node", "2", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("held-out reward") == 1  # rank 0 alone evaluates and prints
    assert main(no_r(argv(micro, prompts_file, tmp_path / "one", "--steps", "2", "--grad-accum", "2"))) == 0
    diff = max_diff(adapter(tmp_path / "one"), adapter(tmp_path / "two"))
    print(f"torchrun 2 processes vs 1 process with --grad-accum 2: max abs diff {diff:.3g}")
    assert diff < 1e-6
