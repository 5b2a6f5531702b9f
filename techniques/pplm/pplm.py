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
- Multi-token words and duplicates in bags: see pplm_data.py.
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
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from minigpt import (EOT_ID, GPT, TrainConfig, atomic_save_dir, get_tokenizer, load_tensors, read_json,
                     sample_next_token, save_tensors, train, write_json)

from .pplm_data import PAPER_HEADS, BagOfWords, bag_names, load_bag, paper_head_path, read_paper_head

__all__ = ["PPLMConfig", "PPLMOutput", "Step", "Discriminator", "generate", "mean_hidden", "cache_features",
           "train_discriminator", "load_discriminator", "bow_loss", "kl_divergence", "window_weights", "Context",
           "Objective", "perturbed_loss", "perturb_past", "prompt_context", "BagOfWords", "load_bag", "bag_names",
           "main"]

SMALL_CONST = 1e-15  # the reference's guard against log(0) and division by a zero norm


# ---- the discriminator: a linear head on the mean hidden state -------------------------------------
class Discriminator(nn.Module):
    """p(a|x) = softmax(W · mean_t h_t + b), h_t the last hidden states (after ln_f)
    over the real (non-padded) tokens. Parameter names match the paper's heads (mlp.*)."""

    def __init__(self, n_embd: int, class_names: Sequence[str], base_model: str = ""):
        super().__init__()
        if len(class_names) < 2:
            raise ValueError(f"a discriminator needs at least two classes, got {list(class_names)}")
        self.mlp = nn.Linear(n_embd, len(class_names))
        self.class_names, self.base_model = [str(c) for c in class_names], base_model

    @property
    def n_embd(self) -> int:
        return self.mlp.in_features

    def forward(self, mean_hidden: torch.Tensor) -> torch.Tensor:  # (B, C) -> (B, classes)
        return self.mlp(mean_hidden)

    def class_index(self, label: Union[int, str]) -> int:
        """A class by name ("very_positive", "very positive") or by index."""
        names = [c.lower().replace(" ", "_") for c in self.class_names]
        key = str(label).strip().lower().replace(" ", "_")
        if key in names:
            return names.index(key)
        if key.lstrip("-").isdigit() and 0 <= int(key) < len(names):
            return int(key)
        raise ValueError(f"class label {label!r} is not one of this head's classes: "
                         + ", ".join(f"{i}={c}" for i, c in enumerate(self.class_names)))

    def check_model(self, model: GPT) -> None:
        if model.config.n_embd != self.n_embd:
            want = f" ({self.base_model})" if self.base_model else ""
            raise ValueError(f"this discriminator head reads hidden states of size n_embd={self.n_embd}{want}, but the "
                             f"model has n_embd={model.config.n_embd}; load the model it was trained on "
                             f"(e.g. --model {self.base_model or 'gpt2-medium'}) or train a head for this one")

    def save(self, directory: Union[str, Path]) -> None:
        """discriminator.safetensors + discriminator.json, written atomically."""
        meta = {"class_names": self.class_names, "n_embd": self.n_embd, "base_model": self.base_model}
        with atomic_save_dir(directory) as tmp:
            save_tensors(dict(self.state_dict()), tmp / "discriminator.safetensors", {"format": "pt"})
            write_json(meta, tmp / "discriminator.json")

    @classmethod
    def load(cls, directory: Union[str, Path]) -> "Discriminator":
        d = Path(directory)
        meta, tensors = read_json(d / "discriminator.json"), load_tensors(d / "discriminator.safetensors")
        head = cls(tensors["mlp.weight"].shape[1], meta["class_names"], meta.get("base_model", ""))
        head.load_state_dict(tensors)
        return head.eval()

    @classmethod
    def from_paper(cls, name_or_path: Union[str, Path], class_names: Optional[Sequence[str]] = None) -> "Discriminator":
        """One of the paper's heads by name (sentiment, clickbait, toxicity) or a .pt state dict."""
        if str(name_or_path) in PAPER_HEADS:
            _, names, base = PAPER_HEADS[str(name_or_path)]
            w, b = read_paper_head(paper_head_path(str(name_or_path)))
        else:
            w, b = read_paper_head(name_or_path)
            names, base = [str(i) for i in range(w.shape[0])], ""
        head = cls(w.shape[1], class_names or names, base)
        head.mlp.weight.data.copy_(w)
        head.mlp.bias.data.copy_(b)
        return head.eval()


