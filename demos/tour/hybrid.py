"""Step 6, the hybrid: step 3's LoRA model (verses), step 4's prefix (E2E) and PPLM (the positive-words bag)
in one generation, against each technique alone and the base model, on held-out E2E records with the same
seed for every configuration. It measures each with the yardsticks of the three techniques: the record's
values named (the prefix's task), the bag's share and mass (PPLM's attribute), and how much more the LoRA
model likes the text than the base model (the verses' style). It reads the LoRA model and the prefix from the
context, so steps 3 and 4 run first.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minigpt import EOT_ID, GPT
from techniques import pplm

from ..common import finite_or_none, new_figure, save_figure
from ..kits import e2e_prompt
from .context import PPLM_BAG, StepResult, TourContext, _announce, _encode, pplm_knobs
from .shared import _spans, slot_recall

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
    """Left: the three shares (record values named, bag words, bag mass) per configuration, in percent;
    right: the verse style (log p_LoRA - log p_base per token)."""
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


def _check_earlier_steps(ctx: TourContext) -> None:
    """The hybrid reuses what steps 3 and 4 left on the context; say which to run when they have not run."""
    left = {"lora_model": ctx.lora_model, "prefix": ctx.prefix, "e2e_held_out": ctx.e2e_held_out}
    missing = [name for name, value in left.items() if value is None]
    if missing:
        raise ValueError(f"the hybrid step reuses the LoRA model and the prefix of steps 3 and 4 (missing: "
                         f"{', '.join(missing)}); run step_lora(ctx) and step_prefix(ctx) first")


def step_hybrid(ctx: TourContext) -> StepResult:
    """Step 6: the five configurations of HYBRID_CONFIGS on the same held-out inputs and seeds, measured with
    the same yardsticks. Needs ctx.lora_model (step 3), ctx.prefix and ctx.e2e_held_out (step 4)."""
    _check_earlier_steps(ctx)
    s, tok, model = ctx.sizes, ctx.tokenizer, ctx.model
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
        mean = lambda xs: finite_or_none(sum(xs) / len(xs)) if xs else None
        rows[key] = {"label": label, "slot_recall": mean(recall), "bag_share": mean(share), "bag_mass": mean(mass),
                     "verse_style": mean(style), "tokens": mean(length)}
        examples[key] = _spans(tok, texts[key][0][1], bag_ids)
    fmt = lambda v, pct=True: "n/a" if v is None else (f"{100 * v:.1f}%" if pct else f"{v:+.3f}")
    table = [[r["label"], fmt(r["slot_recall"]), fmt(r["bag_share"]), fmt(r["bag_mass"]),
              fmt(r["verse_style"], pct=False), f"{r['tokens']:.1f}"] for r in rows.values()]
    header = ["configuration", "record values named", "bag words in text", "bag mass per token",
              "verse style (nats/token)", "tokens"]
    print("  " + " | ".join(header))
    for line in table:
        print("  " + " | ".join(line))
    fig = _hybrid_figure(rows, ctx.out / "hybrid.png")
    report = [("text", (f"{len(mrs)} held-out E2E input(s), prompt `{e2e_prompt('mr')}`, {s.hybrid_tokens} tokens, "
                        "the same seed for every configuration. Yardsticks: the share of the record's values the "
                        "text names (the prefix's task), the share of bag words in the text and the bag's mass per "
                        "token (PPLM's attribute), and how much more the LoRA-tuned model likes the text than the "
                        "base model does, read after <|endoftext|> (the verses' style).")),
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
