"""Poetry generator (the tutorial's LoRA mini project), for real.

The tutorial's "poetry generator" appended "twinkling in the night..." to the prompt. Here LoRA (Hu et al.
2021, eq. 3: h = W0·x + (alpha/r)·B·A·x) adapts the frozen model's attention to the verses of
data/poem_sentiment (Project Gutenberg poems, CC BY 4.0): the paper's r = 8, alpha = 16 on the query and value
projections of every c_attn, trained on the train split (one verse per example, "<|endoftext|>" in front, the
loss on the verse and its closing "<|endoftext|>"), with the dev split's eval loss drawn during training. The
yardstick is the held-out perplexity of the test split's verses, computed by its definition,
exp(Σ -log p(token | what precedes it) / number of tokens) over the verses' own tokens (each verse read after
"<|endoftext|>"; the closing "<|endoftext|>" is not scored), before and after; and samples of the same verse
openings from the same seeds. The paper's lr 2e-4 is for GPT-2 medium over thousands of steps; a few hundred
steps on the small bundled model need a higher one, so models narrower than 512 train at 2e-3 (1e-3 for
GPT-2 sizes), and the step count is sized to fit a 2-core CPU in minutes (see SIZES).

The LoRA pieces the other LoRA projects reuse (scifi, chemistry, hybrid) live here: `train_lora`,
`load_lora`, `train_config`, `text_perplexity`, `sample_continuations`, `bars_figure`, `read_verses`.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from minigpt import (EOT_ID, Example, GPT, TrainConfig, collate_lm, examples_from_pairs, generate, get_tokenizer,
                     lm_loss_fn, resolve_precision, save_history, train)
from minigpt.cli import describe_plan, positive_int, run_command
from techniques.lora import apply_lora, load_adapter, lora_parameters, lora_summary, save_adapter

from ..common import Stopwatch, choose_model, finite_or_none, format_seconds, new_figure, save_figure
from .common import REPO, ProjectResult, loss_figure, metric_figure, project_parser, write_metrics, write_samples

NAME = "poetry"
TITLE = "Poetry generator"
TECHNIQUE = "LoRA"
TRAINS = True
NEEDS: tuple[str, ...] = ()   # perplexity is computed here by its definition; no package needed

EOT = "<|endoftext|>"
POEMS = REPO / "data" / "poem_sentiment"
# Hu et al. 2021, section 7.1 / Table 5: r = 8, alpha = 16 on W_q and W_v.
LORA = dict(r=8, alpha=16, targets=["c_attn"], qkv="qv")
SAMPLE_KNOBS = dict(do_sample=True, temperature=0.9, top_k=40)
TUTORIAL_PROMPT = "Stars are"   # the tutorial's own example, lower-cased below like the verses


@dataclass
class Sizes:
    steps: int = 300              # LoRA optimizer steps (the dev loss has levelled off by then on tiny)
    batch_size: int = 16
    eval_every: int = 50
    train_verses: Optional[int] = None   # None = every verse of the split
    dev_verses: Optional[int] = None
    test_verses: Optional[int] = None
    samples: int = 5
    sample_tokens: int = 24


SIZES = {"full": Sizes(),
         "quick": Sizes(steps=120, eval_every=40, samples=3, sample_tokens=20),
         "smoke": Sizes(steps=2, batch_size=4, eval_every=1, train_verses=16, dev_verses=4, test_verses=6,
                        samples=2, sample_tokens=4)}


def sizes_for(args) -> Sizes:
    return SIZES["smoke" if args.smoke else "quick" if args.quick else "full"]


# ---- data ----------------------------------------------------------------------------------------------
def read_verses(split: str, *, with_labels: bool = False) -> list:
    """data/poem_sentiment/{split}.tsv (id<TAB>verse<TAB>label, no header) -> the verses (or (verse, label))."""
    path = POEMS / f"{split}.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this project needs the poem verses shipped in data/poem_sentiment")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split("\t")
        if len(parts) != 3 or not parts[1].strip():
            raise ValueError(f"{path}, line {n}: expected id<TAB>verse<TAB>label")
        rows.append((parts[1].strip(), int(parts[2])) if with_labels else parts[1].strip())
    return rows


def verse_examples(verses: Sequence[str], max_len: int) -> list[Example]:
    """One example per verse: "<|endoftext|>" (GPT-2 has no BOS), then the verse; loss on the verse and its EOT."""
    return examples_from_pairs(get_tokenizer(), [(EOT, " " + v) for v in verses], max_len)


def _first(xs: list, n: Optional[int]) -> list:
    return xs if n is None else xs[:n]


# ---- LoRA: train or load -----------------------------------------------------------------------------
def lora_lr(model: GPT) -> float:
    """The paper's 2e-4 is for GPT-2 medium over thousands of steps; a few hundred need more (see the docstring)."""
    return 1e-3 if model.config.n_embd >= 512 else 2e-3