def load_discriminator(spec: Union[str, Path]) -> Discriminator:
    """A paper head name, a folder saved by Discriminator.save, or a reference .pt file."""
    p = Path(spec)
    if str(spec) in PAPER_HEADS or p.suffix == ".pt":
        return Discriminator.from_paper(spec)
    if p.is_dir() and (p / "discriminator.safetensors").is_file():
        return Discriminator.load(p)
    raise ValueError(f"unknown discriminator {str(spec)!r}: give one of the paper's heads "
                     f"({', '.join(PAPER_HEADS)}), a folder saved by train-discriminator, or a .pt head")


def mean_hidden(model: GPT, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over the real positions of the last hidden states (after ln_f): (B, C)."""
    out = model(input_ids, attention_mask=attention_mask, output_hidden_states=True)
    h = out.hidden_states[-1]                                       # (B, T, C)
    m = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    m = m.to(h.dtype)[..., None]                                    # (B, T, 1)
    return (h * m).sum(1) / m.sum(1).clamp(min=1)


@torch.no_grad()
def cache_features(model: GPT, texts: Sequence[str], *, batch_size: int = 32, max_len: int = 100,
                   progress: bool = True) -> torch.Tensor:
    """The frozen model's mean hidden state of "<|endoftext|>" + text for each text, (N, C), on the CPU.
    Like the reference's training script, the end-of-text token leads (generation prompts start
    with it too); texts longer than max_len tokens are cut (the reference skips them)."""
    tok = get_tokenizer()
    seqs = [[EOT_ID] + tok.encode(t)[:max_len - 1] for t in texts]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # batches of similar length: little padding
    out = torch.empty(len(seqs), model.config.n_embd)
    for i in tqdm(range(0, len(seqs), batch_size), disable=not progress, desc="features", unit="batch"):
        idx = order[i:i + batch_size]
        T = max(len(seqs[j]) for j in idx)
        ids = torch.full((len(idx), T), EOT_ID, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, j in enumerate(idx):  # left-padded
            ids[r, T - len(seqs[j]):], mask[r, T - len(seqs[j]):] = torch.tensor(seqs[j]), 1
        out[idx] = mean_hidden(model, ids.to(model.device), mask.to(model.device)).float().cpu()
    return out


def train_discriminator(model: GPT, texts: Sequence[str], labels: Sequence[int], class_names: Sequence[str], *,
                        eval_texts: Sequence[str] = (), eval_labels: Sequence[int] = (),
                        config: TrainConfig = TrainConfig(epochs=10, batch_size=64, lr=1e-4, decay=False),
                        max_len: int = 100, progress: bool = True) -> tuple[Discriminator, dict]:
    """Train a head on cached features of the frozen model with minigpt.train.
    Returns (head, report) with the loss history and dev accuracy (None without dev data)."""
    if len(texts) != len(labels) or len(eval_texts) != len(eval_labels):
        raise ValueError("texts and labels must have the same length")
    head = Discriminator(model.config.n_embd, class_names, model.config.name_or_path).to(model.device)

    def examples(ts, ys):  # (feature (C,), label) pairs: the model runs once per text, not once per epoch
        return list(zip(cache_features(model, ts, max_len=max_len, progress=progress), ys))

    def collate(batch):
        return {"x": torch.stack([f for f, _ in batch]), "y": torch.tensor([y for _, y in batch])}

    def loss_fn(batch):
        return F.cross_entropy(head(batch["x"]), batch["y"])

    train_ex, eval_ex = examples(texts, labels), (examples(eval_texts, eval_labels) if eval_texts else [])
    history = train(head.parameters(), loss_fn, train_ex, eval_examples=eval_ex, config=config, collate_fn=collate)
    head.eval()
    acc = None
    if eval_ex:
        with torch.no_grad():
            batch = collate(eval_ex)
            acc = (head(batch["x"].to(model.device)).argmax(-1).cpu() == batch["y"]).float().mean().item()
    return head, {"history": history, "dev_accuracy": acc, "n_train": len(train_ex), "n_dev": len(eval_ex)}


# ---- the pieces of the objective ------------------------------------------------------------------
def bow_loss(probs: torch.Tensor, bags: torch.Tensor) -> torch.Tensor:
    """probs (B, V), bags multi-hot (n_bags, V) -> Σ_bags -log Σ_{w in bag} p(w), per row (B,)."""
    return -(probs @ bags.T).log().sum(-1)


def kl_divergence(p_tilde: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """KL(p̃ || p) per row, with the reference's SMALL_CONST lifted onto near-zero entries."""
    p = p + SMALL_CONST * (p <= SMALL_CONST).to(p.dtype)
    q = p_tilde + SMALL_CONST * (p_tilde <= SMALL_CONST).to(p.dtype).detach()
    return (q * (q / p).log()).sum(-1)


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


