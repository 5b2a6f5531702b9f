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
length bias Dr. GRPO and DAPO point out).

The batch and its micro-batches. A step's batch is P prompts, P·G completions. It is cut into grad_accum ×
world_size micro-batches of whole groups (each group's Â needs the whole group, so a group is never split); each
process samples, scores and back-propagates its own micro-batches. Every normaliser above is the whole batch's
(N_tokens and B = P·G summed over micro-batches and processes), so the micro-batches' losses sum to the batch's
loss and the summed gradients are its gradient, whatever the split. Differs from TRL, where bnpo normalises by each
micro-batch's own token count (so its loss depends on the accumulation); here bnpo and dapo coincide. The
gradients of the processes are then summed (all_reduce_sum; the losses already carry the global normaliser, so
this is DDP's average × world_size, as minigpt.train does it). Each micro-batch is sampled in one call of
`minigpt.generate` with its own generator, seeded from the run's seed generator by the micro-batch's place in the
step, so 2 processes sample what 1 process with grad_accum 2 samples, and the sampled batch does not depend on
which process takes which micro-batch.

As in TRL, std is the unbiased (Bessel) one and ε = 1e-4; with scale "batch" the mean is still the group's and the
std the batch's. π_ref is the base model: the LoRA adapters switched off (`techniques.lora.lora_disabled`), so one
model sits in memory, not two. Where β = 0 π_ref is not computed at all (as in TRL).
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch

from minigpt import (PRECISIONS, Processes, TrainingInterrupted, TrainState, all_reduce_sum, autocast, comm_device,
                     generate, load_train_state, resolve_precision, save_train_state, setup_processes)
from techniques.lora import lora_disabled, lora_parameters

__all__ = ["GRPOConfig", "LOSS_TYPES", "SCALES", "group_advantages", "kl_k3", "per_token_loss", "aggregate",
           "grpo_loss", "completion_logps", "sample_group", "check_rewards", "Rollout", "rollout",
           "accumulate_gradients", "grpo_train"]

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
    precision: str = "fp32"           # fp32 | bf16 | fp16 | auto: the policy's forward passes under autocast
    grad_accum: int = 1               # micro-batches (of whole groups) per process, summed into each step
    save_every: Optional[int] = None  # steps between checkpoints (None: none)
    checkpoint_dir: Optional[str] = None  # where they go (replaced atomically each time)
    resume_from: Optional[str] = None     # a checkpoint to continue exactly

    def check(self) -> None:
        if self.num_generations < 2:
            raise ValueError(f"num_generations (G) = {self.num_generations}: GRPO needs G >= 2 to form an advantage")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; choose one of {LOSS_TYPES}")
        if self.scale_rewards not in SCALES:
            raise ValueError(f"unknown scale_rewards {self.scale_rewards!r}; choose one of {SCALES}")
        if self.num_iterations < 1:
            raise ValueError("num_iterations (μ) must be >= 1")
        if self.precision != "auto" and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be auto or one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.precision == "fp16":
            raise ValueError("precision fp16 needs loss scaling, which grpo_train does not do; use bf16 (same "
                             "autocast, the fp32 exponent range) or fp32")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1 micro-batch per step, got {self.grad_accum}")
        if self.save_every is not None and (self.save_every < 1 or not self.checkpoint_dir):
            raise ValueError("save_every needs a checkpoint_dir and must be >= 1 step")

    def settings(self) -> dict:
        """The values that shape the run's steps: a resumed run must share them (compared on resume)."""
        skip = ("history", "save_every", "checkpoint_dir", "resume_from")
        return {k: v for k, v in asdict(self).items() if k not in skip}


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
              num_items: Optional[float] = None, num_seqs: Optional[int] = None) -> torch.Tensor:
    """Reduce ℓ [N, L] over the completion mask [N, L] as `loss_type` says (module docstring).

    num_items (completion tokens) and num_seqs (completions) are the whole batch's when ℓ is one micro-batch of
    it (grad accumulation, several processes): the micro-batches' losses then sum to the whole batch's loss.
    None: this tensor is the whole batch (mask.sum(), N)."""
    mask = mask.to(loss.dtype)
    n_seq = loss.size(0) if num_seqs is None else num_seqs
    n_tok = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=loss.dtype)
    if loss_type == "grpo":
        return ((loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / n_seq
    if loss_type in ("bnpo", "dapo"):
        return (loss * mask).sum() / n_tok.clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (loss * mask).sum() / (n_seq * max_completion_length)
    raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, cfg: GRPOConfig, num_items=None,
              num_seqs=None) -> torch.Tensor:
    """The aggregated GRPO loss of one (micro-)batch (per_token_loss, then aggregate)."""
    ell = per_token_loss(logp, old_logp, advantages, ref_logp, beta=cfg.beta,
                         epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high)
    return aggregate(ell, mask, cfg.loss_type, cfg.max_completion_length, num_items, num_seqs)


def completion_logps(model, seqs: torch.Tensor, attention: torch.Tensor, T_prompt: int,
                     precision: str = "fp32") -> torch.Tensor:
    """log π(o_t | q, o_<t) of each completion token, [N, L], from one teacher-forced forward pass.

    The forward pass runs under autocast for bf16/fp16 (minigpt.autocast); the log-softmax over the vocabulary
    and everything after it in fp32, as minigpt.causal_lm_loss does."""
    with autocast(seqs.device, precision):
        logits = model(seqs, attention_mask=attention).logits[:, T_prompt - 1:-1]   # (N, L, V)
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, seqs[:, T_prompt:, None]).squeeze(-1)


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
def sample_group(model, tokenizer, prompts: Sequence[str], cfg: GRPOConfig, generator=None, precision="fp32"):
    """G completions of every prompt, the whole batch at once through `minigpt.generate`.

    Returns (seqs [B·G, T+L], attention [B·G, T+L], completion mask [B·G, L] ending at eos (eos counted,
    as in TRL), completion texts). Rows of one prompt are consecutive."""
    eos = tokenizer.eot_id
    ids, pmask = _left_pad(tokenizer, prompts, model.config.n_positions, cfg.max_completion_length,
                           next(model.parameters()).device)
    ids, pmask = ids.repeat_interleave(cfg.num_generations, 0), pmask.repeat_interleave(cfg.num_generations, 0)
    T = ids.size(1)
    with autocast(ids.device, precision):  # the sampler's forward passes; its softmax is fp32 (generate)
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


