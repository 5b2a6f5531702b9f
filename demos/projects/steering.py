"""Steering compared: seven ways to make story openings positive, on the same openings and seeds.

The PPLM paper (Dathathri et al. 2020, tables 4 and 6) made its case by comparison; this project runs that
comparison on the model at hand, for positive sentiment, on five held-out story openings (`PROMPTS`, written for
this project and used by no other: nothing here was tuned on them), each continued --samples times, sample k
(counted over all openings) drawing from its own torch.Generator seeded --seed + k in every row:

- B: the plain model (top-k 10 sampling);
- BR: B, with the best of k samples kept by the attribute model (candidate 0 is B's own sample; candidate j > 0
  is seeded --seed + k + 100003·j); the paper keeps the best of 10, k is --rerank (default 4: CPU time);
- BC (bag): PPLM with the paper's positive_words bag (demos.kits.continuations, the reference's knobs);
- BC (discrim): PPLM with the SST-2 head trained here (class positive, the reference's knobs);
- BCR: BC (bag), reranked by the head like BR (candidate 0 is BC (bag)'s own sample). The paper reranks its
  discriminator runs; on a 2-core CPU one discriminator PPLM sample costs about 7 s on the bundled model (10
  gradient steps per token), so k of them per sample would take the run past ten minutes: we rerank the bag's,
  which cost a fifth of that, and say so in the row's label;
- WD: weighted decoding, p'(x) ∝ p(x)·exp(λ·1[x in positive_words]) (techniques.pplm.weighted_decoding, λ = 2);
- JAM: the last hidden state moved across the SST-2 head's boundary to log-odds μ = 2 (techniques.pplm.jam);
- LoRA-GRPO: LoRA (r 4) on a copy of the model, trained by techniques.grpo (grpo_train) with the SST-2 head as
  reward (AttributeReward on the saved head folder) on GRPO_OPENINGS, openings distinct from the held-out ones, then
  sampled on the held-out openings with the same seeds; cost = seconds of GRPO training and the LoRA parameters.
  Where techniques.grpo is not installed its row says "not available" and holds no numbers.

The attribute model ("the SST-2 head") is a linear head on the model's mean last hidden state
(pplm.train_discriminator on SST-2 rows, the reference's settings). It is the steering signal of BR, BC
(discrim), BCR and JAM, so its accuracy on their text is marked as such; VADER (Hutto & Gilbert 2014), which no
method steers with, is the outside yardstick: mean compound and the share rated positive (>= 0.05).

Fluency: perplexity of each continuation (read after its opening) under the unsteered model, and under a larger
GPT-2 (--judge, default gpt2-medium) where its weights load (they cannot be downloaded offline: the column then
says why it is empty). Diversity: Dist-1/2/3, distinct n-grams over all n-grams of the row's continuations
(tokens), pooled per method as the paper does. Cost: seconds of generation per sample, seconds of training of
what the row needs (the head), and the extra parameters it reads (the head's 2·C + 2; WD's bag is not trained).

metrics.json: before = B's VADER mean, after = JAM's; extra.table holds every row; steering.png plots
attribute against fluency, one point per method.
"""
from __future__ import annotations

import copy
import importlib.util
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from minigpt import GPT, TrainConfig, get_tokenizer, resolve_precision
from minigpt.cli import positive_int
from techniques import pplm

from ..common import bow_stepsize, new_figure, save_figure
from ..kits import EOT, continuations, mean, prompt_ids, text_perplexity
from .common import (REPO, Finished, Project, ProjectResult, ProjectRun, Samples, add_prompts_arg,
                     read_prompts_file, vader_analyzer)

NAME = "steering"
TITLE = "Steering compared"

PROMPTS = (  # written for this project, held out from every other: openings with no sentiment of their own
    "The train stopped between two stations, and",
    "On the morning of the election, the baker",
    "My grandmother kept a box under her bed.",
    "The new teacher walked into the classroom and",
    "After the storm, the fishermen went down to the harbour",
)
BOW = "positive_words"
SST2 = REPO / "data" / "sst2"
CLASSES = ["negative", "positive"]
TARGET = "positive"
POSITIVE = 0.05                             # VADER's threshold for "positive"
SAMPLING = dict(do_sample=True, top_k=10, temperature=1.0)
DISCRIM_KNOBS = dict(stepsize=0.04, num_iterations=10, gamma=1.0, gm_scale=0.95, kl_scale=0.01, horizon_length=1)
BOW_KNOBS = dict(stepsize=0.03, num_iterations=3, window_length=5, gamma=1.5, gm_scale=0.95, kl_scale=0.01)
HEAD_TRAIN = dict(batch_size=64, lr=1e-4, decay=False)
WD_LAMBDA = 2.0
JAM_MARGIN = 2.0
SEED_STRIDE = 100003                        # candidate j of a reranked sample is seeded seed + k + j * stride


