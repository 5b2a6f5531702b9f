"""Step 5, PPLM with the positive-words bag: the same prompt continued twice with the same seed, once as the
model would (stepsize 0) and once with PPLM nudging the past keys and values towards the bag before each
token. It shows both texts with the bag's words marked, the bag's probability mass at each step, and the
final hidden states of both runs in a 3-D PCA with each step's nudge as an arrow.
"""
from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.ticker import MaxNLocator

from techniques import pplm

from ..common import new_figure, save_figure
from ..kits import EOT
from .context import (
    PPLM_BAG,
    StepResult,
    TourContext,
    _announce,
    _encode,
    _r,
    pplm_knobs,
)
from .shared import _spans

PPLM_PROMPT = "The lake"


def bag_share(new_tokens: torch.Tensor, bag_ids: set) -> float:
    """Share of the generated tokens (rows, T) that are words of the bag."""
    return sum(t in bag_ids for t in new_tokens.flatten().tolist()) / max(1, new_tokens.numel())


def _pca3(points: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Project (N, C) points on their top 3 principal components: (N, 3) and each component's share of variance."""
    x = points.double() - points.double().mean(0)
    _, S, V = torch.linalg.svd(x, full_matrices=False)
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
    """Step 5: PPLM_PROMPT continued with and without PPLM's nudge, same seed; two figures."""
    s, tok, model = ctx.sizes, ctx.tokenizer, ctx.model
    bag = ctx.pplm_bag()
    bag_ids = set(bag.token_ids)
    knobs = ", ".join(f"{k}={v}" for k, v in pplm_knobs(model).items())
    _announce(5, "PPLM", f"{s.pplm_samples} continuation(s) of {PPLM_PROMPT!r}, unperturbed and perturbed "
                         f"towards the {PPLM_BAG} bag ({knobs}), same seed")
    print(f"  {bag.summary()}")
    ids = _encode(ctx, EOT + PPLM_PROMPT)
    common = {"bow": bag, "max_new_tokens": s.pplm_tokens, "num_samples": s.pplm_samples, "progress": ctx.progress}
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
    print("  PPLM beside six other ways to steer, on the same seeds: python -m demos.projects.steering (its table.md "
          "and steering.png; docs/steering.md)")
    figs = [_attribute_figure(a_plain, a_before, a_after, ctx.out / "pplm_attribute.png"),
            _pca_figure(plain.stacked("hidden_before")[:, 0], steered.stacked("hidden_before")[:, 0],
                        steered.stacked("hidden_after")[:, 0], ctx.out / "pplm_hidden_pca.png")]
    report = [("text", (f"Prompt “{PPLM_PROMPT}”, {s.pplm_tokens} tokens, {s.pplm_samples} sample(s), the same "
                        f"seed for both runs; knobs {knobs}. {bag.summary()}. Words of the bag are marked."))]
    for u, p in texts:
        report.append(("pair", ("unperturbed", "perturbed (PPLM)"), [(PPLM_PROMPT, False)] + u,
                       [(PPLM_PROMPT, False)] + p))
    report += [("text", (f"Mean bag mass per generated token: unperturbed {numbers['attribute_unperturbed']:.4f}, "
                         f"perturbed {numbers['attribute_perturbed']:.4f}; share of bag words in the text "
                         f"{100 * numbers['bag_share_unperturbed']:.1f}% vs "
                         f"{100 * numbers['bag_share_perturbed']:.1f}%.")),
               ("image", figs[0], "The bag's probability mass at each step."),
               ("text", ("The final hidden state (after ln_f) at each step, projected on 3 principal components. "
                         "Each arrow is one step's nudge: the same context read through the unperturbed past "
                         "(blue) and through the past PPLM moved (green). Mean ‖shift‖/‖h‖ = "
                         f"{numbers['relative_hidden_shift']:.3f}.")),
               ("image", figs[1], "Hidden states along both runs, with the per-step shift.")]
    return StepResult("pplm", "PPLM", numbers, figs, report)
