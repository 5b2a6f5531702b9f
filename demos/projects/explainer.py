"""Educational explainer, made real: one prefix per reading level on the same frozen model.

The tutorial's "educational explainer" replaced the word "force" with "pull" when asked for the
simple level. Here the same frozen model gets two prefixes, one trained on "simple" explanations
and one on "expert" ones, from data/explainer/pairs.jsonl (126 physics topics, each explained once
per level; written for the project, see its README): `Explain <topic>:` -> ` <explanation>
<|endoftext|>`, loss on the explanation, each prefix on its level's 101 train topics. Measured on
the 25 held-out topics: (1) the held-out loss per level, before = no prefix, after = that level's
prefix; (2) the readability of what each prefix writes, as Flesch reading ease (Flesch 1948:
206.835 - 1.015 * words/sentences - 84.6 * syllables/words; higher = easier), computed here by
its definition with syllables counted by the `pyphen` package's en_US hyphenation dictionary
(textstat's releases from 0.7.9 load NLTK's cmudict, a download this offline project cannot make;
hyphenation points undercount some syllables, e.g. "about" gets one, the same for every output).
The headline is the gap: mean Flesch of the simple prefix's outputs minus the expert prefix's,
higher = the levels differ as intended. Before = the gap without prefixes: both levels ask the
same prompt with the same seeds, so the unprefixed model writes the same text for both and the gap
is 0 (computed, not assumed). Outputs are sampled (top-k 40, temperature 0.8; one torch.Generator
per sample seeded --seed + i, the same for every variant); the tiny model's greedy text loops,
which makes a reading score meaningless. Hyperparameters: the paper's P = 10 and MLP
reparametrisation; lr per `prefix_lr` (3e-3 for the bundled model's few hundred steps instead of
the paper's 5e-5..8e-5 on GPT-2 medium).
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from minigpt import EOT_ID, GPT, examples_from_pairs, generate, get_tokenizer

from ..common import new_figure, save_figure
from ..kits import PrefixRun, fit_prefix, heldout_loss, load_prefix, save_prefix
from .common import (REPO, Finished, Project, ProjectResult, ProjectRun, Samples, add_prefix_args, prefix_training,
                     require)

__all__ = ["NAME", "TITLE", "PROJECT", "run", "LEVELS", "Pair", "read_pairs", "Readability", "flesch_reading_ease",
           "count_words", "count_sentences", "count_syllables"]

NAME = "explainer"
TITLE = "Educational explainer (two reading levels)"

LEVELS = ("simple", "expert")
P_EXPLAINER = 10
SAMPLING = dict(do_sample=True, top_k=40, temperature=0.8)


@dataclass
class Pair:
    topic: str
    level: str
    prompt: str
    completion: str
    split: str


@dataclass
class Sizes:
    train_topics: Optional[int]   # per level (None = all 101)
    test_topics: Optional[int]    # (None = all 25)
    steps: int                    # per level
    eval_every: int
    samples: int                  # samples per test topic and variant
    new_tokens: int
    shown: int


SIZES = {"full": Sizes(None, None, 120, 30, 2, 64, 6),
         "quick": Sizes(None, 12, 60, 20, 1, 64, 4),
         "smoke": Sizes(4, 2, 2, 2, 1, 6, 2)}


# ---- the data ----------------------------------------------------------------------------------
def read_pairs(path: Path) -> list[Pair]:
    """pairs.jsonl -> Pairs; errors name the file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this project needs the explainer pairs (data/explainer in the "
                                "repository, or --data FILE)")
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
        fields = ("topic", "level", "prompt", "completion", "split")
        if not isinstance(row, dict) or not all(isinstance(row.get(f), str) for f in fields):
            raise ValueError(f"{path}, line {n}: needs string fields {', '.join(fields)}")
        if row["level"] not in LEVELS or row["split"] not in ("train", "test"):
            raise ValueError(f"{path}, line {n}: level must be one of {LEVELS} and split train or test, got "
                             f"{row['level']!r}, {row['split']!r}")
        pairs.append(Pair(*(row[f] for f in fields)))
    return pairs


def _select(pairs: Sequence[Pair], level: str, split: str, limit: Optional[int]) -> list[Pair]:
    return [p for p in pairs if p.level == level and p.split == split][:limit]


# ---- Flesch reading ease, by its definition ----------------------------------------------------
WORD = re.compile(r"[A-Za-z]+(?:['\u2019][A-Za-z]+)*")          # runs of letters; numbers are not words
SENTENCE_END = re.compile(r"[.!?]+(?=[\s\"')\]]|$)")            # "3.5" and "e.g.x" do not end sentences


def count_words(text: str) -> int:
    return len(WORD.findall(text))


