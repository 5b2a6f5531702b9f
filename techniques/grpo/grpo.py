"""GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300, sec. 4.1) on a LoRA-adapted minigpt GPT, by hand.

For each prompt q, sample a group of G completions o_1..o_G from π_old (the policy as it was when the batch was
sampled), score them, and take μ clipped policy-gradient passes over that batch:

    Â_i   = (r_i − mean(r_group)) / (std(r) + ε)                     advantages (scale: "group" | "batch" | "none")
    ρ_i,t = π_θ(o_i,t | q, o_i,<t) / π_old(o_i,t | q, o_i,<t)          the ratio, per token
    KL_k3 = exp(ref − logp) − (ref − logp) − 1 ≥ 0                      k3 estimator of KL(π_θ ‖ π_ref), per token
    ℓ_i,t = −min(ρ·Â_i, clip(ρ, 1 − ε_low, 1 + ε_high)·Â_i) + β·KL_k3

and aggregate ℓ over the completion tokens (mask M) as TRL names it:
    grpo:    mean_i( Σ_t M ℓ / Σ_t M )          per-sequence mean, then mean over sequences (the paper's eq. 21)
    bnpo:    Σ M ℓ / Σ M                       token mean over the batch
    dr_grpo: Σ M ℓ / (B · L_max)               Dr. GRPO: a constant normaliser, no length bias
    dapo:    Σ M ℓ / N_tokens(global batch)    DAPO: token mean over the whole generation batch
Default here: "dapo", as TRL 1.16 defaults to it: "grpo" favours short wrong answers / long right ones (the
length bias Dr. GRPO and DAPO point out); one process here, so dapo's normaliser equals bnpo's.

As in TRL, std is the unbiased (Bessel) one and ε = 1e-4; with scale "batch" the mean is still the group's and the
std the batch's. π_ref is the base model: the LoRA adapters switched off (`techniques.lora.lora_disabled`), so one
model sits in memory, not two. Where β = 0 π_ref is not computed at all (as in TRL).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from minigpt import generate
from techniques.lora import lora_disabled, lora_parameters

__all__ = ["GRPOConfig", "LOSS_TYPES", "SCALES", "group_advantages", "kl_k3", "per_token_loss", "aggregate",
           "grpo_loss", "completion_logps", "sample_group", "check_rewards", "grpo_train"]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALES = ("group", "batch", "none")
Reward = Callable[[Sequence[str]], Sequence[float]]


@dataclass
class GRPOConfig:
    """GRPO's knobs, named as in TRL's GRPOConfig where it has them."""
    num_generations: int = 4          # G, completions per prompt
    max_completion_length: int = 16   # L_max
    beta: float = 0.04                # β, the KL coefficient
    epsilon_low: float = 0.2          # ε_low
    epsilon_high: float = 0.2         # ε_high
    num_iterations: int = 1           # μ, update passes per sampled batch
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    lr: float = 1e-3
    steps: int = 30
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: int = 0
    history: list = field(default_factory=list)

    def check(self) -> None:
        if self.num_generations < 2:
            raise ValueError(f"num_generations (G) = {self.num_generations}: GRPO needs G >= 2 to form an advantage")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; choose one of {LOSS_TYPES}")
        if self.scale_rewards not in SCALES:
            raise ValueError(f"unknown scale_rewards {self.scale_rewards!r}; choose one of {SCALES}")
        if self.num_iterations < 1:
            raise ValueError("num_iterations (μ) must be >= 1")


def group_advantages(rewards: torch.Tensor, G: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """Â_i = (r_i − mean of its group) / (std + ε), rewards [B·G] grouped consecutively -> [B·G]."""
    if rewards.numel() % G:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of G = {G}")
    groups = rewards.view(-1, G)                                     # (B, G)
    A = (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)      # (B·G,)
    if scale == "group":
        std = groups.std(dim=1).repeat_interleave(G)
    elif scale == "batch":
        std = rewards.std().expand_as(rewards)
    elif scale == "none":
        return A
    else:
        raise ValueError(f"unknown scale {scale!r}; choose one of {SCALES}")
    return A / (std + eps)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """KL_k3 = exp(ref − logp) − (ref − logp) − 1, per token (Schulman's k3; ≥ 0, 0 iff equal)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def per_token_loss(logp, old_logp, advantages, ref_logp=None, *, beta=0.0, epsilon_low=0.2, epsilon_high=0.2):
    """ℓ_t = −min(ρ·Â, clip(ρ, 1−ε_low, 1+ε_high)·Â) + β·KL_k3; logp, old_logp, ref_logp [N, L], Â [N]."""
    rho = torch.exp(logp - old_logp)                                  # (N, L)
    A = advantages[:, None]                                           # (N, 1)
    loss = -torch.min(rho * A, torch.clamp(rho, 1 - epsilon_low, 1 + epsilon_high) * A)
    if beta != 0.0:
        loss = loss + beta * kl_k3(logp, ref_logp)
    return loss


def aggregate(loss: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int,
              num_items: Optional[float] = None) -> torch.Tensor:
    """Reduce ℓ [N, L] over the completion mask [N, L] as `loss_type` says (module docstring)."""
    mask = mask.to(loss.dtype)
    if loss_type == "grpo":
        return ((loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (loss * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (loss * mask).sum() / (loss.size(0) * max_completion_length)
    if loss_type == "dapo":
        n = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=loss.dtype)
        return (loss * mask).sum() / n.clamp(min=1.0)
    raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, cfg: GRPOConfig) -> torch.Tensor:
    """The aggregated GRPO loss of one batch (per_token_loss, then aggregate)."""
    ell = per_token_loss(logp, old_logp, advantages, ref_logp, beta=cfg.beta,
                         epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high)
    return aggregate(ell, mask, cfg.loss_type, cfg.max_completion_length)


def completion_logps(model, seqs: torch.Tensor, attention: torch.Tensor, T_prompt: int) -> torch.Tensor:
    """log π(o_t | q, o_<t) of each completion token, [N, L], from one teacher-forced forward pass."""
    logits = model(seqs, attention_mask=attention).logits[:, T_prompt - 1:-1].float()   # (N, L, V)
    return torch.log_softmax(logits, dim=-1).gather(-1, seqs[:, T_prompt:, None]).squeeze(-1)


def _left_pad(tokenizer, prompts: Sequence[str], n_ctx: int, L: int, device):
    ids = [tokenizer.encode(p) for p in prompts]
    T = max(len(x) for x in ids)
    if T + L > n_ctx:
        raise ValueError(f"a prompt of {T} tokens + {L} completion tokens exceeds the context of {n_ctx}; "
                         "shorten the prompts or --max-completion-length")
    pad = tokenizer.eot_id
    batch = torch.tensor([[pad] * (T - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in ids], device=device)
    return batch, mask


@torch.no_grad()
def sample_group(model, tokenizer, prompts: Sequence[str], cfg: GRPOConfig, generator=None):
    """G completions of every prompt, the whole batch at once through `minigpt.generate`.

    Returns (seqs [B·G, T+L], attention [B·G, T+L], completion mask [B·G, L] ending at eos (eos counted,
    as in TRL), completion texts). Rows of one prompt are consecutive."""
    eos = tokenizer.eot_id
    ids, pmask = _left_pad(tokenizer, prompts, model.config.n_positions, cfg.max_completion_length,
                           next(model.parameters()).device)
    ids, pmask = ids.repeat_interleave(cfg.num_generations, 0), pmask.repeat_interleave(cfg.num_generations, 0)
    T = ids.size(1)
    out = generate(model, ids, max_new_tokens=cfg.max_completion_length, attention_mask=pmask, do_sample=True,
                   temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, eos_token_id=eos,
                   pad_token_id=eos, generator=generator)
    comp = out[:, T:]
    L = comp.size(1)
    is_eos = comp == eos
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], L, dtype=torch.long))
    cmask = (torch.arange(L, device=comp.device)[None] <= first[:, None]).long()   # (N, L): up to and incl. eos
    attention = torch.cat([pmask, cmask], dim=1)
    texts = [tokenizer.decode([t for t, m in zip(row.tolist(), mrow.tolist()) if m and t != eos])
             for row, mrow in zip(comp, cmask)]
    return out, attention, cmask, texts


