"""Step 2, attention: every head of the middle layer over one sentence, read from the model's forward pass
with `output_attentions=True`. One heatmap per head (row i: token i's softmax over tokens 0..i, the masked
future left blank) and, per head, its mean entropy and its weight on the first and on the previous token.

The heatmaps are drawn by `attention_figure(model, ids, layer, heads)` (attention_weights, then draw_attention),
for any model, prompt, layer and heads: the playground's Inspect tab draws one head with it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure

from minigpt import GPT, get_tokenizer

from ..common import new_figure, save_figure
from .context import StepResult, TourContext, _announce, _encode, _r, _token_label

ATTENTION_SENTENCE = "The old man gave the boy his book because he had finished reading it."


@torch.no_grad()
def attention_weights(model: GPT, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """(nh, T, T) attention of every head of `layer` over ids (1, T), on the CPU: row i is token i's softmax
    over tokens 0..i, from the model's own output_attentions=True."""
    return model(ids, output_attentions=True).attentions[layer][0].float().cpu()


def draw_attention(att: torch.Tensor, labels: Sequence[str], heads: Sequence[int] | None = None) -> Figure:
    """One heatmap per head of att (nh, T, T), the masked future left blank, weights 0..1 on one colour bar.
    `heads` picks which (default all); 4 heads or fewer go 2 to a row so that every token label stays legible."""
    heads = list(range(att.size(0))) if heads is None else [int(h) for h in heads]
    T = att.size(-1)
    ncols = 1 if len(heads) == 1 else 2 if len(heads) <= 4 else 4
    nrows = math.ceil(len(heads) / ncols)
    fig = new_figure((7, 6.5) if ncols == 1 else (8, (3.6 if ncols == 2 else 2.4) * nrows + 1.0))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    im, cmap = None, matplotlib.colormaps["viridis"].with_extremes(bad="#f2f2f2")
    causal, fs = torch.ones(T, T, dtype=torch.bool).tril(), 8 if ncols == 1 else 7
    for k, ax in enumerate(axes.flat):
        if k >= len(heads):
            ax.axis("off")
            continue
        h = heads[k]
        shown = np.ma.masked_where(~causal.numpy(), att[h].numpy())  # the masked future drawn blank, not as 0
        im = ax.imshow(shown, cmap=cmap, vmin=0, vmax=1)
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xticks(range(T), labels, rotation=90, fontsize=fs)
        ax.set_yticks(range(T), labels if k % ncols == 0 else [""] * T, fontsize=fs)
        if k % ncols == 0:
            ax.set_ylabel("query (attending) token", fontsize=fs + 1)
        if k >= len(heads) - ncols:
            ax.set_xlabel("key token (attended to)", fontsize=fs + 1)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="attention weight (probability)")
    return fig


def attention_figure(model: GPT, ids: torch.Tensor, layer: int, heads: Sequence[int] | None = None,
                     title: str | None = None) -> Figure:
    """Step 2's heatmaps for any model, prompt ids (1, T), layer and heads; `title` above them."""
    tok = get_tokenizer()
    fig = draw_attention(attention_weights(model, ids, layer), [_token_label(tok, i) for i in ids[0].tolist()],
                         heads)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def step_attention(ctx: TourContext) -> StepResult:
    """Step 2: the heads of the middle layer over ATTENTION_SENTENCE, drawn and summed up per head."""
    cfg, tok = ctx.model.config, ctx.tokenizer
    layer = cfg.n_layer // 2
    _announce(2, "Attention", f"the {cfg.n_head} heads of layer {layer} (of {cfg.n_layer}) over "
                              f"{ATTENTION_SENTENCE!r}, from output_attentions=True")
    ids = _encode(ctx, ATTENTION_SENTENCE)
    att = attention_weights(ctx.model, ids, layer)                      # (nh, T, T)
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
    fig = draw_attention(att, labels)
    path = save_figure(fig, ctx.out / "attention.png",
                       f"Layer {layer}: each row is one token's attention over the tokens so far", tight=False)
    report = [("text", (f"Layer {layer} of {cfg.n_layer}, all {cfg.n_head} heads, over “{ATTENTION_SENTENCE}”. "
                        "Row i is token i's softmax over tokens 0..i (the upper triangle is masked: no looking "
                        "ahead).")),
              ("image", path, "Attention weights per head."),
              ("table", ["head", "mean entropy (nats)", "on the first token", "on the previous token"],
               [[r["head"], f"{r['entropy_nats']:.2f}", f"{r['to_first_token']:.2f}", f"{r['to_previous_token']:.2f}"]
                for r in heads])]
    return StepResult("attention", "Attention", {"layer": layer, "sentence": ATTENTION_SENTENCE, "tokens": T,
                                                 "heads": heads}, [path], report)
