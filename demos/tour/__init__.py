"""The learner's tour: every technique on one model, measured and drawn.

    python -m demos.tour [--model NAME | --weights DIR] [--out runs/tour] [--quick] [--smoke] [--device ...] [--seed N]

Six steps, in order; each prints what it does and draws at least one PNG:
  1. next-token probabilities: the model's top tokens, and the same distribution
     after temperature, top-k and top-p (minigpt's sampling math, checked by sampling);
  2. attention: one layer's heads over a sentence (`output_attentions=True`);
  3. LoRA on the poem verses: loss curves, samples before/after, W / ΔW / W + ΔW,
     the singular values of ΔW (rank r), merged vs unmerged logits;
  4. prefix tuning on E2E (restaurant records -> sentences): loss curve,
     held-out outputs before/after, parameter counts (direct, reparametrised);
  5. PPLM with the positive-words bag: unperturbed vs perturbed text, the bag's
     mass per token, and the hidden-state nudge in a 3-D PCA;
  6. the hybrid: the LoRA adapter, the prefix and PPLM in one generation, against each alone.

Everything shown comes from the run: no canned text. The output folder gets
index.html (self-contained), report.md, the PNGs and summary.json. Each step
is a public function `step_*(ctx) -> StepResult` over a shared `TourContext`,
so demos/tour.ipynb runs the same code one step at a time (`setup`, `show`, `finish`).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.ticker import MaxNLocator
from tqdm.auto import tqdm

from minigpt import (EOT_ID, GPT, TrainConfig, atomic_save_dir, collate_lm, evaluate, examples_from_pairs, generate,
                     get_tokenizer, lm_loss_fn, resolve_precision, sample_next_token, write_json)
from minigpt.cli import describe_plan, run_command
from minigpt.tokenizer import Tokenizer
from techniques import pplm
from techniques.pplm import BagOfWords
from techniques.lora import lora_modules, lora_parameters, lora_summary, merge_lora
from techniques.prefix import PrefixTuning, train_prefix

from ..common import (Report, Stopwatch, add_demo_args, bow_stepsize, choose_model, finite_or_none, format_seconds,
                     html_item, moving_average, new_figure, run_mode, save_figure)
from ..kits import (E2E, EOT, LORA, PREFIX_HIDDEN, e2e_prompt, group_by_mr, lora_lr, new_lora_model, prefix_lr, read_e2e,
                   read_verses, train_lora_parameters, verse_examples)

__all__ = ["Sizes", "SIZES", "TourContext", "StepResult", "STEPS", "step_next_token", "step_attention", "step_lora",
           "step_prefix", "step_pplm", "step_hybrid", "run_tour", "build_summary", "build_report", "setup", "show",
           "finish", "filtered_probs", "pplm_knobs", "forecast", "estimate_seconds", "build_parser", "main"]


# ---- what the steps read and how they sample -------------------------------------------------------
NEXT_TOKEN_PROMPT = "The king looked at the crowd and said"
SAMPLING = dict(temperature=0.8, top_k=10, top_p=0.9)     # step 1's filters (minigpt.sample_next_token's order)
ATTENTION_SENTENCE = "The old man gave the boy his book because he had finished reading it."
SAMPLE_KNOBS = dict(do_sample=True, temperature=0.9, top_k=40)  # samples before/after LoRA

# LoRA: the paper's r = 8, alpha = 16 on the attention's q and v (Hu et al. 2021, section 7.1 / Table 5), as
# demos.kits.LORA holds it. The paper's lr 2e-4 (GPT-2 M on E2E) is for large models and thousands of steps; a
# few hundred steps on the small bundled model need a higher one (demos.kits.lora_lr: 2e-3 below width 512).

# Prefix tuning: the paper's P = 10 virtual tokens for table-to-text (E2E) and its MLP reparametrisation
# (Li & Liang 2021, sections 4.3 and 7.2, hidden width 512). The paper trains 5-10 epochs over 42k records at
# lr 5e-5 ... 5e-4; the tour has a few hundred steps, so it trains at a higher rate (demos.kits.prefix_lr).
PREFIX = dict(num_virtual_tokens=10, projection=True, hidden_size=PREFIX_HIDDEN)
PREFIX_BEAMS = 5  # the prefix-tuning paper decodes E2E with beam search, 5 beams (Li & Liang 2021, section 5.3)
E2E_MAX_TOKENS = 110   # prompt + completion tokens kept per record (the longest E2E pairs are ~100)

# PPLM with a bag of words: the paper's BoW settings (Dathathri et al. 2020, appendix: stepsize 0.03-0.04,
# 3 iterations, gamma 1.5, gm_scale 0.95, kl_scale 0.01, window 5, top-k 10 sampling), for GPT-2 medium.
# The bundled tiny models forced one change, the step size: models narrower than 512 take a larger one (0.1 at
# width 256, 0.3 below); see demos.common.bow_stepsize for the measurements behind it.
PPLM_BAG = "positive_words"
PPLM_PROMPT = "The lake"
PPLM_KNOBS = dict(stepsize=0.03, num_iterations=3, gamma=1.5, gm_scale=0.95, kl_scale=0.01, window_length=5,
                  do_sample=True, top_k=10)


def pplm_knobs(model: GPT, steer: bool = True) -> dict:
    """The PPLM knobs for this model; steer=False gives the same sampling with stepsize 0 (plain decoding)."""
    return {**PPLM_KNOBS, "stepsize": bow_stepsize(model, PPLM_KNOBS["stepsize"]) if steer else 0.0}


@dataclass
class Sizes:
    """How much each step does; --smoke, --quick and the full tour differ only here."""
    bars: int = 15                 # step 1: tokens drawn as bars
    draws: int = 3000              # step 1: samples from minigpt.sample_next_token to check the filtered bars
    lora_steps: int = 600
    lora_batch: int = 16
    lora_eval_every: int = 50
    lora_eval_verses: Optional[int] = None   # None = every held-out (dev) verse
    samples: int = 3               # samples before/after LoRA, outputs before/after the prefix
    sample_tokens: int = 24
    prefix_steps: int = 1000
    prefix_batch: int = 8
    prefix_eval_every: int = 100
    prefix_eval_mrs: int = 40      # held-out E2E inputs (all their references are eval examples)
    prefix_tokens: int = 48
    pplm_samples: int = 6
    pplm_tokens: int = 40
    hybrid_inputs: int = 5
    hybrid_tokens: int = 40


SIZES = {
    "full": Sizes(),
    "quick": Sizes(draws=1000, lora_steps=200, lora_eval_every=25, samples=3, sample_tokens=20,
                   prefix_steps=300, prefix_eval_every=50, prefix_eval_mrs=20, prefix_tokens=40,
                   pplm_samples=4, pplm_tokens=30, hybrid_inputs=3, hybrid_tokens=30),
    "smoke": Sizes(bars=8, draws=64, lora_steps=3, lora_batch=4, lora_eval_every=2, lora_eval_verses=8, samples=1,
                   sample_tokens=4, prefix_steps=3, prefix_batch=4, prefix_eval_every=2, prefix_eval_mrs=2,
                   prefix_tokens=4, pplm_samples=1, pplm_tokens=4, hybrid_inputs=1, hybrid_tokens=4),
}


@dataclass
class TourContext:
    """What every step shares: the model and the run's settings, then what a step leaves for a later one
    (each None until the step that makes it has run) and the run's bookkeeping."""
    model: GPT
    model_name: str
    tokenizer: Tokenizer
    out: Path
    seed: int
    sizes: Sizes
    mode: str = "full"
    progress: bool = True
    precision: str = "fp32"        # the LoRA and prefix steps' training arithmetic (--precision)
    # left by one step for another
    lora_model: Optional[GPT] = None            # step 3's LoRA-tuned copy of the model; step 6 generates with it
    prefix: Optional[PrefixTuning] = None       # step 4's trained prefix, folded to its direct table; step 6 reads it
    e2e_held_out: Optional[list[str]] = None    # step 4's held-out E2E inputs (meaning representations); step 6's
    bag: Optional[BagOfWords] = None            # the PPLM bag of steps 5 and 6; `pplm_bag()` loads it once
    # the run's bookkeeping
    forecast: Optional[dict[str, float]] = None  # seconds per step, from estimate_seconds (summary.json shows it)
    model_line: str = ""                        # which model and why (choose_model's reason): the report's opening
    clock: Optional[Stopwatch] = None           # the notebook's wall clock, started by setup(); finish() reads it
    cpu_start: float = 0.0                      # time.process_time() when the run began

    @property
    def device(self) -> torch.device:
        return self.model.device

    def generator(self, offset: int = 0) -> torch.Generator:
        """A fresh seeded generator: the same offset gives the same draws (same-seed comparisons)."""
        return torch.Generator(device=self.device).manual_seed(self.seed + offset)

    def pplm_bag(self) -> BagOfWords:
        """The PPLM bag (PPLM_BAG in this tokenizer's ids), loaded on first use and kept."""
        if self.bag is None:
            self.bag = pplm.load_bag(PPLM_BAG, self.tokenizer)
        return self.bag