def new_lora_model(base: GPT) -> GPT:
    """A copy of `base` with the paper's LoRA (r=8, alpha=16 on q and v of every c_attn); `base` stays as it was."""
    return apply_lora(copy.deepcopy(base), r=LORA["r"], alpha=LORA["alpha"], targets=LORA["targets"],
                      qkv=LORA["qkv"], verbose=False)


def load_lora(base: GPT, directory: str | Path) -> GPT:
    """A copy of `base` with the adapter saved in `directory` (peft's layout)."""
    model = load_adapter(copy.deepcopy(base), directory)
    print(f"loaded the LoRA adapter from {directory}: {lora_summary(model)}")
    return model.eval()


def train_lora(base: GPT, train_ex: Sequence[Example], eval_ex: Sequence[Example], config: TrainConfig
               ) -> tuple[GPT, list[dict]]:
    """(a LoRA copy of `base` trained on train_ex, its loss history). Only A and B train; the model stays in
    eval mode (no dropout), so the loss curve and the before/after comparison see the same network."""
    model = new_lora_model(base).eval()
    print(lora_summary(model))
    print(describe_plan(len(train_ex), len(eval_ex), config), flush=True)
    history = train(lora_parameters(model), lm_loss_fn(model), list(train_ex), eval_examples=list(eval_ex),
                    config=config, eval_modules=[model])
    return model.eval(), history


def progress() -> bool:
    """Progress bars only on a terminal (a log file gets the one-line summaries)."""
    return sys.stderr.isatty()


def train_config(args, sizes: Sizes, model: GPT, *, steps: Optional[int] = None, batch_size: Optional[int] = None,
                 eval_every: Optional[int] = None) -> TrainConfig:
    lr = args.lr if getattr(args, "lr", None) is not None else lora_lr(model)
    if lr <= 0 or not math.isfinite(lr):
        raise ValueError(f"--lr must be a positive number, got {lr}")
    return TrainConfig(max_steps=getattr(args, "steps", None) or steps or sizes.steps,
                       batch_size=batch_size or sizes.batch_size, lr=lr, eval_every=eval_every or sizes.eval_every,
                       seed=args.seed, progress=progress(), precision=resolve_precision(args.precision, model.device))


def poetry_lora(base: GPT, args, sizes: Sizes) -> tuple[GPT, list[dict], dict]:
    """The poetry adapter: loaded from --lora DIR, or trained on the train verses (dev for the eval loss).
    Returns (LoRA model, history (empty when loaded), what was done, for metrics.json)."""
    if getattr(args, "lora", None):
        return load_lora(base, args.lora), [], {"adapter": str(args.lora)}
    max_len = min(64, base.config.n_positions)
    train_ex = verse_examples(_first(read_verses("train"), sizes.train_verses), max_len)
    dev_ex = verse_examples(_first(read_verses("dev"), sizes.dev_verses), max_len)
    config = train_config(args, sizes, base)
    model, history = train_lora(base, train_ex, dev_ex, config)
    info = {"steps": len(history), "lr": config.lr, "batch_size": config.batch_size, "train_verses": len(train_ex),
            "dev_verses": len(dev_ex), "dev_loss_first_eval": _eval_loss(history, 0),
            "dev_loss_last_eval": _eval_loss(history, -1),
            "trainable_parameters": sum(p.numel() for p in lora_parameters(model))}
    return model, history, info


def _eval_loss(history: list[dict], which: int) -> Optional[float]:
    ev = [h["eval_loss"] for h in history if "eval_loss" in h]
    return finite_or_none(ev[which]) if ev else None


# ---- the yardstick: perplexity by its definition -------------------------------------------------------
@dataclass
class Perplexity:
    """exp(Σ nll / Σ tokens) over texts, from each text's summed nll (nats) and its number of scored tokens."""
    text_nll: list[float]
    text_tokens: list[int]

    @property
    def nll(self) -> float:
        return float(sum(self.text_nll))

    @property
    def tokens(self) -> int:
        return int(sum(self.text_tokens))

    @property
    def mean_cross_entropy(self) -> float:
        return self.nll / self.tokens

    @property
    def value(self) -> float:
        return math.exp(self.mean_cross_entropy)

    @property
    def per_text(self) -> list[float]:
        return [math.exp(a / b) for a, b in zip(self.text_nll, self.text_tokens)]

    def subset(self, indices: Sequence[int]) -> "Perplexity":
        return Perplexity([self.text_nll[i] for i in indices], [self.text_tokens[i] for i in indices])


