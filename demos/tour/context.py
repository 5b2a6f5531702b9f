"""What every step of the tour shares: how much each step does (`Sizes`, one per mode), the context a step
reads and leaves its results on (`TourContext`), what a step returns (`StepResult`), the PPLM bag and knobs
that steps 5 and 6 both use, and the small helpers every step calls (the step banner, encoding a prompt,
rounding a number for summary.json).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from minigpt import GPT
from minigpt.tokenizer import Tokenizer
from techniques import pplm
from techniques.pplm import BagOfWords
from techniques.prefix import PrefixTuning

from ..common import Stopwatch, bow_stepsize

# PPLM with a bag of words: the paper's BoW settings (Dathathri et al. 2020, appendix: stepsize 0.03-0.04,
# 3 iterations, gamma 1.5, gm_scale 0.95, kl_scale 0.01, window 5, top-k 10 sampling), for GPT-2 medium.
# The bundled tiny models forced one change, the step size: models narrower than 512 take a larger one (0.1 at
# width 256, 0.3 below); see demos.common.bow_stepsize for the measurements behind it. Steps 5 (PPLM) and 6
# (the hybrid) both steer with them.
PPLM_BAG = "positive_words"
PPLM_KNOBS = {"stepsize": 0.03, "num_iterations": 3, "gamma": 1.5, "gm_scale": 0.95, "kl_scale": 0.01,
              "window_length": 5, "do_sample": True, "top_k": 10}


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
    lora_eval_verses: int | None = None   # None = every held-out (dev) verse
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
    lora_model: GPT | None = None             # step 3's LoRA-tuned copy of the model; step 6 generates with it
    prefix: PrefixTuning | None = None        # step 4's trained prefix, folded to its direct table; step 6 reads it
    e2e_held_out: list[str] | None = None     # step 4's held-out E2E inputs (meaning representations): step 6's
    bag: BagOfWords | None = None             # the PPLM bag of steps 5 and 6; `pplm_bag()` loads it once
    # the run's bookkeeping
    forecast: dict[str, float] | None = None  # seconds per step, from estimate_seconds (summary.json shows it)
    model_line: str = ""                      # which model and why (choose_model's reason): the report's opening
    clock: Stopwatch | None = None            # the notebook's wall clock, started by setup(); finish() reads it
    cpu_start: float = 0.0                    # time.process_time() when the run began

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
    """What a step hands back: its numbers for summary.json, its figures and its part of the report."""
    key: str                       # summary.json's key for the step
    title: str
    numbers: dict                  # measured, JSON-ready
    figures: list[Path]
    report: list[tuple]            # common.Report items
    seconds: float = 0.0


def _announce(n: int, title: str, what: str) -> None:
    """The step's banner: its number, its title and what it is about to do."""
    print(f"\n[{n}/6] {title}: {what}", flush=True)


def _encode(ctx: TourContext, text: str) -> torch.Tensor:
    """A text as one row of token ids on the model's device."""
    return torch.tensor([ctx.tokenizer.encode(text)], dtype=torch.long, device=ctx.device)  # (1, T)


def _token_label(tok: Tokenizer, i: int) -> str:
    """A token as a label: spaces shown as ␣, newlines as ↵."""
    return tok.decode([i]).replace(" ", "␣").replace("\n", "↵")


def _r(x: float, digits: int = 4) -> float:
    """A number (float or one-element tensor) rounded for summary.json."""
    return round(float(x), digits)
