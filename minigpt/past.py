"""The past: the one seam every technique plugs into, in one home.

`GPT.forward` takes and returns `past_key_values` as a plain tuple over layers
of `(k, v)` pairs, each [B, n_head, T_past, head_dim]. Prefix tuning builds a
learned one, PPLM nudges a real one, generation grows one token at a time.
What they all need besides the tuple lives here, written once:

- one stacked layout, (L, 2, B, n_head, T, head_dim), for arithmetic on the
  whole past at once (PPLM adds Δ to it; a prefix table reshapes into it);
- the attention mask over the past: ones for the past positions in front,
  ones for each new token behind;
- left padding, so a batch of prompts ends in one column;
- `KVBuffer`, a preallocated past that decoding writes in place instead of
  growing the tuple by `torch.cat` (which copies the whole past every token).
  The forward pass still returns plain `(k, v)` tuples: views of the buffer.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["PastKeyValues", "stack_past", "unstack_past", "past_length", "extend_mask", "mask_with_past",
           "check_left_padded", "left_pad", "KVBuffer"]

# One (k, v) pair per layer, each [B, n_head, T_past, head_dim].
PastKeyValues = tuple[tuple[torch.Tensor, torch.Tensor], ...]


# ---- the past as one tensor ---------------------------------------------------------------
def stack_past(past: PastKeyValues) -> torch.Tensor:
    """Per-layer (k, v) pairs -> one tensor (L, 2, B, n_head, T, head_dim): index 0 keys, 1 values."""
    return torch.stack([torch.stack(kv) for kv in past])


def unstack_past(stacked: torch.Tensor) -> PastKeyValues:
    """The inverse of `stack_past`: (L, 2, B, n_head, T, head_dim) -> per-layer (k, v) views.

    `unbind`, not indexing: its backward stacks the layers' gradients once,
    where each stacked[l, 0] would fill a zero tensor the size of the whole past.
    """
    if stacked.dim() != 6 or stacked.size(1) != 2:
        raise ValueError(f"a stacked past is (L, 2, B, n_head, T, head_dim), got {list(stacked.shape)}")
    return tuple(tuple(layer.unbind(0)) for layer in stacked.unbind(0))


def past_length(past: Optional[PastKeyValues]) -> int:
    """T_past: how many positions the past holds (0 for no past)."""
    return 0 if past is None else past[0][0].size(2)


# ---- the attention mask over past + new tokens ---------------------------------------------
def extend_mask(mask: torch.Tensor, *, before: int = 0, after: int = 0) -> torch.Tensor:
    """mask [B, T] -> [B, before + T + after], the new columns all 1 (attended).

    `before` covers a past that has no mask of its own (a learned prefix is
    always attended); `after` covers tokens about to be fed (generation steps).
    """
    B = mask.size(0)
    parts = [mask.new_ones(B, before)] if before else []
    parts.append(mask)
    if after:
        parts.append(mask.new_ones(B, after))
    return torch.cat(parts, dim=1) if len(parts) > 1 else mask


def mask_with_past(attention_mask: Optional[torch.Tensor], B: int, T: int, T_past: int,
                   device: torch.device) -> Optional[torch.Tensor]:
    """Accept a mask over the new tokens only ([B, T]: the past is then fully attended)
    or over past + new ([B, T_past + T]); return it over past + new, or None when
    nothing is padded (the model then needs no mask at all)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.size(0) != B or attention_mask.size(1) not in (T, T_past + T):
        raise ValueError(f"attention_mask must be [batch, T] = [{B}, {T}] or [batch, T_past + T] = "
                         f"[{B}, {T_past + T}], got {list(attention_mask.shape)}")
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    if attention_mask.size(1) == T and T_past:
        attention_mask = extend_mask(attention_mask, before=T_past)
    return None if bool(attention_mask.all()) else attention_mask


