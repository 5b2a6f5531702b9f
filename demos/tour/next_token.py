"""Step 1, next-token probabilities: the model's distribution over its vocabulary after one prompt, the same
distribution after temperature, top-k and top-p (`filtered_probs`, minigpt.sample_next_token's math written
out), and a few thousand real draws from minigpt.sample_next_token that check it. One figure: the top tokens'
bars before and after the filters, with the draws' shares as dots.

The figure is drawn by `next_token_figure(model, ids, temperature=, top_k=, top_p=)` (next_token_distribution,
then draw_next_token), for any model, prompt and decoding settings: the playground's Generate tab draws with it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from matplotlib.figure import Figure

from minigpt import GPT, get_tokenizer, sample_next_token

from ..common import new_figure, save_figure
from .context import StepResult, TourContext, _announce, _encode, _r, _token_label

NEXT_TOKEN_PROMPT = "The king looked at the crowd and said"
SAMPLING = {"temperature": 0.8, "top_k": 10, "top_p": 0.9}  # step 1's filters (minigpt.sample_next_token's order)


def filtered_probs(logits: torch.Tensor, *, temperature: float, top_k: int | None, top_p: float | None
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


@dataclass
class NextTokenDistribution:
    """What step 1 draws: the top tokens after a prompt, their softmax, the filtered distribution, and (with
    draws) the share of real minigpt.sample_next_token draws. probs, kept and freq are (V,) on the CPU."""
    top: list[int]                      # the `bars` most likely token ids, most likely first
    labels: list[str]                   # their labels (␣ = space)
    probs: torch.Tensor                 # (V,) softmax of the last position's logits (temperature 1)
    kept: torch.Tensor                  # (V,) filtered_probs: what sample_next_token draws from
    freq: torch.Tensor | None           # (V,) share of `draws` real draws, or None without draws
    sampling: dict                      # temperature, top_k, top_p
    draws: int


@torch.no_grad()
def next_token_distribution(model: GPT, ids: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                            top_p: float | None = None, bars: int = 10, draws: int = 0,
                            generator: torch.Generator | None = None) -> NextTokenDistribution:
    """The model's next-token distribution after ids (1, T), before and after the decoding filters, and
    `draws` real draws from minigpt.sample_next_token (with `generator`) that check the filtered numbers."""
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    logits = model(ids).logits[0, -1].float()                                 # (V,)
    probs = logits.softmax(-1)
    kept = filtered_probs(logits, **sampling)
    freq = sampled_frequencies(logits, draws, generator, **sampling).cpu() if draws else None
    top = probs.topk(min(bars, probs.numel())).indices.tolist()
    tok = get_tokenizer()
    return NextTokenDistribution(top, [_token_label(tok, i) for i in top], probs.cpu(), kept.cpu(), freq, sampling,
                                 draws)


def _filters_title(sampling: dict) -> str:
    t, k, p = sampling["temperature"], sampling["top_k"], sampling["top_p"]
    return f"T={t:g}, top-k={k if k is not None else 'off'}, top-p={p if p is not None and p < 1 else 'off'}"


def draw_next_token(d: NextTokenDistribution, title: str | None = None) -> Figure:
    """Step 1's figure: the top tokens' softmax on the left, the filtered distribution on the right (removed
    tokens grey, the draws' shares as dots when there are draws); `title` above both panels."""
    fig = new_figure((8, 4.5))
    left, right = fig.subplots(1, 2, sharey=True)
    y = list(range(len(d.top)))
    top_p = [float(d.probs[i]) for i in d.top]
    left.barh(y, top_p, color="#4c72b0")
    left.set(title="model softmax (temperature 1)", xlabel="probability", ylabel="next token (␣ = space)")
    left.set_yticks(y, d.labels, fontsize=8)
    left.invert_yaxis()
    rest = 1 - sum(top_p)
    left.text(0.98, 0.02, f"other {d.probs.numel() - len(d.top):,} tokens: {100 * rest:.1f}%",
              transform=left.transAxes, ha="right", va="bottom", fontsize=8, color="#555")
    kept_top = [float(d.kept[i]) for i in d.top]
    right.barh(y, kept_top, color=["#55a868" if k > 0 else "#cccccc" for k in kept_top], label="after the filters")
    if d.freq is not None:
        right.plot([float(d.freq[i]) for i in d.top], y, "k.", ms=7, label=f"share of {d.draws} draws")
    for yi, k in zip(y, kept_top):
        if k == 0:
            right.text(0.005, yi, "removed", va="center", fontsize=7, color="#777")
    right.set(title=_filters_title(d.sampling), xlabel="probability")
    right.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def next_token_figure(model: GPT, ids: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, bars: int = 10, draws: int = 0,
                      generator: torch.Generator | None = None, title: str | None = None) -> Figure:
    """Step 1's figure for any model, prompt ids (1, T) and decoding settings: next_token_distribution drawn
    by draw_next_token (the tour's step and the playground's Generate tab both draw with it)."""
    return draw_next_token(next_token_distribution(model, ids, temperature=temperature, top_k=top_k, top_p=top_p,
                                                   bars=bars, draws=draws, generator=generator), title)


def step_next_token(ctx: TourContext) -> StepResult:
    """Step 1: the top tokens after NEXT_TOKEN_PROMPT, before and after SAMPLING's filters, and ctx.sizes.draws
    real draws; one figure."""
    s, tok = ctx.sizes, ctx.tokenizer
    filt = ", ".join(f"{k}={v}" for k, v in SAMPLING.items())
    _announce(1, "Next-token probabilities",
              f"the model's distribution after {NEXT_TOKEN_PROMPT!r}, then after {filt}; {s.draws} draws from "
              "minigpt.sample_next_token check the filtered numbers")
    d = next_token_distribution(ctx.model, _encode(ctx, NEXT_TOKEN_PROMPT), bars=s.bars, draws=s.draws,
                                generator=ctx.generator(1), **SAMPLING)
    probs, kept, freq, ids = d.probs, d.kept, d.freq, d.top
    numbers = {
        "prompt": NEXT_TOKEN_PROMPT, "sampling": SAMPLING,
        "top": [{"token": tok.decode([i]), "p": _r(probs[i], 5), "p_filtered": _r(kept[i], 5),
                 "sampled": _r(freq[i], 5)} for i in ids],
        "entropy_nats": _r(_entropy(probs)), "entropy_filtered_nats": _r(_entropy(kept)),
        "kept_tokens": int((kept > 0).sum()), "draws": s.draws,
        "draws_outside_kept": round(float(freq[kept == 0].sum()) * s.draws),
        "max_abs_sampled_minus_exact": _r((freq - kept).abs().max(), 5),
    }
    for row in numbers["top"][:5]:
        print(f"  {row['token']!r:>14}  p={row['p']:.3f}  after filters={row['p_filtered']:.3f}  "
              f"sampled={row['sampled']:.3f}")
    print(f"  the filters keep {numbers['kept_tokens']} of {probs.numel():,} tokens; entropy "
          f"{numbers['entropy_nats']:.2f} -> {numbers['entropy_filtered_nats']:.2f} nats; "
          f"{numbers['draws_outside_kept']} of {s.draws} draws fell outside the kept set")

    fig = draw_next_token(d)
    path = save_figure(fig, ctx.out / "next_token.png", f"Next token after “{NEXT_TOKEN_PROMPT}”")
    report = [("text", (f"Prompt: “{NEXT_TOKEN_PROMPT}”. The left panel is the model's softmax over its "
                        f"{probs.numel():,}-token vocabulary (top {len(ids)} shown); the right one is what "
                        f"minigpt.sample_next_token draws from with {filt}: {numbers['kept_tokens']} tokens stay. "
                        f"Dots: the share of {s.draws} real draws ({numbers['draws_outside_kept']} outside the kept "
                        f"set; largest gap to the exact numbers {numbers['max_abs_sampled_minus_exact']:.3f}).")),
              ("image", path, "Top next tokens before and after temperature, top-k and top-p."),
              ("table", ["token", "p", "after filters", "sampled"],
               [[repr(r["token"]), f"{r['p']:.4f}", f"{r['p_filtered']:.4f}", f"{r['sampled']:.4f}"]
                for r in numbers["top"]])]
    return StepResult("next_token", "Next-token probabilities", numbers, [path], report)
