"""Sentiment story: PPLM nudges five story openings towards positive text, measured by VADER.

The tutorial's fake ("Sentiment story (PPLM, mini)" and the exercise "positivity nudge on 5 prompts")
appended " with joy and hope..." to the prompt and printed a hard-coded 3-vector as the "gradient".
Here five story openings (`PROMPTS`, written for this project) are continued by the model several
times each, first unperturbed and then under PPLM (Dathathri et al. 2020) with the same seeds
(continuation k, counted over all prompts, draws from its own torch.Generator seeded --seed + k),
in two settings:

- bag of words: the paper's `positive_words` list, loss -log Σ_{w in bag} p̃(w);
- discriminator: a linear head p(a|x) = softmax(W · mean_t h_t + b) on the model's own mean hidden
  state, trained here with `pplm.train_discriminator` on SST-2 (data/sst2/train.tsv; its accuracy on
  data/sst2/dev.tsv is reported), steering to class "positive". `--discrim sentiment` with
  `--model gpt2-medium` uses the paper's own head (class very_positive) instead, and `--discrim DIR`
  a head saved by an earlier run (this project saves its head into --out/discriminator).

metrics.json leads with the better-documented setting: the one that is the paper's own attribute
model on the model at hand (`headline_setting`). On GPT-2 medium with --discrim sentiment that is the
paper's head; on any other model it is the paper's bag with the reference's settings, and the head
trained here (on an SST-2 subset, for a model the paper never saw) is the second setting, reported
under "extra" with the same numbers. On the bundled model the head trained here reaches about 62%
SST-2 dev accuracy and lowers VADER's score, while the bag raises it (a run's samples.md and
metrics.json hold the numbers).

Yardstick: VADER's compound score (vaderSentiment, Hutto & Gilbert 2014; a rule-based scorer nobody
here wrote) of each continuation (the generated text only: the prompt is the same before and after),
mean over the samples, unperturbed vs perturbed; also the share of continuations VADER rates
positive (compound >= 0.05, VADER's own threshold).

Hyperparameters are the reference's (uber-research/PPLM README and run_pplm.py examples):
discriminator stepsize 0.04, 10 iterations, gamma 1.0, gm_scale 0.95, kl_scale 0.01, horizon 1;
bag of words stepsize 0.03, 3 iterations, window 5, gamma 1.5, gm_scale 0.95, kl_scale 0.01; both
sample with top-k 10. What the small model and a 2-core CPU forced: the bag's step size grows on
models narrower than 512 (0.1 at width 256, 0.3 below; demos.common.bow_stepsize, as in the tour); 30 new
tokens per continuation (the paper: 50) and 6 samples per prompt; the head is trained on a random 12,000 of
SST-2's 67,349 training rows (caching features costs one forward pass per text; --train-rows 0 takes them
all) with the reference's training settings (10 epochs, batch 64, Adam at lr 1e-4). The bundled model saw
SST-2's training sentences (without labels) in pre-training; the dev rows are held out from it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from minigpt import GPT, TrainConfig, get_tokenizer, resolve_precision
from minigpt.cli import positive_int
from techniques import pplm

from ..common import bow_stepsize, new_figure, save_figure
from ..kits import continuations, mean
from .common import (REPO, Finished, Project, ProjectResult, ProjectRun, Samples, add_prompts_arg, loss_figure,
                     read_prompts_file, vader_analyzer)

NAME = "sentiment_story"
TITLE = "Sentiment story"

PROMPTS = (  # written for this project: openings with no sentiment of their own
    "The old house at the end of the lane",
    "When my brother came home that night,",
    "The letter arrived on a grey morning, and",
    "The two travellers reached the river at dusk.",
    "She opened the door of the empty theatre and",
)
BOW = "positive_words"
SST2 = REPO / "data" / "sst2"
CLASSES = ["negative", "positive"]          # SST-2's labels 0 and 1
PAPER_CLASS = "very_positive"               # the paper's sentiment head (SST-5 classes)
TRAINED_CLASS = "positive"
POSITIVE = 0.05                             # VADER's threshold for "positive" (compound >= 0.05)

SAMPLING = dict(do_sample=True, top_k=10, temperature=1.0)
# The reference's settings (uber-research/PPLM README: "-D sentiment --stepsize 0.04 --num_iterations 10
# --gamma 1.0 --kl_scale 0.01 --gm_scale 0.95"; "-B ... --stepsize 0.03 --num_iterations 3 --window_length 5
# --gamma 1.5 --kl_scale 0.01"; gm_scale 0.95 as in its run_pplm_example for bags).
DISCRIM_KNOBS = dict(stepsize=0.04, num_iterations=10, gamma=1.0, gm_scale=0.95, kl_scale=0.01, horizon_length=1)
BOW_KNOBS = dict(stepsize=0.03, num_iterations=3, window_length=5, gamma=1.5, gm_scale=0.95, kl_scale=0.01)
# The head's training: the reference's (run_pplm_discrim_train.py: 10 epochs, batch 64, Adam at lr 1e-4).
HEAD_TRAIN = dict(batch_size=64, lr=1e-4, decay=False)


@dataclass
class Sizes:
    prompts: int
    samples: int        # continuations per prompt
    tokens: int         # new tokens per continuation
    train_rows: int     # SST-2 training rows for the head (0 = all)
    dev_rows: int       # SST-2 dev rows for its accuracy (0 = all)
    epochs: int


SIZES = {"full": Sizes(5, 6, 30, 12000, 0, 10),
         "quick": Sizes(5, 2, 20, 3000, 0, 10),
         "smoke": Sizes(2, 1, 4, 64, 32, 1)}


# ---- samples.md ------------------------------------------------------------------------------------
def samples_section(heading: str, rows: Sequence[dict], note: str = "") -> str:
    """A section for the end of samples.md (its appendix): one entry per row (input, output, score)."""
    lines = [f"\n# {heading}\n"] + ([note + "\n"] if note else [])
    for i, row in enumerate(rows, 1):
        lines += [f"## {i}. input\n\n{_quote(row['input'])}\n", f"**{row['label']}** ({row['score']}):\n\n"
                  f"{_quote(row['output'])}\n"]
    return "\n".join(lines)


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in str(text).strip().splitlines()) or "> (empty)"


# ---- the attribute models ------------------------------------------------------------------------------
def sst2_rows(name: str, limit: int, seed: int) -> tuple[list[str], list[int]]:
    """SST-2 texts and labels (0 negative, 1 positive); `limit` > 0 keeps a random subset of that size."""
    texts, labels, _ = pplm.load_labelled_tsv(SST2 / name, class_names=CLASSES)
    if 0 < limit < len(texts):
        keep = sorted(random.Random(seed).sample(range(len(texts)), limit))
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    return texts, labels


def head_accuracy(model: GPT, head: pplm.Discriminator, texts: Sequence[str], labels: Sequence[int]) -> float:
    """Share of SST-2 rows whose class (by name) the head ranks above the other SST-2 class."""
    idx = [head.class_index(c) for c in CLASSES]
    with torch.no_grad():
        feats = pplm.cache_features(model, texts, progress=False).to(model.device)
        logits = head.to(model.device)(feats)[:, idx]
    return (logits.argmax(-1).cpu() == torch.tensor(labels)).float().mean().item()


@dataclass
class Head:
    head: pplm.Discriminator
    label: str
    source: str
    dev_accuracy: Optional[float]
    history: Optional[list] = None
    trained: bool = False


def sentiment_head(model: GPT, args, sizes: Sizes) -> Head:
    """The discriminator: --discrim NAME|DIR loaded, else trained on SST-2 now."""
    dev_texts, dev_labels = sst2_rows("dev.tsv", sizes.dev_rows, args.seed)
    if args.discrim:
        head = pplm.load_discriminator(args.discrim)
        head.check_model(model)
        label = args.class_label or (PAPER_CLASS if args.discrim in pplm.PAPER_HEADS else TRAINED_CLASS)
        head.class_index(label)
        binary = all(c in head.class_names for c in CLASSES) and len(head.class_names) == 2
        acc = head_accuracy(model, head, dev_texts, dev_labels) if binary else None
        return Head(head, label, f"loaded from {args.discrim}", acc)
    label = args.class_label or TRAINED_CLASS
    pplm.Discriminator(1, CLASSES).class_index(label)   # a class the head will not have fails before training
    texts, labels = sst2_rows("train.tsv", args.train_rows if args.train_rows is not None else sizes.train_rows,
                              args.seed)
    config = TrainConfig(epochs=sizes.epochs, eval_every=max(1, len(texts) // HEAD_TRAIN["batch_size"]),
                         seed=args.seed, progress=not args.no_progress,
                         precision=resolve_precision(args.precision, model.device), **HEAD_TRAIN)
    print(f"discriminator: a linear head on the model's mean hidden state, {len(texts):,} SST-2 training rows, "
          f"{sizes.epochs} epoch(s) at batch {config.batch_size}, lr {config.lr}; dev: {len(dev_texts)} rows")
    head, report = pplm.train_discriminator(model, texts, labels, CLASSES, eval_texts=dev_texts,
                                            eval_labels=dev_labels, config=config, progress=not args.no_progress)
    print(f"discriminator dev accuracy: {100 * report['dev_accuracy']:.1f}% on {report['n_dev']} SST-2 dev rows")
    return Head(head, label, f"trained here on {report['n_train']:,} SST-2 rows", report["dev_accuracy"],
                report["history"], trained=True)


# ---- the yardstick -----------------------------------------------------------------------------------
def vader_scores(analyzer, texts: Sequence[str]) -> list[float]:
    return [analyzer.polarity_scores(t)["compound"] for t in texts]


def distinct_n(token_rows: Sequence[Sequence[int]], n: int = 2) -> float:
    """Dist-n (Li et al. 2016, as the PPLM paper reports it): distinct n-grams of generated tokens divided by
    all of them, pooled over a setting's samples. Low values mean repetition, PPLM's failure at large steps."""
    grams = [tuple(row[i:i + n]) for row in token_rows for i in range(len(row) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def positive_share(scores: Sequence[float]) -> float:
    return sum(s >= POSITIVE for s in scores) / max(1, len(scores))


# ---- options and the run -------------------------------------------------------------------------------
def add_options(p) -> None:
    g = p.add_argument_group("this project")
    add_prompts_arg(g, "story openings")
    g.add_argument("--discrim", metavar="NAME|DIR",
                   help="use this discriminator instead of training one: a paper head (sentiment: needs "
                        "--model gpt2-medium; class very_positive) or a folder saved by an earlier run "
                        "(OUT/discriminator)")
    g.add_argument("--class-label", help="the class to steer towards (default: positive for a head trained "
                                         "here, very_positive for the paper's sentiment head)")
    g.add_argument("--train-rows", type=int, default=None, metavar="N",
                   help="SST-2 training rows for the head (default 12000; --quick 3000; 0 = all 67,349)")
    g.add_argument("--samples", type=positive_int, help="continuations per prompt (default 6; --quick 2)")
    g.add_argument("--tokens", type=positive_int, help="new tokens per continuation (default 30; --quick 20)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def preflight(args, sizes: Sizes) -> object:
    """Before the model loads: the options, the yardstick (a missing yardstick fails at once) and the openings
    (--prompts FILE, or the project's own)."""
    if args.train_rows is not None and args.train_rows < 0:
        raise ValueError(f"--train-rows must be >= 0 (0 = all rows), got {args.train_rows}")
    analyzer = vader_analyzer()
    return analyzer, (read_prompts_file(args.prompts) if args.prompts else list(PROMPTS[:sizes.prompts]))


def headline_setting(args) -> str:
    """The setting metrics.json leads with: the one that is the paper's own attribute model on this model.
    With --discrim sentiment (the paper's head, gpt2-medium) that is the discriminator; otherwise it is the
    bag (the paper's positive_words list and the reference's settings), and a head trained here on an SST-2
    subset (or loaded from a folder) is the second setting."""
    return "discrim" if args.discrim in pplm.PAPER_HEADS else "bow"


def run(run: ProjectRun) -> Finished:
    """Both PPLM settings and the unperturbed text on the same seeds, scored by VADER."""
    args, sizes = run.args, run.sizes
    samples, tokens = args.samples or sizes.samples, args.tokens or sizes.tokens
    analyzer, prompts = run.prepared   # the analyzer and the openings preflight made
    model = run.model
    bow_knobs = {**BOW_KNOBS, "stepsize": bow_stepsize(model, BOW_KNOBS["stepsize"])}
    head = sentiment_head(model, args, sizes)
    tok = get_tokenizer()
    common = dict(samples=samples, seed=args.seed, max_new_tokens=tokens, progress=not args.no_progress,
                  **SAMPLING)
    print(f"{len(prompts)} prompts x {samples} samples x {tokens} tokens, unperturbed and under PPLM "
          f"(discriminator: {head.source}, class {head.label}; bag: {BOW})")
    runs = {"plain": continuations(model, prompts, desc="unperturbed", bow=BOW, **common,
                                   **{**BOW_KNOBS, "stepsize": 0.0}),
            "discrim": continuations(model, prompts, desc="PPLM discriminator", discriminator=head.head,
                                     class_label=head.label, **common, **DISCRIM_KNOBS),
            "bow": continuations(model, prompts, desc=f"PPLM bag {BOW}", bow=BOW, **common, **bow_knobs)}
    texts = {k: [tok.decode(t) for t in v.tokens] for k, v in runs.items()}
    scores = {k: vader_scores(analyzer, v) for k, v in texts.items()}
    distinct2 = {k: distinct_n([list(map(int, t)) for t in v.tokens], 2) for k, v in runs.items()}
    for k, label in (("plain", "unperturbed"), ("discrim", "discriminator"), ("bow", f"bag {BOW}")):
        print(f"  {label:>18}: VADER compound {mean(scores[k]):+.3f}, positive {100 * positive_share(scores[k]):.0f}%"
              f", distinct-2 {distinct2[k]:.3f}")
    first = headline_setting(args)
    second = "bow" if first == "discrim" else "discrim"
    setting = {"discrim": f"PPLM discriminator ({head.source}), class {head.label}",
               "bow": f"PPLM bag of words ({BOW})"}
    knobs = {"discrim": DISCRIM_KNOBS, "bow": bow_knobs}
    result = ProjectResult(
        NAME, "VADER compound (mean)", True, mean(scores["plain"]), mean(scores[first]), run.chosen.name,
        len(scores["plain"]), run.clock.elapsed(),
        extra={"setting": setting[first], "knobs": knobs[first],
               "positive_share_before": positive_share(scores["plain"]),
               "positive_share_after": positive_share(scores[first]),
               "second_setting": {"setting": setting[second], "knobs": knobs[second],
                                  "vader_compound_mean": mean(scores[second]),
                                  "positive_share": positive_share(scores[second])},
               "distinct_2": {"unperturbed": distinct2["plain"], "discriminator": distinct2["discrim"],
                              "bag": distinct2["bow"]},
               "distinct_note": "Dist-2 (Li et al. 2016): distinct token bigrams / all, over the continuations",
               "discriminator_dev_accuracy": head.dev_accuracy,
               "bag_mass_per_step": {"unperturbed": mean(runs["plain"].attribute),
                                     "bag": mean(runs["bow"].attribute)},
               "head_p_class_per_step_discriminator": mean(runs["discrim"].attribute),
               "diagnostics_note": "the bag's mass / the head's p(class) per step under the distribution PPLM "
                                   "draws from: the steering's own signal, not the yardstick",
               "sampling": SAMPLING, "prompts": len(prompts), "samples_per_prompt": samples,
               "new_tokens": tokens, "seed": args.seed,
               "scored": "the continuation only (the prompt is the same before and after)"})
    done = finish(run, result, prompts, samples, texts, scores, head, (first, second))
    print(f"{TITLE}: VADER compound {result.before:+.3f} -> {result.after:+.3f} ({setting[first]}; "
          f"{setting[second]}: {mean(scores[second]):+.3f})")
    return done


LABELS = {"plain": "unperturbed", "discrim": "PPLM discriminator", "bow": f"PPLM bag ({BOW})"}


def finish(run: ProjectRun, result: ProjectResult, prompts, samples, texts, scores, head: Head, order) -> Finished:
    """Writes settings.png (+ loss.png and the head when trained here); hands the frame samples.md (the
    headline setting, then the second in its appendix) and metric.png's bars."""
    first, second = order
    out, files = run.folder(), []
    if head.trained:
        head.head.save(out / "discriminator")
        loss_figure(out, head.history, f"discriminator on SST-2 (dev accuracy {100 * head.dev_accuracy:.1f}%)",
                    unit="nats / sentence")
        files = ["discriminator/", "loss.png"]
    settings_figure(out, scores)
    inputs = [f"{p}  (sample {j + 1} of {samples}, seed {result.extra['seed'] + k})"
              for k, (p, j) in enumerate((p, j) for p in prompts for j in range(samples))]
    story = lambda k, key: prompts[k // samples] + texts[key][k]  # noqa: E731
    rows = [{"input": inputs[k], "before": story(k, "plain"), "after": story(k, first),
             "before_score": f"VADER {scores['plain'][k]:+.3f}", "after_score": f"VADER {scores[first][k]:+.3f}"}
            for k in range(len(inputs))]
    x = result.extra
    acc = "" if head.dev_accuracy is None else f", SST-2 dev accuracy {100 * head.dev_accuracy:.1f}%"
    note = (f"Before: unperturbed sampling (top-k 10). After: {x['setting']} (knobs {x['knobs']}). Same seed per "
            "sample before and after. Scores: VADER compound of the continuation only. The second section below "
            f"holds the second setting, {x['second_setting']['setting']}{acc if second == 'discrim' else ''}, on "
            "the same seeds.\n\n"
            f"VADER compound, mean: unperturbed {result.before:+.3f}; {LABELS[first]} {result.after:+.3f}; "
            f"{LABELS[second]} {x['second_setting']['vader_compound_mean']:+.3f}. Rated positive: "
            f"{100 * x['positive_share_before']:.0f}% / {100 * x['positive_share_after']:.0f}% / "
            f"{100 * x['second_setting']['positive_share']:.0f}%. Distinct-2 (repetition: lower is more): "
            + " / ".join(f"{v:.3f}" for v in x["distinct_2"].values()) + " (unperturbed / discriminator / bag).\n\n"
            f"A 2-core CPU and the small model forced {x['new_tokens']} new tokens (the paper: 50) and {samples} "
            "sample(s) per prompt; a head trained here uses a subset of SST-2's training rows.")
    appendix = samples_section(f"Second setting: {x['second_setting']['setting']}",
                               [{"input": inputs[k], "label": f"after ({LABELS[second]})",
                                 "score": f"VADER {scores[second][k]:+.3f}", "output": story(k, second)}
                                for k in range(len(inputs))],
                               f"Knobs {x['second_setting']['knobs']}; compare with the 'before' of the same sample "
                               "above.")
    samples_md = Samples(f"{TITLE}: unperturbed vs {LABELS[first]}", rows, note, appendix)
    return Finished(result, samples_md, labels=(LABELS["plain"], LABELS[first]),
                    per_item=(scores["plain"], scores[first]), files=[*files, "settings.png"])


def settings_figure(out, scores: dict) -> Path:
    """settings.png: mean VADER compound (dots: samples) and the positive share, per setting."""
    names = [("plain", "unperturbed", "#9aa5b1"), ("discrim", "discriminator", "#1a7f37"), ("bow", "bag", "#4c72b0")]
    fig = new_figure()
    ax1, ax2 = fig.subplots(1, 2)
    for x, (key, label, color) in enumerate(names):
        ax1.bar(x, mean(scores[key]), color=color, width=0.55)
        ax1.scatter([x] * len(scores[key]), scores[key], s=12, color="#333", alpha=0.5, zorder=3)
        ax1.annotate(f"{mean(scores[key]):+.3f}", (x, mean(scores[key])), ha="center", va="bottom")
        ax2.bar(x, 100 * positive_share(scores[key]), color=color, width=0.55)
        ax2.annotate(f"{100 * positive_share(scores[key]):.0f}%", (x, 100 * positive_share(scores[key])),
                     ha="center", va="bottom")
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(names)), [n[1] for n in names])
        ax.grid(axis="y", alpha=0.3)
    ax1.axhline(0, color="#555", lw=0.8)
    ax1.set(ylabel="VADER compound (continuation)", title="mean (dots: samples)")
    ax2.set(ylabel="% rated positive (compound >= 0.05)", title="share rated positive", ylim=(0, 105))
    return save_figure(fig, Path(out) / "settings.png", "Sentiment story: both PPLM settings, the same seeds")


PROJECT = Project(
    name=NAME, title=TITLE, technique="PPLM", run=run, sizes=SIZES,
    description="PPLM steers five story openings towards positive sentiment (a discriminator trained on SST-2, "
                "and the positive_words bag); VADER scores the text before and after, with the same seeds.",
    needs=("vaderSentiment",), trains=True, options=add_options, preflight=preflight)


if __name__ == "__main__":
    raise SystemExit(PROJECT.main())