@dataclass
class Sizes:
    prompts: int
    samples: int
    tokens: int
    rerank: int
    train_rows: int
    dev_rows: int
    epochs: int
    grpo_steps: int
    grpo_group: int
    grpo_tokens: int


SIZES = {"full": Sizes(5, 6, 30, 4, 6000, 0, 10, 30, 4, 20),
         "quick": Sizes(5, 6, 20, 2, 2000, 300, 10, 15, 4, 16),
         "smoke": Sizes(2, 1, 4, 2, 64, 32, 1, 2, 2, 3)}
GRPO_OPENINGS = (  # LoRA-GRPO's training openings: distinct from PROMPTS (the held-out ones every row samples on)
    "The old man opened the door of the shop and",
    "When the bus finally arrived, my brother",
    "The letter on the kitchen table said",
    "At the end of the long road there was a farm, and",
    "Every Sunday the neighbours met in the square",
    "The doctor looked at the results and",
)
GRPO_RANK = 4


# ---- the measures ---------------------------------------------------------------------------------------
def distinct_n(token_rows: Sequence[Sequence[int]], n: int) -> float:
    """Dist-n (Li et al. 2016, as the PPLM paper reports it): distinct n-grams / all n-grams, pooled."""
    grams = [tuple(row[i:i + n]) for row in token_rows for i in range(len(row) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def positive_share(scores: Sequence[float]) -> float:
    return sum(s >= POSITIVE for s in scores) / max(1, len(scores))


def head_rates(model: GPT, head: pplm.Discriminator, prompts: Sequence[str], conts: Sequence[str]) -> list[float]:
    """The head's p(positive) of each continuation (features of the continuation alone, as it was trained)."""
    feats = pplm.cache_features(model, [c if c.strip() else EOT for c in conts], progress=False).to(model.device)
    with torch.no_grad():
        return head.to(model.device)(feats).softmax(-1)[:, head.class_index(TARGET)].tolist()


# ---- the attribute model --------------------------------------------------------------------------------
def sst2_rows(name: str, limit: int, seed: int) -> tuple[list[str], list[int]]:
    texts, labels, _ = pplm.load_labelled_tsv(SST2 / name, class_names=CLASSES)
    if 0 < limit < len(texts):
        keep = sorted(random.Random(seed).sample(range(len(texts)), limit))
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    return texts, labels


def sentiment_head(model: GPT, args, sizes: Sizes) -> tuple[pplm.Discriminator, Optional[float], float]:
    """(head, dev accuracy, seconds of training): --discrim DIR loaded and checked, else trained on SST-2 now."""
    if args.discrim:
        head = pplm.load_discriminator(args.discrim)
        head.check_model(model)
        pplm.head_direction(head, TARGET)      # two classes, one of them "positive": else a one-line error
        return head, None, 0.0
    texts, labels = sst2_rows("train.tsv", sizes.train_rows, args.seed)
    dev_texts, dev_labels = sst2_rows("dev.tsv", sizes.dev_rows, args.seed)
    config = TrainConfig(epochs=sizes.epochs, eval_every=max(1, len(texts) // HEAD_TRAIN["batch_size"]),
                         seed=args.seed, progress=not args.no_progress,
                         precision=resolve_precision(args.precision, model.device), **HEAD_TRAIN)
    start = time.perf_counter()
    head, report = pplm.train_discriminator(model, texts, labels, CLASSES, eval_texts=dev_texts,
                                            eval_labels=dev_labels, config=config, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    print(f"SST-2 head: {len(texts):,} rows, dev accuracy {100 * report['dev_accuracy']:.1f}% "
          f"({report['n_dev']} rows), trained in {seconds:.1f} s")
    return head, report["dev_accuracy"], seconds


# ---- the rows ---------------------------------------------------------------------------------------------
def sample_rows(model: GPT, prompts: Sequence[str], samples: int, seed: int, tokens: int, adjust, desc: str,
                progress: bool, offset: int = 0) -> list[list[int]]:
    """jam.steered_generate for every (opening, sample): sample k seeded seed + k + offset."""
    out = []
    jobs = [(p, k) for k, p in enumerate(p for p in prompts for _ in range(samples))]
    for prompt, k in tqdm(jobs, desc=desc, unit="sample", disable=not progress):
        ids = prompt_ids(prompt, model.device)
        gen = torch.Generator(device=model.device).manual_seed(seed + k + offset)
        seq = pplm.steered_generate(model, ids, max_new_tokens=tokens, adjust=adjust, top_k=SAMPLING["top_k"],
                                    temperature=SAMPLING["temperature"], generator=gen)
        out.append(seq[0, ids.size(1):].tolist())
    return out


def reranked(model, head, prompts, samples, candidates: list[list[list[int]]], k: int) -> list[list[int]]:
    """Per sample, the candidate (of k) the head rates most positive."""
    tok = get_tokenizer()
    n = len(candidates[0])
    flat_prompts = [p for p in prompts for _ in range(samples)]
    rates = [head_rates(model, head, flat_prompts, [tok.decode(c[i]) for i in range(n)]) for c in candidates[:k]]
    return [candidates[pplm.rerank([r[i] for r in rates], k)][i] for i in range(n)]


@dataclass
class Row:
    key: str
    label: str
    tokens: list[list[int]]
    seconds_per_sample: float
    train_seconds: float
    extra_parameters: int
    steers_with_head: bool
    note: str = ""


def grpo_available() -> Optional[str]:
    """None when techniques.grpo can be imported, else why not (its row then says so, with no numbers)."""
    if importlib.util.find_spec("techniques.grpo") is None:
        return "techniques.grpo is not installed in this checkout (the GRPO issue has not landed): no row"
    return None


def grpo_reward(model: GPT, head_dir: Path):
    """GRPO's reward: the SST-2 head's p(positive) on the frozen model's features, as the head was trained (rated
    on the policy's own LoRA-changed states, the reward could rise by moving the features rather than the text)."""
    from techniques.grpo.rewards import AttributeReward
    return AttributeReward(model, head_dir, TARGET)


def grpo_row(run: ProjectRun, prompts, head_dir: Path, samples: int, tokens: int, show: bool) -> Row:
    """LoRA (r = GRPO_RANK) on a copy of the model, trained by GRPO with the SST-2 head (saved at head_dir) as
    reward on GRPO_OPENINGS, then sampled on the held-out openings with the same seeds as the other rows."""
    from techniques.grpo import grpo as grpo_mod
    from techniques.lora import apply_lora, lora_parameters
    args, sizes = run.args, run.sizes
    policy = apply_lora(copy.deepcopy(run.model), r=GRPO_RANK, alpha=2 * GRPO_RANK, verbose=False)
    reward = grpo_reward(run.model, head_dir)       # the frozen model, not the policy
    cfg = grpo_mod.GRPOConfig(num_generations=sizes.grpo_group, max_completion_length=sizes.grpo_tokens,
                              steps=sizes.grpo_steps, seed=args.seed, top_k=SAMPLING["top_k"])
    start = time.perf_counter()
    history = grpo_mod.grpo_train(policy, get_tokenizer(), list(GRPO_OPENINGS), reward, cfg, progress=show)
    train_seconds = time.perf_counter() - start
    params = sum(p.numel() for p in lora_parameters(policy))
    start = time.perf_counter()
    rows = sample_rows(policy, prompts, samples, args.seed, tokens, None, "LoRA-GRPO", show)
    per = (time.perf_counter() - start) / (len(prompts) * samples)
    first, last = history[0]["reward_mean"], history[-1]["reward_mean"]
    return Row("LoRA_GRPO", f"LoRA-GRPO (r {GRPO_RANK}, {cfg.steps} steps, G {cfg.num_generations})", rows, per,
               train_seconds, params, True,
               f"GRPO reward (head p(positive)) {first:.3f} at step 1, {last:.3f} at step {len(history)}; "
               f"trained on {len(GRPO_OPENINGS)} openings distinct from the held-out ones")


def run_rows(run: ProjectRun, prompts, head, head_seconds: float, head_dir: Optional[Path] = None) -> list[Row]:
    args, sizes = run.args, run.sizes
    model = run.model
    samples, tokens, k = args.samples or sizes.samples, args.tokens or sizes.tokens, args.rerank or sizes.rerank
    show = not args.no_progress
    n = len(prompts) * samples
    head_params = sum(p.numel() for p in head.parameters())
    bag = pplm.load_bag(BOW, get_tokenizer())
    common = dict(samples=samples, seed=args.seed, max_new_tokens=tokens, progress=show, **SAMPLING)
    rows, timed = [], {}

    def clock(key, fn):   # seconds of generation (and, for BR/BCR, of rating the candidates)
        start = time.perf_counter()
        value = fn()
        timed[key] = time.perf_counter() - start
        return value

    plain = clock("B", lambda: sample_rows(model, prompts, samples, args.seed, tokens, None, "B", show))
    rows.append(Row("B", "B (plain)", plain, timed["B"] / n, 0.0, 0, False))
    more = clock("BR+", lambda: [sample_rows(model, prompts, samples, args.seed, tokens, None, f"BR candidate {j}",
                                             show, offset=j * SEED_STRIDE) for j in range(1, k)])
    br = clock("BR", lambda: reranked(model, head, prompts, samples, [plain, *more], k))
    rows.append(Row("BR", f"BR (best of {k})", br, (timed["B"] + timed["BR+"] + timed["BR"]) / n, head_seconds,
                    head_params, True))
    bow_knobs = {**BOW_KNOBS, "stepsize": bow_stepsize(model, BOW_KNOBS["stepsize"])}
    bc_bag = clock("BCb", lambda: continuations(model, prompts, desc="BC bag", bow=BOW, **common, **bow_knobs))
    rows.append(Row("BC_bag", "BC (PPLM bag)", bc_bag.tokens, timed["BCb"] / n, 0.0, 0, False))
    disc = dict(discriminator=head, class_label=TARGET, **DISCRIM_KNOBS)
    bc = clock("BC", lambda: continuations(model, prompts, desc="BC discrim", **common, **disc))
    rows.append(Row("BC_discrim", "BC (PPLM discrim)", bc.tokens, timed["BC"] / n, head_seconds, head_params, True))
    bc_more = clock("BCR+", lambda: [continuations(model, prompts, desc=f"BCR candidate {j}", bow=BOW,
                                                   **{**common, "seed": args.seed + j * SEED_STRIDE},
                                                   **bow_knobs).tokens for j in range(1, k)])
    bcr = clock("BCR", lambda: reranked(model, head, prompts, samples, [bc_bag.tokens, *bc_more], k))
    rows.append(Row("BCR", f"BCR (PPLM bag, best of {k} by the head)", bcr,
                    (timed["BCb"] + timed["BCR+"] + timed["BCR"]) / n, head_seconds, head_params, True))
    wd = pplm.weighted_decoding(bag.token_ids, model.config.vocab_size, WD_LAMBDA, model.device)
    wd_rows = clock("WD", lambda: sample_rows(model, prompts, samples, args.seed, tokens, wd, "WD", show))
    rows.append(Row("WD", f"WD (lambda {WD_LAMBDA:g})", wd_rows, timed["WD"] / n, 0.0, 0, False,
                    f"bag {BOW}: {len(bag.token_ids)} token ids, not trained"))
    jam = pplm.jam_adjust(model, head, TARGET, pplm.JAMConfig(margin=args.jam_margin))
    jam_rows = clock("JAM", lambda: sample_rows(model, prompts, samples, args.seed, tokens, jam, "JAM", show))
    rows.append(Row("JAM", f"JAM (margin {args.jam_margin:g})", jam_rows, timed["JAM"] / n, head_seconds,
                    head_params, True))
    if head_dir is not None:
        rows.append(grpo_row(run, prompts, head_dir, samples, tokens, show))
    return rows


def judge_model(args, model: GPT) -> tuple[Optional[GPT], str]:
    """The larger GPT-2 that scores fluency, or None and why not."""
    if args.smoke or args.judge == "none":
        return None, "not measured (--smoke or --judge none)"
    try:
        judge = GPT.from_pretrained(args.judge, device=model.device)
    except (OSError, ValueError) as e:
        return None, f"{args.judge} did not load ({str(e).splitlines()[0][:120]})"
    if judge.num_parameters() <= model.num_parameters():
        return None, f"{args.judge} is not larger than the steered model"
    return judge, args.judge


def table(run: ProjectRun, rows: Sequence[Row], prompts, samples: int, head, analyzer, judge) -> list[dict]:
    tok, model = get_tokenizer(), run.model
    contexts = [EOT + p for p in prompts for _ in range(samples)]
    out = []
    for row in rows:
        texts = [tok.decode(t) for t in row.tokens]
        vader = [analyzer.polarity_scores(t)["compound"] for t in texts]
        rates = head_rates(model, head, [p for p in prompts for _ in range(samples)], texts)
        scored = [(c, t) for c, t in zip(contexts, texts) if tok.encode(t)]
        ppl = text_perplexity(model, [t for _, t in scored], [c for c, _ in scored]).value if scored else None
        ppl_judge = None
        if judge is not None and scored:
            ppl_judge = text_perplexity(judge, [t for _, t in scored], [c for c, _ in scored]).value
        ids = [list(map(int, t)) for t in row.tokens]
        out.append({"method": row.label, "key": row.key, "vader_mean": mean(vader),
                    "vader_positive_share": positive_share(vader),
                    "head_accuracy": sum(r >= 0.5 for r in rates) / len(rates),
                    "head_is_steering_signal": row.steers_with_head,
                    "perplexity_unsteered": ppl, "perplexity_judge": ppl_judge,
                    "dist_1": distinct_n(ids, 1), "dist_2": distinct_n(ids, 2), "dist_3": distinct_n(ids, 3),
                    "seconds_per_sample": row.seconds_per_sample, "train_seconds": row.train_seconds,
                    "extra_parameters": row.extra_parameters, "note": row.note,
                    "texts": texts, "vader": vader})
    return out


def markdown_table(rows: Sequence[dict], judge_name: str, missing: Sequence[tuple[str, str]] = ()) -> str:
    f = lambda x, s="{:.3f}": "n/a" if x is None else s.format(x)  # noqa: E731
    lines = ["| method | VADER mean | VADER % pos | SST-2 head acc | ppl (unsteered) | ppl (" + judge_name + ") | "
             "Dist-1 | Dist-2 | Dist-3 | s / sample | train s | extra params |", "|" + "---|" * 12]
    for r in rows:
        acc = f(100 * r["head_accuracy"], "{:.0f}%") + (" *" if r["head_is_steering_signal"] else "")
        lines.append(f"| {r['method']} | {r['vader_mean']:+.3f} | {100 * r['vader_positive_share']:.0f}% | {acc} | "
                     f"{f(r['perplexity_unsteered'], '{:.1f}')} | {f(r['perplexity_judge'], '{:.1f}')} | "
                     f"{r['dist_1']:.3f} | {r['dist_2']:.3f} | {r['dist_3']:.3f} | {r['seconds_per_sample']:.2f} | "
                     f"{r['train_seconds']:.1f} | {r['extra_parameters']:,} |")
    lines += [f"| {label} | not available: {why} |" + " |" * 10 for label, why in missing]
    return "\n".join(lines) + "\n\n\\* the SST-2 head is this method's own steering signal (BR/BCR rerank by it, " \
                              "BC, JAM and LoRA-GRPO steer by it): its accuracy there is not an outside measure.\n"


def figure(out: Path, rows: Sequence[dict]) -> Path:
    """steering.png: VADER compound mean (outside yardstick) against perplexity under the unsteered model."""
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    colors = ["#9aa5b1", "#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3"]
    for r, c in zip(rows, colors):
        if r["perplexity_unsteered"] is None:
            continue
        ax.scatter(r["perplexity_unsteered"], r["vader_mean"], s=70, color=c, zorder=3, label=r["method"])
        ax.annotate(r["key"], (r["perplexity_unsteered"], r["vader_mean"]), textcoords="offset points",
                    xytext=(6, 4), fontsize=9)
    ax.axhline(0, color="#555", lw=0.8)
    ax.set(xlabel="perplexity under the unsteered model (lower = more fluent)",
           ylabel="VADER compound, mean (higher = more positive)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, out / "steering.png", "Steering compared: attribute vs fluency, one point per method")


# ---- options and the run ----------------------------------------------------------------------------------
def add_options(p) -> None:
    g = p.add_argument_group("this project")
    add_prompts_arg(g, "story openings")
    g.add_argument("--discrim", metavar="DIR", help="an SST-2 head saved by an earlier run (OUT/discriminator) "
                                                    "instead of training one")
    g.add_argument("--samples", type=positive_int, help="continuations per opening (default 6)")
    g.add_argument("--tokens", type=positive_int, help="new tokens per continuation (default 30; --quick 20)")
    g.add_argument("--rerank", type=int, default=None, metavar="K",
                   help="BR and BCR keep the best of K samples (default 4; the paper: 10)")
    g.add_argument("--jam-margin", type=float, default=JAM_MARGIN, metavar="MU",
                   help=f"JAM's target log-odds of 'positive' on each moved state (default {JAM_MARGIN:g})")
    g.add_argument("--judge", default="gpt2-medium", metavar="NAME",
                   help="a larger GPT-2 for the second perplexity column (default gpt2-medium; none = skip)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def preflight(args, sizes: Sizes):
    if args.rerank is not None and args.rerank < 1:
        raise ValueError(f"--rerank keeps the best of K samples: K must be >= 1, got {args.rerank}")
    prompts = read_prompts_file(args.prompts) if args.prompts else list(PROMPTS[:sizes.prompts])
    return vader_analyzer(), prompts


def run(run: ProjectRun) -> Finished:
    args, sizes = run.args, run.sizes
    analyzer, prompts = run.prepared
    samples = args.samples or sizes.samples
    head, dev_acc, head_seconds = sentiment_head(run.model, args, sizes)
    print(f"{len(prompts)} openings x {samples} samples, the same seeds in every row")
    grpo_note = grpo_available()
    head_dir = None
    if grpo_note is None:             # AttributeReward reads a head folder: --discrim, else the one saved now
        head_dir = Path(args.discrim) if args.discrim else run.folder() / "discriminator"
        if not args.discrim:
            head.save(head_dir)
    rows = run_rows(run, prompts, head, head_seconds, head_dir)
    judge, judge_name = judge_model(args, run.model)
    print(f"second perplexity: {judge_name}")
    measured = table(run, rows, prompts, samples, head, analyzer, judge)
    text = markdown_table(measured, args.judge, [("LoRA-GRPO", grpo_note)] if grpo_note else [])
    print(text)
    grpo_note = grpo_note or next(r["note"] for r in measured if r["key"] == "LoRA_GRPO")
    print(f"LoRA-GRPO: {grpo_note}")
    out = run.folder()
    if dev_acc is not None:
        head.save(out / "discriminator")
    figure(out, measured)
    (out / "table.md").write_text(text, encoding="utf-8")
    by = {r["key"]: r for r in measured}
    public = [{k: v for k, v in r.items() if k not in ("texts", "vader")} for r in measured]
    result = ProjectResult(NAME, "VADER compound (mean)", True, by["B"]["vader_mean"], by["JAM"]["vader_mean"],
                           run.chosen.name, len(by["B"]["vader"]), run.clock.elapsed(),
                           extra={"table": public, "lora_grpo": grpo_note, "head_dev_accuracy": dev_acc,
                                  "judge": judge_name, "prompts": len(prompts), "samples_per_prompt": samples,
                                  "seed": args.seed, "sampling": SAMPLING, "wd_lambda": WD_LAMBDA,
                                  "jam_margin": args.jam_margin, "bag": BOW,
                                  "scored": "the continuation only (the opening is the same in every row)"})
    flat = [p for p in prompts for _ in range(samples)]
    sample_rows_md = [{"input": f"{flat[i]}  (seed {args.seed + i})", "before": flat[i] + by["B"]["texts"][i],
                       "after": flat[i] + by["JAM"]["texts"][i], "before_score": f"B, VADER {by['B']['vader'][i]:+.3f}",
                       "after_score": f"JAM, VADER {by['JAM']['vader'][i]:+.3f}"} for i in range(len(flat))]
    appendix = "\n# Every method, the same samples\n\n" + text + "\n" + "\n".join(
        f"## {r['method']}\n\n" + "\n".join(f"- ({r['vader'][i]:+.3f}) {flat[i]}**{r['texts'][i].strip()}**"
                                            for i in range(len(flat))) + "\n" for r in measured)
    note = (f"Before: B, plain sampling (top-k 10). After: JAM (margin {args.jam_margin:g}). The table of all "
            f"methods and every sample follow. LoRA-GRPO: {grpo_note}.")
    return Finished(result, Samples(f"{TITLE}: B vs JAM, and every method", sample_rows_md, note, appendix),
                    labels=("B (plain)", "JAM"), per_item=(by["B"]["vader"], by["JAM"]["vader"]),
                    files=["steering.png", "table.md", *(["discriminator/"] if dev_acc is not None else [])])


PROJECT = Project(
    name=NAME, title=TITLE, technique="PPLM", run=run, sizes=SIZES,
    description="The PPLM paper's comparison on story openings, positive sentiment: B, BR, BC (bag, discrim), BCR, "
                "WD, JAM and LoRA-GRPO on the same seeds; VADER, the SST-2 head, perplexity, Dist-1/2/3 and cost "
                "per method.",
    needs=("vaderSentiment",), trains=True, options=add_options, preflight=preflight)


if __name__ == "__main__":
    raise SystemExit(PROJECT.main())