@torch.no_grad()
def text_perplexity(model: GPT, texts: Sequence[str], contexts: Optional[Sequence[str]] = None, *,
                    prefix=None, batch_size: int = 16) -> Perplexity:
    """Perplexity of `texts`, each read after its context (default "<|endoftext|>"): only the text's own
    tokens are scored, each given everything before it (and a learned prefix's past, if given).

    exp(Σ_texts Σ_tokens -log p(x_t | x_<t) / Σ_texts n_tokens): the token-weighted mean cross-entropy,
    not a mean of per-text means.
    """
    tok = get_tokenizer()
    contexts = [EOT] * len(texts) if contexts is None else list(contexts)
    if len(contexts) != len(texts) or not texts:
        raise ValueError("text_perplexity needs one context per text, and at least one text")
    limit = model.config.n_positions - (prefix.num_virtual_tokens if prefix is not None else 0)
    rows = []
    for i, (c, t) in enumerate(zip(contexts, texts)):
        cids, tids = tok.encode(c), tok.encode(t)
        if not cids or not tids:
            raise ValueError(f"text {i + 1}: the context and the text must each give at least one token")
        if len(cids) + len(tids) > limit:
            raise ValueError(f"text {i + 1} is {len(cids) + len(tids)} tokens with its context, more than the "
                             f"{limit} positions the model has for it")
        rows.append(Example(cids + tids, [0] * len(cids) + [1] * len(tids)))
    was_training = model.training
    model.eval()
    nll, counts = [], []
    try:
        for i in range(0, len(rows), batch_size):
            batch = {k: v.to(model.device) for k, v in collate_lm(rows[i:i + batch_size]).items()}
            ids, mask, scored = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
            past = None
            if prefix is not None:
                past, mask = prefix.inputs_for(ids, mask)
            logits = model(ids, attention_mask=mask, past_key_values=past).logits          # (B, T, V)
            logp = logits[:, :-1].float().log_softmax(-1)                                  # predicts tokens 1..T-1
            target_logp = logp.gather(-1, ids[:, 1:, None])[..., 0]                        # (B, T-1)
            counted = scored[:, 1:].to(target_logp.dtype)
            nll += (-(target_logp * counted).sum(1)).tolist()
            counts += counted.sum(1).long().tolist()
    finally:
        model.train(was_training)
    return Perplexity(nll, counts)


# ---- samples -------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_continuations(model: GPT, prompts: Sequence[str], *, seed: int, max_new_tokens: int, prefix=None,
                         **knobs) -> list[str]:
    """One continuation per prompt (the new text only, stopping at "<|endoftext|>"); prompt i draws from its
    own generator seeded with seed + i, so two models given the same prompts see the same random numbers."""
    tok, out = get_tokenizer(), []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([tok.encode(prompt)], dtype=torch.long, device=model.device)    # (1, T)
        g = torch.Generator(device=model.device).manual_seed(seed + i)
        past = prefix.past_key_values(1) if prefix is not None else None
        seq = generate(model, ids, max_new_tokens=max_new_tokens, eos_token_id=EOT_ID, generator=g,
                       past_key_values=past, **knobs)
        out.append(tok.decode([t for t in seq[0, ids.size(1):].tolist() if t != EOT_ID]))
    return out


def verse_openings(n: int) -> list[str]:
    """The tutorial's own prompt, then the first two words of held-out (test) verses."""
    openings = [TUTORIAL_PROMPT.lower()] + [" ".join(v.split()[:2]) for v in read_verses("test")]
    return openings[:n]


