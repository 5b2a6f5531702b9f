"""Measures the projects share: perplexity by its definition, a plain mean, and sacrebleu's corpus BLEU.

Perplexity here is exp(Σ -log p(token | what precedes it) / number of tokens), over the tokens of the
texts being scored only (their context is read, not scored): the token-weighted mean cross-entropy,
exponentiated; not a mean of per-text perplexities.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from minigpt import Example, GPT, collate_lm, get_tokenizer

from .data import EOT

__all__ = ["Perplexity", "text_perplexity", "mean", "corpus_bleu"]


@dataclass
class Perplexity:
    """exp(Σ nll / Σ tokens) over texts, from each text's summed nll (nats) and its number of scored tokens."""
    text_nll: list[float]
    text_tokens: list[int]

    @property
    def nll(self) -> float:
        return float(sum(self.text_nll))

    @property
    def tokens(self) -> int:
        return int(sum(self.text_tokens))

    @property
    def mean_cross_entropy(self) -> float:
        return self.nll / self.tokens

    @property
    def value(self) -> float:
        return math.exp(self.mean_cross_entropy)

    @property
    def per_text(self) -> list[float]:
        return [math.exp(a / b) for a, b in zip(self.text_nll, self.text_tokens)]

    def subset(self, indices: Sequence[int]) -> "Perplexity":
        return Perplexity([self.text_nll[i] for i in indices], [self.text_tokens[i] for i in indices])


@torch.no_grad()
def text_perplexity(model: GPT, texts: Sequence[str], contexts: Optional[Sequence[str]] = None, *,
                    prefix=None, batch_size: int = 16) -> Perplexity:
    """Perplexity of `texts`, each read after its context (default "<|endoftext|>"): only the text's own
    tokens are scored, each given everything before it (and a learned prefix's past, if given).

    exp(Σ_texts Σ_tokens -log p(x_t | x_<t) / Σ_texts n_tokens): the token-weighted mean cross-entropy,
    not a mean of per-text means.
    """
    tok = get_tokenizer()
    contexts = [EOT] * len(texts) if contexts is None else list(contexts)
    if len(contexts) != len(texts) or not texts:
        raise ValueError("text_perplexity needs one context per text, and at least one text")
    limit = model.config.n_positions - (prefix.num_virtual_tokens if prefix is not None else 0)
    rows = []
    for i, (c, t) in enumerate(zip(contexts, texts)):
        cids, tids = tok.encode(c), tok.encode(t)
        if not cids or not tids:
            raise ValueError(f"text {i + 1}: the context and the text must each give at least one token")
        if len(cids) + len(tids) > limit:
            raise ValueError(f"text {i + 1} is {len(cids) + len(tids)} tokens with its context, more than the "
                             f"{limit} positions the model has for it")
        rows.append(Example(cids + tids, [0] * len(cids) + [1] * len(tids)))
    was_training = model.training
    model.eval()
    nll, counts = [], []
    try:
        for i in range(0, len(rows), batch_size):
            batch = {k: v.to(model.device) for k, v in collate_lm(rows[i:i + batch_size]).items()}
            ids, mask, scored = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
            past = None
            if prefix is not None:
                past, mask = prefix.inputs_for(ids, mask)
            logits = model(ids, attention_mask=mask, past_key_values=past).logits          # (B, T, V)
            logp = logits[:, :-1].float().log_softmax(-1)                                  # predicts tokens 1..T-1
            target_logp = logp.gather(-1, ids[:, 1:, None])[..., 0]                        # (B, T-1)
            counted = scored[:, 1:].to(target_logp.dtype)
            nll += (-(target_logp * counted).sum(1)).tolist()
            counts += counted.sum(1).long().tolist()
    finally:
        model.train(was_training)
    return Perplexity(nll, counts)


def mean(xs: Sequence[float]) -> float:
    """The arithmetic mean; 0.0 for an empty sequence."""
    return sum(xs) / max(1, len(xs))


def corpus_bleu(sacrebleu, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu's corpus BLEU (0-100, its default 13a tokenisation) with every reference of every input.
    sacrebleu takes reference *streams*; inputs with fewer references fill the later streams with None.
    `sacrebleu` is the imported module (a demos extra, imported by the caller's preflight)."""
    width = max(len(r) for r in references)
    streams = [[r[k] if k < len(r) else None for r in references] for k in range(width)]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)
