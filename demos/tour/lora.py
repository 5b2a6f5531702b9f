"""Step 3, LoRA on the poem verses: an adapter ΔW = s·B·A trained on the attention's q and v of a copy of the
model. It shows the train and held-out loss, samples before and after with the same seed, the most moved
query projection as W, ΔW and W + ΔW, the singular values of ΔW (at most r non-zero), and that merging ΔW into
W leaves the logits as they were. The tuned copy stays on the context (`ctx.lora_model`) for step 6.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch

from minigpt import GPT, TrainConfig, collate_lm, evaluate, lm_loss_fn
from minigpt.cli import describe_plan
from techniques.lora import lora_modules, lora_parameters, lora_summary, merge_lora

from ..common import new_figure, save_figure
from ..kits import (
    EOT,
    LORA,
    lora_lr,
    new_lora_model,
    read_verses,
    train_lora_parameters,
    verse_examples,
)
from .context import StepResult, TourContext, _announce, _r
from .shared import _loss_figure, _sample_texts

# LoRA: the paper's r = 8, alpha = 16 on the attention's q and v (Hu et al. 2021, section 7.1 / Table 5), as
# demos.kits.LORA holds it. The paper's lr 2e-4 (GPT-2 M on E2E) is for large models and thousands of steps; a
# few hundred steps on the small bundled model need a higher one (demos.kits.lora_lr: 2e-3 below width 512).

SAMPLE_KNOBS = {"do_sample": True, "temperature": 0.9, "top_k": 40}  # samples before/after LoRA


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
    """Each matrix's singular values, largest first, on a log scale, with the rank r marked."""
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
    """Step 3: train a LoRA copy of the model on the verses, measure and draw it; leaves it in ctx.lora_model."""
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
    report = [("text", (f"{lora_summary(lora_model)}. Trained {len(history)} steps at lr {lr:g} on {len(train_ex)} "
                        f"verses; the eval loss on {len(eval_ex)} held-out verses went from {eval_before:.3f} to "
                        f"{eval_after:.3f} nats/token. Merged (W0 + ΔW) and unmerged logits differ by at most "
                        f"{diff:.1e}.")),
              ("image", figs[0], "Train and held-out loss."),
              ("table", ["prompt", "before (base model)", "after (LoRA), same seed"],
               [[p[len(EOT):], b, a] for p, b, a in zip(prompts, before, after)]),
              ("text", f"The query projection of {block} (the one LoRA moved most): W0, the update ΔW = s·B·A "
                       f"(s = alpha/r = {LORA['alpha'] / r:g}) and their sum, each on its own colour scale. "
                       f"‖ΔW‖/‖W‖ = {ratio:.4f}" + (": a small update, W + ΔW looks like W to the eye."
                                                    if ratio < 0.05 else ".")),
              ("image", figs[1], "W, ΔW and W + ΔW of one projection."),
              ("text", (f"ΔW = B·A is a product through r = {r} dimensions, so at most {r} singular values are "
                        f"non-zero; the rest are rounding noise (numerical rank here: {numerical_rank}).")),
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