@dataclass
class Rollout:
    """One micro-batch of whole groups, sampled by π_old and scored: n = groups × G rows, consecutive by group."""
    seqs: torch.Tensor            # (n, T + L) prompt (left-padded) + completion
    attention: torch.Tensor       # (n, T + L)
    cmask: torch.Tensor           # (n, L) the completion tokens, up to and including eos
    T: int                        # prompt length (padded)
    rewards: torch.Tensor         # (n,)
    old: Optional[torch.Tensor]   # (n, L) log π_old; None where μ = 1 (π_old is π_θ itself: logp.detach())
    ref: Optional[torch.Tensor]   # (n, L) log π_ref (adapters off); None where β = 0
    texts: list
    advantages: Optional[torch.Tensor] = None   # (n,) Â, set once the whole batch's rewards are known


@torch.no_grad()
def rollout(model, tokenizer, prompts: Sequence[str], reward: Reward, cfg: GRPOConfig, generator=None,
            precision: str = "fp32") -> Rollout:
    """Sample G completions of each prompt, score them, and keep log π_old (and log π_ref where β > 0).

    With μ = 1 the one update pass starts from the policy that sampled the batch, so log π_old is the pass's own
    log π_θ, detached (ρ = 1 exactly, as TRL does): no extra forward pass, and dropout's masks (the update pass
    runs in train mode) cannot make ρ differ from 1. With μ > 1 it is computed here, once, in eval mode."""
    model.eval()
    seqs, attention, cmask, texts = sample_group(model, tokenizer, prompts, cfg, generator, precision)
    T = seqs.size(1) - cmask.size(1)
    r = check_rewards(reward(texts), len(texts)).to(seqs.device)
    old = completion_logps(model, seqs, attention, T, precision) if cfg.num_iterations > 1 else None
    ref = None
    if cfg.beta != 0.0:
        with lora_disabled(model):
            ref = completion_logps(model, seqs, attention, T, precision)
    return Rollout(seqs, attention, cmask, T, r, old, ref, texts)