def count_sentences(text: str) -> int:
    """Sentence ends in the text, plus one for words after the last end (an unfinished sentence)."""
    ends = list(SENTENCE_END.finditer(text))
    tail = text[ends[-1].end():] if ends else text
    return len(ends) + (1 if WORD.search(tail) else 0)


def count_syllables(word: str, dic) -> int:
    """Hyphenation points + 1 (pyphen's en_US dictionary): a syllable count, at least 1."""
    return len(dic.positions(word.lower())) + 1


@dataclass
class Readability:
    words: int
    sentences: int
    syllables: int

    @property
    def flesch(self) -> float:
        """Flesch (1948) reading ease: 206.835 - 1.015 (words / sentences) - 84.6 (syllables / words)."""
        return 206.835 - 1.015 * self.words / self.sentences - 84.6 * self.syllables / self.words


def flesch_reading_ease(text: str, dic) -> Optional[float]:
    """The text's Flesch reading ease, or None for a text without words (no score is defined)."""
    words = WORD.findall(text)
    if not words:
        return None
    return Readability(len(words), count_sentences(text), sum(count_syllables(w, dic) for w in words)).flesch


def _mean(xs: Sequence[Optional[float]]) -> Optional[float]:
    """The mean of the scores that exist (None = an output without words), or None if none does."""
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _fmt(x: Optional[float]) -> str:
    return "n/a (no words)" if x is None else f"{x:.1f}"


def _gap(simple: Optional[float], expert: Optional[float]) -> float:
    return simple - expert if simple is not None and expert is not None else float("nan")


# ---- sampling with one generator per sample -----------------------------------------------------
@torch.no_grad()
def sample_text(model: GPT, prompt: str, seed: int, new_tokens: int, prefix=None) -> str:
    """One sampled continuation (new text only, up to <|endoftext|>) from a generator seeded `seed`."""
    tok = get_tokenizer()
    ids = torch.tensor([tok.encode(prompt)], dtype=torch.long, device=model.device)   # (1, T)
    g = torch.Generator(device=model.device).manual_seed(seed)
    past = prefix.past_key_values(1) if prefix is not None else None
    seq = generate(model, ids, max_new_tokens=new_tokens, eos_token_id=EOT_ID, past_key_values=past, generator=g,
                   **SAMPLING)
    new = seq[0, ids.size(1):].tolist()
    return tok.decode(new[:new.index(EOT_ID)] if EOT_ID in new else new).strip()


# ---- the project -------------------------------------------------------------------------------
def add_options(p: argparse.ArgumentParser) -> None:
    add_prefix_args(p, P=P_EXPLAINER, P_note=f"{P_EXPLAINER}, the paper's table-to-text length; one prefix per level",
                    steps={k: v.steps for k, v in SIZES.items()},
                    prefix_help="load the two prefixes a run saved (DIR/simple and DIR/expert, e.g. OUT/adapter) "
                                "instead of training them")
    p.add_argument("--data", metavar="FILE", default=str(REPO / "data" / "explainer" / "pairs.jsonl"),
                   help="the level-tagged pairs (default: data/explainer/pairs.jsonl)")


def _level_pairs(args, size: Sizes) -> tuple[dict[str, list[Pair]], dict[str, list[Pair]]]:
    """--data's train and test pairs per level, at this run's sizes; each level needs both."""
    pairs = read_pairs(Path(args.data))
    train = {lv: _select(pairs, lv, "train", size.train_topics) for lv in LEVELS}
    test = {lv: _select(pairs, lv, "test", size.test_topics) for lv in LEVELS}
    for lv in LEVELS:
        if not train[lv] or not test[lv]:
            raise ValueError(f"{args.data}: the {lv!r} level needs train and test rows")
    return train, test


def preflight(args, size: Sizes) -> tuple[dict[str, list[Pair]], dict[str, list[Pair]]]:
    """pyphen and a bad --data file fail before the model loads; the pairs (train, test) go on to run."""
    require("pyphen", "pyphen")
    return _level_pairs(args, size)


def _loss_figure(out: Path, runs: dict[str, PrefixRun], P: int) -> Path:
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for (level, r), color in zip(runs.items(), ("#1a7f37", "#8e44ad")):
        ax.plot([h["step"] + 1 for h in r.history], [h["loss"] for h in r.history], lw=1, alpha=0.4, color=color,
                label=f"{level}: train (per batch)")
        ev = [h for h in r.history if "eval_loss" in h]
        ax.plot([h["step"] + 1 for h in ev], [h["eval_loss"] for h in ev], "o-", color=color,
                label=f"{level}: held-out topics")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats / token)",
           title=f"One prefix per level (P={P}): loss on the explanation")
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, out / "loss.png")


