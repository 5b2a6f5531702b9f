"""python -m minigpt generate: streams the same text as the library, fails cleanly."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def test_seeded_sampling_cli_is_reproducible(tiny_hf, capsys):
    folder = str(tiny_hf[2])
    args = ("generate", "Hi", "--weights", folder, "--seed", "3", "--top-k", "40", "--max-new-tokens", "8")
    a, b, c = main(capsys, *args), main(capsys, *args), main(capsys, *args[:-1], "9")
    assert a[0] == 0 and a == b and a[1] != c[1]


def test_help_documents_every_option(capsys):
    code, out, _ = main(capsys, "generate", "--help")
    assert code == 0
    for opt in ("--model", "--weights", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed",
                "--device", "--lora", "--prefix"):
        assert opt in out


def test_bad_input_gives_one_line_errors(tiny_hf, capsys):
    folder = str(tiny_hf[2])
    code, _, err = main(capsys, "generate", "x", "--weights", folder, "--top-p", "2")
    assert code == 2 and err.startswith("error: top_p")
    code, _, err = main(capsys, "generate", "x", "--weights", folder, "--max-new-tokens", "500")
    assert code == 2 and "n_positions" in err
    code, _, err = main(capsys, "generate", "x", "--weights", folder, "--device", "tpu")
    assert code == 2 and "unknown device" in err
    code, _, err = main(capsys, "generate", "x", "--weights", folder + "-missing")
    assert code == 2 and "neither a folder" in err
