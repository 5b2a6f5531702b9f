"""Decoding with the KV cache: greedy, temperature, top-k, top-p; batched with left padding.

Each step feeds only the newest token and the cached keys/values, so a step
costs one token's forward, not the whole sequence's. A batch of prompts of
different lengths is left-padded (see Tokenizer.encode_batch); the attention
mask hides the padding and sets each row's positions, so every row gets the
tokens it would get alone. A row that emits `eos_token_id` is finished and
padded from then on; decoding stops when every row is finished.

The past lives in a preallocated `KVBuffer` (past.py) that each step writes
in place, so a step does not copy the whole past as `torch.cat` would; an
initial past (a learned prefix) is copied into it once. `preallocate=False`
grows the plain tuple instead: the same tokens, kept as the reference the
tests compare against. Likewise the attention mask lives in one [B, T_max]
tensor whose later columns are ones; each step reads a view of it.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from .model import GPT
from .past import KVBuffer, PastKeyValues, mask_with_past, past_length

__all__ = ["generate", "stream", "sample_next_token", "check_sampling"]


def check_sampling(*, temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None for no limit), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample_next_token(logits: torch.Tensor, *, do_sample: bool = False, temperature: float = 1.0,
                      top_k: Optional[int] = None, top_p: Optional[float] = None,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. Greedy takes the argmax; sampling applies
    temperature, then top-k, then top-p (nucleus), then draws from the rest."""
    if not do_sample or temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the ones before it already hold top_p of the mass (the first always stays)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def stream(model: GPT, input_ids: torch.Tensor, *, max_new_tokens: int,
           attention_mask: Optional[torch.Tensor] = None, past_key_values: Optional[PastKeyValues] = None,
           do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None, eos_token_id: Optional[int] = None,
           pad_token_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
           preallocate: bool = True) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, [B], one step at a time (for streaming).

    preallocate: keep the past in a KVBuffer written in place (default), or
    grow the plain (k, v) tuple by concatenation at every step (the reference)."""
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a LongTensor [batch, seq]; wrap a single prompt as [[ids...]]")
    B, T = input_ids.shape
    T_past = past_length(past_key_values)
    n_pos = model.config.n_positions
    if T_past + T > n_pos:
        raise ValueError(f"the prompt is too long: {T_past} past + {T} prompt tokens = {T_past + T} > n_positions "
                         f"{n_pos}, {T_past + T - n_pos} over the limit; shorten the prompt")
    if T_past + T + max_new_tokens > n_pos:
        raise ValueError(f"{T_past} past + {T} prompt + {max_new_tokens} new tokens = "
                         f"{T_past + T + max_new_tokens} > n_positions {n_pos}; lower max_new_tokens to at most "
                         f"{n_pos - T_past - T}")
    mask = mask_with_past(attention_mask, B, T, T_past, input_ids.device)
    if max_new_tokens == 0:
        return
    total = T_past + T + max_new_tokens - 1  # the last token is yielded, never fed back
    full_mask = None if mask is None else _mask_buffer(mask, total)
    buf = _kv_buffer(model, B, total) if preallocate else None
    pad = eos_token_id if pad_token_id is None else pad_token_id
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    ids, past, n = input_ids, past_key_values, T_past + T
    for _ in range(max_new_tokens):
        mask = None if full_mask is None else full_mask[:, :n]  # (B, T_past + T + steps so far)
        out = model(ids, attention_mask=mask, past_key_values=past, kv_buffer=buf)
        past = None if buf is not None else out.past_key_values  # a buffer holds its past itself
        tok = sample_next_token(out.logits[:, -1, :], do_sample=do_sample, temperature=temperature,
                                top_k=top_k, top_p=top_p, generator=generator)
        if eos_token_id is not None:
            tok = tok.masked_fill(finished, pad)
            finished |= tok == eos_token_id
        yield tok
        if eos_token_id is not None and bool(finished.all()):
            return
        ids, n = tok[:, None], n + 1


def _kv_buffer(model: GPT, B: int, max_length: int) -> KVBuffer:
    cfg, w = model.config, model.transformer.wte.weight
    return KVBuffer(cfg.n_layer, B, cfg.n_head, max_length, cfg.head_dim, device=w.device, dtype=w.dtype)


def _mask_buffer(mask: torch.Tensor, max_length: int) -> torch.Tensor:
    """mask [B, T0] -> [B, max_length]: the mask, then ones for every token decoding will feed."""
    full = mask.new_ones(mask.size(0), max_length)
    full[:, :mask.size(1)] = mask
    return full


def generate(model: GPT, input_ids: torch.Tensor, *, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """Prompt [B, T] -> prompt plus continuation [B, T + new] (new <= max_new_tokens
    when every row stops at eos). Keyword arguments are those of `stream`;
    `past_key_values` is an initial past, e.g. a learned prefix."""
    new = list(stream(model, input_ids, max_new_tokens=max_new_tokens, **kwargs))
    if not new:
        return input_ids
    return torch.cat([input_ids, torch.stack(new, dim=1).to(input_ids.dtype)], dim=1)