def _readability_figure(out: Path, bars: dict[str, Optional[float]], n: int, model_name: str) -> Path:
    """readability.png: the mean Flesch reading ease of each variant's outputs and of the written references."""
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    names = list(bars)
    values = [float("nan") if bars[k] is None else bars[k] for k in names]
    colors = ["#9aa5b1", "#1a7f37", "#8e44ad", "#d5dbdb", "#d5dbdb"][:len(names)]
    for x, (v, c) in enumerate(zip(values, colors)):
        ax.bar(x, v, color=c, width=0.6)
        if v == v:
            ax.annotate(f"{v:.1f}", (x, v), ha="center", va="bottom" if v >= 0 else "top", fontsize=10)
    ax.set_xticks(range(len(names)), names, fontsize=9)
    ax.axhline(0, color="#333", lw=0.8)
    ax.set(ylabel="Flesch reading ease (higher = easier)",
           title=f"Readability of the outputs per level ({n} held-out topics, model {model_name})")
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, out / "readability.png")


def run(run: ProjectRun) -> Finished:
    """The Flesch gap between the levels' outputs without prefixes and with one prefix per level."""
    args, size, model, tok = run.args, run.sizes, run.model, get_tokenizer()
    dic = require("pyphen", "pyphen").Pyphen(lang="en_US")
    train, test = run.prepared

    runs: dict[str, PrefixRun] = ({lv: load_prefix(model, Path(args.prefix) / lv) for lv in LEVELS}
                                  if args.prefix else {})
    P = runs["simple"].prefix.num_virtual_tokens if runs else args.num_virtual_tokens
    max_len = model.config.n_positions - P
    new_tokens = min(size.new_tokens, max_len - max(len(tok.encode(p.prompt)) for lv in LEVELS for p in test[lv]))
    examples = lambda rows: examples_from_pairs(tok, [(p.prompt, p.completion) for p in rows], max_len)  # noqa: E731
    train_ex = {lv: examples(train[lv]) for lv in LEVELS}
    test_ex = {lv: examples(test[lv]) for lv in LEVELS}
    print(f"explainer: {len(train_ex['simple'])} + {len(train_ex['expert'])} train pairs, "
          f"{len(test_ex['simple'])} + {len(test_ex['expert'])} held-out (simple + expert); "
          f"{size.samples} sample(s) per held-out topic, top-k {SAMPLING['top_k']}, "
          f"temperature {SAMPLING['temperature']}, up to {new_tokens} tokens")

    loss_before = {lv: heldout_loss(model, test_ex[lv]) for lv in LEVELS}
    for lv in LEVELS:
        if lv not in runs:
            runs[lv] = fit_prefix(model, train_ex[lv], test_ex[lv], P=P, eval_every=size.eval_every,
                                  label=f"[{lv}] ", **prefix_training(args, size.steps))
    loss_after = {lv: heldout_loss(model, test_ex[lv], runs[lv].prefix) for lv in LEVELS}

    # Sample i of topic t uses seed --seed + t * samples + i for every variant (no prefix, simple, expert).
    cache: dict[tuple, str] = {}

    def outputs(level: str, prefix_level: Optional[str]) -> list[list[str]]:
        prefix = runs[prefix_level].prefix if prefix_level else None
        texts = []
        for t, pair in enumerate(test[level]):
            row = []
            for i in range(size.samples):
                key = (pair.prompt, args.seed + t * size.samples + i, prefix_level)
                if key not in cache:
                    cache[key] = sample_text(model, pair.prompt, key[1], new_tokens, prefix)
                row.append(cache[key])
            texts.append(row)
        return texts

    plain = {lv: outputs(lv, None) for lv in LEVELS}          # each level's prompts, no prefix
    steered = {lv: outputs(lv, lv) for lv in LEVELS}          # each level's prompts, its own prefix
    score = lambda rows: [_mean([flesch_reading_ease(s, dic) for s in row]) for row in rows]  # noqa: E731
    fre_plain = {lv: score(plain[lv]) for lv in LEVELS}
    fre_steered = {lv: score(steered[lv]) for lv in LEVELS}
    fre_reference = {lv: _mean([flesch_reading_ease(p.completion, dic) for p in test[lv]]) for lv in LEVELS}
    gap_before = _gap(_mean(fre_plain["simple"]), _mean(fre_plain["expert"]))
    gap_after = _gap(_mean(fre_steered["simple"]), _mean(fre_steered["expert"]))
    no_words = sum(flesch_reading_ease(s, dic) is None for d in (plain, steered) for lv in LEVELS
                   for row in d[lv] for s in row)

    r4 = lambda x: None if x is None else round(float(x), 4)  # noqa: E731
    extra = {**{f"loss_{lv}_before": r4(loss_before[lv]) for lv in LEVELS},
             **{f"loss_{lv}_after": r4(loss_after[lv]) for lv in LEVELS},
             **{f"flesch_{lv}_no_prefix": r4(_mean(fre_plain[lv])) for lv in LEVELS},
             **{f"flesch_{lv}_prefix": r4(_mean(fre_steered[lv])) for lv in LEVELS},
             **{f"flesch_{lv}_reference": r4(fre_reference[lv]) for lv in LEVELS},
             "flesch_gap_reference": r4(_gap(fre_reference["simple"], fre_reference["expert"])),
             "outputs_without_words": no_words, "samples_per_topic": size.samples, "P": P,
             "prefix_simple": runs["simple"].how, "prefix_expert": runs["expert"].how,
             "syllables": "pyphen en_US hyphenation points + 1", "sampling": SAMPLING}
    result = ProjectResult(NAME, "Flesch gap, simple - expert", True, gap_before, gap_after,
                           run.chosen.name, len(test["simple"]), run.clock.elapsed(), extra=extra)

    note = (f"Two prefixes (P={P}) on one frozen model ({run.chosen.name}). Flesch reading ease (Flesch 1948; "
            f"syllables from pyphen's en_US dictionary) of sampled outputs on {len(test['simple'])} held-out topics, "
            f"{size.samples} sample(s) each: no prefix {_fmt(_mean(fre_plain['simple']))}; simple prefix "
            f"{_fmt(_mean(fre_steered['simple']))}; expert prefix {_fmt(_mean(fre_steered['expert']))}. **Gap "
            f"(simple - expert): {gap_before:.1f} before -> {gap_after:.1f} after** (the written references: "
            f"{_fmt(fre_reference['simple'])} vs {_fmt(fre_reference['expert'])}). Held-out loss (nats/token), "
            "no prefix "
            f"-> the level's prefix: simple {loss_before['simple']:.3f} -> {loss_after['simple']:.3f}, expert "
            f"{loss_before['expert']:.3f} -> {loss_after['expert']:.3f}. Prefixes: {runs['simple'].how}. Each sample "
            "uses the same seed in every variant. lr: the paper's 5e-5..8e-5 suits GPT-2 medium over thousands of "
            "steps; narrower models use prefix_lr's higher rate.")
    rows = []
    for t in range(min(size.shown, len(test["simple"]))):
        s, e = test["simple"][t], test["expert"][t]
        rows.append({"input": f"{s.prompt}  (sample 1; the same seed in every column)",
                     "reference": f"simple:{s.completion}\nexpert:{e.completion}",
                     "before": plain["simple"][t][0],
                     "before_score": f"no prefix, Flesch {_fmt(fre_plain['simple'][t])}",
                     "after": f"simple prefix: {steered['simple'][t][0]}\nexpert prefix: {steered['expert'][t][0]}",
                     "after_score": f"Flesch simple {_fmt(fre_steered['simple'][t])}, expert "
                                    f"{_fmt(fre_steered['expert'][t])}"})
    per_topic = tuple([g for g in (_gap(a, b) for a, b in zip(d["simple"], d["expert"])) if g == g]
                      for d in (fre_plain, fre_steered))   # NaN (no words) is left out
    out = run.folder()
    _readability_figure(out, {"no prefix": _mean(fre_plain["simple"]), "simple prefix": _mean(fre_steered["simple"]),
                              "expert prefix": _mean(fre_steered["expert"]),
                              "written: simple": fre_reference["simple"], "written: expert": fre_reference["expert"]},
                        len(test["simple"]), run.chosen.name)
    files = ["readability.png"]
    trained = {lv: r for lv, r in runs.items() if r.history}
    if trained:
        _loss_figure(out, trained, P)
        files += ["loss.png", "adapter/"]
    for lv in LEVELS:
        save_prefix(runs[lv], out / "adapter" / lv, run.chosen.name)   # a loaded prefix is not written again
    print(f"Flesch gap (simple - expert) {gap_before:.1f} -> {gap_after:.1f}; held-out loss simple "
          f"{loss_before['simple']:.3f} -> {loss_after['simple']:.3f}, expert {loss_before['expert']:.3f} -> "
          f"{loss_after['expert']:.3f}")
    return Finished(result, Samples(f"{TITLE}: samples", rows, note=note), labels=("no prefix", "one prefix per level"),
                    unit="Flesch points", per_item=per_topic, files=files)


PROJECT = Project(
    name=NAME, title=TITLE, technique="prefix tuning", run=run, sizes=SIZES,
    description="One prefix per reading level (simple, expert) on the same frozen model: held-out loss per level, and "
                "the Flesch reading-ease gap between the levels' outputs (syllables from pyphen).",
    needs=("pyphen",), options=add_options, preflight=preflight)

if __name__ == "__main__":
    raise SystemExit(PROJECT.main())