# ---- the generation loop ---------------------------------------------------------------------------
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
                  ("temperature", self.temperature >= 0, ">= 0 (0 = greedy)"), ("top_k", self.top_k >= 0, ">= 0 (0 = off)"),
                  ("repetition_penalty", self.repetition_penalty > 0, "> 0 (1 = off)")]
        for name in ("num_iterations", "window_length", "horizon_length", "grad_length", "top_k"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise ValueError(f"PPLM knob {name} must be an integer, got {getattr(self, name)!r}")
        for name, ok, want in checks:
            if not ok or (isinstance(getattr(self, name), float) and not math.isfinite(getattr(self, name))):
                raise ValueError(f"PPLM knob {name} must be {want}, got {getattr(self, name)!r}")


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

    def stacked(self, name: str) -> torch.Tensor:
        """One diagnostic over time, e.g. stacked("attribute_after") -> (steps, B)."""
        return torch.stack([getattr(s, name) for s in self.steps])


@dataclass
class Context:
    """What step 2 needs for the current token besides Δ."""
    last: torch.Tensor                     # (B, 1) the current token
    past: torch.Tensor                     # (L, 2, B, nh, T_past, hs) the past before it (perturbed so far)
    mask: Optional[torch.Tensor]           # (B, T_past + 1) or None (nothing padded)
    p: torch.Tensor                        # (B, V) unperturbed next-token distribution
    unpert_past: tuple                     # unperturbed cache including the current token
    hidden_sum: torch.Tensor               # (B, C) Σ unperturbed ln_f hidden states of the real tokens before it
    count: torch.Tensor                    # (B,) how many tokens that sum holds


@dataclass
class Objective:
    """The attribute model(s) and the KL weight: what perturbed_loss adds up."""
    bags: Optional[torch.Tensor] = None    # (n_bags, V) multi-hot
    head: Optional[Discriminator] = None
    label: Optional[int] = None
    kl_scale: float = 0.01
    horizon_length: int = 1
    detach_current: bool = True            # the current token's hidden state enters the mean as a constant (reference)


def _stack(past) -> torch.Tensor:          # tuple of L (k, v) -> (L, 2, B, nh, T, hs)
    return torch.stack([torch.stack(kv) for kv in past])


def _unstack(P: torch.Tensor) -> tuple:
    # unbind, not indexing: its backward stacks the layers' gradients once, where
    # each P[l, 0] would fill a zero tensor the size of all of P
    return tuple(tuple(layer.unbind(0)) for layer in P.unbind(0))


def perturbed_loss(model: GPT, ctx: Context, delta: torch.Tensor, obj: Objective):
    """Step 2's objective for each row: (total, attribute loss, KL, p̃, ln_f hidden of the current token)."""
    out = model(ctx.last, attention_mask=ctx.mask, past_key_values=_unstack(ctx.past + delta), output_hidden_states=True)
    probs = out.logits[:, -1].softmax(-1)                           # p̃ (B, V)
    h_now = out.hidden_states[-1][:, -1]                            # (B, C)
    attr = probs.new_zeros(probs.size(0))
    if obj.bags is not None:
        attr = attr + bow_loss(probs, obj.bags)
    if obj.head is not None:
        total_h = ctx.hidden_sum + (h_now.detach() if obj.detach_current else h_now)
        soft = (probs @ model.transformer.wte.weight)[:, None]      # (B, 1, C) the soft token p̃·W_te
        past, mask = ctx.unpert_past, ctx.mask
        for _ in range(obj.horizon_length):
            mask = None if mask is None else torch.cat([mask, mask.new_ones(mask.size(0), 1)], 1)
            o = model(None, inputs_embeds=soft, attention_mask=mask, past_key_values=past, output_hidden_states=True)
            past, total_h = o.past_key_values, total_h + o.hidden_states[-1][:, -1]
        mean = total_h / (ctx.count + 1 + obj.horizon_length)[:, None].to(total_h.dtype)
        target = torch.full((probs.size(0),), obj.label, dtype=torch.long, device=probs.device)
        attr = attr + F.cross_entropy(obj.head(mean), target, reduction="none")
    kl = kl_divergence(probs, ctx.p)
    total = attr + obj.kl_scale * kl if obj.kl_scale > 0 else attr
    return total, attr, kl, probs, h_now


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
        norm = g.pow(2).sum(dim=(1, 3, 4, 5)).sqrt()                # (L, B): a layer's keys and values together
        if obj.bags is not None and obj.head is None:               # BoW alone: running max over the generation
            grad_max = norm + SMALL_CONST if grad_max is None else torch.maximum(grad_max, norm)
            scale = grad_max
        else:
            scale = norm + SMALL_CONST
        delta = (delta - cfg.stepsize * g / scale.pow(cfg.gamma)[:, None, :, None, None, None]).detach()
        losses.append(attr.detach())                                # kept on the device: no sync per iteration
        kls.append(kl.detach())
        norms.append(norm.T)
    return delta, grad_max, losses, kls, norms


def _full_mask(attention_mask, B, T, device):
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask must be [batch, T] = [{B}, {T}], got {list(attention_mask.shape)}")
    m = attention_mask.to(device=device, dtype=torch.long)
    if not bool(m[:, -1].all()):
        raise ValueError("attention_mask: pad prompts on the LEFT (the last column must be real tokens), "
                         "as Tokenizer.encode_batch does")
    return None if bool(m.all()) else m


def _as_bags(bow, tokenizer, V, device, dtype) -> tuple[list[BagOfWords], Optional[torch.Tensor]]:
    if bow is None or (isinstance(bow, (list, tuple)) and not bow):
        return [], None
    items = [bow] if isinstance(bow, (str, Path, BagOfWords)) else list(bow)
    bags = [b if isinstance(b, BagOfWords) else load_bag(b, tokenizer) for b in items]
    M = torch.zeros(len(bags), V, dtype=dtype, device=device)
    for i, b in enumerate(bags):
        if max(b.token_ids) >= V:
            raise ValueError(f"bag {b.name!r} holds token id {max(b.token_ids)}, outside this model's vocabulary of {V}")
        M[i, b.token_ids] = 1
    return bags, M


def generate(model: GPT, input_ids: torch.Tensor, *, bow=None, discriminator: Optional[Discriminator] = None,
             class_label: Union[int, str, None] = None, attention_mask: Optional[torch.Tensor] = None,
             max_new_tokens: int = 100, generator: Optional[torch.Generator] = None,
             eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None, progress: bool = False,
             num_samples: int = 1, **knobs) -> PPLMOutput:
    """PPLM decoding of every row of input_ids [B, T] (rows are independent samples).

    num_samples > 1 reads each prompt once and then decodes num_samples rows per prompt in one
    batch (output rows r·num_samples ... r·num_samples + num_samples - 1 continue prompt r).

    bow: a bag name, file, BagOfWords, or a list of them (their losses add).
    discriminator + class_label: a head and the class to steer towards (name or index); the head
    is moved to the model's device and dtype.
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
    label = None
    if discriminator is not None:
        discriminator.check_model(model)
        if class_label is None:
            raise ValueError("a discriminator needs class_label: one of "
                             + ", ".join(f"{i}={c}" for i, c in enumerate(discriminator.class_names)))
        label = discriminator.class_index(class_label)
        discriminator = discriminator.to(device=dev, dtype=dtype)
    if M is None and discriminator is None and cfg.stepsize > 0 and cfg.num_iterations > 0:
        raise ValueError("PPLM needs an attribute model: give bow=... and/or discriminator=... with class_label")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    extra = cfg.horizon_length if discriminator is not None else 0
    if T + max_new_tokens + extra > model.config.n_positions:
        raise ValueError(f"{T} prompt + {max_new_tokens} new + {extra} horizon tokens > n_positions "
                         f"{model.config.n_positions}; lower max_new_tokens")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            obj = Objective(M, discriminator, label, cfg.kl_scale, cfg.horizon_length)
            out = _decode(model, input_ids.to(dev), _full_mask(attention_mask, B, T, dev), cfg, obj,
                          max_new_tokens, generator, eos_token_id, pad_token_id, progress, num_samples)
            out.bags = bags
            return out
    finally:
        model.train(was_training)


def _prompt_pass(model, ids, mask):
    """The prompt in one pass, exactly as minigpt.generate's first step."""
    out = model(ids, attention_mask=mask, output_hidden_states=True)
    h = out.hidden_states[-1]                                       # (B, T, C)
    real = (torch.ones_like(ids) if mask is None else mask)[:, :-1, None].to(h.dtype)
    hidden_sum, count = (h[:, :-1] * real).sum(1), real[..., 0].sum(1)
    return out.logits[:, -1], h[:, -1], out.past_key_values, hidden_sum, count


def prompt_context(model: GPT, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> Context:
    """The Context of the first generated token: the past is the prompt but its last token."""
    mask = _full_mask(attention_mask, *input_ids.shape, model.device)
    x, _, unpert, hidden_sum, count = _prompt_pass(model, input_ids, mask)
    prev = _stack(tuple((k[:, :, :-1], v[:, :, :-1]) for k, v in unpert))
    return Context(input_ids[:, -1:], prev, mask, x.softmax(-1), unpert, hidden_sum, count)


def _decode(model, ids, mask, cfg, obj, max_new_tokens, generator, eos, pad, progress, num_samples=1):
    L = model.config.n_layer
    x, h_u, unpert, hidden_sum, count = _prompt_pass(model, ids, mask)  # p's logits, current token's hidden
    if num_samples > 1:  # every sample of a prompt starts from the same prompt pass
        rep = lambda t: None if t is None else t.repeat_interleave(num_samples, dim=0)
        ids, mask, x, h_u, hidden_sum, count = map(rep, (ids, mask, x, h_u, hidden_sum, count))
        unpert = tuple((rep(k), rep(v)) for k, v in unpert)
    B, T = ids.shape
    P = None                    # perturbed past before the current token; None while it equals the unperturbed
    last, prev_unpert = ids[:, -1:], tuple((k[:, :, :-1], v[:, :, :-1]) for k, v in unpert)
    real = torch.ones_like(ids) if mask is None else mask
    seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=ids.device)  # for the penalty
    seen.scatter_(1, torch.where(real.bool(), ids, ids[:, -1:]), True)                      # real tokens only
    grad_max = None
    finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
    pad = eos if pad is None else pad
    result, steps = [ids], []
    for i in tqdm(range(max_new_tokens), disable=not progress, desc="pplm", unit="tok"):
        T_past = prev_unpert[0][0].size(2)
        perturb = cfg.stepsize > 0 and cfg.num_iterations > 0 and i < cfg.grad_length and T_past > 0
        losses, kls, norms = [], [], []
        if perturb or P is not None:
            ctx = Context(last, P if P is not None else _stack(prev_unpert), mask, x.softmax(-1), unpert,
                          hidden_sum, count)
            past = ctx.past
            if perturb:
                delta, grad_max, losses, kls, norms = perturb_past(model, ctx, obj, cfg, grad_max)
                past = past + delta
            # step 3: the current token under H_t + Δ; its keys and values join the perturbed past
            o = model(last, attention_mask=mask, past_key_values=_unstack(past), output_hidden_states=True)
            x_tilde, h_tilde, P = o.logits[:, -1], o.hidden_states[-1][:, -1], _stack(o.past_key_values)
        else:
            x_tilde, h_tilde = x, h_u
        # step 4: fuse log p_out = log p + gm·(log p̃ - log p) (+ const), penalise repeats, top-k, draw
        fused = x + cfg.gm_scale * (x_tilde.log_softmax(-1) - x.log_softmax(-1))
        if cfg.repetition_penalty != 1.0:
            pen = torch.where(fused < 0, fused * cfg.repetition_penalty, fused / cfg.repetition_penalty)
            fused = torch.where(seen, pen, fused)
        tok = sample_next_token(fused, do_sample=cfg.do_sample, temperature=cfg.temperature,
                                top_k=cfg.top_k or None, generator=generator)
        if eos is not None:
            tok = tok.masked_fill(finished, pad)
            finished |= tok == eos
        before, after = _attribute(x, x_tilde, h_u, h_tilde, hidden_sum, count, obj)
        n = len(losses)
        steps.append(Step(tok, perturb, torch.stack(losses) if n else x.new_zeros(0, B),
                          torch.stack(kls) if n else x.new_zeros(0, B),
                          torch.stack(norms) if n else x.new_zeros(0, B, L), before, after, h_u, h_tilde))
        result.append(tok[:, None])
        seen.scatter_(1, tok[:, None], True)
        if (eos is not None and bool(finished.all())) or i == max_new_tokens - 1:
            break
        # step 1 of the next token: the unperturbed pass (exactly minigpt.generate's) and the running sums
        hidden_sum, count = hidden_sum + h_u, count + 1
        last, prev_unpert = tok[:, None], unpert
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
        out = model(last, attention_mask=mask, past_key_values=unpert, output_hidden_states=True)
        unpert, x, h_u = out.past_key_values, out.logits[:, -1], out.hidden_states[-1][:, -1]
    return PPLMOutput(torch.cat(result, 1), [s.to_cpu() for s in steps])


def _attribute(x, x_tilde, h_u, h_tilde, hidden_sum, count, obj):
    """(before, after) per row: p(class) of the mean hidden state with the current token's
    unperturbed / perturbed hidden state, or else the bags' mass under p / p̃."""
    if obj.head is not None:
        n = (count + 1)[:, None].to(h_u.dtype)
        f = lambda h: obj.head((hidden_sum + h) / n).softmax(-1)[:, obj.label]
        return f(h_u), f(h_tilde)
    if obj.bags is not None:
        mass = lambda logits: (logits.softmax(-1) @ obj.bags.T).sum(-1)
        return mass(x), mass(x_tilde)
    z = torch.full((x.size(0),), float("nan"), device=x.device)
    return z, z


# ---- command line (techniques/pplm_cli.py) -----------------------------------------------------------
def main(argv=None) -> int:
    """python -m techniques.pplm ... (see pplm_cli.py)."""
    from .pplm_cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
