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


def test_seeded_sampling_cli_is_reproducible(tiny_hf):
    folder = str(tiny_hf[2])
    a = run("generate", "Hi", "--weights", folder, "--seed", "3", "--top-k", "40", "--max-new-tokens", "8")
    b = run("generate", "Hi", "--weights", folder, "--seed", "3", "--top-k", "40", "--max-new-tokens", "8")
    assert a.returncode == 0 and a.stdout == b.stdout


def test_help_documents_every_option():
    r = run("generate", "--help")
    for opt in ("--model", "--weights", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed",
                "--device", "--lora", "--prefix"):
        assert opt in r.stdout


def test_bad_input_gives_one_line_errors(tiny_hf):
    folder = str(tiny_hf[2])
    r = run("generate", "x", "--weights", folder, "--top-p", "2")
    assert r.returncode == 2 and r.stderr.startswith("error: top_p") and "Traceback" not in r.stderr
    r = run("generate", "x", "--weights", folder, "--max-new-tokens", "500")
    assert r.returncode == 2 and "n_positions" in r.stderr and "Traceback" not in r.stderr
    r = run("generate", "x", "--weights", folder, "--device", "tpu")
    assert r.returncode == 2 and "unknown device" in r.stderr