def bars_figure(path: str | Path, values: dict[str, float], *, ylabel: str, title: str, fmt: str = "{:.3g}",
                colors: Sequence[str] = ("#9aa5b1", "#4c72b0")) -> Path:
    """A secondary before/after figure: one bar per label, its value written on top."""
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    bars = ax.bar(list(values), list(values.values()), color=list(colors)[:len(values)], width=0.5)
    for b, v in zip(bars, values.values()):
        ax.annotate(fmt.format(v), (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


# ---- the project ---------------------------------------------------------------------------------------
def add_lora_args(parser: argparse.ArgumentParser, sizes: dict) -> None:
    """The LoRA projects' options: --lora DIR, --steps, --lr (sizes: the project's SIZES, for the defaults)."""
    g = parser.add_argument_group("LoRA")
    g.add_argument("--lora", metavar="DIR", help="load this adapter (saved by an earlier run in OUT/adapter) "
                                                 "instead of training one")
    g.add_argument("--steps", type=positive_int, default=None,
                   help=f"LoRA optimizer steps (default: {sizes['full'].steps}; --quick {sizes['quick'].steps})")
    g.add_argument("--lr", type=float, default=None,
                   help="AdamW peak learning rate (default: 2e-3 for models narrower than 512, else 1e-3)")


def build_parser() -> argparse.ArgumentParser:
    p = project_parser(NAME, "LoRA (r=8, alpha=16 on q and v) on poem verses: held-out perplexity and samples "
                             "from the same seeds, before and after.", needs=NEEDS)
    add_lora_args(p, SIZES)
    return p


def run(args) -> ProjectResult:
    clock, sizes = Stopwatch(), sizes_for(args)
    chosen = choose_model(args)
    print(chosen.reason)
    base = chosen.model
    test = _first(read_verses("test"), sizes.test_verses)
    prompts = verse_openings(sizes.samples)
    contexts = [EOT + " " + p for p in prompts]

    model, history, info = poetry_lora(base, args, sizes)   # a LoRA copy: `base` is untouched
    before = text_perplexity(base, [" " + v for v in test])
    before_samples = sample_continuations(base, contexts, seed=args.seed, max_new_tokens=sizes.sample_tokens,
                                          **SAMPLE_KNOBS)
    print(f"held-out perplexity before LoRA: {before.value:.2f} over {before.tokens} tokens of {len(test)} verses")
    after = text_perplexity(model, [" " + v for v in test])
    after_samples = sample_continuations(model, contexts, seed=args.seed, max_new_tokens=sizes.sample_tokens,
                                         **SAMPLE_KNOBS)
    print(f"held-out perplexity after LoRA: {after.value:.2f} (lower is better)")

    result = ProjectResult(NAME, "held-out perplexity", False, before.value, after.value, chosen.name, len(test),
                           clock.elapsed(), extra={
                               "heldout_tokens": before.tokens,
                               "mean_cross_entropy_before": finite_or_none(before.mean_cross_entropy),
                               "mean_cross_entropy_after": finite_or_none(after.mean_cross_entropy),
                               "lora": {**{k: v for k, v in LORA.items()}, **info},
                               "sample_knobs": SAMPLE_KNOBS, "sample_tokens": sizes.sample_tokens})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if history:
        save_adapter(model, out / "adapter")
        save_history(history, out)
        loss_figure(out, history, f"LoRA on {info['train_verses']} poem verses (r=8, alpha=16, q and v): loss")
    rows = [{"input": p, "before": b, "after": a} for p, b, a in zip(prompts, before_samples, after_samples)]
    write_samples(out, f"{TITLE}: samples before and after LoRA", rows, note=_note(result, info, sizes))
    metric_figure(out, result, labels=("base model", "with LoRA"))
    result.seconds = clock.elapsed()
    write_metrics(result, out)
    print(f"wrote {out}/metrics.json, samples.md, metric.png{', loss.png' if history else ''} "
          f"in {format_seconds(result.seconds)}")
    return result


def _note(result: ProjectResult, info: dict, sizes: Sizes) -> str:
    how = (f"loaded from {info['adapter']}" if "adapter" in info else
           f"trained {info['steps']} steps (batch {info['batch_size']}, lr {info['lr']:g}) on {info['train_verses']} "
           f"train verses, eval loss on {info['dev_verses']} dev verses")
    return (f"Model: {result.model}. LoRA r={LORA['r']}, alpha={LORA['alpha']} on q and v of every c_attn, {how}. "
            f"Held-out perplexity of {result.n} test verses (by its definition, over their own tokens): "
            f"{result.before:.2f} before, {result.after:.2f} after (lower is better). The paper's lr is 2e-4 for "
            "GPT-2 medium over thousands of steps; this run has a few hundred, hence the higher lr. "
            f"Each opening below is sampled (temperature {SAMPLE_KNOBS['temperature']}, top-k {SAMPLE_KNOBS['top_k']}, "
            f"{sizes.sample_tokens} tokens at most) from the same seed before and after.")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args), out=args.out)


if __name__ == "__main__":
    raise SystemExit(main())
