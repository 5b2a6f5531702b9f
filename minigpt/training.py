"""One small training loop shared by every technique.

It trains whatever `params` it is given (LoRA's A and B, a prefix table, a
discriminator head) with a loss function the caller supplies, so the loop knows
nothing about any one technique:

    history = train(params, loss_fn, train_examples, eval_examples=..., config=TrainConfig(...))

AdamW, linear warmup then linear decay to 0, gradient clipping, a periodic
eval loss, a tqdm progress bar and a loss history (list of dicts, saved as
JSON for the demos' plots). Batches are drawn with a seeded generator, so a
run is reproducible.

Data helpers for causal language modelling live here too: plain text cut into
blocks, prompt -> completion pairs with the loss on the completion only, and a
loader for .txt / .jsonl files that names the file and line of any problem.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .io import atomic_save_dir, write_json
from .past import extend_mask
from .tokenizer import EOT_ID, Tokenizer

IGNORE = -100  # cross_entropy's ignore_index: positions that are not targets

__all__ = ["TrainConfig", "train", "plan_steps", "evaluate", "Example", "causal_lm_loss", "collate_lm", "examples_from_text",
           "examples_from_pairs", "load_lm_data", "split_examples", "save_history", "lm_loss_fn"]


# ---- the loss --------------------------------------------------------------------------
class _CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over the rows whose target is not IGNORE, with its gradient written out:

        loss = -(1/n) Σ_i log softmax(z_i)[t_i]        dloss/dz_i = (softmax(z_i) - onehot(t_i)) / n

    (rows with target IGNORE get a zero gradient). The same numbers as F.cross_entropy(..., ignore_index),
    computed with less memory traffic: the forward keeps only log softmax(z) [N, V], and the backward turns
    that tensor into the gradient in place (exp, scale, subtract at the targets), where autograd's generic
    path allocates and fills two more [N, V] tensors (the NLL gradient, then the log-softmax gradient).
    For GPT-2's vocabulary at 8 x 128 tokens each such tensor is 196 MiB.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # logits [N, V] float, targets [N]
        logp = logits.log_softmax(-1)                                     # (N, V)
        counted = targets != IGNORE                                        # (N,)
        n = counted.sum()
        picked = logp.gather(-1, targets.clamp(min=0)[:, None])[:, 0]     # (N,) log p(t_i); IGNORE rows masked next
        loss = -(picked * counted).sum() / n
        ctx.save_for_backward(logp, targets, counted, n)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        logp, targets, counted, n = ctx.saved_tensors
        scale = (grad_loss / n) * counted.to(logp.dtype)                  # (N,): 0 on IGNORE rows
        grad = logp.exp_().mul_(scale[:, None])                           # softmax(z) * scale, in place
        rows = counted.nonzero()[:, 0]
        grad[rows, targets[rows]] -= scale[rows]                           # - onehot(t) * scale
        return grad, None


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from positions <= t.

    logits [B, T, V], input_ids [B, T]; loss_mask [B, T] marks the tokens that
    count as targets (1) — e.g. the completion of a prompt -> completion pair.
    The targets are shifted left (the last position predicts nothing, -100),
    rather than the logits right, so the [B, T, V] logits are never copied.
    """
    targets = F.pad(input_ids[:, 1:], (0, 1), value=IGNORE)  # (B, T): token t+1 is position t's target
    if loss_mask is not None:
        counted = F.pad(loss_mask[:, 1:], (0, 1), value=0)
        targets = targets.masked_fill(counted == 0, IGNORE)
    if not bool((targets != IGNORE).any()):
        return logits.sum() * 0.0  # nothing to learn from in this batch: zero loss, zero gradient
    return _CrossEntropy.apply(logits.flatten(0, 1).float(), targets.flatten())


def lm_loss_fn(model, past_fn: Optional[Callable] = None) -> Callable[[dict], torch.Tensor]:
    """loss_fn for `train` over batches from `collate_lm`. `past_fn(batch_size)`
    may return (past_key_values, n_past) to prepend, as prefix tuning does."""
    def loss_fn(batch):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        past = None
        if past_fn is not None:
            past, n_past = past_fn(ids.size(0))
            mask = extend_mask(mask, before=n_past)
        out = model(ids, attention_mask=mask, past_key_values=past)
        return causal_lm_loss(out.logits, ids, batch["loss_mask"])
    return loss_fn


# ---- data ------------------------------------------------------------------------------
@dataclass
class Example:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is a training target


def examples_from_text(ids: Sequence[int], block_size: int, source: str = "text") -> list[Example]:
    """Cut one long token stream into non-overlapping blocks of block_size tokens."""
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    if len(ids) < block_size:
        raise ValueError(f"{source}: {len(ids)} tokens is shorter than one block of {block_size}; "
                         "give more text or a smaller --block-size")
    return [Example(list(ids[i:i + block_size]), [1] * block_size)
            for i in range(0, len(ids) - block_size + 1, block_size)]


def examples_from_pairs(tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]], max_len: int) -> list[Example]:
    """prompt -> completion pairs as `prompt completion<|endoftext|>`, loss on the completion only."""
    out = []
    for prompt, completion in pairs:
        p, c = tokenizer.encode(prompt), tokenizer.encode(completion) + [EOT_ID]
        if len(p) >= max_len:
            raise ValueError(f"pair {len(out) + 1}: the prompt alone is {len(p)} tokens, which fills the block of "
                             f"{max_len}, leaving no completion token to learn; shorten it or raise the block size")
        ids = (p + c)[:max_len]
        out.append(Example(ids, ([0] * len(p) + [1] * len(c))[:max_len]))
    return out