def accumulate_gradients(model, rollouts: Sequence[Rollout], cfg: GRPOConfig, num_items, num_seqs: int,
                         precision: str = "fp32") -> tuple[float, torch.Tensor]:
    """One update pass's backward over this process's micro-batches, gradients added into .grad.

    Each micro-batch's loss is aggregated with the whole batch's normalisers (num_items completion tokens,
    num_seqs completions), so the losses, and the gradients, sum to the whole batch's.
    Returns (this process's share of the loss, the sums [Σ M·KL, Σ M·clipped, Σ M] for the step's record)."""
    model.train()
    loss_sum, stats = 0.0, torch.zeros(3, dtype=torch.float64)
    for ro in rollouts:
        logp = completion_logps(model, ro.seqs, ro.attention, ro.T, precision)   # (n, L) fp32, with grad
        old = ro.old if ro.old is not None else logp.detach()                   # μ = 1: π_old = π_θ
        loss = grpo_loss(logp, old, ro.ref, ro.advantages, ro.cmask, cfg, num_items, num_seqs)
        loss.backward()
        loss_sum += float(loss.detach())
        with torch.no_grad():
            m = ro.cmask.to(logp.dtype)
            rho = torch.exp(logp - old)
            clipped = ((rho < 1 - cfg.epsilon_low) | (rho > 1 + cfg.epsilon_high)).to(m.dtype)
            kl = (kl_k3(logp, ro.ref) * m).sum() if ro.ref is not None else m.new_zeros(())
            stats += torch.stack([kl, (clipped * m).sum(), m.sum()]).double().cpu()
    return loss_sum, stats


def _split(items: list, parts: int) -> list[list]:
    """`items` in `parts` consecutive pieces whose sizes differ by at most one."""
    q, rem = divmod(len(items), parts)
    cuts = [0]
    for k in range(parts):
        cuts.append(cuts[-1] + q + (k < rem))
    return [items[cuts[k]:cuts[k + 1]] for k in range(parts)]


def _all_reduce_grads(params, procs: Processes, device) -> None:
    """Sum every gradient over the processes, in one flat buffer (each loss already has the global normaliser)."""
    comm = comm_device(device)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]).to(comm), procs).to(device)
    for p, g in zip(params, flat.split([q.numel() for q in params])):
        p.grad = g.view_as(p).clone()


def _broadcast_rank0(params, procs: Processes, device) -> None:
    """Every process starts from rank 0's values (a sum in which the other ranks give zeros)."""
    comm = comm_device(device)
    with torch.no_grad():
        for p in params:
            t = p.detach().to(comm).clone() if procs.is_main else torch.zeros_like(p, device=comm)
            p.copy_(all_reduce_sum(t, procs).to(device))


