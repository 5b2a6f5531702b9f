"""The PPLM paper's baselines (Dathathri et al. 2020, section 4 and tables 4 and 6), by hand.

- WD, weighted decoding: at every step the next-token distribution is reweighted towards a bag of words,

      p'(x) ∝ p(x) · exp(λ · 1[x ∈ bag])        i.e. logits' = logits + λ · 1_bag

  The paper describes WD as reweighting the probabilities of the bag's words (after Ghazvininejad et al. 2017)
  without giving λ; we take λ as a knob (`weighted_decoding(..., strength=λ)`), and λ = 0 is plain sampling.
- BR / BCR, reranking: draw k samples (plain for BR, PPLM for BCR) and keep the one the attribute model rates
  highest (`rerank`). The paper keeps the best of 10; k is a knob here, and k must be at least 1.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .jam import LogitAdjust

__all__ = ["bag_indicator", "weighted_decoding", "rerank"]


def bag_indicator(bag_ids: Sequence[int], vocab_size: int, device=None) -> torch.Tensor:
    """1_bag: (V,) with 1.0 at the bag's token ids."""
    ids = sorted({int(i) for i in bag_ids})
    if not ids:
        raise ValueError("weighted decoding needs a non-empty bag of words: give a bag name or at least one word "
                         "that is a single token")
    if ids[0] < 0 or ids[-1] >= vocab_size:
        raise ValueError(f"bag token ids must lie in [0, {vocab_size}), got {ids[0]}..{ids[-1]}")
    one = torch.zeros(vocab_size, device=device)
    one[ids] = 1.0
    return one


def weighted_decoding(bag_ids: Sequence[int], vocab_size: int, strength: float, device=None) -> LogitAdjust:
    """The logit adjustment of WD for jam.steered_generate: logits + λ · 1_bag."""
    one = bag_indicator(bag_ids, vocab_size, device)

    def adjust(h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:      # (B, C), (B, V)
        return logits + strength * one.to(logits.device, logits.dtype)

    return adjust


def rerank(scores: Sequence[float], k: int) -> int:
    """The index of the best of the first k candidates' scores (the first on a tie)."""
    if k < 1:
        raise ValueError(f"reranking keeps the best of k samples: k must be >= 1, got {k}")
    if len(scores) < k:
        raise ValueError(f"reranking needs k={k} candidate scores, got {len(scores)}")
    best = max(range(k), key=lambda i: (scores[i], -i))
    return best
