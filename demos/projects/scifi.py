"""Sci-fi from 100 snippets (the tutorial's LoRA exercise), for real.

The tutorial only named the exercise ("Sci-fi stories with 100 snippets"). Here LoRA (Hu et al. 2021: the
paper's r = 8, alpha = 16 on the query and value projections of every c_attn) is trained on exactly the 100
snippets of data/scifi/snippets.txt (written for the project, MIT; see its README): one snippet per example,
"<|endoftext|>" in front, the loss on the snippet and its closing "<|endoftext|>". Two yardsticks, before and
after: the perplexity of the 25 held-out snippets (data/scifi/heldout.txt), by its definition over their own
tokens (headline; lower is better); and the share of genre words (data/scifi/genre_words.txt, 60 words) among
the words of samples continued from neutral prompts, the same seeds before and after: a simple lexical count
(lower-cased alphabetic words, whole-word matches), a rough signal of the genre and nothing more. With no
third split, the held-out snippets also give the eval loss drawn during training; nothing is chosen by it.
The lr is the poetry project's (2e-3 on the small bundled model instead of the paper's 2e-4, which is for
GPT-2 medium over thousands of steps), and 100 snippets make an epoch of 13 steps, so the run is a few
hundred steps (SIZES).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from minigpt import Example, examples_from_pairs, get_tokenizer, save_history
from techniques.lora import save_adapter

from ..common import finite_or_none
from ..kits import EOT, LORA, load_lora, lora_train_config, sample_continuations, text_perplexity, train_lora
from .common import (REPO, Finished, Project, ProjectResult, ProjectRun, Samples, add_lora_args, bars_figure,
                     lora_training, loss_figure)

NAME = "scifi"
TITLE = "Sci-fi from 100 snippets"

DATA = REPO / "data" / "scifi"
N_SNIPPETS = 100
SAMPLE_KNOBS = dict(do_sample=True, temperature=0.9, top_k=40)
# Openings with no genre in them: what the model adds is what it has learned.
NEUTRAL_PROMPTS = ("The morning", "She opened the door", "Nobody expected", "The old man said", "It was late when",
                   "They walked along", "In the end,", "He looked up at the", "The letter arrived",
                   "Everyone in the room")
WORD = re.compile(r"[a-z]+")


@dataclass
class Sizes:
    steps: int = 200             # 100 snippets at batch 8 = 13 steps an epoch: about 15 epochs
    batch_size: int = 8
    eval_every: int = 25
    snippets: int = N_SNIPPETS   # the exercise: exactly 100 (fewer only in --smoke)
    heldout: int | None = None
    prompts: int = len(NEUTRAL_PROMPTS)
    samples_per_prompt: int = 3
    sample_tokens: int = 40


SIZES = {"full": Sizes(),
         "quick": Sizes(steps=80, eval_every=20, samples_per_prompt=2, sample_tokens=30),
         "smoke": Sizes(steps=2, batch_size=4, eval_every=1, heldout=4, prompts=2, samples_per_prompt=1,
                        sample_tokens=4)}


# ---- data ----------------------------------------------------------------------------------------------
def read_lines(name: str) -> list[str]:
    path = DATA / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this project needs the snippets shipped in data/scifi")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{path} is empty")
    return lines


def read_snippets() -> list[str]:
    """The exercise's 100 training snippets; refuses a file with any other count."""
    snippets = read_lines("snippets.txt")
    if len(snippets) != N_SNIPPETS:
        raise ValueError(f"{DATA / 'snippets.txt'} has {len(snippets)} snippets; the exercise trains on exactly "
                         f"{N_SNIPPETS}")
    return snippets


def read_genre_words() -> set[str]:
    return {w.lower() for w in read_lines("genre_words.txt")}


def snippet_examples(snippets: Sequence[str], max_len: int) -> list[Example]:
    return examples_from_pairs(get_tokenizer(), [(EOT, " " + s) for s in snippets], max_len)


# ---- the lexical yardstick -------------------------------------------------------------------------------
def words(text: str) -> list[str]:
    """Lower-cased alphabetic words (the count docs/projects.md reports)."""
    return WORD.findall(text.lower())


def genre_count(text: str, bag: set[str]) -> tuple[int, int]:
    """(genre words, all words) in `text`: whole-word matches against the bag."""
    ws = words(text)
    return sum(w in bag for w in ws), len(ws)


def genre_share(texts: Sequence[str], bag: set[str]) -> float:
    """Genre words / all words, pooled over the texts (0 when there are no words)."""
    counts = [genre_count(t, bag) for t in texts]
    hits, total = sum(c[0] for c in counts), sum(c[1] for c in counts)
    return hits / total if total else 0.0


