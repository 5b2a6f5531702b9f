"""Step 2, attention: every head of the middle layer over one sentence, read from the model's forward pass
with `output_attentions=True`. One heatmap per head (row i: token i's softmax over tokens 0..i, the masked
future left blank) and, per head, its mean entropy and its weight on the first and on the previous token.
"""
from __future__ import annotations

import math

import matplotlib
import numpy as np
import torch

from ..common import new_figure, save_figure
from .context import StepResult, TourContext, _announce, _encode, _r, _token_label

ATTENTION_SENTENCE = "The old man gave the boy his book because he had finished reading it."


def step_attention(ctx: TourContext) -> StepResult:
    """Step 2: the heads of the middle layer over ATTENTION_SENTENCE, drawn and summed up per head."""
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
    report = [("text", (f"Layer {layer} of {cfg.n_layer}, all {cfg.n_head} heads, over “{ATTENTION_SENTENCE}”. "
                        "Row i is token i's softmax over tokens 0..i (the upper triangle is masked: no looking "
                        "ahead).")),
              ("image", path, "Attention weights per head."),
              ("table", ["head", "mean entropy (nats)", "on the first token", "on the previous token"],
               [[r["head"], f"{r['entropy_nats']:.2f}", f"{r['to_first_token']:.2f}", f"{r['to_previous_token']:.2f}"]
                for r in heads])]
    return StepResult("attention", "Attention", {"layer": layer, "sentence": ATTENTION_SENTENCE, "tokens": T,
                                                 "heads": heads}, [path], report)
