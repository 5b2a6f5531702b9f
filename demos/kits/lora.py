"""LoRA as the tour and the LoRA projects use it: the paper's adapter, its learning rate, training, loading
and sampling from the same seeds before and after.

LoRA (Hu et al. 2021, eq. 3) adds a trainable low-rank update to frozen weights: h = W0·x + (alpha/r)·B·A·x.
Here it is always the paper's GPT-2 setting, r = 8 and alpha = 16 on the query and value projections of every
c_attn (Hu et al. 2021, section 7.1 / Table 5). The paper's lr 2e-4 is for GPT-2 medium over thousands of
steps; the runs here have a few hundred, so they train at a higher rate (`lora_lr`).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Optional, Sequence

import torch

from minigpt import EOT_ID, Example, GPT, TrainConfig, generate, get_tokenizer, lm_loss_fn, resolve_precision, train
from minigpt.cli import describe_plan
from techniques.lora import apply_lora, load_adapter, lora_parameters, lora_summary

from ..common import finite_or_none
from .data import read_verses, verse_examples

__all__ = ["LORA", "lora_lr", "new_lora_model", "load_lora", "lora_train_config", "train_lora_parameters",
           "train_lora", "train_poem_lora", "sample_continuations"]

# Hu et al. 2021, section 7.1 / Table 5: r = 8, alpha = 16 on W_q and W_v.
LORA = dict(r=8, alpha=16, targets=["c_attn"], qkv="qv")


def lora_lr(model: GPT) -> float:
    """Peak learning rate for a few hundred LoRA steps: 2e-3 on models narrower than 512 (the bundled tiny
    model), 1e-3 on wider ones (GPT-2 sizes). The paper's 2e-4 is for GPT-2 medium over thousands of steps."""
    return 1e-3 if model.config.n_embd >= 512 else 2e-3


def new_lora_model(base: GPT) -> GPT:
    """A copy of `base` with the paper's LoRA (r=8, alpha=16 on q and v of every c_attn); `base` stays as it was.
    A's initialisation draws from torch's global generator; B starts at zero, so the copy computes what base does."""
    return apply_lora(copy.deepcopy(base), r=LORA["r"], alpha=LORA["alpha"], targets=LORA["targets"],
                      qkv=LORA["qkv"], verbose=False)


def load_lora(base: GPT, directory: str | Path) -> GPT:
    """A copy of `base` with the adapter saved in `directory` (peft's layout), in eval mode."""
    model = load_adapter(copy.deepcopy(base), directory)
    print(f"loaded the LoRA adapter from {directory}: {lora_summary(model)}")
    return model.eval()


def lora_train_config(model: GPT, *, steps: int, batch_size: int, eval_every: int, seed: int, precision: str,
                      progress: bool, lr: Optional[float] = None) -> TrainConfig:
    """The TrainConfig of a LoRA run: AdamW at `lr` (None = lora_lr(model), the projects' --lr default),
    `precision` resolved for the model's device (auto -> bf16 where native, else fp32)."""
    lr = lora_lr(model) if lr is None else lr
    if lr <= 0 or not math.isfinite(lr):
        raise ValueError(f"--lr must be a positive number, got {lr}")
    return TrainConfig(max_steps=steps, batch_size=batch_size, lr=lr, eval_every=eval_every, seed=seed,
                       progress=progress, precision=resolve_precision(precision, model.device))


def train_lora_parameters(model: GPT, train_ex: Sequence[Example], eval_ex: Sequence[Example],
                          config: TrainConfig) -> list[dict]:
    """Train the LoRA parameters (A and B) of a LoRA model with minigpt.train; returns the loss history.
    The model stays in eval mode (no dropout), so the loss curve and a before/after comparison see the same
    network."""
    model.eval()
    return train(lora_parameters(model), lm_loss_fn(model), list(train_ex), eval_examples=list(eval_ex),
                 config=config, eval_modules=[model])


def train_lora(base: GPT, train_ex: Sequence[Example], eval_ex: Sequence[Example], config: TrainConfig
               ) -> tuple[GPT, list[dict]]:
    """(a LoRA copy of `base` trained on train_ex, its loss history), printing the adapter and the plan.
    `base` is untouched."""
    model = new_lora_model(base).eval()
    print(lora_summary(model))
    print(describe_plan(len(train_ex), len(eval_ex), config), flush=True)
    history = train_lora_parameters(model, train_ex, eval_ex, config)
    return model.eval(), history


def train_poem_lora(base: GPT, config: TrainConfig, *, train_verses: Optional[int] = None,
                    dev_verses: Optional[int] = None) -> tuple[GPT, list[dict], dict]:
    """The poem adapter (the poetry project's, which the hybrid reuses): LoRA trained on the first
    `train_verses` verses of data/poem_sentiment's train split (None = all), the eval loss on the first
    `dev_verses` of the dev split, each verse read after "<|endoftext|>" (at most 64 tokens).
    Returns (LoRA model, history, what was done, for metrics.json)."""
    max_len = min(64, base.config.n_positions)
    train_ex = verse_examples(_first(read_verses("train"), train_verses), max_len)
    dev_ex = verse_examples(_first(read_verses("dev"), dev_verses), max_len)
    model, history = train_lora(base, train_ex, dev_ex, config)
    info = {"steps": len(history), "lr": config.lr, "batch_size": config.batch_size, "train_verses": len(train_ex),
            "dev_verses": len(dev_ex), "dev_loss_first_eval": _eval_loss(history, 0),
            "dev_loss_last_eval": _eval_loss(history, -1),
            "trainable_parameters": sum(p.numel() for p in lora_parameters(model))}
    return model, history, info


def _first(xs: list, n: Optional[int]) -> list:
    return xs if n is None else xs[:n]


def _eval_loss(history: list[dict], which: int) -> Optional[float]:
    ev = [h["eval_loss"] for h in history if "eval_loss" in h]
    return finite_or_none(ev[which]) if ev else None


@torch.no_grad()
def sample_continuations(model: GPT, prompts: Sequence[str], *, seed: int, max_new_tokens: int, prefix=None,
                         **knobs) -> list[str]:
    """One continuation per prompt (the new text only, stopping at "<|endoftext|>"); prompt i draws from its
    own generator seeded with seed + i, so two models given the same prompts see the same random numbers.
    knobs go to minigpt.generate (do_sample, temperature, top_k, ...); a prefix's past goes in front."""
    tok, out = get_tokenizer(), []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([tok.encode(prompt)], dtype=torch.long, device=model.device)    # (1, T)
        g = torch.Generator(device=model.device).manual_seed(seed + i)
        past = prefix.past_key_values(1) if prefix is not None else None
        seq = generate(model, ids, max_new_tokens=max_new_tokens, eos_token_id=EOT_ID, generator=g,
                       past_key_values=past, **knobs)
        out.append(tok.decode([t for t in seq[0, ids.size(1):].tolist() if t != EOT_ID]))
    return out
