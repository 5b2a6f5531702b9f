"""PPLM: steer GPT-2 by a gradient step on its past keys and values.

Dathathri et al., "Plug and Play Language Models" (ICLR 2020). The language
model p(x) stays frozen; an attribute model p(a|x) (a bag of words, or a linear
discriminator on the mean hidden state) says how well the next token fits the
attribute, and its gradient nudges the past H_t (every layer's keys and values)
before each token is drawn. Per generated token (the update of step 2 is the
paper's Eq. 3, written as descent on -log p(a|x) plus the KL term):

  1. Run the unperturbed model on the last token: p = p(x_{t+1} | H_t).
  2. Start from Δ = 0 and repeat num_iterations times:
       p̃    = softmax(logits of the last token under H_t + Δ)
       L    = attribute loss(p̃) + kl_scale · KL(p̃ || p)
              BoW:    -log Σ_{w in bag} p̃(w), summed over bags
              discr.: CE(head(mean of ln_f hidden states, with horizon_length soft tokens p̃·W_te)), class)
       g    = ∂L/∂Δ · window mask       (only the window of past positions moves; optional linear decay)
       Δ   -= stepsize · g / ‖g‖^gamma, the norm taken per layer over keys and values together;
              for BoW alone, ‖g‖ is the running maximum over the whole generation (as the reference).
  3. Run the last token under H_t + Δ: p̃ and the next past. The perturbed keys and
     values stay in the past that follows (the nudges accumulate over time).
  4. Fuse: p_out ∝ p̃^gm_scale · p^(1 - gm_scale); repetition penalty; top-k; sample or argmax.

This file reads in that order: the knobs and what step 2 reads; step 1; the pieces
of step 2's objective, then step 2 itself; step 3; step 4; the loop that runs them
for every token, and `generate`. The attribute models' data, and the
discriminator's persistence and training, are in attributes.py.

Names: `logits` / `logits_pert` are the current token's logits under H_t / H_t + Δ
(p and p̃ before the softmax); `hidden` / `hidden_pert` its last hidden state
(after ln_f) under each; `past_pert` the perturbed past, stacked
(L, 2, B, n_head, T, head_dim) as minigpt.stack_past lays it out.

Knobs and defaults are the reference's (uber-research/PPLM run_pplm.py): stepsize 0.02,
num_iterations 3, window_length 0 (= the whole past), decay off, gamma 1.5, kl_scale 0.01,
gm_scale 0.9, horizon_length 1, grad_length 10000, temperature 1.0, top_k 10 (0 = off),
greedy unless do_sample, repetition_penalty 1.0.

Where this differs from the reference, and why:
- KV cache. The reference recomputes the unperturbed model on the whole sequence at
  every token (O(n²)); here an unperturbed cache is carried beside the perturbed one,
  so each token costs 2 one-token forwards + num_iterations × (forward + backward).
- Batches. Rows are independent samples (or prompts, left-padded with a mask), and
  num_samples continues each prompt several times from one prompt pass. Every
  per-sample quantity of the reference is per row here: the BoW loss (the reference
  sums probabilities over the batch inside the log), the gradient norms (and their
  running max), the window, the discriminator's mean (over each row's real tokens).
- Window. The reference's window covers the OLDEST window_length positions
  (uber-research/PPLM#31); that stays the default (window_from="oldest"), and
  window_from="recent" moves the newest positions instead. As in the reference, a
  past no longer than the window is moved whole, without decay.
- Temperature. The reference divides only p̃'s logits by the temperature before
  fusing; here the fused distribution is tempered (p_out^(1/T)), so stepsize 0 is
  plain sampling at temperature T. Identical at the default T = 1.
- Fusion is computed in log space as logits_p + gm_scale·(log p̃ - log p), which is
  log(p̃^gm · p^(1-gm)) up to a constant: when p̃ is p, the logits reach the sampler
  bit for bit, so stepsize 0 (or gm_scale 0) gives exactly `minigpt.generate`'s tokens.
  Top-k and sampling are minigpt's `sample_next_token` (top-k on logits, not on
  probabilities; the same set of tokens).
- Repetition penalty (CTRL's, as in the transformers port of this script) divides a
  positive logit or multiplies a negative one for every token already in the row;
  it is applied to the fused logits, not to p̃ alone, so it acts on unperturbed text too.
- Steps that cannot move anything (stepsize 0, num_iterations 0, a step past
  grad_length, an empty past) skip the gradient loop instead of running it with a
  zero step; the result is the same.
- Multi-token words and duplicates in bags: see attributes.py.
- The loss is differentiated with torch.autograd.grad with respect to Δ only, so
  the model's weights never collect .grad.
The horizon feeds the same p̃·W_te soft token horizon_length times after the
unperturbed past, as the reference does; the hidden state of the current token
under H_t + Δ enters the mean detached, as in the reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from minigpt import (GPT, PastKeyValues, check_left_padded, extend_mask, get_tokenizer, past_length, sample_next_token,
                     stack_past, unstack_past)

from .attributes import BagOfWords, Discriminator, load_bag

__all__ = ["PPLMConfig", "Context", "Objective", "prompt_context", "unperturbed_step", "bow_loss", "kl_divergence",
           "avoid_loss", "perturbed_loss", "window_weights", "layer_grad_norms", "descent_step", "perturb_past",
           "perturbed_step", "fuse", "repetition_penalty", "Step", "PPLMOutput", "check_fits", "generate",
           "SMALL_CONST"]

SMALL_CONST = 1e-15  # the reference's guard against log(0) and division by a zero norm


# ---- the knobs -------------------------------------------------------------------------------------
@dataclass
class PPLMConfig:
    """The knobs, with the reference's defaults (see the module docstring for what each does)."""
    stepsize: float = 0.02
    num_iterations: int = 3
    window_length: int = 0
    window_from: str = "oldest"
    decay: bool = False
    gamma: float = 1.5
    kl_scale: float = 0.01
    gm_scale: float = 0.9
    horizon_length: int = 1
    grad_length: int = 10000
    temperature: float = 1.0
    top_k: int = 10
    do_sample: bool = False
    repetition_penalty: float = 1.0

    def __post_init__(self):
        checks = [("stepsize", self.stepsize >= 0, ">= 0"), ("num_iterations", self.num_iterations >= 0, ">= 0"),
                  ("window_length", self.window_length >= 0, ">= 0 (0 = the whole past)"),
                  ("window_from", self.window_from in ("oldest", "recent"), "'oldest' or 'recent'"),
                  ("gamma", self.gamma >= 0, ">= 0"), ("kl_scale", self.kl_scale >= 0, ">= 0"),
                  ("gm_scale", 0 <= self.gm_scale <= 1, "in [0, 1]"),
                  ("horizon_length", self.horizon_length >= 1, ">= 1"), ("grad_length", self.grad_length >= 0, ">= 0"),
                  ("temperature", self.temperature >= 0, ">= 0 (0 = greedy)"),
                  ("top_k", self.top_k >= 0, ">= 0 (0 = off)"),
                  ("repetition_penalty", self.repetition_penalty > 0, "> 0 (1 = off)")]
        for name in ("num_iterations", "window_length", "horizon_length", "grad_length", "top_k"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise ValueError(f"PPLM knob {name} must be an integer, got {getattr(self, name)!r}")
        for name, ok, want in checks:
            if not ok or (isinstance(getattr(self, name), float) and not math.isfinite(getattr(self, name))):
                raise ValueError(f"PPLM knob {name} must be {want}, got {getattr(self, name)!r}")


@dataclass
class Context:
    """What step 2 needs for the current token besides Δ."""
    last: torch.Tensor                     # (B, 1) the current token
    past: torch.Tensor                     # (L, 2, B, nh, T_past, hs) the past before it (perturbed so far)
    mask: Optional[torch.Tensor]           # (B, T_past + 1) or None (nothing padded)
    p: torch.Tensor                        # (B, V) unperturbed next-token distribution
    unpert_past: PastKeyValues             # unperturbed cache including the current token
    hidden_sum: torch.Tensor               # (B, C) Σ unperturbed ln_f hidden states of the real tokens before it
    count: torch.Tensor                    # (B,) how many tokens that sum holds


@dataclass
class Objective:
    """The attribute model(s) and the KL weight: what perturbed_loss adds up."""
    bags: Optional[torch.Tensor] = None    # (n_bags, V) multi-hot: steer towards these words
    head: Optional[Discriminator] = None
    label: Optional[int] = None
    kl_scale: float = 0.01
    horizon_length: int = 1
    detach_current: bool = True            # the current token's hidden state enters the mean as a constant (reference)
    avoid: Optional[torch.Tensor] = None   # (n_avoid, V) multi-hot: steer away from these words (ours, not the paper's)

    @property
    def bow_only(self) -> bool:
        """Bags without a discriminator: the case whose gradient norm is a running max (as the reference)."""
        return (self.bags is not None or self.avoid is not None) and self.head is None


# ---- step 1: the unperturbed model -----------------------------------------------------------------
def _prompt_pass(model: GPT, ids: torch.Tensor, mask: Optional[torch.Tensor], past: Optional[PastKeyValues] = None):
    """The prompt in one pass (after an initial `past`, e.g. a prefix), exactly as minigpt.generate's first step.
    `mask` covers past + prompt. Returns (logits, hidden, cache, hidden_sum, count) of the last prompt token:
    its logits (B, V) and ln_f hidden state (B, C), the cache including it, and Σ / count of the prompt's
    hidden states before it."""
    out = model(ids, attention_mask=mask, past_key_values=past, output_hidden_states=True)
    mask = None if mask is None else mask[:, -ids.size(1):]         # the prompt's own columns
    h = out.hidden_states[-1]                                       # (B, T, C)
    real = (torch.ones_like(ids) if mask is None else mask)[:, :-1, None].to(h.dtype)
    hidden_sum, count = (h[:, :-1] * real).sum(1), real[..., 0].sum(1)
    return out.logits[:, -1], h[:, -1], out.past_key_values, hidden_sum, count


def _drop_last(past: PastKeyValues) -> PastKeyValues:
    """The cache without its newest position: the past BEFORE the current token."""
    return tuple((k[:, :, :-1], v[:, :, :-1]) for k, v in past)


def prompt_context(model: GPT, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> Context:
    """The Context of the first generated token: the past is the prompt but its last token."""
    mask = check_left_padded(attention_mask, *input_ids.shape, model.device)
    logits, _, cache, hidden_sum, count = _prompt_pass(model, input_ids, mask)
    return Context(input_ids[:, -1:], stack_past(_drop_last(cache)), mask, logits.softmax(-1), cache, hidden_sum,
                   count)


def unperturbed_step(model: GPT, last: torch.Tensor, mask: Optional[torch.Tensor], cache: PastKeyValues):
    """Step 1 of every later token, exactly minigpt.generate's step: (logits (B, V), hidden (B, C), cache)."""
    out = model(last, attention_mask=mask, past_key_values=cache, output_hidden_states=True)
    return out.logits[:, -1], out.hidden_states[-1][:, -1], out.past_key_values


# ---- step 2's objective: attribute loss + kl_scale · KL(p̃ || p) ------------------------------------
def bow_loss(probs: torch.Tensor, bags: torch.Tensor) -> torch.Tensor:
    """probs (B, V), bags multi-hot (n_bags, V) -> Σ_bags -log Σ_{w in bag} p(w), per row (B,)."""
    return -(probs @ bags.T).log().sum(-1)


def avoid_loss(probs: torch.Tensor, bags: torch.Tensor) -> torch.Tensor:
    """probs (B, V), bags multi-hot (n_bags, V) -> Σ_bags -log(1 - Σ_{w in bag} p(w)), per row (B,).

    Not in the paper: the BoW loss turned around, to steer AWAY from a bag (e.g. masculine-coded words
    in a job advert). It is 0 when the bag has no mass and grows without bound as its mass nears 1;
    the mass is capped at 1 - SMALL_CONST so the log stays finite."""
    mass = (probs @ bags.T).clamp(max=1 - SMALL_CONST)
    return -torch.log1p(-mass).sum(-1)


def kl_divergence(p_tilde: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """KL(p̃ || p) per row, with the reference's SMALL_CONST lifted onto near-zero entries."""
    p = p + SMALL_CONST * (p <= SMALL_CONST).to(p.dtype)
    q = p_tilde + SMALL_CONST * (p_tilde <= SMALL_CONST).to(p.dtype).detach()
    return (q * (q / p).log()).sum(-1)


def _discriminator_loss(model: GPT, ctx: Context, probs: torch.Tensor, hidden_pert: torch.Tensor,
                        obj: Objective) -> torch.Tensor:
    """CE(head(mean hidden state), class) per row (B,). The mean runs over the real tokens before the
    current one, the current one under H_t + Δ, and horizon_length soft tokens p̃·W_te fed after the
    unperturbed cache (the reference's horizon)."""
    total_h = ctx.hidden_sum + (hidden_pert.detach() if obj.detach_current else hidden_pert)
    soft = (probs @ model.transformer.wte.weight)[:, None]          # (B, 1, C) the soft token p̃·W_te
    past, mask = ctx.unpert_past, ctx.mask
    for _ in range(obj.horizon_length):
        mask = None if mask is None else extend_mask(mask, after=1)
        o = model(None, inputs_embeds=soft, attention_mask=mask, past_key_values=past, output_hidden_states=True)
        past, total_h = o.past_key_values, total_h + o.hidden_states[-1][:, -1]
    mean = total_h / (ctx.count + 1 + obj.horizon_length)[:, None].to(total_h.dtype)   # (B, C)
    target = torch.full((probs.size(0),), obj.label, dtype=torch.long, device=probs.device)
    head_dtype = next(obj.head.parameters()).dtype  # the head stays fp32 when the model runs in bf16/fp16
    return F.cross_entropy(obj.head(mean.to(head_dtype)), target, reduction="none")


def perturbed_loss(model: GPT, ctx: Context, delta: torch.Tensor, obj: Objective):
    """Step 2's objective for each row: (total, attribute loss, KL, p̃, ln_f hidden of the current token)."""
    out = model(ctx.last, attention_mask=ctx.mask, past_key_values=unstack_past(ctx.past + delta),
                output_hidden_states=True)
    probs = out.logits[:, -1].softmax(-1)                           # p̃ (B, V)
    hidden_pert = out.hidden_states[-1][:, -1]                      # (B, C)
    attr = probs.new_zeros(probs.size(0))
    if obj.bags is not None:
        attr = attr + bow_loss(probs, obj.bags)
    if obj.avoid is not None:
        attr = attr + avoid_loss(probs, obj.avoid)
    if obj.head is not None:
        attr = attr + _discriminator_loss(model, ctx, probs, hidden_pert, obj)
    kl = kl_divergence(probs, ctx.p)
    total = attr + obj.kl_scale * kl if obj.kl_scale > 0 else attr
    return total, attr, kl, probs, hidden_pert


# ---- step 2: Δ by normalised gradient steps ----------------------------------------------------------
def window_weights(mask: torch.Tensor, window_length: int, decay: bool = False, window_from: str = "oldest"
                   ) -> torch.Tensor:
    """mask (B, T_past) of real positions -> gradient weights (B, T_past).

    window_length 0 moves the whole past. Otherwise window_length positions move:
    the oldest real ones (the reference) or the most recent; with decay, weights
    1/w, 2/w, ..., 1 rising towards the newest position in the window. A row whose
    real past is not longer than the window moves whole, without decay (as the reference)."""
    real = mask.to(torch.float64)
    if window_length == 0:
        return real
    n_real = real.sum(1, keepdim=True)                              # (B, 1)
    rank = real.cumsum(1) - 1                                       # index among real positions, oldest 0
    idx = rank if window_from == "oldest" else rank - (n_real - window_length)
    inside = (idx >= 0) & (idx < window_length)
    w = (idx + 1) / window_length if decay else torch.ones_like(idx)
    return torch.where(n_real > window_length, w * inside, real) * real


def layer_grad_norms(g: torch.Tensor) -> torch.Tensor:
    """g (L, 2, B, nh, T_past, hs) -> ‖g‖ per layer and row, (L, B): a layer's keys and values together."""
    return g.pow(2).sum(dim=(1, 3, 4, 5)).sqrt()


def descent_step(delta: torch.Tensor, g: torch.Tensor, scale: torch.Tensor, stepsize: float, gamma: float
                 ) -> torch.Tensor:
    """Δ - stepsize · g / scale^gamma, scale (L, B) one norm per layer and row (detached)."""
    return (delta - stepsize * g / scale.pow(gamma)[:, None, :, None, None, None]).detach()


def perturb_past(model: GPT, ctx: Context, obj: Objective, cfg: PPLMConfig, grad_max: Optional[torch.Tensor] = None):
    """Step 2: Δ after cfg.num_iterations normalised gradient steps.
    Returns (Δ, grad_max, losses, kls, norms); grad_max is BoW's running max of the norms, (L, B)."""
    T_past = ctx.past.size(4)
    real = ctx.mask[:, :T_past] if ctx.mask is not None else ctx.last.new_ones(ctx.last.size(0), T_past)
    window = window_weights(real, cfg.window_length, cfg.decay, cfg.window_from).to(ctx.past.dtype)
    window = window[None, None, :, None, :, None]                   # (1, 1, B, 1, T_past, 1)
    delta = torch.zeros_like(ctx.past)
    losses, kls, norms = [], [], []
    for _ in range(cfg.num_iterations):
        with torch.enable_grad():
            delta.requires_grad_(True)
            total, attr, kl, _, _ = perturbed_loss(model, ctx, delta, obj)
            (g,) = torch.autograd.grad(total.sum(), delta)          # rows are independent: Σ keeps them apart
        g = g * window                                              # (L, 2, B, nh, T_past, hs)
        norm = layer_grad_norms(g)                                  # (L, B)
        if obj.bow_only:                                            # running max over the whole generation
            grad_max = norm + SMALL_CONST if grad_max is None else torch.maximum(grad_max, norm)
            scale = grad_max
        else:
            scale = norm + SMALL_CONST
        delta = descent_step(delta, g, scale, cfg.stepsize, cfg.gamma)
        losses.append(attr.detach())                                # kept on the device: no sync per iteration
        kls.append(kl.detach())
        norms.append(norm.T)
    return delta, grad_max, losses, kls, norms


# ---- step 3: the current token under H_t + Δ ---------------------------------------------------------
def perturbed_step(model: GPT, last: torch.Tensor, mask: Optional[torch.Tensor], past_pert: torch.Tensor):
    """(logits_pert (B, V), hidden_pert (B, C), the next past_pert): the current token's keys and
    values, computed under the perturbed past, join it (the nudges accumulate)."""
    o = model(last, attention_mask=mask, past_key_values=unstack_past(past_pert), output_hidden_states=True)
    return o.logits[:, -1], o.hidden_states[-1][:, -1], stack_past(o.past_key_values)


# ---- step 4: fuse, penalise repeats (then top-k and the draw: minigpt.sample_next_token) -------------
def fuse(logits: torch.Tensor, logits_pert: torch.Tensor, gm_scale: float) -> torch.Tensor:
    """log p_out = log p + gm·(log p̃ - log p) (+ a constant per row), i.e. p_out ∝ p̃^gm · p^(1-gm).
    Starts from the logits of p, so that p̃ = p gives them back unchanged."""
    return logits + gm_scale * (logits_pert.log_softmax(-1) - logits.log_softmax(-1))


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on the tokens in `seen` (B, V): a positive logit divided by it, a negative one multiplied."""
    if penalty == 1.0:
        return logits
    pen = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, pen, logits)


# ---- the loop: steps 1-4 for every token ------------------------------------------------------------
@dataclass
class Step:
    """Diagnostics of one generated token, one entry per row (on the CPU)."""
    token: torch.Tensor                    # (B,)
    perturbed: bool
    loss: torch.Tensor                     # (iters, B) attribute loss before each update
    kl: torch.Tensor                       # (iters, B) KL(p̃ || p) before each update (unscaled)
    grad_norm: torch.Tensor                # (iters, B, L) per-layer norm of the windowed gradient
    attribute_before: torch.Tensor         # (B,) bag mass under p, or p(class) of the unperturbed mean
    attribute_after: torch.Tensor          # (B,) the same under p̃ / the perturbed last hidden state
    hidden_before: torch.Tensor            # (B, C) ln_f hidden state of the current token, unperturbed
    hidden_after: torch.Tensor             # (B, C) the same under the perturbed past

    def to_cpu(self) -> "Step":
        """Diagnostics are gathered on the device and moved once, at the end (float32)."""
        move = lambda t: t.cpu() if t.dtype == torch.long else t.detach().float().cpu()
        return Step(**{f.name: (move(v) if isinstance(v, torch.Tensor) else v)
                       for f in fields(self) for v in [getattr(self, f.name)]})


@dataclass
class PPLMOutput:
    sequences: torch.Tensor                # (B, T + new) prompt and continuation
    steps: list[Step] = field(default_factory=list)
    bags: list[BagOfWords] = field(default_factory=list)
    avoid_bags: list[BagOfWords] = field(default_factory=list)

    def stacked(self, name: str) -> torch.Tensor:
        """One diagnostic over time, e.g. stacked("attribute_after") -> (steps, B)."""
        return torch.stack([getattr(s, name) for s in self.steps])


def _attribute(logits, logits_pert, hidden, hidden_pert, hidden_sum, count, obj):
    """(before, after) per row: p(class) of the mean hidden state with the current token's
    unperturbed / perturbed hidden state, or else the bags' mass under p / p̃ (the avoided bags'
    mass when there are only those: lower is then better)."""
    if obj.head is not None:
        n, head_dtype = (count + 1)[:, None].to(hidden.dtype), next(obj.head.parameters()).dtype
        f = lambda h: obj.head(((hidden_sum + h) / n).to(head_dtype)).softmax(-1)[:, obj.label]
        return f(hidden), f(hidden_pert)
    bags = obj.bags if obj.bags is not None else obj.avoid
    if bags is not None:
        mass = lambda z: (z.softmax(-1) @ bags.T).sum(-1)
        return mass(logits), mass(logits_pert)
    z = torch.full((logits.size(0),), float("nan"), device=logits.device)
    return z, z


def _decode(model, ids, mask, cfg, obj, max_new_tokens, generator, eos, pad, progress, num_samples=1, past=None):
    L = model.config.n_layer
    if past is not None and mask is not None:                           # the initial past is always attended
        mask = extend_mask(mask, before=past_length(past))
    logits, hidden, cache, hidden_sum, count = _prompt_pass(model, ids, mask, past)   # step 1 of the first token
    if num_samples > 1:  # every sample of a prompt starts from the same prompt pass
        rep = lambda t: None if t is None else t.repeat_interleave(num_samples, dim=0)
        ids, mask, logits, hidden, hidden_sum, count = map(rep, (ids, mask, logits, hidden, hidden_sum, count))
        cache = tuple((rep(k), rep(v)) for k, v in cache)
    B, T = ids.shape
    past_pert = None            # perturbed past before the current token; None while it equals the unperturbed
    last, cache_before = ids[:, -1:], _drop_last(cache)                 # the current token; the past before it
    real = torch.ones_like(ids) if mask is None else mask[:, -T:]
    seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=ids.device)  # for the penalty
    seen.scatter_(1, torch.where(real.bool(), ids, ids[:, -1:]), True)                      # real tokens only
    grad_max = None
    finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
    pad = eos if pad is None else pad
    result, steps = [ids], []
    with tqdm(total=max_new_tokens, disable=not progress, desc="pplm", unit="tok") as bar:
        for i in range(max_new_tokens):
            T_past = cache_before[0][0].size(2)
            perturb = cfg.stepsize > 0 and cfg.num_iterations > 0 and i < cfg.grad_length and T_past > 0
            losses, kls, norms = [], [], []
            if perturb or past_pert is not None:
                ctx = Context(last, past_pert if past_pert is not None else stack_past(cache_before), mask,
                              logits.softmax(-1), cache, hidden_sum, count)
                past = ctx.past
                if perturb:                                                     # step 2
                    delta, grad_max, losses, kls, norms = perturb_past(model, ctx, obj, cfg, grad_max)
                    past = past + delta
                logits_pert, hidden_pert, past_pert = perturbed_step(model, last, mask, past)   # step 3
            else:
                logits_pert, hidden_pert = logits, hidden
            fused = repetition_penalty(fuse(logits, logits_pert, cfg.gm_scale), seen, cfg.repetition_penalty)
            tok = sample_next_token(fused, do_sample=cfg.do_sample, temperature=cfg.temperature,   # step 4
                                    top_k=cfg.top_k or None, generator=generator)
            if eos is not None:
                tok = tok.masked_fill(finished, pad)
                finished |= tok == eos
            before, after = _attribute(logits, logits_pert, hidden, hidden_pert, hidden_sum, count, obj)
            n = len(losses)
            steps.append(Step(tok, perturb, torch.stack(losses) if n else logits.new_zeros(0, B),
                              torch.stack(kls) if n else logits.new_zeros(0, B),
                              torch.stack(norms) if n else logits.new_zeros(0, B, L), before, after, hidden,
                              hidden_pert))
            result.append(tok[:, None])
            seen.scatter_(1, tok[:, None], True)
            bar.update(1)
            if (eos is not None and bool(finished.all())) or i == max_new_tokens - 1:
                break
            # step 1 of the next token: the unperturbed pass and the running sums of the discriminator's mean
            hidden_sum, count = hidden_sum + hidden, count + 1
            last, cache_before = tok[:, None], cache
            if mask is not None:
                mask = extend_mask(mask, after=1)
            logits, hidden, cache = unperturbed_step(model, last, mask, cache)
    return PPLMOutput(torch.cat(result, 1), [s.to_cpu() for s in steps])


def _as_bags(bow, tokenizer, V, device, dtype) -> tuple[list[BagOfWords], Optional[torch.Tensor]]:
    """bow (a name, file, BagOfWords or a list of them) -> (the bags, their multi-hot rows (n_bags, V))."""
    if bow is None or (isinstance(bow, (list, tuple)) and not bow):
        return [], None
    items = [bow] if isinstance(bow, (str, Path, BagOfWords)) else list(bow)
    bags = [b if isinstance(b, BagOfWords) else load_bag(b, tokenizer) for b in items]
    M = torch.zeros(len(bags), V, dtype=dtype, device=device)
    for i, b in enumerate(bags):
        if max(b.token_ids) >= V:
            raise ValueError(f"bag {b.name!r} holds token id {max(b.token_ids)}, outside this model's vocabulary "
                             f"of {V}")
        M[i, b.token_ids] = 1
    return bags, M


def check_fits(n_prompt: int, max_new_tokens: int, horizon: int, n_positions: int) -> None:
    """PPLM needs n_prompt + max_new_tokens + horizon positions (the horizon's soft tokens follow the
    newest token). Refuse, saying by how much, a prompt that leaves no room, or too many new tokens."""
    first = min(1, max_new_tokens)                  # the room one new token needs
    extra = f" + {horizon} horizon" if horizon else ""
    if n_prompt + first + horizon > n_positions:
        over = n_prompt + first + horizon - n_positions
        raise ValueError(f"the prompt is too long: {n_prompt} prompt tokens{extra} + {first} new = "
                         f"{n_prompt + first + horizon} > n_positions {n_positions}; it is {over} token(s) over "
                         "the limit, shorten the prompt")
    if n_prompt + max_new_tokens + horizon > n_positions:
        raise ValueError(f"{n_prompt} prompt + {max_new_tokens} new{extra} tokens = "
                         f"{n_prompt + max_new_tokens + horizon} > n_positions {n_positions}; lower max_new_tokens "
                         f"to at most {n_positions - n_prompt - horizon}")


def generate(model: GPT, input_ids: torch.Tensor, *, bow=None, discriminator: Optional[Discriminator] = None,
             class_label: Union[int, str, None] = None, attention_mask: Optional[torch.Tensor] = None,
             max_new_tokens: int = 100, generator: Optional[torch.Generator] = None,
             eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None, progress: bool = False,
             num_samples: int = 1, past_key_values: Optional[PastKeyValues] = None, avoid_bow=None,
             **knobs) -> PPLMOutput:
    """PPLM decoding of every row of input_ids [B, T] (rows are independent samples).

    num_samples > 1 reads each prompt once and then decodes num_samples rows per prompt in one
    batch (output rows r·num_samples ... r·num_samples + num_samples - 1 continue prompt r).

    bow: a bag name, file, BagOfWords, or a list of them (their losses add).
    avoid_bow: the same, for bags to steer AWAY from (`avoid_loss`; not in the paper).
    discriminator + class_label: a head and the class to steer towards (name or index); the head
    is moved to the model's device and dtype.
    past_key_values: an initial past in front of the prompt, e.g. a learned prefix
    (`PrefixTuning.past_key_values(B)`), always attended; attention_mask covers the prompt only.
    PPLM treats it as the oldest part of H_t: it is perturbed with the rest (a window counted
    from the oldest positions covers it first).
    knobs: the PPLMConfig fields (stepsize, num_iterations, ...). Sampling draws from
    `generator` exactly as minigpt.generate does. Returns tokens and per-step diagnostics."""
    cfg = PPLMConfig(**knobs)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError("input_ids must be a non-empty LongTensor [batch, seq]")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    B, T = input_ids.shape
    dev, dtype, V = model.device, model.transformer.wte.weight.dtype, model.config.vocab_size
    bags, M = _as_bags(bow, get_tokenizer(), V, dev, dtype)
    avoid_bags, M_avoid = _as_bags(avoid_bow, get_tokenizer(), V, dev, dtype)
    label = None
    if discriminator is not None:
        discriminator.check_model(model)
        if class_label is None:
            raise ValueError("a discriminator needs class_label: one of "
                             + ", ".join(f"{i}={c}" for i, c in enumerate(discriminator.class_names)))
        label = discriminator.class_index(class_label)
        discriminator = discriminator.to(device=dev, dtype=dtype)
    if M is None and M_avoid is None and discriminator is None and cfg.stepsize > 0 and cfg.num_iterations > 0:
        raise ValueError("PPLM needs an attribute model: give bow=..., avoid_bow=... and/or discriminator=... "
                         "with class_label")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_fits(past_length(past_key_values) + T, max_new_tokens, cfg.horizon_length if discriminator is not None else 0,
               model.config.n_positions)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            obj = Objective(M, discriminator, label, cfg.kl_scale, cfg.horizon_length, avoid=M_avoid)
            out = _decode(model, input_ids.to(dev), check_left_padded(attention_mask, B, T, dev), cfg, obj,
                          max_new_tokens, generator, eos_token_id, pad_token_id, progress, num_samples,
                          past_key_values)
            out.bags, out.avoid_bags = bags, avoid_bags
            return out
    finally:
        model.train(was_training)
