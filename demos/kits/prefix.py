"""Prefix tuning as the prefix projects use it: train or load a prefix, decode with it, score it.

A prefix (Li & Liang 2021) is P learned key/value vectors per layer, put in front of every input as if an
earlier prompt had been read; the model stays frozen. Trained here as the paper trains it: reparametrised,
P'[P, d] through an MLP of hidden width 512 (section 4.3 and appendix A), then folded to the plain table
P_theta, which is what is used and saved.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from minigpt import (EOT_ID, Example, GPT, TrainConfig, collate_lm, evaluate, generate, get_tokenizer, left_pad,
                     lm_loss_fn, resolve_precision)
from minigpt.cli import describe_plan
from techniques.prefix import (PrefixTuning, PrefixTuningPlus, load_adapter, prefix_memory, save_adapter,
                               train_prefix)

__all__ = ["PREFIX_HIDDEN", "prefix_lr", "PrefixRun", "load_prefix", "fit_prefix", "save_prefix", "complete",
           "heldout_loss", "prefix_attention_share", "output_change", "matched_prefix_plus", "tradeoff_curves",
           "tradeoff_figure", "TRADEOFF_PS"]

PREFIX_HIDDEN = 512   # the reparametrisation MLP's hidden width (Li & Liang 2021, section 4.3 and appendix A)


def prefix_lr(model: GPT) -> float:
    """Peak learning rate: the paper's 8e-5 (Li & Liang 2021, GPT-2 medium, 5e-5 to 8e-5) from GPT-2 medium's
    width (1024) up; a few hundred steps on narrower models need more: 5e-4 for gpt2's 768, 3e-3 below 512
    (e.g. the bundled tiny model)."""
    d = model.config.n_embd
    return 8e-5 if d >= 1024 else 5e-4 if d >= 512 else 3e-3


@dataclass
class PrefixRun:
    """A prefix ready to use (folded to its table, eval mode) and how it came to be."""
    prefix: PrefixTuning
    history: list[dict]      # the training history; empty when loaded
    how: str                 # one line for samples.md and metrics.json
    lr: Optional[float] = None
    steps: int = 0


def load_prefix(model: GPT, directory: str | Path) -> PrefixRun:
    """The prefix adapter saved in `directory` (peft's layout), for `model`."""
    prefix = load_adapter(model, directory).eval()
    return PrefixRun(prefix, [], f"loaded from {directory} (P={prefix.num_virtual_tokens})")


def fit_prefix(model: GPT, train_ex: Sequence[Example], eval_ex: Sequence[Example], *, P: int, steps: int,
               eval_every: int, seed: int, precision: str, progress: bool, batch_size: int = 8,
               lr: Optional[float] = None, label: str = "") -> PrefixRun:
    """Train a reparametrised prefix of P virtual tokens (MLP width PREFIX_HIDDEN) on the frozen model with
    techniques.prefix.train_prefix, `steps` AdamW steps of `batch_size` at `lr` (None = prefix_lr(model)),
    the eval loss on eval_ex every `eval_every` steps; return it folded to its table.

    The prefix's initialisation draws from torch's global generator, seeded with `seed` just before."""
    lr = lr if lr is not None else prefix_lr(model)
    if lr <= 0:
        raise ValueError(f"--lr must be > 0, got {lr}")
    config = TrainConfig(max_steps=steps, batch_size=batch_size, lr=lr, eval_every=min(eval_every, steps),
                         seed=seed, progress=progress, precision=resolve_precision(precision, model.device))
    torch.manual_seed(seed)
    prefix = PrefixTuning(model.config, P, projection=True, hidden_size=PREFIX_HIDDEN).to(model.device)
    n = sum(p.numel() for p in prefix.parameters())
    print(f"{label}prefix: P={P} virtual tokens, reparametrised (P'[{P}, {model.config.n_embd}] + MLP of width "
          f"{PREFIX_HIDDEN}): {n:,} trainable parameters, the model's {model.num_parameters():,} frozen; lr {lr:g}")
    print(f"{label}{describe_plan(len(train_ex), len(eval_ex), config)}")
    history = train_prefix(model, prefix, list(train_ex), eval_examples=list(eval_ex), config=config)
    with torch.no_grad():
        folded = prefix.fold().eval()
    return PrefixRun(folded, history, f"trained here: P={P}, reparametrised (MLP width {PREFIX_HIDDEN}), "
                                      f"{steps} steps of batch {config.batch_size}, lr {lr:g}", lr, steps)


def save_prefix(run: PrefixRun, directory: Path, model_name: str) -> Optional[Path]:
    """Save a prefix trained here (peft's layout); a loaded one is not written again."""
    if not run.history:
        return None
    return save_adapter(run.prefix, directory, base_model_name_or_path=model_name)


def _until_eot(ids: Sequence[int]) -> list[int]:
    ids = list(ids)
    return ids[:ids.index(EOT_ID)] if EOT_ID in ids else ids


@torch.no_grad()
def complete(model: GPT, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             prefix: Optional[PrefixTuning] = None, batch_size: int = 32, num_beams: int = 1) -> list[str]:
    """Greedy (or, with num_beams > 1, beam-search) continuation of each prompt (token ids), up to
    <|endoftext|>: the new text only.

    Prompts are batched by length (left-padded; minigpt.generate gives each row the tokens it would
    get alone) and returned in the order given. Neither needs a generator: the same prompt gives the
    same output before and after, whatever the batch."""
    tok = get_tokenizer()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = left_pad([prompts[i] for i in chunk], EOT_ID, model.device)     # (B, T)
        past = prefix.past_key_values(len(chunk)) if prefix is not None else None   # L x (k, v) [B, nh, P, hs]
        seq = generate(model, ids, attention_mask=mask, past_key_values=past, max_new_tokens=max_new_tokens,
                       eos_token_id=EOT_ID, pad_token_id=EOT_ID, num_beams=num_beams)  # (B, T + new)
        for i, row in zip(chunk, seq[:, ids.size(1):].tolist()):
            texts[i] = tok.decode(_until_eot(row))
    return texts


def heldout_loss(model: GPT, examples: Sequence[Example], prefix: Optional[PrefixTuning] = None,
                 batch_size: int = 8) -> float:
    """Mean cross-entropy (nats/token) on the examples' target tokens, with or without the prefix."""
    past_fn = None if prefix is None else (lambda B: (prefix.past_key_values(B), prefix.num_virtual_tokens))
    return evaluate(lm_loss_fn(model, past_fn=past_fn), list(examples), batch_size, collate_lm, model.device, [model])


@torch.no_grad()
def prefix_attention_share(model: GPT, prefix: PrefixTuning, input_ids: torch.Tensor) -> float:
    """The prefix's share of attention (the trade-off of Prefix-Tuning+, arXiv 2506.13674, section 3):
    the softmax mass on the P prefix positions, sum_{j<P} softmax(q_i k_j^T / sqrt(hs)), averaged over
    layers, heads, batch rows and query positions i. It falls as the input grows and rises with P.

    input_ids: [B, T], no padding (every token real).
    """
    past, mask = prefix.inputs_for(input_ids)
    out = model(input_ids, past_key_values=past, attention_mask=mask, output_attentions=True)
    P = prefix.num_virtual_tokens
    shares = [a[..., :P].sum(-1).mean() for a in out.attentions]   # each a: (B, nh, T, P + T)
    return float(torch.stack(shares).mean())


# ---- the trade-off of Prefix-Tuning+ (arXiv 2506.13674, section 3), measured ---------------------------------
TRADEOFF_PS = (5, 10, 20, 40)


def _last_hidden(model: GPT, input_ids: torch.Tensor, **kw) -> torch.Tensor:
    """The final hidden state (after ln_f) at the last position: (B, C). That position reads all T tokens."""
    return model(input_ids, output_hidden_states=True, **kw).hidden_states[-1][:, -1]


@torch.no_grad()
def output_change(model: GPT, input_ids: torch.Tensor, *, prefix: Optional[PrefixTuning] = None,
                  plus: Optional[PrefixTuningPlus] = None) -> float:
    """‖h_method − h_frozen‖ / ‖h_frozen‖ at the last position (final hidden state, after ln_f), mean over rows:
    how much the prefix (or Prefix-Tuning+'s M) changes what the model reads out after T input tokens.

    Each method is compared with the frozen model at the same positions: a prefix puts the real tokens at
    positions P, P+1, ..., so its frozen baseline runs with those position ids and no prefix; Prefix-Tuning+
    moves no position, so its baseline is the same model with every M set to 0 (the frozen model exactly).
    input_ids: [B, T], no padding. Give exactly one of prefix, plus (a PrefixTuningPlus wrapping `model`)."""
    if (prefix is None) == (plus is None):
        raise ValueError("give exactly one of prefix= (a PrefixTuning) or plus= (a PrefixTuningPlus)")
    B, T = input_ids.shape
    if prefix is not None:
        past, mask = prefix.inputs_for(input_ids)
        P = prefix.num_virtual_tokens
        pos = torch.arange(P, P + T, device=input_ids.device).unsqueeze(0).expand(B, -1)   # (B, T)
        base = _last_hidden(model, input_ids, position_ids=pos)
        with_it = _last_hidden(model, input_ids, past_key_values=past, attention_mask=mask)
    else:
        with_it = _last_hidden(model, input_ids)
        saved = [M.detach().clone() for M in plus.trainable_parameters()]
        for M in plus.trainable_parameters():
            M.zero_()
        base = _last_hidden(model, input_ids)
        for M, m in zip(plus.trainable_parameters(), saved):
            M.copy_(m)
    return float(((with_it - base).norm(dim=-1) / base.norm(dim=-1)).mean())


@torch.no_grad()
def matched_prefix_plus(model: GPT, prefix: PrefixTuning, calib_ids: torch.Tensor,
                        feature_map: str = "elu") -> tuple[PrefixTuningPlus, float]:
    """A Prefix-Tuning+ of magnitude comparable to `prefix`, wrapping `model` in place (unwrap() it after use).

    The matching, in two steps: M per layer and head is the derivation's step 2 on the prefix's own keys and
    values, M = c · Σ_j φ(k_j) v_jᵀ (techniques.prefix.prefix_memory), so both methods carry the same vectors;
    the one scalar c (shared by all layers) is then fitted by bisection on log c so that both change the
    output equally (output_change) on `calib_ids`, a short input. Returns the wrapper and c."""
    target = output_change(model, calib_ids, prefix=prefix)
    past = prefix.past_key_values(1)                                    # L x (k, v) [1, nh, P, hs]
    plus = PrefixTuningPlus(model, feature_map=feature_map)
    base_M = {int(i): prefix_memory(past[int(i)][0][0], past[int(i)][1][0], feature_map)   # (nh, hs, hs)
              for i in plus.wrappers}

    def set_scale(c: float) -> float:
        for i, w in plus.wrappers.items():
            w.M.copy_(c * base_M[int(i)])
        return output_change(model, calib_ids, plus=plus)

    lo, hi = -12.0, 4.0                                                 # log10 c
    for _ in range(30):                                               # 16 decades / 2^30: exact enough
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if set_scale(10 ** mid) < target else (lo, mid)
    c = 10 ** ((lo + hi) / 2)
    set_scale(c)
    return plus, c


@torch.no_grad()
def tradeoff_curves(model: GPT, lengths: Sequence[int], Ps: Sequence[int] = TRADEOFF_PS, *, batch: int = 8,
                    seed: int = 0, feature_map: str = "elu", prefixes: Optional[dict] = None) -> dict:
    """The trade-off, measured on `model` with random inputs (the same token rows for every P and method):

    share[P][k]:       prefix_attention_share at input length lengths[k], for each P
    prefix[P][k]:      output_change of prefix tuning with P virtual tokens
    plus[P][k]:        output_change of Prefix-Tuning+ matched to that prefix (matched_prefix_plus at the
                       shortest length)
    scale[P]:          the matching scalar c

    prefixes: {P: PrefixTuning} to measure (e.g. trained ones); by default a fresh one per P, seeded with
    `seed` (PrefixTuning's own initialisation, N(0, 1) entries: magnitudes like a trained prefix's, see docs)."""
    lengths = sorted(int(t) for t in lengths)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, lengths[-1]), generator=g).to(model.device)
    out: dict = {"lengths": lengths, "Ps": list(Ps), "share": {}, "prefix": {}, "plus": {}, "scale": {}}
    for P in Ps:
        if prefixes is not None and P in prefixes:
            prefix = prefixes[P]
        else:
            torch.manual_seed(seed)
            prefix = PrefixTuning(model.config, P).to(model.device).eval()
        prefix.check_length(lengths[-1])
        out["share"][P] = [prefix_attention_share(model, prefix, ids[:, :T]) for T in lengths]
        out["prefix"][P] = [output_change(model, ids[:, :T], prefix=prefix) for T in lengths]
        plus, c = matched_prefix_plus(model, prefix, ids[:, :lengths[0]], feature_map)
        try:
            out["plus"][P] = [output_change(model, ids[:, :T], plus=plus) for T in lengths]
        finally:
            plus.unwrap()
        out["scale"][P] = c
    return out