def check_rewards(values, n: int) -> torch.Tensor:
    """The reward's output as a float tensor [n], or a clear error (wrong count, NaN, not a number)."""
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError) as e:
        raise ValueError(f"the reward returned something that is not a number ({e}); it must return floats") from e
    if len(values) != n:
        raise ValueError(f"the reward returned {len(values)} values for {n} completions; return one per text")
    if any(not math.isfinite(v) for v in values):
        raise ValueError("the reward returned NaN or inf; it must return finite floats")
    return torch.tensor(values)


def grpo_train(model, tokenizer, prompts: Sequence[str], reward: Reward, cfg: GRPOConfig,
               batch_prompts: int = 2, progress: bool = False) -> list[dict]:
    """Train the LoRA parameters of `model` by GRPO for cfg.steps steps; returns the history, one dict a step.

    Each step: sample G completions of `batch_prompts` prompts (π_old = the model now), score, form Â, then take
    μ = num_iterations AdamW steps on the same batch. The model must carry LoRA adapters (π_ref = adapters off)."""
    cfg.check()
    params = lora_parameters(model)
    if not params:
        raise ValueError("the model has no LoRA adapters: apply techniques.lora.apply_lora first")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    history = []
    steps = range(cfg.steps)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc="grpo")
    for step in steps:
        start = (step * batch_prompts) % len(prompts)
        batch = [prompts[(start + i) % len(prompts)] for i in range(batch_prompts)]
        model.eval()
        seqs, attention, cmask, texts = sample_group(model, tokenizer, batch, cfg, gen)
        T = seqs.size(1) - cmask.size(1)
        r = check_rewards(reward(texts), len(texts)).to(seqs.device)
        A = group_advantages(r, cfg.num_generations, cfg.scale_rewards)
        with torch.no_grad():
            old = completion_logps(model, seqs, attention, T)
            ref = None
            if cfg.beta != 0.0:
                with lora_disabled(model):
                    ref = completion_logps(model, seqs, attention, T)
        model.train()
        for _ in range(cfg.num_iterations):
            logp = completion_logps(model, seqs, attention, T)
            loss = grpo_loss(logp, old, ref, A, cmask, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            m = cmask.float()
            rho = torch.exp(logp.detach() - old)
            clipped = ((rho < 1 - cfg.epsilon_low) | (rho > 1 + cfg.epsilon_high)).float()
            kl = kl_k3(logp.detach(), ref) if ref is not None else None
        rec = {"step": step + 1, "loss": float(loss.detach()),
               "reward_mean": float(r.mean()), "reward_std": float(r.std()),
               "kl": float((kl * m).sum() / m.sum()) if kl is not None else None,
               "clip_frac": float((clipped * m).sum() / m.sum()), "completion_length": float(m.sum(1).mean())}
        history.append(rec)
        if progress:
            steps.set_postfix(r=f"{rec['reward_mean']:.3f}±{rec['reward_std']:.3f}", kl=rec["kl"],
                              clip=f"{rec['clip_frac']:.2f}", len=f"{rec['completion_length']:.1f}")
    model.eval()
    return history
