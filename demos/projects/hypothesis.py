"""Scientific hypothesis: PPLM with the `science` bag continues the opening of research-challenge sentences.

The tutorial's fake ("Scientific hypothesis (PPLM, major)") printed f"Hypothesis: {prompt} under
stress conditions" beside a hard-coded 3-vector. Here the prompts are real: the "challenge" summary of
each paper in ACLSum's test split (Takeshita et al. 2024, `pip install aclsum`, MIT; the package's own
train/val/test splits, test only here; one sentence per paper), cut to the first half of its words
("Existing methods for visual question answering only focus on ..."), and the model continues each,
unperturbed and then under PPLM with the paper's `science` bag of words, with the same seeds
(continuation k draws from its own torch.Generator seeded --seed + k).

Two measurements, and what each is worth:
- the headline, the share of generated tokens that are science-bag tokens, is the steering bag's own
  signal: PPLM optimises exactly this (one token ahead), so a rise would show that the steering acted,
  not that the text became more scientific by any outside judge;
- the independent check is the fluency cost: the perplexity of the generated continuation under the
  unsteered model (the same frozen model, no perturbation; pooled over all tokens), before vs after.
  PPLM's KL term and the geometric-mean fusion are there to keep it from rising much.

Hyperparameters: the reference's bag-of-words settings (uber-research/PPLM: stepsize 0.03, 3
iterations, window 5, gamma 1.5, kl_scale 0.01, gm_scale 0.95, top-k 10 sampling). Scaled for a
2-core CPU: 40 new tokens per continuation (the paper: 50), one continuation per paper. On the
bundled model the bag's 48 words hold about 0.15% of the next-token mass and never reach the top 10
the sampler draws from, at these settings or at 10x the stepsize (a probe on 10 prompts); only at
stepsize 1.0 do they appear, as "matter matter matter" at a perplexity near 500. The settings stay
the paper's, and a run reports what they do (the bag's mass per step is in metrics.json as a
diagnostic).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from minigpt import GPT, causal_lm_loss, get_tokenizer
from minigpt.cli import positive_int
from techniques import pplm

from ..common import new_figure, save_figure
from ..kits import continuations, mean, prompt_ids
from .common import Finished, Project, ProjectResult, ProjectRun, Samples, add_prompts_arg, read_prompts_file, require

NAME = "hypothesis"
TITLE = "Scientific hypothesis"

BAG = "science"
SPLIT = "test"
ASPECT = "challenge"
SAMPLING = dict(do_sample=True, top_k=10, temperature=1.0)
KNOBS = dict(stepsize=0.03, num_iterations=3, window_length=5, gamma=1.5, gm_scale=0.95, kl_scale=0.01)


@dataclass
class Sizes:
    papers: int     # 0 = the whole split
    samples: int
    tokens: int


SIZES = {"full": Sizes(0, 1, 40), "quick": Sizes(30, 1, 25), "smoke": Sizes(2, 1, 4)}


# ---- prompts from ACLSum -----------------------------------------------------------------------------
def first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s+", text.strip())[0]


def challenge_prompts(split: str = SPLIT, limit: int = 0) -> list[str]:
    """The first half of the words of each paper's challenge summary (its first sentence), in split order,
    without duplicates; `limit` > 0 keeps the first that many."""
    aclsum = require("aclsum")
    prompts, seen = [], set()
    for doc in aclsum.ACLSum(split):
        words = first_sentence(doc.summaries[ASPECT]).split()
        prompt = " ".join(words[:max(1, len(words) // 2)])
        if prompt and prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
    if not prompts:
        raise ValueError(f"ACLSum's {split} split holds no {ASPECT} summaries")
    return prompts[:limit] if limit > 0 else prompts


# ---- the two measurements ---------------------------------------------------------------------------
def bag_share(continuations_: Sequence[Sequence[int]], bag_ids: set) -> float:
    """Share of generated tokens that are in the bag (pooled)."""
    total = sum(len(c) for c in continuations_)
    return sum(t in bag_ids for c in continuations_ for t in c) / max(1, total)


@torch.no_grad()
def continuation_nll(model: GPT, prompt: str, continuation: Sequence[int]) -> tuple[float, int]:
    """(Σ -log p(token | everything before it), tokens) over the continuation, under the model as it is."""
    ids = prompt_ids(prompt, model.device)
    full = torch.cat([ids, torch.tensor([list(continuation)], device=model.device)], 1)    # (1, T)
    mask = torch.zeros_like(full)
    mask[:, ids.size(1):] = 1                                    # targets: the continuation's tokens
    n = len(continuation)
    return float(causal_lm_loss(model(full).logits, full, mask)) * n, n


def perplexity(model: GPT, prompts: Sequence[str], conts: Sequence[Sequence[int]], samples: int
               ) -> tuple[float, list[float]]:
    """Pooled perplexity exp(Σ nll / Σ tokens) of the continuations, and each one's own."""
    parts = [continuation_nll(model, prompts[k // samples], c) for k, c in enumerate(conts)]
    pooled = math.exp(sum(s for s, _ in parts) / max(1, sum(n for _, n in parts)))
    return pooled, [math.exp(s / n) if n else float("nan") for s, n in parts]


# ---- options and the run -------------------------------------------------------------------------------
def add_options(p) -> None:
    g = p.add_argument_group("this project")
    add_prompts_arg(g, "prompts (instead of ACLSum's)")
    g.add_argument("--papers", type=positive_int, help="ACLSum test papers to prompt with (default: all 100; "
                                                       "--quick 30)")
    g.add_argument("--samples", type=positive_int, help="continuations per prompt (default 1)")
    g.add_argument("--tokens", type=positive_int, help="new tokens per continuation (default 40; --quick 25)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def preflight(args, sizes: Sizes) -> list[str]:
    """Before the model loads: the prompts (--prompts FILE, or ACLSum, the package that holds them)."""
    if args.prompts:
        return read_prompts_file(args.prompts)
    return challenge_prompts(SPLIT, args.papers or sizes.papers)


def run(run: ProjectRun) -> Finished:
    """The ACLSum prompts continued unperturbed and under PPLM on the same seeds; bag share and perplexity."""
    args, sizes = run.args, run.sizes
    samples, tokens = args.samples or sizes.samples, args.tokens or sizes.tokens
    prompts = run.prepared
    model, tok = run.model, get_tokenizer()
    bag = pplm.load_bag(BAG, tok)
    bag_ids = set(bag.token_ids)
    print(bag.summary())
    print(f"{len(prompts)} ACLSum {SPLIT} challenge prompts x {samples} sample(s) x {tokens} tokens, unperturbed "
          f"and under PPLM")
    common = dict(samples=samples, seed=args.seed, max_new_tokens=tokens, progress=not args.no_progress,
                  bow=bag, **SAMPLING)
    plain = continuations(model, prompts, desc="unperturbed", **common, **{**KNOBS, "stepsize": 0.0})
    steered = continuations(model, prompts, desc=f"PPLM bag {BAG}", **common, **KNOBS)
    plain, steered, mass = plain.tokens, steered.tokens, (mean(plain.attribute), mean(steered.attribute))
    ppl_before, ppl_items_before = perplexity(model, prompts, plain, samples)
    ppl_after, ppl_items_after = perplexity(model, prompts, steered, samples)
    result = ProjectResult(
        NAME, "science-bag tokens (% of generated tokens)", True, 100 * bag_share(plain, bag_ids),
        100 * bag_share(steered, bag_ids), run.chosen.name, len(plain), run.clock.elapsed(),
        extra={"perplexity_before": ppl_before, "perplexity_after": ppl_after,
               "perplexity_note": "of the generated continuation under the unsteered model (pooled over tokens); "
                                  "lower is more fluent by the model's own standard",
               "headline_note": "the science-bag share is the steering bag's own signal; perplexity is the "
                                "independent check",
               "bag_mass_per_step_before": mass[0], "bag_mass_per_step_after": mass[1],
               "bag": BAG, "bag_token_ids": len(bag_ids), "knobs": KNOBS, "sampling": SAMPLING,
               "prompts": len(prompts), "split": SPLIT, "samples_per_prompt": samples, "new_tokens": tokens,
               "seed": args.seed})
    print(f"  science-bag tokens {result.before:.2f}% -> {result.after:.2f}%; perplexity under the unsteered model "
          f"{ppl_before:.1f} -> {ppl_after:.1f}")
    texts = {"before": [tok.decode(c) for c in plain], "after": [tok.decode(c) for c in steered]}
    return finish(run, result, prompts, samples, texts, (plain, steered), bag_ids,
                  (ppl_items_before, ppl_items_after))


def finish(run: ProjectRun, result: ProjectResult, prompts, samples, texts, conts, bag_ids, ppl_items) -> Finished:
    """Writes perplexity.png; hands the frame samples.md and metric.png's bars (each continuation's share)."""
    shares = [[100 * bag_share([c], bag_ids) for c in cs] for cs in conts]
    perplexity_figure(run.folder(), result, ppl_items)
    rows = [{"input": f"{prompts[k // samples]}  (seed {result.extra['seed'] + k})",
             "before": prompts[k // samples] + texts["before"][k], "after": prompts[k // samples] + texts["after"][k],
             "before_score": f"science-bag tokens {shares[0][k]:.1f}%, perplexity {ppl_items[0][k]:.1f}",
             "after_score": f"science-bag tokens {shares[1][k]:.1f}%, perplexity {ppl_items[1][k]:.1f}"}
            for k in range(len(texts["before"]))]
    x = result.extra
    note = (f"Prompts: the first half of each ACLSum {x['split']}-split challenge summary. Before: unperturbed "
            f"sampling (top-k 10). After: PPLM with the {BAG} bag (knobs {KNOBS}). Same seed per sample. "
            f"{x['new_tokens']} new tokens per continuation (the paper: 50) to fit a 2-core CPU.\n\n"
            f"The headline, science-bag tokens {result.before:.2f}% -> {result.after:.2f}% of the generated tokens, "
            "is the steering bag's OWN signal (PPLM optimises it, one token ahead): a rise would show that the "
            "steering acted, not that an outside judge finds the text more scientific. The bag's probability mass "
            f"per step (p before, p̃ after; a diagnostic) went from {x['bag_mass_per_step_before']:.5f} to "
            f"{x['bag_mass_per_step_after']:.5f}. The independent check is the fluency cost: perplexity "
            f"of the generated text under the unsteered model, {x['perplexity_before']:.1f} -> "
            f"{x['perplexity_after']:.1f} (lower is more fluent).")
    return Finished(result, Samples(f"{TITLE}: unperturbed vs PPLM ({BAG} bag)", rows, note),
                    labels=("unperturbed", f"PPLM ({BAG} bag)"), unit="%", per_item=tuple(shares),
                    files=["perplexity.png"])


def perplexity_figure(out, result: ProjectResult, ppl_items) -> Path:
    """perplexity.png: pooled perplexity before/after, each continuation's as a dot (log scale)."""
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    vals = [result.extra["perplexity_before"], result.extra["perplexity_after"]]
    bars = ax.bar(["unperturbed", f"PPLM ({BAG} bag)"], vals, color=["#9aa5b1", "#4c72b0"], width=0.5)
    for b, v in zip(bars, vals):
        ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom")
    for i, ys in enumerate(ppl_items):
        ys = [y for y in ys if math.isfinite(y)]
        ax.scatter([i] * len(ys), ys, s=12, color="#333", alpha=0.5, zorder=3)
    ax.set_yscale("log")
    ax.set(ylabel="perplexity under the unsteered model (log scale)",
           title=f"the fluency cost of steering (pooled; dots: continuations; n={result.n})")
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, Path(out) / "perplexity.png", "Scientific hypothesis: the independent check")


PROJECT = Project(
    name=NAME, title=TITLE, technique="PPLM", run=run, sizes=SIZES,
    description="PPLM with the science bag continues the first half of ACLSum's research-challenge sentences; "
                "measured by the share of science-bag tokens (the bag's own signal) and the perplexity of the text "
                "under the unsteered model (the fluency cost), with the same seeds.",
    needs=("aclsum",), trains=False,   # steers only: no --precision
    options=add_options, preflight=preflight)


if __name__ == "__main__":
    raise SystemExit(PROJECT.main())
