"""Helpers the tests share: GPT-2-shaped models with random weights, built by
transformers and saved with save_pretrained, so the real loading path is exercised."""
from __future__ import annotations

from pathlib import Path

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
