"""What two steps of the tour share: continuations of a list of prompts (the samples before and after LoRA
and the prefix), the loss-curve figure (LoRA and prefix training), the E2E yardstick (the share of a
record's values an output names: prefix tuning and the hybrid) and the bag-word marking of a text (PPLM and
the hybrid). A step imports these, never another step.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from minigpt import EOT_ID, GPT, generate
from minigpt.tokenizer import Tokenizer

from ..common import moving_average, new_figure, save_figure
from .context import TourContext, _encode, _r


def _sample_texts(ctx: TourContext, model: GPT, prompts: Sequence[str], n_tokens: int, offset: int,
                  past_fn: Callable | None = None, **knobs) -> list[str]:
    """One continuation per prompt (the new text only), each from generator seed + offset + i."""
    out = []
    for i, prompt in enumerate(prompts):
        ids = _encode(ctx, prompt)
        past = past_fn() if past_fn else None
        with torch.no_grad():
            seq = generate(model, ids, max_new_tokens=n_tokens, eos_token_id=EOT_ID, past_key_values=past,
                           generator=ctx.generator(offset + i), **knobs)
        out.append(ctx.tokenizer.decode([t for t in seq[0, ids.size(1):].tolist() if t != EOT_ID]))
    return out


def _loss_figure(history: list[dict], eval_before: float, path: Path, title: str,
                 baseline: tuple[str, float] | None = None) -> Path:
    """Train loss per step (and its moving average) and held-out loss at each evaluation, from step 0;
    `baseline` (label, loss) adds a dashed reference line."""
    fig = new_figure()
    ax = fig.subplots()
    steps = [h["step"] + 1 for h in history]
    losses = [h["loss"] for h in history]
    ax.plot(steps, losses, color="#4c72b0", alpha=0.3, lw=1, label="train (per step)")
    ax.plot(steps, moving_average(losses, max(1, len(losses) // 20)), color="#4c72b0", lw=2,
            label="train (moving average)")
    ev = [(0, eval_before)] + [(h["step"] + 1, h["eval_loss"]) for h in history if "eval_loss" in h]
    ax.plot([e[0] for e in ev], [e[1] for e in ev], "o-", color="#dd8452", lw=2, label="eval (held out)")
    if baseline is not None:
        ax.axhline(baseline[1], color="#777", ls="--", lw=1, label=baseline[0])
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return save_figure(fig, path, title)


def mr_values(mr: str) -> list[str]:
    """The slot values of a meaning representation, except familyFriendly's yes/no (never said literally)."""
    out = []
    for part in mr.split("],"):
        key, _, value = part.partition("[")
        value = value.rstrip("]").strip()
        if value and key.strip() != "familyFriendly":
            out.append(value)
    return out


def slot_recall(mr: str, text: str) -> float:
    """Share of the record's values that appear in the text (case-insensitive): a rough yardstick."""
    values = mr_values(mr)
    return sum(v.lower() in text.lower() for v in values) / len(values) if values else float("nan")


def mean_slot_recall(mrs: Sequence[str], texts: Sequence[str]) -> float:
    """slot_recall averaged over inputs and their outputs, one text per input (rounded for the summary)."""
    if len(mrs) != len(texts):
        raise ValueError(f"{len(mrs)} inputs but {len(texts)} outputs")
    return _r(sum(slot_recall(mr, t) for mr, t in zip(mrs, texts)) / len(mrs))


def _spans(tok: Tokenizer, ids: Sequence[int], bag_ids: set) -> list[tuple[str, bool]]:
    """The text of ids as (token, is a bag word) pairs, <|endoftext|> left out: the report marks the bag's words."""
    return [(tok.decode([i]), i in bag_ids) for i in ids if i != EOT_ID]
