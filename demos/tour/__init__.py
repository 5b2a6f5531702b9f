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
index.html (self-contained), report.md, the PNGs and summary.json.

One file per step: next_token.py, attention.py, lora.py, prefix.py, pplm.py and
hybrid.py, each with a public function `step_*(ctx) -> StepResult`, its settings
and its figures. The steps share a `TourContext` (context.py), on which a step
leaves what a later one reuses (step 6 reads the LoRA model of step 3 and the
prefix of step 4), and the helpers of shared.py; no step imports another.
run.py runs them in order and writes the files. demos/tour.ipynb runs the same
code one step at a time (`setup`, `show`, `finish`).
"""
from __future__ import annotations

from .attention import ATTENTION_SENTENCE, attention_figure, attention_weights, draw_attention, step_attention
from .context import (
    PPLM_BAG,
    PPLM_KNOBS,
    SIZES,
    Sizes,
    StepResult,
    TourContext,
    pplm_knobs,
)
from .hybrid import HYBRID_CONFIGS, HYBRID_SHORT, step_hybrid
from .lora import SAMPLE_KNOBS, merged_logits_gap, most_moved_query, step_lora
from .next_token import (
    NEXT_TOKEN_PROMPT,
    SAMPLING,
    NextTokenDistribution,
    draw_next_token,
    filtered_probs,
    next_token_distribution,
    next_token_figure,
    sampled_frequencies,
    step_next_token,
)
from .pplm import PPLM_PROMPT, bag_share, step_pplm
from .prefix import E2E_MAX_TOKENS, PREFIX, PREFIX_BEAMS, e2e_data, step_prefix
from .run import (
    STEPS,
    build_parser,
    build_report,
    build_summary,
    estimate_seconds,
    finish,
    forecast,
    main,
    run_tour,
    setup,
    show,
)
from .shared import mean_slot_recall, mr_values, slot_recall

# The tour's public names: the context and the steps, the whole run and the command line, the notebook's
# helpers, and each step's settings and measures (as tests and readers reach them: tour.slot_recall, ...).
__all__ = [
    "ATTENTION_SENTENCE", "E2E_MAX_TOKENS", "HYBRID_CONFIGS", "HYBRID_SHORT", "NEXT_TOKEN_PROMPT", "PPLM_BAG",
    "PPLM_KNOBS", "PPLM_PROMPT", "PREFIX", "PREFIX_BEAMS", "SAMPLE_KNOBS", "SAMPLING", "SIZES", "STEPS",
    "NextTokenDistribution", "Sizes", "StepResult", "TourContext",
    "attention_figure", "attention_weights", "draw_attention", "draw_next_token", "next_token_distribution",
    "next_token_figure",
    "bag_share", "build_parser", "build_report", "build_summary", "e2e_data", "estimate_seconds", "filtered_probs",
    "finish", "forecast", "main", "mean_slot_recall", "merged_logits_gap", "most_moved_query", "mr_values",
    "pplm_knobs", "run_tour", "sampled_frequencies", "setup", "show", "slot_recall", "step_attention",
    "step_hybrid", "step_lora", "step_next_token", "step_pplm", "step_prefix",
]