def collate_lm(examples: Sequence[Example], pad_id: int = EOT_ID) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask and loss_mask, all [B, T]."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), T), dtype=torch.long)
    loss = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        attn[i, :n] = 1
        loss[i, :n] = torch.tensor(e.loss_mask)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def load_lm_data(path: str | os.PathLike, tokenizer: Tokenizer, block_size: int,
                 prompt_field: str = "prompt", completion_field: str = "completion") -> list[Example]:
    """A .txt file (cut into blocks) or a .jsonl file of {"prompt": ..., "completion": ...}.

    Errors name the file and, for JSONL, the line: a missing or empty file,
    bytes that are not UTF-8, text shorter than one block, a line that is not
    JSON or lacks a field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise ValueError(f"{path} is empty")
    if path.suffix == ".jsonl":
        pairs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
            for f in (prompt_field, completion_field):
                if not isinstance(row, dict) or not isinstance(row.get(f), str):
                    raise ValueError(f"{path}, line {n}: needs a string field {f!r}")
            pairs.append((row[prompt_field], row[completion_field]))
        return examples_from_pairs(tokenizer, pairs, block_size)
    return examples_from_text(tokenizer.encode(text), block_size, source=str(path))


def split_examples(examples: list, eval_fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """Seeded shuffle, then hold out eval_fraction (at least one example when there are two or more)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=g).tolist()
    n_eval = min(len(examples) - 1, max(1, round(len(examples) * eval_fraction))) if len(examples) > 1 else 0
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


# ---- the loop --------------------------------------------------------------------------
@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: Optional[int] = None   # exactly this many optimizer steps (overrides epochs; the data is cycled)
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    decay: bool = True                # linear decay to 0 after warmup
    grad_clip: Optional[float] = 1.0
    eval_every: int = 50              # steps between eval losses (and one at the end)
    seed: int = 0
    progress: bool = True
    device: Optional[str] = None      # where batches go; None = where the params are

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1 step, got {self.eval_every}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 (or None for whole epochs), got {self.max_steps}")


def plan_steps(n_examples: int, config: TrainConfig) -> tuple[int, float]:
    """(optimizer steps, epochs they make) for n_examples: max_steps when given, else whole epochs."""
    per_epoch = math.ceil(n_examples / config.batch_size)
    total = config.max_steps if config.max_steps is not None else per_epoch * config.epochs
    return total, total / per_epoch


def _lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if not cfg.decay:
        return 1.0
    return max(0.0, (total - step) / max(1, total - cfg.warmup_steps))


def _to(batch, device):
    if isinstance(batch, dict):
        return {k: v.to(device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(v.to(device) for v in batch)
    return batch.to(device)


@torch.no_grad()
def evaluate(loss_fn, examples, batch_size, collate_fn, device, eval_modules=()) -> float:
    """Mean loss over `examples`, with `eval_modules` in eval mode (no dropout) meanwhile."""
    modes = [m.training for m in eval_modules]
    for m in eval_modules:
        m.eval()
    total, n = 0.0, 0
    try:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            total += float(loss_fn(_to(collate_fn(chunk), device))) * len(chunk)
            n += len(chunk)
    finally:
        for m, mode in zip(eval_modules, modes):
            m.train(mode)
    return total / max(1, n)


def train(params, loss_fn: Callable, train_examples: Sequence, *, eval_examples: Sequence = (),
          config: TrainConfig = TrainConfig(), collate_fn: Callable = collate_lm,
          eval_modules: Sequence[torch.nn.Module] = ()) -> list[dict]:
    """Optimise `params` (only those that require grad) to lower loss_fn(batch).

    `eval_modules` (e.g. the model) are switched to eval mode for the eval loss,
    so dropout does not blur it, and back afterwards.

    Returns the history: one dict per step {step, epoch, loss, lr, grad_norm},
    with eval_loss added every `eval_every` steps and at the end.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad (did you apply the technique first?)")
    if not len(train_examples):
        raise ValueError("no training examples")
    device = torch.device(config.device) if config.device else params[0].device
    torch.manual_seed(config.seed)
    g = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    total, epochs = plan_steps(len(train_examples), config)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, config))

    history, step = [], 0
    bar = tqdm(total=total, disable=not config.progress, desc="train", unit="step")
    for epoch in range(math.ceil(epochs)):
        order = torch.randperm(len(train_examples), generator=g).tolist()
        for i in range(0, len(order), config.batch_size):
            if step >= total:
                break
            batch = _to(collate_fn([train_examples[j] for j in order[i:i + config.batch_size]]), device)
            loss = loss_fn(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip else float("inf"))
            opt.step()
            record = {"step": step, "epoch": epoch, "loss": loss.item(), "lr": opt.param_groups[0]["lr"],
                      "grad_norm": float(gn)}
            sched.step()
            step += 1
            if eval_examples and (step % config.eval_every == 0 or step == total):
                record["eval_loss"] = evaluate(loss_fn, eval_examples, config.batch_size, collate_fn, device,
                                              eval_modules)
            history.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}",
                            **({"eval": f"{record['eval_loss']:.3f}"} if "eval_loss" in record else {}))
    bar.close()
    return history


def save_history(history: list[dict], directory: str | os.PathLike, name: str = "history.json") -> Path:
    """Write the loss history as JSON (atomically) for plots."""
    with atomic_save_dir(directory) as tmp:
        write_json({"history": history}, tmp / name)
    return Path(directory) / name
