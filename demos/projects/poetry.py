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

The LoRA pieces the LoRA projects share (the paper's adapter, training, loading, seeded samples) are in
demos.kits.lora, the verses in demos.kits.data and perplexity in demos.kits.measures; the hybrid trains this
project's adapter with the same kit function, `train_poem_lora`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from minigpt import GPT, save_history
from techniques.lora import save_adapter

from ..common import finite_or_none
from ..kits import (EOT, LORA, load_lora, lora_train_config, read_verses, sample_continuations, text_perplexity,
                    train_poem_lora)
from .common import (Finished, Project, ProjectResult, ProjectRun, Samples, add_lora_args, add_prompts_arg,
                     lora_training, loss_figure, read_prompts_file)

NAME = "poetry"
TITLE = "Poetry generator"

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


def _first(xs: list, n: Optional[int]) -> list:
    return xs if n is None else xs[:n]


# ---- LoRA: train or load -----------------------------------------------------------------------------
def poetry_lora(base: GPT, args, sizes: Sizes) -> tuple[GPT, list[dict], dict]:
    """The poetry adapter: loaded from --lora DIR, or trained on the train verses (dev for the eval loss).
    Returns (LoRA model, history (empty when loaded), what was done, for metrics.json)."""
    if args.lora:
        return load_lora(base, args.lora), [], {"adapter": str(args.lora)}
    config = lora_train_config(base, batch_size=sizes.batch_size, eval_every=sizes.eval_every,
                               **lora_training(args, sizes.steps))
    return train_poem_lora(base, config, train_verses=sizes.train_verses, dev_verses=sizes.dev_verses)


# ---- samples -------------------------------------------------------------------------------------------
def verse_openings(n: int) -> list[str]:
    """The tutorial's own prompt, then the first two words of held-out (test) verses."""
    openings = [TUTORIAL_PROMPT.lower()] + [" ".join(v.split()[:2]) for v in read_verses("test")]
    return openings[:n]


# ---- the project ---------------------------------------------------------------------------------------
def run(run: ProjectRun) -> Finished:
    """Held-out perplexity and samples of the same verse openings, before and after LoRA."""
    args, sizes, base = run.args, run.sizes, run.model
    test = _first(read_verses("test"), sizes.test_verses)
    prompts = run.prepared or verse_openings(sizes.samples)   # --prompts FILE, or the project's openings
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

    result = ProjectResult(NAME, "held-out perplexity", False, before.value, after.value, run.chosen.name, len(test),
                           run.clock.elapsed(), extra={
                               "heldout_tokens": before.tokens,
                               "mean_cross_entropy_before": finite_or_none(before.mean_cross_entropy),
                               "mean_cross_entropy_after": finite_or_none(after.mean_cross_entropy),
                               "lora": {**{k: v for k, v in LORA.items()}, **info},
                               "sample_knobs": SAMPLE_KNOBS, "sample_tokens": sizes.sample_tokens})
    files = []
    if history:
        out = run.folder()
        save_adapter(model, out / "adapter")
        save_history(history, out)
        loss_figure(out, history, f"LoRA on {info['train_verses']} poem verses (r=8, alpha=16, q and v): loss")
        files = ["adapter/", "history.json", "loss.png"]
    rows = [{"input": p, "before": b, "after": a} for p, b, a in zip(prompts, before_samples, after_samples)]
    samples = Samples(f"{TITLE}: samples before and after LoRA", rows, note=_note(result, info, sizes))
    return Finished(result, samples, labels=("base model", "with LoRA"), files=files)


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


PROJECT = Project(
    name=NAME, title=TITLE, technique="LoRA", run=run, sizes=SIZES,
    description="LoRA (r=8, alpha=16 on q and v) on poem verses: held-out perplexity and samples from the same "
                "seeds, before and after.",
    needs=(),   # perplexity is computed here by its definition; no package needed
    options=lambda parser: (add_lora_args(parser, SIZES),
                            add_prompts_arg(parser.add_argument_group("this project"), "verse openings")),
    preflight=lambda args, sizes: read_prompts_file(args.prompts) if args.prompts else None)


if __name__ == "__main__":
    raise SystemExit(PROJECT.main())
