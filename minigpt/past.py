"""The past: the one seam every technique plugs into, in one home.

`GPT.forward` takes and returns `past_key_values` as a plain tuple over layers
of `(k, v)` pairs, each [B, n_head, T_past, head_dim]. Prefix tuning builds a
learned one, PPLM nudges a real one, generation grows one token at a time.
What they all need besides the tuple lives here, written once:

- one stacked layout, (L, 2, B, n_head, T, head_dim), for arithmetic on the
  whole past at once (PPLM adds Δ to it; a prefix table reshapes into it);
- the attention mask over the past: ones for the past positions in front,
  ones for each new token behind;
- left padding, so a batch of prompts ends in one column.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["PastKeyValues", "stack_past", "unstack_past", "past_length", "extend_mask", "mask_with_past",
           "check_left_padded", "left_pad"]

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
