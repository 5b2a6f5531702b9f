"""python -m minigpt generate: streams the same text as the library, fails cleanly."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigpt import generate

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, "-m", "minigpt", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)


def test_greedy_cli_prints_what_generate_gives(tiny_hf, tokenizer):
    _, ours, folder = tiny_hf
    r = run("generate", "The dog", "--weights", str(folder), "--greedy", "--max-new-tokens", "12",
            "--device", "cpu")
    assert r.returncode == 0, r.stderr
    want = generate(ours, torch.tensor([tokenizer.encode("The dog")]), max_new_tokens=12)
    assert r.stdout == tokenizer.decode(want[0]) + "\n"


def main(capsys, *args):
    """The command in-process (no interpreter start-up): (exit code, stdout, stderr)."""
    from minigpt.__main__ import main as cli_main
    try:
        code = cli_main(list(args))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_beam_search_cli_prints_what_beam_search_gives(tiny_hf, tokenizer, capsys):
    from minigpt import beam_search
    _, ours, folder = tiny_hf
    code, out, err = main(capsys, "generate", "The dog", "--weights", str(folder), "--num-beams", "3",
                          "--no-repeat-ngram-size", "2", "--length-penalty", "0.8", "--max-new-tokens", "10")
    assert code == 0, err
    ids = torch.tensor([tokenizer.encode("The dog")])
    want = beam_search(ours, ids, max_new_tokens=10, num_beams=3, no_repeat_ngram_size=2, length_penalty=0.8)
    assert out == tokenizer.decode(want.sequences[0]) + "\n"


def test_stop_cuts_the_printed_text(tiny_hf, tokenizer, capsys):
    _, ours, folder = tiny_hf
    full = tokenizer.decode(generate(ours, torch.tensor([tokenizer.encode("The dog")]), max_new_tokens=12)[0])
    new = full[len("The dog"):]
    stop = new[len(new) // 2:len(new) // 2 + 2]
    code, out, err = main(capsys, "generate", "The dog", "--weights", str(folder), "--greedy",
                          "--max-new-tokens", "12", "--stop", stop)
    assert code == 0, err
    assert out == "The dog" + new[:new.index(stop)] + "\n"


def test_seeded_sampling_cli_is_reproducible(tiny_hf, capsys):
    folder = str(tiny_hf[2])
    args = ("generate", "Hi", "--weights", folder, "--seed", "3", "--top-k", "40", "--max-new-tokens", "8")
    a, b, c = main(capsys, *args), main(capsys, *args), main(capsys, *args[:-1], "9")
    assert a[0] == 0 and a == b and a[1] != c[1]


def test_help_documents_every_option(capsys):
    code, out, _ = main(capsys, "generate", "--help")
    assert code == 0
    for opt in ("--model", "--weights", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed",
                "--device", "--lora", "--prefix", "--num-beams", "--length-penalty", "--early-stopping",
                "--no-repeat-ngram-size", "--repetition-penalty", "--stop"):
        assert opt in out


def test_bad_input_gives_one_line_errors(tiny_hf, capsys):
    folder = str(tiny_hf[2])
    code, _, err = main(capsys, "generate", "x", "--weights", folder, "--top-p", "2")
    assert code == 2 and err.startswith("error: top_p")
    code, _, err = main(capsys, "generate", "x", "--weights", folder, "--max-new-tokens", "500")
    assert code == 2 and "lower --max-new-tokens to at most 63" in err
    code, _, err = main(capsys, "generate", "x", "--weights", folder, "--device", "tpu")
    assert code == 2 and "unknown device" in err
    code, _, err = main(capsys, "generate", "x", "--weights", folder + "-missing")
    assert code == 2 and "neither a folder" in err



def one_line_error(code, out, err, *words):
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


def test_too_long_prompt_says_by_how_much_and_prints_nothing(tiny_hf, capsys):
    """n_positions is 64: a 70-token prompt is 7 over (it must leave room for one new token)."""
    folder = str(tiny_hf[2])
    code, out, err = main(capsys, "generate", " a" * 70, "--weights", folder)
    one_line_error(code, out, err, "prompt is too long", "70 prompt tokens", "7 token(s) over the limit")
    assert out == ""  # the prompt is not echoed before the refusal


def test_damaged_weights_file_is_one_line(tiny_hf, tmp_path, capsys):
    folder = tiny_hf[2]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:1000])
    code, out, err = main(capsys, "generate", "x", "--weights", str(tmp_path))
    one_line_error(code, out, err, str(tmp_path / "model.safetensors"), "damaged and cannot be read")


def test_adapter_folder_as_weights_points_to_the_flag(tmp_path, capsys):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    code, out, err = main(capsys, "generate", "x", "--weights", str(tmp_path))
    one_line_error(code, out, err, "adapter, not a model", "--prefix")


def test_error_policy_user_mistakes_interrupts_and_bugs(capsys):
    from minigpt.cli import run_command

    def raises(e):
        def body():
            raise e
        return body

    assert run_command(raises(ValueError("--lr must be > 0")), out="runs/x") == 2
    assert capsys.readouterr().err == "error: --lr must be > 0; nothing was saved to runs/x\n"
    assert run_command(raises(FileNotFoundError("data.txt not found"))) == 2
    assert capsys.readouterr().err == "error: data.txt not found\n"
    assert run_command(raises(KeyboardInterrupt()), out="runs/x") == 130
    assert capsys.readouterr().err == "interrupted; nothing was saved to runs/x\n"
    with pytest.raises(RuntimeError):  # a bug in the project keeps its traceback
        run_command(raises(RuntimeError("shape mismatch")))
    assert run_command(lambda: None) == 0


def test_shared_training_options_and_plan():
    import argparse

    from minigpt import TrainConfig
    from minigpt.cli import add_train_args, describe_plan, train_config_from_args
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=0)
    add_train_args(p, lr=2e-4)
    help_text = p.format_help()
    for opt in ("--epochs", "--max-steps", "--batch-size", "--lr", "--warmup-steps", "--weight-decay",
                "--eval-fraction", "--eval-every", "--no-progress"):
        assert opt in help_text
    cfg = train_config_from_args(p.parse_args(["--max-steps", "6"]))
    assert isinstance(cfg, TrainConfig) and cfg.max_steps == 6 and cfg.lr == 2e-4
    assert describe_plan(10, 2, cfg).startswith("training 6 steps (3 epochs of 2 steps, batch 8) on 10 examples")
    with pytest.raises(ValueError, match="--eval-fraction"):
        train_config_from_args(p.parse_args(["--eval-fraction", "1.5"]))
    with pytest.raises(SystemExit):
        p.parse_args(["--max-steps", "0"])
