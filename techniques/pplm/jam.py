"""JAM, "Just A Move" (Huang, Chen and Umrawal 2025, arXiv 2502.20684), by hand; and the decoding loop that the
PPLM paper's baselines (weighted decoding, `baselines.py`) share with it.

JAM steers without a gradient step per token and without training the LM: a small linear classifier reads the
model's hidden state, and at generation time the latent vector is moved across that classifier's boundary.

For a two-class linear head p(a|h) = softmax(W h + b) the log-odds of the target class t against the other class o
is an affine function of h, the margin

    m(h) = u·h + c,        u = W_t - W_o,  c = b_t - b_o.

The smallest move δ (in L2) that brings the margin up to a target μ is the orthogonal projection onto the
half-space {h : u·h + c >= μ}:

    δ(h) = max(0, μ - m(h)) / ||u||² · u                                                   (the move)

It lies along u, the boundary's normal (orthogonal to the boundary m = 0 and to every level set), its norm is
max(0, μ - m(h)) / ||u||, and m(h + δ) = max(m(h), μ). A state already past the target is not moved.

Where and when (what the paper leaves to the implementer, as we read its summary; the arXiv HTML was not in
the stored pages this code was written from, only a summary of it, so these are our choices, said here):
- which layer: the last hidden state, after ln_f, just before the head. The head is linear, so moving h by δ
  moves the logits by δ·wteᵀ: logits' = logits + lm_head(δ). No new seam in minigpt is needed, and a zero move
  gives the plain logits bit for bit (the term added is exactly zero). The past keys and values are those of the
  unmoved states: a move at the last layer does not change what later tokens attend to.
- which positions: each generated position, at the step that samples from it (the prompt's positions are read,
  not moved: JAM steers the continuation).
- which classifier: the PPLM discriminator (`attributes.Discriminator`, trained by `train_discriminator` on the
  mean of the last hidden states). We apply it to the single position's state; because it is linear, every
  moved position past the target puts the mean of the moved positions past it too.
- by how much: a target margin μ in nats of log-odds (`JAMConfig.margin`, default 2.0: p(target) >= 0.88 on
  the moved state). The paper's "detect, then move" (it may generate twice: once to detect, once moved) is
  folded into one pass here: the formula detects (a state past μ gets δ = 0) and moves in the same step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from minigpt import GPT, sample_next_token

from .attributes import Discriminator

__all__ = ["JAMConfig", "head_direction", "margin", "minimal_move", "jam_adjust", "steered_generate", "LogitAdjust"]

# (last hidden state (B, C) after ln_f, logits (B, V)) -> adjusted logits (B, V)
LogitAdjust = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class JAMConfig:
    """margin μ: the target log-odds of the class on each moved state (nats)."""
    margin: float = 2.0

    def __post_init__(self):
        if not torch.isfinite(torch.tensor(float(self.margin))):
            raise ValueError(f"JAM's margin must be a finite number of nats, got {self.margin}")


def head_direction(head: Discriminator, target: int | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(u (C,), c ()) of the margin m(h) = u·h + c of class `target` against the head's other class."""
    if len(head.class_names) != 2:
        raise ValueError(f"JAM moves across one boundary: it needs a two-class head, this one has "
                         f"{len(head.class_names)} classes ({', '.join(head.class_names)}); train a binary head")
    t = head.class_index(target)
    o = 1 - t
    W, b = head.mlp.weight, head.mlp.bias                                   # (2, C), (2,)
    return (W[t] - W[o]).detach(), (b[t] - b[o]).detach()


def margin(h: torch.Tensor, u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """m(h) = u·h + c: (..., C) -> (...)."""
    return h @ u + c


def minimal_move(h: torch.Tensor, u: torch.Tensor, c: torch.Tensor, mu: float) -> torch.Tensor:
    """δ = max(0, μ - m(h)) / ||u||² · u, the smallest δ with m(h + δ) >= μ: (..., C) -> (..., C)."""
    norm2 = (u * u).sum()
    if not norm2 > 0:
        raise ValueError("the head's two classes have the same weights (u = 0): there is no boundary to move across")
    gap = (mu - margin(h, u, c)).clamp(min=0)                               # (...)
    return gap[..., None] * (u / norm2)                                     # (..., C)


def jam_adjust(model: GPT, head: Discriminator, target: int | str, config: JAMConfig = JAMConfig()) -> LogitAdjust:
    """The logit adjustment of JAM for `steered_generate`: logits + lm_head(δ(h)), i.e. the head applied to h + δ."""
    head.check_model(model)
    u, c = head_direction(head, target)
    u, c = u.to(model.device), c.to(model.device)

    def adjust(h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:      # (B, C), (B, V)
        delta = minimal_move(h.float(), u.float(), c.float(), config.margin)  # (B, C)
        return logits + model.lm_head_reference(delta.to(h.dtype)).float()  # the head is linear: W(h+δ) = Wh + Wδ

    return adjust


@torch.no_grad()
def steered_generate(model: GPT, input_ids: torch.Tensor, *, max_new_tokens: int,
                     adjust: Optional[LogitAdjust] = None, do_sample: bool = True, temperature: float = 1.0,
                     top_k: Optional[int] = 10, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Prompt (B, T) -> prompt + continuation (B, T + max_new_tokens), sampling each token from the logits of the
    last position after `adjust(h, logits)` (None: plain sampling, the same numbers as minigpt.generate with
    preallocate=False). One forward pass per token over the growing past."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    ids, past, result = input_ids, None, [input_ids]
    for _ in range(max_new_tokens):
        out = model(ids, past_key_values=past, output_hidden_states=adjust is not None)
        past = out.past_key_values
        logits = out.logits[:, -1, :].float()                               # (B, V)
        if adjust is not None:
            logits = adjust(out.hidden_states[-1][:, -1, :], logits)        # h: (B, C), after ln_f
        tok = sample_next_token(logits, do_sample=do_sample, temperature=temperature, top_k=top_k,
                                generator=generator)
        result.append(tok[:, None].to(input_ids.dtype))
        ids = tok[:, None]
    return torch.cat(result, 1)