def grpo_train(model, tokenizer, prompts: Sequence[str], reward: Reward, cfg: GRPOConfig,
               batch_prompts: int = 2, progress: bool = False, run_info: Optional[dict] = None) -> list[dict]:
    """Train the adapter parameters of `model` (LoRA, DoRA, QLoRA) by GRPO for cfg.steps steps; returns the
    history, one dict a step.

    Each step: the next `batch_prompts` prompts (cycled), cut into micro-batches of whole groups (module
    docstring); each micro-batch sampled with π_old = the model now and scored; Â from the whole batch's rewards;
    then μ = num_iterations AdamW steps on that batch, each the sum of the micro-batches' gradients over every
    process. Under torchrun every process must call it with the same prompts and config.
    With cfg.save_every the whole state (adapter parameters, AdamW, the seed generator of the sampling, torch's
    generators, step, history) is checkpointed through minigpt.save_train_state into cfg.checkpoint_dir;
    cfg.resume_from continues such a checkpoint exactly (the same steps, bit for bit, as the uninterrupted run;
    `run_info`, the caller's JSON-able description of its set-up, must equal the saved one).
    The record of a step: loss, reward_mean/std, kl (the policy's mean KL_k3 to π_ref before the step's last
    update), clip_frac, completion_length, and t_sample / t_update (seconds: sampling and scoring; the updates)."""
    cfg.check()
    params = lora_parameters(model)
    if not params:
        raise ValueError("the model has no LoRA adapters: apply techniques.lora.apply_lora first")
    device = params[0].device
    procs = setup_processes(device)
    W, A_k, G = procs.world_size, cfg.grad_accum, cfg.num_generations
    if batch_prompts < W * A_k:
        raise ValueError(f"batch_prompts = {batch_prompts} prompts cannot fill {A_k} micro-batch(es) on each of {W} "
                         "process(es) (a group is never split): give at least grad_accum x processes prompts a step")
    precision = resolve_precision(cfg.precision, device)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    if procs.several:
        _broadcast_rank0(params, procs, device)
        torch.manual_seed(cfg.seed + procs.rank)  # dropout: each process its own masks
    digest = hashlib.sha256("\x00".join(prompts).encode("utf-8")).hexdigest()[:16]
    settings = {**cfg.settings(), "precision": precision, "processes": W, "batch_prompts": batch_prompts,
                "prompts": len(prompts), "prompts_sha256": digest}
    saving = dict(params=params, optimizer=opt, scaler=None, settings=settings, run=run_info or {}, device=device,
                  procs=procs)
    g = torch.Generator().manual_seed(cfg.seed)  # draws each micro-batch's sampling seed: the same on every process
    state = TrainState(data_rng=g.get_state())
    if cfg.resume_from:
        state = load_train_state(cfg.resume_from, **saving)
        g.set_state(state.data_rng)
    comm = comm_device(device)
    saved = None
    steps = range(state.step, cfg.steps)
    if progress and procs.is_main:
        from tqdm import tqdm
        steps = tqdm(steps, desc="grpo", initial=state.step, total=cfg.steps)
    try:
        for step in steps:
            t0 = time.perf_counter()
            start = (step * batch_prompts) % len(prompts)
            batch = [prompts[(start + i) % len(prompts)] for i in range(batch_prompts)]
            seeds = torch.randint(0, 2 ** 62, (W * A_k,), generator=g).tolist()   # one per micro-batch
            parts = _split(list(range(batch_prompts)), W * A_k)                    # prompt indices of each
            mine = [m * W + procs.rank for m in range(A_k)]                        # as minigpt.train deals them
            rollouts = [rollout(model, tokenizer, [batch[i] for i in parts[j]], reward, cfg,
                                torch.Generator(device=device).manual_seed(seeds[j]), precision) for j in mine]
            # the whole batch's rewards on every process: each fills in its own rows, the sum adds zeros elsewhere
            r_all = torch.zeros(batch_prompts * G, dtype=torch.float32, device=comm)
            for j, ro in zip(mine, rollouts):
                r_all[parts[j][0] * G:(parts[j][-1] + 1) * G] = ro.rewards.float().to(comm)
            r_all = all_reduce_sum(r_all, procs)
            A_all = group_advantages(r_all, G, cfg.scale_rewards)                 # (P·G,) each group whole
            for j, ro in zip(mine, rollouts):
                ro.advantages = A_all[parts[j][0] * G:(parts[j][-1] + 1) * G].to(device)
            n_tok = all_reduce_sum(torch.tensor(float(sum(int(ro.cmask.sum()) for ro in rollouts)), device=comm),
                                   procs).item()
            t_sample = time.perf_counter() - t0
            for _ in range(cfg.num_iterations):
                opt.zero_grad(set_to_none=True)
                loss, stats = accumulate_gradients(model, rollouts, cfg, n_tok, batch_prompts * G, precision)
                if procs.several:
                    _all_reduce_grads(params, procs, device)
                opt.step()
            total = all_reduce_sum(torch.cat([torch.tensor([loss], dtype=torch.float64), stats]).to(comm), procs)
            loss, kl_sum, clip_sum, m_sum = total.tolist()
            rec = {"step": step + 1, "loss": loss, "reward_mean": float(r_all.mean()),
                   "reward_std": float(r_all.std()), "kl": kl_sum / m_sum if cfg.beta != 0.0 else None,
                   "clip_frac": clip_sum / m_sum, "completion_length": m_sum / (batch_prompts * G),
                   "t_sample": t_sample, "t_update": time.perf_counter() - t0 - t_sample}
            state.history.append(rec)
            state.step = step + 1
            if cfg.save_every and state.step % cfg.save_every == 0:
                state.data_rng = g.get_state()
                save_train_state(cfg.checkpoint_dir, state, **saving)
                saved = state.step
            if progress and procs.is_main:
                steps.set_postfix(r=f"{rec['reward_mean']:.3f}±{rec['reward_std']:.3f}", kl=rec["kl"],
                                  clip=f"{rec['clip_frac']:.2f}", len=f"{rec['completion_length']:.1f}")
    except KeyboardInterrupt:
        if saved is None:
            raise
        raise TrainingInterrupted(
            f"interrupted after step {state.step} of {cfg.steps}; the last checkpoint (step {saved}) is in "
            f"{cfg.checkpoint_dir}: resume with --resume {cfg.checkpoint_dir} (the same command and options)") from None
    model.eval()
    return state.history