@dataclass
class StepResult:
    key: str                       # summary.json's key for the step
    title: str
    numbers: dict                  # measured, JSON-ready
    figures: list[Path]
    report: list[tuple]            # common.Report items
    seconds: float = 0.0


def _announce(n: int, title: str, what: str) -> None:
    print(f"\n[{n}/6] {title}: {what}", flush=True)


def _encode(ctx: TourContext, text: str) -> torch.Tensor:
    return torch.tensor([ctx.tokenizer.encode(text)], dtype=torch.long, device=ctx.device)  # (1, T)


def _token_label(tok: Tokenizer, i: int) -> str:
    """A token as a label: spaces shown as ␣, newlines as ↵."""
    return tok.decode([i]).replace(" ", "␣").replace("\n", "↵")


def _r(x: float, digits: int = 4) -> float:
    return round(float(x), digits)


# ==== step 1: next-token probabilities ===============================================================
def filtered_probs(logits: torch.Tensor, *, temperature: float, top_k: Optional[int], top_p: Optional[float]
                   ) -> torch.Tensor:
    """The distribution minigpt.sample_next_token draws from, (V,) -> (V,): logits / T, then top-k
    (keep the k largest), then top-p (drop a token once the ones before it hold top_p of the mass).
    The same three steps as the library's; step 1 checks them against its draws."""
    z = logits / temperature
    if top_k is not None and top_k < z.numel():
        z = z.masked_fill(z < torch.topk(z, top_k).values[-1], float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_z, order = z.sort(descending=True)
        p = sorted_z.softmax(-1)
        drop_sorted = (p.cumsum(-1) - p) >= top_p
        z = z.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return z.softmax(-1)


def sampled_frequencies(logits: torch.Tensor, n: int, generator: torch.Generator, **sampling) -> torch.Tensor:
    """How often minigpt.sample_next_token picks each token in n draws, (V,)."""
    counts = torch.zeros(logits.numel(), device=logits.device)
    done = 0
    while done < n:
        rows = min(256, n - done)
        toks = sample_next_token(logits.expand(rows, -1), do_sample=True, generator=generator, **sampling)  # (rows,)
        counts += torch.bincount(toks, minlength=logits.numel()).to(counts.dtype)
        done += rows
    return counts / n


def _entropy(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def step_next_token(ctx: TourContext) -> StepResult:
    s, tok = ctx.sizes, ctx.tokenizer
    filt = ", ".join(f"{k}={v}" for k, v in SAMPLING.items())
    _announce(1, "Next-token probabilities",
              f"the model's distribution after {NEXT_TOKEN_PROMPT!r}, then after {filt}; {s.draws} draws from "
              "minigpt.sample_next_token check the filtered numbers")
    with torch.no_grad():
        logits = ctx.model(_encode(ctx, NEXT_TOKEN_PROMPT)).logits[0, -1].float()  # (V,)
        probs = logits.softmax(-1)
        kept = filtered_probs(logits, **SAMPLING)
        freq = sampled_frequencies(logits, s.draws, ctx.generator(1), **SAMPLING)
    top_p, top_i = probs.topk(s.bars)
    ids = top_i.tolist()
    labels = [_token_label(tok, i) for i in ids]
    numbers = {
        "prompt": NEXT_TOKEN_PROMPT, "sampling": SAMPLING,
        "top": [{"token": tok.decode([i]), "p": _r(probs[i], 5), "p_filtered": _r(kept[i], 5),
                 "sampled": _r(freq[i], 5)} for i in ids],
        "entropy_nats": _r(_entropy(probs)), "entropy_filtered_nats": _r(_entropy(kept)),
        "kept_tokens": int((kept > 0).sum()), "draws": s.draws,
        "draws_outside_kept": int(round(float(freq[kept == 0].sum()) * s.draws)),
        "max_abs_sampled_minus_exact": _r((freq - kept).abs().max(), 5),
    }
    for row in numbers["top"][:5]:
        print(f"  {row['token']!r:>14}  p={row['p']:.3f}  after filters={row['p_filtered']:.3f}  "
              f"sampled={row['sampled']:.3f}")
    print(f"  the filters keep {numbers['kept_tokens']} of {probs.numel():,} tokens; entropy "
          f"{numbers['entropy_nats']:.2f} -> {numbers['entropy_filtered_nats']:.2f} nats; "
          f"{numbers['draws_outside_kept']} of {s.draws} draws fell outside the kept set")

    fig = new_figure((8, 4.5))
    left, right = fig.subplots(1, 2, sharey=True)
    y = list(range(len(ids)))
    left.barh(y, top_p.cpu().tolist(), color="#4c72b0")
    left.set(title="model softmax (temperature 1)", xlabel="probability", ylabel="next token (␣ = space)")
    left.set_yticks(y, labels, fontsize=8)
    left.invert_yaxis()
    rest = 1 - float(top_p.sum())
    left.text(0.98, 0.02, f"other {probs.numel() - len(ids):,} tokens: {100 * rest:.1f}%", transform=left.transAxes,
              ha="right", va="bottom", fontsize=8, color="#555")
    kept_top = [float(kept[i]) for i in ids]
    right.barh(y, kept_top, color=["#55a868" if k > 0 else "#cccccc" for k in kept_top], label="after the filters")
    right.plot([float(freq[i]) for i in ids], y, "k.", ms=7, label=f"share of {s.draws} draws")
    for yi, k in zip(y, kept_top):
        if k == 0:
            right.text(0.005, yi, "removed", va="center", fontsize=7, color="#777")
    right.set(title=f"T={SAMPLING['temperature']}, top-k={SAMPLING['top_k']}, top-p={SAMPLING['top_p']}",
              xlabel="probability")
    right.legend(loc="lower right", fontsize=8)
    path = save_figure(fig, ctx.out / "next_token.png", f"Next token after “{NEXT_TOKEN_PROMPT}”")
    report = [("text", f"Prompt: “{NEXT_TOKEN_PROMPT}”. The left panel is the model's softmax over its "
                       f"{probs.numel():,}-token vocabulary (top {len(ids)} shown); the right one is what "
                       f"minigpt.sample_next_token draws from with {filt}: {numbers['kept_tokens']} tokens stay. "
                       f"Dots: the share of {s.draws} real draws ({numbers['draws_outside_kept']} outside the kept "
                       f"set; largest gap to the exact numbers {numbers['max_abs_sampled_minus_exact']:.3f})."),
              ("image", path, "Top next tokens before and after temperature, top-k and top-p."),
              ("table", ["token", "p", "after filters", "sampled"],
               [[repr(r["token"]), f"{r['p']:.4f}", f"{r['p_filtered']:.4f}", f"{r['sampled']:.4f}"]
                for r in numbers["top"]])]
    return StepResult("next_token", "Next-token probabilities", numbers, [path], report)


# ==== step 2: attention ==============================================================================
def step_attention(ctx: TourContext) -> StepResult:
    cfg, tok = ctx.model.config, ctx.tokenizer
    layer = cfg.n_layer // 2
    _announce(2, "Attention", f"the {cfg.n_head} heads of layer {layer} (of {cfg.n_layer}) over "
                              f"{ATTENTION_SENTENCE!r}, from output_attentions=True")
    ids = _encode(ctx, ATTENTION_SENTENCE)
    with torch.no_grad():
        att = ctx.model(ids, output_attentions=True).attentions[layer][0].float().cpu()  # (nh, T, T)
    T = att.size(-1)
    labels = [_token_label(tok, i) for i in ids[0].tolist()]
    ent = -(att.clamp_min(1e-12).log() * att).sum(-1).mean(-1)           # (nh,) mean entropy per query
    first = att[:, 1:, 0].mean(-1)                                        # (nh,) attention on the first token
    prev = torch.diagonal(att, offset=-1, dim1=1, dim2=2).mean(-1)        # (nh,) attention on the previous token
    heads = [{"head": h, "entropy_nats": _r(ent[h]), "to_first_token": _r(first[h]), "to_previous_token": _r(prev[h])}
             for h in range(cfg.n_head)]
    for row in heads:
        print(f"  head {row['head']}: entropy {row['entropy_nats']:.2f} nats, on the first token "
              f"{row['to_first_token']:.2f}, on the previous token {row['to_previous_token']:.2f}")
    ncols = 2 if cfg.n_head <= 4 else 4   # 4 heads: 2 x 2, so that every token label stays legible
    nrows = math.ceil(cfg.n_head / ncols)
    fig = new_figure((8, (3.6 if ncols == 2 else 2.4) * nrows + 1.0))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    im, cmap = None, matplotlib.colormaps["viridis"].with_extremes(bad="#f2f2f2")
    for h, ax in enumerate(axes.flat):
        if h >= cfg.n_head:
            ax.axis("off")
            continue
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        shown = np.ma.masked_where(~causal.numpy(), att[h].numpy())  # the masked future drawn blank, not as 0
        im = ax.imshow(shown, cmap=cmap, vmin=0, vmax=1)
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xticks(range(T), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(T), labels if h % ncols == 0 else [""] * T, fontsize=7)
        if h % ncols == 0:
            ax.set_ylabel("query (attending) token", fontsize=8)
        if h >= cfg.n_head - ncols:
            ax.set_xlabel("key token (attended to)", fontsize=8)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="attention weight (probability)")
    path = save_figure(fig, ctx.out / "attention.png",
                       f"Layer {layer}: each row is one token's attention over the tokens so far", tight=False)
    report = [("text", f"Layer {layer} of {cfg.n_layer}, all {cfg.n_head} heads, over “{ATTENTION_SENTENCE}”. "
                       "Row i is token i's softmax over tokens 0..i (the upper triangle is masked: no looking "
                       "ahead)."),
              ("image", path, "Attention weights per head."),
              ("table", ["head", "mean entropy (nats)", "on the first token", "on the previous token"],
               [[r["head"], f"{r['entropy_nats']:.2f}", f"{r['to_first_token']:.2f}", f"{r['to_previous_token']:.2f}"]
                for r in heads])]
    return StepResult("attention", "Attention", {"layer": layer, "sentence": ATTENTION_SENTENCE, "tokens": T,
                                                 "heads": heads}, [path], report)


# ==== step 3: LoRA on the poem verses ================================================================
def _sample_texts(ctx: TourContext, model: GPT, prompts: Sequence[str], n_tokens: int, offset: int,
                  past_fn: Optional[Callable] = None, **knobs) -> list[str]:
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
                 baseline: Optional[tuple[str, float]] = None) -> Path:
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