def tradeoff_figure(curves: dict, path: str | Path, model_name: str) -> Path:
    """Two panels: the prefix's share of attention vs input length (one line per P), and the relative output
    change vs input length for prefix tuning (solid) and the matched Prefix-Tuning+ (dashed)."""
    from demos.common import new_figure, save_figure
    fig = new_figure((11, 4.2))
    a, b = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    T = curves["lengths"]
    for n, P in enumerate(curves["Ps"]):
        color = f"C{n}"
        a.plot(T, [100 * s for s in curves["share"][P]], "o-", color=color, label=f"P = {P}")
        b.plot(T, curves["prefix"][P], "o-", color=color)
        b.plot(T, curves["plus"][P], "s--", color=color)
    a.set(xscale="log", xlabel="input length T (tokens, log scale)", ylabel="prefix share of attention (%)",
          title="Prefix tuning: attention mass on the prefix")
    b.set(xscale="log", yscale="log", xlabel="input length T (tokens, log scale)",
          ylabel="‖Δh‖ / ‖h‖ at the last position (ratio, log scale)",
          title="Output change caused by each method")
    for ax in (a, b):
        ax.grid(alpha=0.3, which="both")
    a.legend(fontsize=8)
    b.plot([], [], "o-", color="0.3", label="prefix tuning (colour: P, as on the left)")
    b.plot([], [], "s--", color="0.3", label="Prefix-Tuning+, M matched to that prefix")
    b.legend(fontsize=8, loc="lower left")
    return save_figure(fig, path,
                       title=f"The prefix-tuning trade-off (arXiv 2506.13674, section 3), model {model_name}")