# ---- the project ---------------------------------------------------------------------------------------
def run(run: ProjectRun) -> Finished:
    """Held-out perplexity of sci-fi snippets and the genre-word share of samples from neutral prompts,
    before and after LoRA on the 100 snippets."""
    args, sizes, base = run.args, run.sizes, run.model
    snippets = read_snippets()[:sizes.snippets]
    heldout = read_lines("heldout.txt")[:sizes.heldout]
    bag = read_genre_words()
    prompts = [p for p in NEUTRAL_PROMPTS[:sizes.prompts] for _ in range(sizes.samples_per_prompt)]
    contexts = [EOT + " " + p for p in prompts]

    def sample(model):
        return sample_continuations(model, contexts, seed=args.seed, max_new_tokens=sizes.sample_tokens,
                                    **SAMPLE_KNOBS)

    history, info = [], {}
    if args.lora:
        model, info = load_lora(base, args.lora), {"adapter": str(args.lora)}
    else:
        max_len = min(96, base.config.n_positions)
        train_ex, eval_ex = snippet_examples(snippets, max_len), snippet_examples(heldout, max_len)
        config = lora_train_config(base, batch_size=sizes.batch_size, eval_every=sizes.eval_every,
                                   **lora_training(args, sizes.steps))
        model, history = train_lora(base, train_ex, eval_ex, config)   # a LoRA copy: `base` is untouched
        info = {"steps": len(history), "lr": config.lr, "batch_size": config.batch_size, "snippets": len(train_ex),
                "epochs": round(len(history) * config.batch_size / len(train_ex), 2)}
    before = text_perplexity(base, [" " + s for s in heldout])
    before_samples = sample(base)
    print(f"before LoRA: held-out perplexity {before.value:.2f}; genre words in samples "
          f"{100 * genre_share(before_samples, bag):.1f}%")
    after = text_perplexity(model, [" " + s for s in heldout])
    after_samples = sample(model)
    share_before, share_after = genre_share(before_samples, bag), genre_share(after_samples, bag)
    print(f"after LoRA: held-out perplexity {after.value:.2f} (lower is better); genre words in samples "
          f"{100 * share_after:.1f}%")

    result = ProjectResult(NAME, "held-out perplexity", False, before.value, after.value, run.chosen.name,
                           len(heldout), run.clock.elapsed(), extra={
                               "heldout_tokens": before.tokens,
                               "genre_word_share_before": finite_or_none(share_before),
                               "genre_word_share_after": finite_or_none(share_after),
                               "genre_word_share_training_snippets": finite_or_none(genre_share(snippets, bag)),
                               "genre_share_is": "a simple lexical count: genre words / all words (lower-cased, "
                                                 "alphabetic, whole words) in the samples from neutral prompts",
                               "samples": len(prompts), "sample_tokens": sizes.sample_tokens,
                               "sample_knobs": SAMPLE_KNOBS, "lora": {**LORA, **info}})
    out, files = run.folder(), ["genre.png"]
    if history:
        save_adapter(model, out / "adapter")
        save_history(history, out)
        loss_figure(out, history, f"LoRA on {info['snippets']} sci-fi snippets: loss (eval = the held-out snippets)")
        files += ["adapter/", "history.json", "loss.png"]
    rows = [{"input": p, "before": b, "after": a,
             "before_score": "genre words %d of %d" % genre_count(b, bag),
             "after_score": "genre words %d of %d" % genre_count(a, bag)}
            for p, b, a in zip(prompts, before_samples, after_samples)]
    bars_figure(out / "genre.png", {"base model": 100 * share_before, "with LoRA": 100 * share_after},
                ylabel="genre words among all words (%)", fmt="{:.1f}%",
                title=f"{NAME}: genre-word share in {len(prompts)} samples from neutral prompts (a lexical count; "
                      f"model {result.model})")
    samples = Samples(f"{TITLE}: samples before and after LoRA", rows, note=_note(result, info, sizes, len(snippets)))
    return Finished(result, samples, labels=("base model", "with LoRA"), files=files)


def _note(result: ProjectResult, info: dict, sizes: Sizes, n_snippets: int) -> str:
    how = (f"loaded from {info['adapter']}" if "adapter" in info else
           f"trained {info['steps']} steps (batch {info['batch_size']}, lr {info['lr']:g}, about {info['epochs']} "
           f"epochs) on the {n_snippets} snippets")
    x = result.extra
    return (f"Model: {result.model}. LoRA r={LORA['r']}, alpha={LORA['alpha']} on q and v of every c_attn, {how}. "
            f"Held-out perplexity of {result.n} snippets: {result.before:.2f} before, {result.after:.2f} after (lower "
            f"is better). Genre words among the words of the samples (a simple lexical count against the 60-word "
            f"list): {100 * x['genre_word_share_before']:.1f}% before, {100 * x['genre_word_share_after']:.1f}% after "
            f"({100 * x['genre_word_share_training_snippets']:.1f}% in the training snippets). The paper's lr is 2e-4 "
            "for GPT-2 medium over thousands of steps; this run has a few hundred, hence the higher lr. Each prompt is "
            f"sampled (temperature {SAMPLE_KNOBS['temperature']}, top-k {SAMPLE_KNOBS['top_k']}, {sizes.sample_tokens} "
            "tokens at most) from the same seed before and after; a prompt listed twice is two seeds.")


PROJECT = Project(
    name=NAME, title=TITLE, technique="LoRA", run=run, sizes=SIZES,
    description="LoRA (r=8, alpha=16 on q and v) trained on exactly 100 sci-fi snippets: held-out perplexity, and "
                "the share of genre words in samples from neutral prompts, before and after.",
    needs=(),   # perplexity by its definition and a word count: no package needed
    options=lambda parser: add_lora_args(parser, SIZES))


if __name__ == "__main__":
    raise SystemExit(PROJECT.main())