def check_left_padded(attention_mask: Optional[torch.Tensor], B: int, T: int,
                      device: torch.device) -> Optional[torch.Tensor]:
    """A prompt mask [B, T] that must be left-padded (every row's last token real);
    None when nothing is padded."""
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask must be [batch, T] = [{B}, {T}], got {list(attention_mask.shape)}")
    m = attention_mask.to(device=device, dtype=torch.long)
    if not bool(m[:, -1].all()):
        raise ValueError("attention_mask: pad prompts on the LEFT (the last column must be real tokens), "
                         "as Tokenizer.encode_batch does")
    return None if bool(m.all()) else m


# ---- left padding ---------------------------------------------------------------------------
def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows of different lengths -> (ids [B, T], mask [B, T]), padded on the left.

    Every row's last token lands in the last column, which is where generation
    reads the next-token logits; `pad_id` fills the rest and the mask (0) hides it.
    """
    if not len(rows) or any(len(r) == 0 for r in rows):
        raise ValueError("left_pad needs at least one row, and every row at least one token")
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, T - len(r):] = 1
    return ids.to(device), mask.to(device)


# ---- a preallocated past for decoding ------------------------------------------------------
class KVBuffer:
    """Room for the keys and values of every layer, written in place as decoding goes.

    One tensor (L, 2, B, n_head, T_max, head_dim): `stack_past`'s layout with
    room to grow along T. `GPT.forward(..., kv_buffer=buf)` writes the new
    tokens' k and v at positions [length, length + T) of each layer, attends
    over the views [:length + T], and returns those views as its plain
    `(k, v)` tuples; only the new positions are written, so a step costs no
    copy of the past (`torch.cat` would copy all T_past positions of every
    layer at every token: 66 MB per step for gpt2 at 900 tokens).

    Returned views stay valid: the buffer only grows, and a later step writes
    beyond them. Written in place, it carries no gradient: use it under
    `torch.no_grad()` / `torch.inference_mode()`; training and PPLM pass the
    past as tuples, which stay differentiable.
    """

    def __init__(self, n_layer: int, batch: int, n_head: int, max_length: int, head_dim: int, *,
                 device=None, dtype: torch.dtype = torch.float32):
        if min(n_layer, batch, n_head, max_length, head_dim) < 1:
            raise ValueError(f"KVBuffer sizes must be positive, got n_layer={n_layer}, batch={batch}, "
                             f"n_head={n_head}, max_length={max_length}, head_dim={head_dim}")
        self.data = torch.empty(n_layer, 2, batch, n_head, max_length, head_dim, device=device, dtype=dtype)
        self.length = 0  # positions written so far: T_past for the next forward

    @property
    def max_length(self) -> int:
        return self.data.size(4)

    def fill(self, past: PastKeyValues) -> None:
        """Copy a past (e.g. a learned prefix) into the empty buffer, once."""
        if self.length:
            raise ValueError(f"this KVBuffer already holds {self.length} positions; a past is copied only into "
                             "an empty one")
        T_past = past_length(past)
        if T_past > self.max_length:
            raise ValueError(f"the past holds {T_past} positions, more than the buffer's {self.max_length}")
        for layer, (k, v) in zip(self.data, past):  # layer: (2, B, nh, T_max, hs)
            layer[0, :, :, :T_past].copy_(k)
            layer[1, :, :, :T_past].copy_(v)
        self.length = T_past

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new k, v (B, nh, T, hs) of `layer` after the past; return the
        layer's keys and values so far, views (B, nh, length + T, hs)."""
        start, end = self.length, self.length + k.size(2)
        kv = self.data[layer]                              # (2, B, nh, T_max, hs)
        kv[0, :, :, start:end].copy_(k)
        kv[1, :, :, start:end].copy_(v)
        return kv[0, :, :, :end], kv[1, :, :, :end]

    def advance(self, T: int) -> None:
        """Count T more positions as written (after every layer has written them)."""
        self.length += T

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i of the past becomes row rows[i] of it (beam search keeps the pasts of the beams it keeps)."""
        written = self.data[:, :, :, :, :self.length]  # (L, 2, B, nh, length, hs)
        written.copy_(written.index_select(2, rows))