def _heatmaps_figure(panels: Sequence[tuple[str, torch.Tensor]], path: Path, title: str) -> Path:
    """One heatmap per matrix, each on its own symmetric colour scale clipped at the 99.5th percentile of |value|."""
    fig = new_figure((8, 3.1))
    axes = fig.subplots(1, len(panels))
    for ax, (name, m) in zip(axes, panels):
        m = m.detach().float().cpu()
        lim = float(torch.quantile(m.abs().flatten()[:1_000_000], 0.995)) or 1e-12
        im = ax.imshow(m.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("input feature", fontsize=8)
        ax.set_ylabel("output feature", fontsize=8)
        ax.tick_params(labelsize=7)
        fig.colorbar(im, ax=ax, shrink=0.75).ax.tick_params(labelsize=7)
    return save_figure(fig, path, title)


def _singular_values_figure(svals: dict[str, torch.Tensor], r: int, path: Path, title: str) -> Path:
    fig = new_figure()
    ax = fig.subplots()
    for (name, s), color in zip(svals.items(), ("#4c72b0", "#dd8452", "#55a868")):
        ax.semilogy(range(1, len(s) + 1), s.clamp_min(1e-30).tolist(), ".-", ms=4, lw=1, color=color, label=name)
    ax.axvline(r + 0.5, color="#c44e52", ls="--", lw=1.5, label=f"r = {r}")
    ax.set(xlabel="index of the singular value (largest first)", ylabel="singular value (log scale)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=9)
    return save_figure(fig, path, title)


def step_lora(ctx: TourContext) -> StepResult:
    s, model = ctx.sizes, ctx.model
    train_verses, dev_verses = read_verses("train"), read_verses("dev")
    if s.lora_eval_verses is not None:
        dev_verses = dev_verses[:s.lora_eval_verses]
    max_len = min(64, model.config.n_positions)
    train_ex, eval_ex = verse_examples(train_verses, max_len), verse_examples(dev_verses, max_len)
    lr = lora_lr(model)
    _announce(3, "LoRA", f"r={LORA['r']}, alpha={LORA['alpha']} adapters on c_attn's q and v, trained on "
                         f"{len(train_ex)} poem verses (train split), eval loss on {len(eval_ex)} held-out verses "
                         f"(dev split), lr {lr:g}")
    lora_model = new_lora_model(model)
    trainable = sum(p.numel() for p in lora_parameters(lora_model))
    config = TrainConfig(max_steps=s.lora_steps, batch_size=s.lora_batch, lr=lr, eval_every=s.lora_eval_every,
                         seed=ctx.seed, progress=ctx.progress, precision=ctx.precision)
    print(f"  {lora_summary(lora_model)}")
    print(f"  {describe_plan(len(train_ex), len(eval_ex), config)}")
    loss_fn = lm_loss_fn(lora_model)
    eval_before = evaluate(loss_fn, eval_ex, s.lora_batch, collate_lm, ctx.device, [lora_model])
    print(f"  eval loss before training: {eval_before:.3f} nats/token")
    prompts = [EOT + " " + " ".join(v.split()[:2]) for v in dev_verses[:s.samples]]
    before = _sample_texts(ctx, model, prompts, s.sample_tokens, 100, **SAMPLE_KNOBS)
    history = train_lora_parameters(lora_model, train_ex, eval_ex, config)
    eval_after = history[-1]["eval_loss"]
    after = _sample_texts(ctx, lora_model, prompts, s.sample_tokens, 100, **SAMPLE_KNOBS)
    print(f"  eval loss after training: {eval_after:.3f} nats/token (before: {eval_before:.3f})")
    for p, b, a in zip(prompts, before, after):
        print(f"  {p[len(EOT):]!r}  before: {b!r}\n  {'':>{len(repr(p[len(EOT):]))}}  after:  {a!r}")

    diff = merged_logits_gap(lora_model, eval_ex[:8], ctx.device)
    print(f"  merged vs unmerged logits: max |difference| {diff:.2e}")
    block, W, dW = most_moved_query(lora_model)
    with torch.no_grad():
        svals = {f"ΔW_{p} = s·B_{p}·A_{p}": torch.linalg.svdvals(d).cpu() for p, d in dW.items()}
    r = LORA["r"]
    sv_q = svals["ΔW_q = s·B_q·A_q"]
    numerical_rank = int((sv_q > sv_q[0] * 1e-6).sum()) if float(sv_q[0]) > 0 else 0
    ratio = float(dW["q"].norm() / W.norm())
    figs = [_loss_figure(history, eval_before, ctx.out / "lora_loss.png",
                         f"LoRA on poem verses: loss (r={r}, {trainable:,} trainable parameters)"),
            _heatmaps_figure([("W (W0, q rows)", W), ("ΔW = s·B·A", dW["q"]), ("W + ΔW", W + dW["q"])],
                             ctx.out / "lora_weights.png", f"{block}: query projection, before and after LoRA"),
            _singular_values_figure(svals, r, ctx.out / "lora_singular_values.png",
                                    f"Singular values of ΔW in {block}: rank {numerical_rank} (r = {r})")]
    print(f"  ΔW_q of {block}: numerical rank {numerical_rank} (r = {r}); ‖ΔW‖/‖W‖ = {ratio:.4f}")
    ctx.lora_model = lora_model
    numbers = {"eval_loss_before": _r(eval_before), "eval_loss_after": _r(eval_after), "rank": r,
               "alpha": LORA["alpha"], "qkv": LORA["qkv"], "numerical_rank": numerical_rank,
               "merged_max_abs_diff": float(f"{diff:.3e}"), "trainable_parameters": trainable,
               "total_parameters": sum(p.numel() for p in lora_model.parameters()), "steps": len(history),
               "lr": lr, "train_verses": len(train_ex), "eval_verses": len(eval_ex), "drawn_layer": block,
               "delta_over_weight_norm": _r(ratio, 6),
               "samples": [{"prompt": p[len(EOT):], "before": b, "after": a}
                           for p, b, a in zip(prompts, before, after)]}
    report = [("text", f"{lora_summary(lora_model)}. Trained {len(history)} steps at lr {lr:g} on {len(train_ex)} "
                       f"verses; the eval loss on {len(eval_ex)} held-out verses went from {eval_before:.3f} to "
                       f"{eval_after:.3f} nats/token. Merged (W0 + ΔW) and unmerged logits differ by at most "
                       f"{diff:.1e}."),
              ("image", figs[0], "Train and held-out loss."),
              ("table", ["prompt", "before (base model)", "after (LoRA), same seed"],
               [[p[len(EOT):], b, a] for p, b, a in zip(prompts, before, after)]),
              ("text", f"The query projection of {block} (the one LoRA moved most): W0, the update ΔW = s·B·A "
                       f"(s = alpha/r = {LORA['alpha'] / r:g}) and their sum, each on its own colour scale. "
                       f"‖ΔW‖/‖W‖ = {ratio:.4f}" + (": a small update, W + ΔW looks like W to the eye."
                                                    if ratio < 0.05 else ".")),
              ("image", figs[1], "W, ΔW and W + ΔW of one projection."),
              ("text", f"ΔW = B·A is a product through r = {r} dimensions, so at most {r} singular values are "
                       f"non-zero; the rest are rounding noise (numerical rank here: {numerical_rank})."),
              ("image", figs[2], "Singular values of ΔW (log scale).")]
    return StepResult("lora", "LoRA", numbers, figs, report)


def merged_logits_gap(lora_model: GPT, examples, device) -> float:
    """max |logits of W0 + ΔW folded in (merge_lora, on a copy) - logits with the separate LoRA branch|."""
    batch = {k: v.to(device) for k, v in collate_lm(examples).items()}
    merged = merge_lora(copy.deepcopy(lora_model))
    with torch.no_grad():
        unmerged_logits = lora_model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        merged_logits = merged(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float((merged_logits - unmerged_logits).abs().max())


def most_moved_query(lora_model: GPT) -> tuple[str, torch.Tensor, dict[str, torch.Tensor]]:
    """(block name, W0's q rows (C, C), {"q": ΔW_q, "v": ΔW_v}) of the c_attn whose ΔW_q is largest relative
    to W_q (float64, for clean singular values). ΔW_p = s·B_p·A_p, each (C, C)."""
    C = lora_model.config.n_embd
    layers = list(lora_modules(lora_model))
    with torch.no_grad():
        rel = [float((m.scaling * m.B["q"] @ m.A["q"]).norm() / m.base.weight[:C].norm()) for _, m in layers]
        name, layer = layers[max(range(len(layers)), key=rel.__getitem__)]
        W = layer.base.weight[:C].double()                                                 # (C, C)
        dW = {p: layer.scaling * (layer.B[p] @ layer.A[p]).double() for p in LORA["qkv"]}  # each (C, C)
    return name.replace(".attn.c_attn", ""), W, dW


# ==== step 4: prefix tuning on E2E ===================================================================
def e2e_data(seed: int, n_held_out: int) -> tuple[list[tuple[str, str]], list[str], dict[str, list[str]]]:
    """(the (mr, ref) rows of devset.csv, to train on; n held-out inputs of testset_w_refs.csv, a seeded
    choice; every held-out input's references)."""
    by_mr = group_by_mr(read_e2e(E2E / "testset_w_refs.csv"))
    held_out = sorted(by_mr)
    random.Random(seed).shuffle(held_out)
    return read_e2e(E2E / "devset.csv"), held_out[:n_held_out], by_mr


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


def step_prefix(ctx: TourContext) -> StepResult:
    s, tok, model = ctx.sizes, ctx.tokenizer, ctx.model
    P = PREFIX["num_virtual_tokens"]
    train_rows, held_out, by_mr = e2e_data(ctx.seed, s.prefix_eval_mrs)
    max_len = min(E2E_MAX_TOKENS, model.config.n_positions - P)
    train_ex = examples_from_pairs(tok, [(e2e_prompt(mr), " " + ref) for mr, ref in train_rows], max_len)
    eval_ex = examples_from_pairs(tok, [(e2e_prompt(mr), " " + ref) for mr in held_out for ref in by_mr[mr]],
                                  max_len)
    lr = prefix_lr(model)
    _announce(4, "Prefix tuning", f"P={P} virtual tokens (MLP-reparametrised) for E2E: `{e2e_prompt('mr')}` -> "
                                  f"` ref`; trained on {len(train_ex)} records of devset.csv, eval loss on the "
                                  f"{len(eval_ex)} references of {len(held_out)} held-out inputs of "
                                  f"testset_w_refs.csv, lr {lr:g}")
    torch.manual_seed(ctx.seed)
    prefix = PrefixTuning(model.config, P, projection=PREFIX["projection"],
                          hidden_size=PREFIX["hidden_size"]).to(ctx.device)
    n_reparam = sum(p.numel() for p in prefix.parameters())   # P'[P, d] + the MLP: what trains
    n_direct = sum(p.numel() for p in PrefixTuning(model.config, P).parameters())  # P_theta [P, 2·L·d]: folded
    config = TrainConfig(max_steps=s.prefix_steps, batch_size=s.prefix_batch, lr=lr,
                         eval_every=s.prefix_eval_every, seed=ctx.seed, progress=ctx.progress,
                         precision=ctx.precision)
    print(f"  trainable: {n_reparam:,} parameters (reparametrised: P'[{P}, {model.config.n_embd}] + MLP); "
          f"the direct table P_theta [P, 2·L·d] has {n_direct:,}; the model's {model.num_parameters():,} stay frozen")
    print(f"  {describe_plan(len(train_ex), len(eval_ex), config)}")
    plain = evaluate(lm_loss_fn(model), eval_ex, s.prefix_batch, collate_lm, ctx.device, [model])
    past_fn = lambda B: (prefix.past_key_values(B), P)  # noqa: E731
    prefix.eval()
    initial = evaluate(lm_loss_fn(model, past_fn=past_fn), eval_ex, s.prefix_batch, collate_lm, ctx.device, [model])
    print(f"  eval loss before training: {plain:.3f} nats/token without a prefix, {initial:.3f} with the untrained one")
    show_mrs = held_out[:s.samples]
    prompts = [e2e_prompt(mr) for mr in show_mrs]
    before = _sample_texts(ctx, model, prompts, s.prefix_tokens, 200, num_beams=PREFIX_BEAMS)
    before_greedy = _sample_texts(ctx, model, prompts, s.prefix_tokens, 200)
    history = train_prefix(model, prefix, train_ex, eval_examples=eval_ex, config=config)
    after_loss = history[-1]["eval_loss"]
    with torch.no_grad():
        folded = prefix.fold()
    after = _sample_texts(ctx, model, prompts, s.prefix_tokens, 200, past_fn=lambda: folded.past_key_values(1),
                          num_beams=PREFIX_BEAMS)
    after_greedy = _sample_texts(ctx, model, prompts, s.prefix_tokens, 200,
                                 past_fn=lambda: folded.past_key_values(1))
    print(f"  eval loss after training: {after_loss:.3f} nats/token (no prefix: {plain:.3f})")
    for mr, b, a, g in zip(show_mrs, before, after, after_greedy):
        print(f"  {mr}\n    before (beam {PREFIX_BEAMS}): {b!r}\n    after (beam {PREFIX_BEAMS}):  {a!r}\n"
              f"    after (greedy):  {g!r}")
    ctx.prefix = folded
    ctx.e2e_held_out = held_out
    fig = _loss_figure(history, initial, ctx.out / "prefix_loss.png",
                       f"Prefix tuning on E2E: loss (P={P}, {n_reparam:,} trainable parameters)",
                       baseline=("eval, no prefix", plain))
    numbers = {"eval_loss_before": _r(plain), "eval_loss_init": _r(initial), "eval_loss_after": _r(after_loss),
               "P": P, "parameters_direct": n_direct, "parameters_reparametrised": n_reparam,
               "hidden_size": PREFIX["hidden_size"], "steps": len(history), "lr": lr, "train_records": len(train_ex),
               "eval_references": len(eval_ex), "eval_inputs": len(held_out),
               "slot_recall_before": mean_slot_recall(show_mrs, before),
               "slot_recall_after": mean_slot_recall(show_mrs, after),
               "decoding": f"beam {PREFIX_BEAMS}",
               "slot_recall_before_greedy": mean_slot_recall(show_mrs, before_greedy),
               "slot_recall_after_greedy": mean_slot_recall(show_mrs, after_greedy),
               "outputs": [{"mr": mr, "before": b, "after": a, "before_greedy": bg, "after_greedy": ag}
                           for mr, b, a, bg, ag in zip(show_mrs, before, after, before_greedy, after_greedy)]}
    report = [("text", f"A prefix of P = {P} learned key/value vectors per layer, reparametrised through an MLP "
                       f"({n_reparam:,} trainable parameters; folded to the direct table P_theta it is {n_direct:,} "
                       f"numbers). Eval loss on the references of {len(held_out)} held-out inputs: no prefix "
                       f"{plain:.3f}, untrained prefix {initial:.3f}, trained {after_loss:.3f} nats/token."),
              ("image", fig, "Prefix-tuning loss (the dashed line: the model without a prefix)."),
              ("table", ["held-out input (mr)", f"before: no prefix (beam {PREFIX_BEAMS})",
                         f"after: with the prefix (beam {PREFIX_BEAMS})", "after: with the prefix (greedy)"],
               [[mr, b, a, g] for mr, b, a, g in zip(show_mrs, before, after, after_greedy)]),
              ("text", f"Decoded as the paper did, beam search with {PREFIX_BEAMS} beams. Share of each input's "
                       f"values named in the output: {100 * numbers['slot_recall_before']:.0f}% before, "
                       f"{100 * numbers['slot_recall_after']:.0f}% after (greedy: "
                       f"{100 * numbers['slot_recall_before_greedy']:.0f}% -> "
                       f"{100 * numbers['slot_recall_after_greedy']:.0f}%).")]
    return StepResult("prefix", "Prefix tuning", numbers, [fig], report)


# ==== step 5: PPLM ===================================================================================
def _spans(tok: Tokenizer, ids: Sequence[int], bag_ids: set) -> list[tuple[str, bool]]:
    return [(tok.decode([i]), i in bag_ids) for i in ids if i != EOT_ID]


def bag_share(new_tokens: torch.Tensor, bag_ids: set) -> float:
    """Share of the generated tokens (rows, T) that are words of the bag."""
    return sum(t in bag_ids for t in new_tokens.flatten().tolist()) / max(1, new_tokens.numel())


def _pca3(points: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Project (N, C) points on their top 3 principal components: (N, 3) and each component's share of variance."""
    x = points.double() - points.double().mean(0)
    U, S, V = torch.linalg.svd(x, full_matrices=False)
    total = float((S ** 2).sum()) or 1.0
    k = min(3, V.size(0))
    proj = x @ V[:k].T
    if k < 3:
        proj = torch.cat([proj, proj.new_zeros(proj.size(0), 3 - k)], 1)
    return proj, [float(S[i] ** 2) / total for i in range(k)] + [0.0] * (3 - k)


def _pca_figure(unpert: torch.Tensor, before: torch.Tensor, after: torch.Tensor, path: Path) -> Path:
    """unpert (T, C): the unperturbed run's final hidden states; before/after (T, C): the perturbed run's, unperturbed
    and under the nudged past. One PCA over all three sets; arrows: the per-step shift before -> after."""
    T = unpert.size(0)
    proj, share = _pca3(torch.cat([unpert, before, after]))
    u, b, a = proj[:T].numpy(), proj[T:2 * T].numpy(), proj[2 * T:].numpy()
    fig = new_figure((8, 6))
    ax = fig.add_subplot(111, projection="3d")
    ax.plot(u[:, 0], u[:, 1], u[:, 2], "o-", color="#999999", ms=3, lw=0.6, alpha=0.6, label="unperturbed run")
    ax.plot(b[:, 0], b[:, 1], b[:, 2], "o-", color="#4c72b0", ms=3.5, lw=0.6, alpha=0.6,
            label="perturbed run, before the nudge")
    ax.scatter(a[:, 0], a[:, 1], a[:, 2], color="#55a868", s=16, depthshade=False,
               label="perturbed run, after the nudge")
    d = a - b
    ax.quiver(b[:, 0], b[:, 1], b[:, 2], d[:, 0], d[:, 1], d[:, 2], color="#c44e52", arrow_length_ratio=0.2, lw=1.6,
              label="per-step shift (Δ on the past)")
    ax.scatter(*u[0], color="k", s=30, marker="*", label="first generated token")
    for i, (lab, sh) in enumerate(zip(("x", "y", "z"), share)):
        getattr(ax, f"set_{lab}label")(f"PC{i + 1} ({100 * sh:.0f}% of variance)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=8, loc="upper left")
    return save_figure(fig, path, "PPLM's hidden-state nudge: final hidden states, 3-D PCA")


def _attribute_figure(unpert: torch.Tensor, pert_before: torch.Tensor, pert_after: torch.Tensor, path: Path) -> Path:
    """Bag mass per generated token (steps, rows), averaged over the rows."""
    fig = new_figure()
    ax = fig.subplots()
    x = list(range(1, unpert.size(0) + 1))
    ax.plot(x, unpert.mean(1).tolist(), "o-", color="#999999", ms=4,
            label=f"unperturbed run (mean {unpert.mean():.3f})")
    ax.plot(list(range(1, pert_after.size(0) + 1)), pert_after.mean(1).tolist(), "o-", color="#55a868", ms=4,
            label=f"perturbed run, after the nudge (mean {pert_after.mean():.3f})")
    ax.plot(list(range(1, pert_before.size(0) + 1)), pert_before.mean(1).tolist(), ":", color="#4c72b0",
            label=f"perturbed run, before the nudge (mean {pert_before.mean():.3f})")
    ax.set(xlabel="generated token (1 = first)", ylabel="bag mass: p(next token in the bag)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return save_figure(fig, path, f"PPLM with the {PPLM_BAG} bag: attribute per generated token")


def step_pplm(ctx: TourContext) -> StepResult:
    s, tok, model = ctx.sizes, ctx.tokenizer, ctx.model
    bag = ctx.pplm_bag()
    bag_ids = set(bag.token_ids)
    knobs = ", ".join(f"{k}={v}" for k, v in pplm_knobs(model).items())
    _announce(5, "PPLM", f"{s.pplm_samples} continuation(s) of {PPLM_PROMPT!r}, unperturbed and perturbed "
                         f"towards the {PPLM_BAG} bag ({knobs}), same seed")
    print(f"  {bag.summary()}")
    ids = _encode(ctx, EOT + PPLM_PROMPT)
    common = dict(bow=bag, max_new_tokens=s.pplm_tokens, num_samples=s.pplm_samples, progress=ctx.progress)
    plain = pplm.generate(model, ids, generator=ctx.generator(300), **common, **pplm_knobs(model, steer=False))
    steered = pplm.generate(model, ids, generator=ctx.generator(300), **common, **pplm_knobs(model))
    T0 = ids.size(1)
    a_plain = plain.stacked("attribute_before")          # (steps, rows): bag mass under p along the plain run
    a_before = steered.stacked("attribute_before")       # (steps, rows): under p along the steered run
    a_after = steered.stacked("attribute_after")         # (steps, rows): under p̃ (PPLM draws from p̃^gm · p^(1-gm))
    texts = []
    for r in range(s.pplm_samples):
        texts.append((_spans(tok, plain.sequences[r, T0:].tolist(), bag_ids),
                      _spans(tok, steered.sequences[r, T0:].tolist(), bag_ids)))
    shift = (steered.stacked("hidden_after") - steered.stacked("hidden_before")).norm(dim=-1)  # (steps, rows)
    scale = steered.stacked("hidden_before").norm(dim=-1)
    numbers = {"attribute_unperturbed": _r(a_plain.mean(), 5), "attribute_perturbed": _r(a_after.mean(), 5),
               "attribute_perturbed_run_before_nudge": _r(a_before.mean(), 5),
               "bag_share_unperturbed": _r(bag_share(plain.sequences[:, T0:], bag_ids)),
               "bag_share_perturbed": _r(bag_share(steered.sequences[:, T0:], bag_ids)),
               "relative_hidden_shift": _r((shift / scale.clamp_min(1e-12)).mean()), "bag": PPLM_BAG,
               "bag_token_ids": len(bag_ids), "prompt": PPLM_PROMPT, "knobs": pplm_knobs(model),
               "samples": s.pplm_samples, "tokens": s.pplm_tokens,
               "texts": [{"unperturbed": "".join(t for t, _ in u), "perturbed": "".join(t for t, _ in p)}
                         for u, p in texts]}
    print(f"  bag mass per token: unperturbed {numbers['attribute_unperturbed']:.4f}, perturbed "
          f"{numbers['attribute_perturbed']:.4f}; bag words in the text: {100 * numbers['bag_share_unperturbed']:.1f}% "
          f"-> {100 * numbers['bag_share_perturbed']:.1f}%")
    for t in numbers["texts"]:
        print(f"  unperturbed: {PPLM_PROMPT + t['unperturbed']!r}\n  perturbed:   {PPLM_PROMPT + t['perturbed']!r}")
    figs = [_attribute_figure(a_plain, a_before, a_after, ctx.out / "pplm_attribute.png"),
            _pca_figure(plain.stacked("hidden_before")[:, 0], steered.stacked("hidden_before")[:, 0],
                        steered.stacked("hidden_after")[:, 0], ctx.out / "pplm_hidden_pca.png")]
    report = [("text", f"Prompt “{PPLM_PROMPT}”, {s.pplm_tokens} tokens, {s.pplm_samples} sample(s), the same seed "
                       f"for both runs; knobs {knobs}. {bag.summary()}. Words of the bag are marked.")]
    for u, p in texts:
        report.append(("pair", ("unperturbed", "perturbed (PPLM)"), [(PPLM_PROMPT, False)] + u,
                       [(PPLM_PROMPT, False)] + p))
    report += [("text", f"Mean bag mass per generated token: unperturbed {numbers['attribute_unperturbed']:.4f}, "
                        f"perturbed {numbers['attribute_perturbed']:.4f}; share of bag words in the text "
                        f"{100 * numbers['bag_share_unperturbed']:.1f}% vs "
                        f"{100 * numbers['bag_share_perturbed']:.1f}%."),
               ("image", figs[0], "The bag's probability mass at each step."),
               ("text", "The final hidden state (after ln_f) at each step, projected on 3 principal components. "
                        "Each arrow is one step's nudge: the same context read through the unperturbed past "
                        "(blue) and through the past PPLM moved (green). Mean ‖shift‖/‖h‖ = "
                        f"{numbers['relative_hidden_shift']:.3f}."),
               ("image", figs[1], "Hidden states along both runs, with the per-step shift.")]
    return StepResult("pplm", "PPLM", numbers, figs, report)


# ==== step 6: the hybrid =============================================================================
HYBRID_CONFIGS = (  # (key, label, LoRA, prefix, PPLM)
    ("base", "base model", False, False, False),
    ("lora", "LoRA alone", True, False, False),
    ("prefix", "prefix alone", False, True, False),
    ("pplm", "PPLM alone", False, False, True),
    ("hybrid", "LoRA + prefix + PPLM", True, True, True),
)

HYBRID_SHORT = {"base": "base", "lora": "LoRA", "prefix": "prefix", "pplm": "PPLM", "hybrid": "all three"}


def _mean_logprob(model: GPT, ids: Sequence[int]) -> float:
    """Mean log p(token) of ids after "<|endoftext|>", nats/token."""
    x = torch.tensor([[EOT_ID] + list(ids)], device=model.device)
    with torch.no_grad():
        logp = model(x).logits[0, :-1].float().log_softmax(-1)          # (n, V)
    return float(logp.gather(-1, x[0, 1:, None]).mean())


def _hybrid_figure(rows: dict, path: Path) -> Path:
    fig = new_figure()
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2.2, 1]})
    keys = [k for k, *_ in HYBRID_CONFIGS]
    short = [HYBRID_SHORT[k] for k in keys]
    metrics = (("slot_recall", "record values named"), ("bag_share", "bag words in text"),
               ("bag_mass", "bag mass per token"))
    width = 0.8 / len(metrics)
    for j, ((m, name), color) in enumerate(zip(metrics, ("#4c72b0", "#55a868", "#8172b3"))):
        left.bar([i + (j - 1) * width for i in range(len(keys))], [100 * (rows[k][m] or 0) for k in keys], width,
                 color=color, label=name)
    left.set_xticks(range(len(keys)), short, fontsize=9)
    left.set(ylabel="percent")
    left.legend(fontsize=8, ncols=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    left.grid(alpha=0.3, axis="y")
    right.bar(range(len(keys)), [rows[k]["verse_style"] or 0 for k in keys], color="#dd8452")
    right.axhline(0, color="k", lw=0.8)
    right.set_xticks(range(len(keys)), short, rotation=35, ha="right", fontsize=9)
    right.set_ylabel("log p_LoRA - log p_base (nats/token)", fontsize=8)
    right.set_title("verse style", fontsize=10)
    right.grid(alpha=0.3, axis="y")
    return save_figure(fig, path, "Hybrid: each technique alone and all three together, on held-out E2E inputs")


def step_hybrid(ctx: TourContext) -> StepResult:
    s, tok, model = ctx.sizes, ctx.tokenizer, ctx.model
    left = {"lora_model": ctx.lora_model, "prefix": ctx.prefix, "e2e_held_out": ctx.e2e_held_out}
    missing = [name for name, value in left.items() if value is None]
    if missing:
        raise ValueError(f"the hybrid step reuses the LoRA model and the prefix of steps 3 and 4 (missing: "
                         f"{', '.join(missing)}); run step_lora(ctx) and step_prefix(ctx) first")
    lora_model, prefix, bag = ctx.lora_model, ctx.prefix, ctx.pplm_bag()
    bag_ids = set(bag.token_ids)
    mrs = ctx.e2e_held_out[:s.hybrid_inputs]
    _announce(6, "Hybrid", f"the LoRA adapter (verses), the prefix (E2E) and PPLM ({PPLM_BAG}) in one generation, "
                           f"against each alone, on {len(mrs)} held-out E2E input(s), {s.hybrid_tokens} tokens, "
                           "same seed for every configuration")
    rows, examples = {}, {}
    jobs = [(c, i, mr) for c in HYBRID_CONFIGS for i, mr in enumerate(mrs)]
    bar = tqdm(jobs, desc="hybrid", unit="text", disable=not ctx.progress)
    texts: dict[str, list] = {c[0]: [] for c in HYBRID_CONFIGS}
    for (key, label, use_lora, use_prefix, use_pplm), i, mr in bar:
        m = lora_model if use_lora else model
        extra = {"past_key_values": prefix.past_key_values(1)} if use_prefix else {}
        knobs = pplm_knobs(m, steer=use_pplm)
        ids = _encode(ctx, e2e_prompt(mr))
        out = pplm.generate(m, ids, bow=bag, max_new_tokens=s.hybrid_tokens, eos_token_id=EOT_ID,
                            generator=ctx.generator(600 + i), **extra, **knobs)
        new = [t for t in out.sequences[0, ids.size(1):].tolist() if t != EOT_ID]
        texts[key].append((mr, new, float(out.stacked("attribute_after").mean()) if out.steps else float("nan")))
    bar.close()
    for key, label, *_ in HYBRID_CONFIGS:
        recall, share, mass, style, length = [], [], [], [], []
        for mr, new, attr in texts[key]:
            text = tok.decode(new)
            recall.append(slot_recall(mr, text))
            share.append(sum(t in bag_ids for t in new) / max(1, len(new)))
            mass.append(attr)
            if new:
                style.append(_mean_logprob(lora_model, new) - _mean_logprob(model, new))
            length.append(len(new))
        mean = lambda xs: finite_or_none(sum(xs) / len(xs)) if xs else None  # noqa: E731
        rows[key] = {"label": label, "slot_recall": mean(recall), "bag_share": mean(share), "bag_mass": mean(mass),
                     "verse_style": mean(style), "tokens": mean(length)}
        examples[key] = _spans(tok, texts[key][0][1], bag_ids)
    fmt = lambda v, pct=True: "n/a" if v is None else (f"{100 * v:.1f}%" if pct else f"{v:+.3f}")  # noqa: E731
    table = [[r["label"], fmt(r["slot_recall"]), fmt(r["bag_share"]), fmt(r["bag_mass"]),
              fmt(r["verse_style"], pct=False), f"{r['tokens']:.1f}"] for r in rows.values()]
    header = ["configuration", "record values named", "bag words in text", "bag mass per token",
              "verse style (nats/token)", "tokens"]
    print("  " + " | ".join(header))
    for line in table:
        print("  " + " | ".join(line))
    fig = _hybrid_figure(rows, ctx.out / "hybrid.png")
    report = [("text", f"{len(mrs)} held-out E2E input(s), prompt `{e2e_prompt('mr')}`, {s.hybrid_tokens} tokens, "
                       "the same seed for every configuration. Yardsticks: the share of the record's values the "
                       "text names (the prefix's task), the share of bag words in the text and the bag's mass per "
                       "token (PPLM's attribute), and how much more the LoRA-tuned model likes the text than the "
                       "base model does, read after <|endoftext|> (the verses' style)."),
              ("table", header, table), ("image", fig, "The same yardsticks for each configuration."),
              ("text", f"The first input, {mrs[0]}, in each configuration (bag words marked):")]
    keys = [k for k, *_ in HYBRID_CONFIGS]
    for a, b in zip(keys[0::2], keys[1::2]):
        report.append(("pair", (rows[a]["label"], rows[b]["label"]), examples[a], examples[b]))
    if len(keys) % 2:
        last = keys[-1]
        report.append(("pair", (rows[last]["label"], ""), examples[last], []))
    numbers = {"inputs": len(mrs), "tokens": s.hybrid_tokens, "configs": rows,
               "first_input": {"mr": mrs[0], **{k: "".join(t for t, _ in v) for k, v in examples.items()}}}
    return StepResult("hybrid", "Hybrid", numbers, [fig], report)


STEPS: tuple[Callable[[TourContext], StepResult], ...] = (step_next_token, step_attention, step_lora, step_prefix,
                                                          step_pplm, step_hybrid)


# ==== the whole tour =================================================================================
def forecast(ctx: TourContext) -> dict[str, float]:
    """A rough forecast of each step's seconds: its sizes times a timed forward/backward and a timed
    one-token decode of this model on this machine, plus a fixed cost per figure."""
    model, s = ctx.model, ctx.sizes
    per_train_token, per_decode = _time_model(ctx)
    # Measured on the bundled model: a PPLM token costs about 12 one-token forwards (2 plain, then 3 iterations
    # of a forward and a backward through the whole past); an optimizer step about 1.3 forward/backwards.
    pplm_cost, step_overhead = 12, 1.3
    figure = 1.5    # seconds to draw and save one PNG
    verse, record = 26, 70  # padded tokens per example in a batch: a verse, an E2E record
    lora_eval = (s.lora_steps / s.lora_eval_every + 1) * (s.lora_eval_verses or 105) * verse / 3
    prefix_eval = (s.prefix_steps / s.prefix_eval_every + 2) * s.prefix_eval_mrs * 7 * record / 3
    return {
        "next_token": s.draws * model.config.vocab_size * 6e-8 + figure,   # a sort of each draw's row (top-p)
        "attention": figure,
        "lora": (step_overhead * s.lora_steps * s.lora_batch * verse + lora_eval) * per_train_token
                + 2 * s.samples * s.sample_tokens * per_decode + 3 * figure,
        "prefix": (step_overhead * s.prefix_steps * s.prefix_batch * record + prefix_eval) * per_train_token
                  + 2 * s.samples * s.prefix_tokens * per_decode + figure + 2,  # + reading and tokenizing E2E
        "pplm": s.pplm_tokens * s.pplm_samples * (1 + pplm_cost) * per_decode + 2 * figure,
        "hybrid": s.hybrid_inputs * s.hybrid_tokens * (3 + 2 * pplm_cost) * per_decode + figure,
    }


def _time_model(ctx: TourContext) -> tuple[float, float]:
    """(seconds per token of a training step, seconds of a one-token decode step), timed here and now."""
    model = ctx.model
    T = min(32, model.config.n_positions // 2)
    ids = torch.randint(0, model.config.vocab_size, (8, T), generator=torch.Generator().manual_seed(0))
    ids = ids.to(ctx.device)

    def train_like():  # forward and backward through the whole model, to the input embeddings only
        emb = model.transformer.wte(ids).detach().requires_grad_(True)
        with torch.enable_grad():
            torch.autograd.grad(model(None, inputs_embeds=emb).logits.float().logsumexp(-1).mean(), emb)

    def fastest(fn, n: int) -> float:  # the minimum over a few runs: robust to other programs' bursts
        times = []
        for _ in range(n):
            clock = Stopwatch()
            fn()
            times.append(clock.elapsed())
        return min(times)

    train_like()  # warm-up
    per_train_token = fastest(train_like, 3) / ids.numel()
    with torch.no_grad():
        past = model(ids[:1]).past_key_values
        per_decode = fastest(lambda: model(ids[:1, :1], past_key_values=past), 5)
    return per_train_token, per_decode


def estimate_seconds(ctx: TourContext) -> float:
    """The forecast of the whole tour, in seconds (see `forecast`)."""
    ctx.forecast = forecast(ctx)
    return sum(ctx.forecast.values())


def run_tour(ctx: TourContext, steps: Sequence[Callable] = STEPS) -> list[StepResult]:
    results = []
    for step in steps:
        clock = Stopwatch()
        result = step(ctx)
        result.seconds = clock.elapsed()
        print(f"  ({format_seconds(result.seconds)})")
        results.append(result)
    return results


def build_summary(ctx: TourContext, results: Sequence[StepResult], seconds: float) -> dict:
    summary = {"model": ctx.model_name, "mode": ctx.mode, "seed": ctx.seed,
               "device": str(ctx.device), "parameters": ctx.model.num_parameters()}
    for r in results:
        summary[r.key] = r.numbers
    summary["step_seconds"] = {r.key: round(r.seconds, 2) for r in results}
    if ctx.forecast is not None:
        summary["forecast_seconds"] = {k: round(v, 1) for k, v in ctx.forecast.items()}
    summary["figures"] = [p.name for r in results for p in r.figures]
    summary["seconds"] = round(seconds, 2)
    summary["cpu_seconds"] = round(time.process_time() - ctx.cpu_start, 2)  # all threads
    return summary


def build_report(ctx: TourContext, results: Sequence[StepResult], summary: dict, model_line: str) -> Report:
    report = Report(f"minigpt tour: {ctx.model_name}")
    report.text(f"{model_line}. Mode: {ctx.mode}; seed {ctx.seed}; device {ctx.device}; "
                f"{summary['seconds']:.0f} s in all. Every number and sample below comes from this run.")
    for i, r in enumerate(results, 1):
        report.heading(f"{i}. {r.title}")
        report.extend(r.report)
        report.text(f"({format_seconds(r.seconds)})")
    report.heading("summary.json")
    keys = ("model", "lora", "prefix", "pplm", "seconds")
    brief = {k: summary[k] for k in keys if k in summary}
    for k in ("lora", "prefix", "pplm"):
        if k in brief:
            brief[k] = {n: v for n, v in brief[k].items() if not isinstance(v, (list, dict))}
    report.code(json.dumps(brief, indent=2))
    return report


def _context(chosen, out: Path, args) -> TourContext:
    mode = run_mode(args)
    return TourContext(model=chosen.model, model_name=chosen.name, tokenizer=get_tokenizer(), out=Path(out),
                       seed=args.seed, sizes=SIZES[mode], mode=mode, progress=not args.no_progress,
                       precision=resolve_precision(args.precision, chosen.model.device),
                       model_line=chosen.reason, cpu_start=time.process_time())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m demos.tour", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Steps: " + "; ".join(f"{i}. {t}" for i, t in enumerate(
                                    ("next-token probabilities", "attention", "LoRA on poem verses",
                                     "prefix tuning on E2E", "PPLM (positive words)", "hybrid"), 1)))
    add_demo_args(p, out="runs/tour", quick_help="the short tour (at most 10 min on a 2-core CPU with the bundled "
                                                 "model): fewer training steps and samples")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _run(args) -> None:
    clock = Stopwatch()
    chosen = choose_model(args)
    print(chosen.reason)
    with atomic_save_dir(args.out) as tmp:
        ctx = _context(chosen, tmp, args)
        expected = estimate_seconds(ctx)
        print(f"{ctx.mode} tour, {len(STEPS)} steps; expected time: about {format_seconds(expected)} "
              "(forecast from a timed forward/backward of this model here)")
        results = run_tour(ctx)
        summary = build_summary(ctx, results, clock.elapsed())
        write_json(summary, tmp / "summary.json")
        build_report(ctx, results, summary, chosen.reason).write(tmp)
    out = Path(args.out)
    print(f"\ndone in {format_seconds(clock.elapsed())}: {out / 'index.html'}, {out / 'report.md'}, "
          f"{out / 'summary.json'} and {len(summary['figures'])} figures")
    print(f"LoRA eval loss {summary['lora']['eval_loss_before']:.3f} -> {summary['lora']['eval_loss_after']:.3f}; "
          f"prefix eval loss {summary['prefix']['eval_loss_before']:.3f} -> "
          f"{summary['prefix']['eval_loss_after']:.3f}; PPLM bag mass {summary['pplm']['attribute_unperturbed']:.4f}"
          f" -> {summary['pplm']['attribute_perturbed']:.4f}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _run(args), out=args.out)


# ==== the notebook's helpers =========================================================================
def setup(argv: Sequence[str] = ()) -> TourContext:
    """Parse the tour's options (a list, as on the command line), load the model and print which one:
    the notebook's first cell. Files go straight into --out (the notebook shows them as it goes)."""
    args = build_parser().parse_args(list(argv))
    chosen = choose_model(args)
    print(chosen.reason)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    ctx = _context(chosen, Path(args.out), args)
    ctx.clock = Stopwatch()
    print(f"{ctx.mode} tour; expected time: about {format_seconds(estimate_seconds(ctx))}")
    return ctx


def show(result: StepResult) -> None:
    """Display a step's report (text, tables, figures) in a notebook."""
    from IPython.display import HTML, display
    display(HTML("\n".join(html_item(i) for i in result.report)))


def finish(ctx: TourContext, results: Sequence[StepResult]) -> dict:
    """Write summary.json, index.html and report.md for the steps run so far; returns the summary."""
    if ctx.clock is None:
        raise ValueError("finish(ctx, results) reads the clock that setup() starts; make the context with setup(...)")
    summary = build_summary(ctx, results, ctx.clock.elapsed())
    write_json(summary, ctx.out / "summary.json")
    build_report(ctx, results, summary, ctx.model_line).write(ctx.out)
    return summary

