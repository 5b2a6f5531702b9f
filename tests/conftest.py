"""Shared fixtures: GPT-2-shaped models with random weights, built by transformers
and saved with save_pretrained, so the real loading path is exercised."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

settings.register_profile("ci", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile("ci")
# The test models are tiny: a second thread only adds synchronisation, which costs seconds
# on a busy 2-core machine.
torch.set_num_threads(1)

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


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """(transformers model, our model, folder) for the TINY config."""
    from minigpt import GPT
    hf, folder = make_hf_model(tmp_path_factory.mktemp("tiny"))
    return hf, GPT.from_pretrained(str(folder)), folder


@pytest.fixture(scope="session")
def tokenizer():
    from minigpt import get_tokenizer
    return get_tokenizer()
