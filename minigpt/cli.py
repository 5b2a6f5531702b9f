"""Command-line plumbing shared by `python -m minigpt` and the techniques' commands."""
from __future__ import annotations

import argparse
import sys

import torch

from .device import resolve_device
from .model import GPT

__all__ = ["add_model_args", "model_from_args", "fail"]


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="gpt2",
                   help="GPT-2 size to load from the Hugging Face cache (gpt2, gpt2-medium, gpt2-large, gpt2-xl), "
                        "downloaded once if online (default: gpt2)")
    g.add_argument("--weights", metavar="DIR",
                   help="a local folder with config.json + model.safetensors (Hugging Face layout); overrides --model")
    g.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default: auto = cuda, then mps, then cpu)")
    g.add_argument("--seed", type=int, default=0, help="random seed, for reproducible sampling and training (default: 0)")


def model_from_args(args) -> GPT:
    """Load the model the arguments name, put it on the chosen device, seed torch."""
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    model = GPT.from_pretrained(args.weights or args.model, device=device)
    return model.eval()


def fail(message: str, code: int = 2):
    """Print a one-line error (no traceback) and exit: for user mistakes."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
