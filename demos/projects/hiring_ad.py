"""Ethical hiring tool: PPLM steers job adverts from masculine- to feminine-coded words, measured by genderdecoder3.

The tutorial's fake ("Ethical hiring tool", PPLM major project) replaced "strong" with "qualified" and
"aggressive" with "inclusive" in two fixed strings. Here the model continues the opening of a job
advert for each of 10 roles (data/hiring/prompts.txt, written for this project) several times,
unperturbed and then under PPLM with the same seeds (continuation k, counted over all roles, draws
from its own torch.Generator seeded --seed + k), with two bags at once: the library's avoid mode,
`pplm.generate(..., avoid_bow=<masculine-coded words>)`, loss -log(1 - Σ_{w in bag} p̃(w)) (not in the
PPLM paper: its bag-of-words loss turned around, to push probability off a bag), and the paper's
bag-of-words loss towards the feminine-coded words (`bow=`); --avoid-only drops the second.

The avoid bag comes from genderdecoder3's masculine-coded list (Gaucher, Friesen & Kay 2011). Its
entries are word STEMS ("compet", "lead", "analy"), matched by genderdecoder3 as the start of a word,
so each stem is expanded to every single GPT-2 token of the tokenizer's vocabulary that is a leading
space followed by a word starting with the stem, in any case (" competitive", " Leader", " analyst",
...): those are the tokens that begin a coded word after a space. Stems no single token starts with
(e.g. "headstrong", "self-relian") cannot be scored by a one-token-ahead loss and are left out (the
bag's summary names them); so are words whose first token is shorter than the stem (" comp"+"etitive").
The feminine-coded stems are expanded the same way into the attracting bag.

Yardstick: genderdecoder3 (`assess`, MIT, nobody here wrote it) on each continuation (the generated
text only; the openings are neutral and the same before and after): masculine- and feminine-coded
words per 100 words (pooled over all continuations; words counted as assess splits them) and the
distribution of its verdicts ("strongly masculine-coded" ... "neutral" ... "strongly feminine-coded").
The headline is the balance the verdicts are read from, feminine-coded minus masculine-coded words per
100 words (higher = further from masculine-coded wording; genderdecoder3's own explanation: feminine
wording "will encourage women applicants" with "only a slight effect" on men). A first version led with
masculine-coded words alone; on the bundled model the unperturbed adverts hold none, so that number
could only read 0 -> 0. It is still reported, unchanged, beside the balance.

Hyperparameters: the reference's bag-of-words settings (uber-research/PPLM: stepsize 0.03, 3
iterations, window 5, gamma 1.5, kl_scale 0.01, gm_scale 0.95, top-k 10 sampling), 50 new tokens; the
avoid loss is a bag loss, so it takes them unchanged. On models narrower than 512 the step size grows
(0.1 at width 256, 0.3 below; demos.common.bow_stepsize, as in the tour). On the bundled model the
masculine-coded tokens hold about 0.1-0.2% of the next-token mass and never reach the top 10 the sampler
draws from, so its unperturbed adverts contain none; metrics.json also carries the steered bag's mass per
step (the steering's own signal, a diagnostic only), before and after.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from minigpt import get_tokenizer
from minigpt.cli import positive_int
from techniques import pplm

from ..common import bow_stepsize, new_figure, save_figure
from ..kits import continuations, mean
from .common import (REPO, Finished, Project, ProjectResult, ProjectRun, Samples, add_prompts_arg, read_prompts_file,
                     require)

NAME = "hiring_ad"
TITLE = "Ethical hiring tool"

PROMPTS_FILE = REPO / "data" / "hiring" / "prompts.txt"
SAMPLING = dict(do_sample=True, top_k=10, temperature=1.0)
KNOBS = dict(stepsize=0.03, num_iterations=3, window_length=5, gamma=1.5, gm_scale=0.95, kl_scale=0.01)
VERDICTS = ("strongly feminine-coded", "feminine-coded", "neutral", "masculine-coded", "strongly masculine-coded")


@dataclass
class Sizes:
    roles: int
    samples: int
    tokens: int


SIZES = {"full": Sizes(10, 10, 50), "quick": Sizes(10, 2, 25), "smoke": Sizes(2, 1, 4)}


# ---- data and bags ---------------------------------------------------------------------------------
def read_prompts(path: Path = PROMPTS_FILE) -> list[tuple[str, str]]:
    """(role, prompt) rows of `role<TAB>prompt`; `#` lines are comments."""
    if not path.is_file():
        raise FileNotFoundError(f"job-advert prompts {path} not found")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        if "\t" not in line:
            raise ValueError(f"{path}, line {n}: expected `role<TAB>prompt`")
        role, prompt = (s.strip() for s in line.split("\t", 1))
        rows.append((role, prompt))
    if not rows:
        raise ValueError(f"{path} holds no prompts")
    return rows


def stem_bag(stems: Sequence[str], name: str) -> tuple[pplm.BagOfWords, list[str]]:
    """The single GPT-2 tokens " <word>" whose word starts with one of the stems (any case), as a bag;
    and the stems no token covers."""
    tok = get_tokenizer()
    stems = [s.lower() for s in stems]
    single, covered = {}, set()
    for i in range(tok.vocab_size):
        s = tok.token_str(i)
        if not s.startswith(" "):
            continue
        word = s[1:].lower()
        hits = [st for st in stems if word.startswith(st)]
        if hits:
            single[s] = i
            covered.update(hits)
    uncovered = [s for s in stems if s not in covered]
    return pplm.BagOfWords(name, list(single), single, {}), uncovered


def genderdecoder():
    """genderdecoder3, or a one-line error naming the demos extra."""
    return require("genderdecoder3")


# ---- the yardstick -----------------------------------------------------------------------------------
def ad_words(text: str) -> list[str]:
    """The words of a text as genderdecoder3.assess splits them (ASCII only, punctuation . , : ; ( ) dropped)."""
    text = re.sub(r"\s", " ", "".join(c if ord(c) < 128 else " " for c in text))
    return [w for w in re.sub(r"[.\t,:;()]", "", text).split(" ") if w]


@dataclass
class Assessment:
    words: int
    masculine: list[str]
    feminine: list[str]
    verdict: str


def assess_all(gd, texts: Sequence[str]) -> list[Assessment]:
    out = []
    for t in texts:
        r = gd.assess(t)
        out.append(Assessment(len(ad_words(t)), r["masculine_coded_words"], r["feminine_coded_words"], r["result"]))
    return out


def per_100(items: Sequence[Assessment], kind: str) -> float:
    """Coded words per 100 words, pooled over all texts."""
    words = sum(a.words for a in items)
    return 100 * sum(len(getattr(a, kind)) for a in items) / max(1, words)


def most_common_words(items: Sequence[Assessment], kind: str, n: int = 5) -> dict[str, int]:
    """The n coded words (lower-cased) found most often, with their counts: does a rise come from many
    words, or from one repeated?"""
    return dict(Counter(w.lower() for a in items for w in getattr(a, kind)).most_common(n))


def verdict_counts(items: Sequence[Assessment]) -> dict[str, int]:
    c = Counter(a.verdict for a in items)
    return {v: c.get(v, 0) for v in VERDICTS}


# ---- options and the run -------------------------------------------------------------------------------
def add_options(p) -> None:
    g = p.add_argument_group("this project")
    add_prompts_arg(g, "advert openings")
    g.add_argument("--avoid-only", action="store_true",
                   help="only avoid the masculine-coded words (avoid_bow=); by default PPLM also steers towards "
                        "the feminine-coded ones (bow=)")
    g.add_argument("--samples", type=positive_int, help="continuations per role (default 10; --quick 2)")
    g.add_argument("--tokens", type=positive_int, help="new tokens per continuation (default 50; --quick 25)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def preflight(args, sizes: Sizes) -> tuple[object, list[tuple[str, str]]]:
    """Before the model loads: the yardstick, then the prompts file; both go on to run."""
    if args.prompts:   # the user's openings, each its own "role"; all of them are run
        return genderdecoder(), [(f"prompt {i}", p) for i, p in enumerate(read_prompts_file(args.prompts), 1)]
    return genderdecoder(), read_prompts()[:sizes.roles]


def run(run: ProjectRun) -> Finished:
    """The job adverts unperturbed and under PPLM on the same seeds, scored by genderdecoder3."""
    args, sizes = run.args, run.sizes
    gd, prompts_file = run.prepared
    samples, tokens = args.samples or sizes.samples, args.tokens or sizes.tokens
    rows = prompts_file
    avoid, avoid_missing = stem_bag(gd.masculine_coded_words, "masculine-coded")
    attract, attract_missing = stem_bag(gd.feminine_coded_words, "feminine-coded")
    print(f"avoid bag: {len(avoid.token_ids)} GPT-2 tokens from {len(gd.masculine_coded_words)} masculine-coded "
          f"stems ({len(avoid_missing)} stems no single token starts with: {', '.join(avoid_missing) or 'none'})")
    steer = dict(avoid_bow=avoid)
    if not args.avoid_only:
        steer["bow"] = attract
        print(f"attract bag: {len(attract.token_ids)} GPT-2 tokens from {len(gd.feminine_coded_words)} "
              f"feminine-coded stems")
    prompts = [p for _, p in rows]
    common = dict(samples=samples, seed=args.seed, max_new_tokens=tokens, progress=not args.no_progress,
                  **SAMPLING)
    print(f"{len(prompts)} roles x {samples} samples x {tokens} tokens, unperturbed and under PPLM")
    tok = get_tokenizer()
    model = run.model
    knobs = {**KNOBS, "stepsize": bow_stepsize(model, KNOBS["stepsize"])}
    plain = continuations(model, prompts, desc="unperturbed", **steer, **common, **{**KNOBS, "stepsize": 0.0})
    steered = continuations(model, prompts, desc="PPLM", **steer, **common, **knobs)
    texts = {"before": [tok.decode(t) for t in plain.tokens], "after": [tok.decode(t) for t in steered.tokens]}
    scored = {k: assess_all(gd, v) for k, v in texts.items()}
    rate = {(k, kind): per_100(v, kind) for k, v in scored.items() for kind in ("masculine", "feminine")}
    result = ProjectResult(
        NAME, "feminine- minus masculine-coded words per 100 words", True,
        rate["before", "feminine"] - rate["before", "masculine"],
        rate["after", "feminine"] - rate["after", "masculine"],
        run.chosen.name, len(texts["before"]), run.clock.elapsed(),
        extra={"masculine_per_100_before": rate["before", "masculine"],
               "masculine_per_100_after": rate["after", "masculine"],
               "feminine_per_100_before": rate["before", "feminine"],
               "feminine_per_100_after": rate["after", "feminine"],
               "top_words": {f"{kind}_{k}": most_common_words(v, kind) for k, v in scored.items()
                             for kind in ("masculine", "feminine")},
               "verdicts_before": verdict_counts(scored["before"]),
               "verdicts_after": verdict_counts(scored["after"]),
               "words_before": sum(a.words for a in scored["before"]),
               "words_after": sum(a.words for a in scored["after"]),
               "mode": "avoid masculine-coded + attract feminine-coded" if not args.avoid_only
               else "avoid masculine-coded only",
               "bag_mass_per_step_before": mean(plain.attribute),
               "bag_mass_per_step_after": mean(steered.attribute),
               "diagnostics_note": f"the {'masculine' if args.avoid_only else 'feminine'}-coded bag's "
                                   "probability mass per step under the distribution sampled from (p before, "
                                   "p̃ after): the steering's own signal, not the yardstick",
               "avoid_bag_tokens": len(avoid.token_ids), "stems_without_a_token": avoid_missing,
               "knobs": knobs, "sampling": SAMPLING, "roles": len(rows), "samples_per_role": samples,
               "new_tokens": tokens, "seed": args.seed,
               "scored": "the continuation only (the openings are neutral and the same before and after)"})
    x = result.extra
    print(f"  masculine-coded per 100 words {x['masculine_per_100_before']:.2f} -> {x['masculine_per_100_after']:.2f}; "
          f"feminine-coded {x['feminine_per_100_before']:.2f} -> {x['feminine_per_100_after']:.2f}; balance "
          f"{result.before:+.2f} -> {result.after:+.2f}")
    return finish(run, result, rows, samples, texts, scored)


def _top(x: dict, when: str) -> str:
    return "; ".join(f"{kind} " + (", ".join(f"{w} x{c}" for w, c in x["top_words"][f"{kind}_{when}"].items())
                                    or "none") for kind in ("masculine", "feminine"))


def _score(a: Assessment) -> str:
    words = lambda ws: ", ".join(ws) or "none"  # noqa: E731
    return f"{a.verdict}; masculine: {words(a.masculine)}; feminine: {words(a.feminine)}"


def finish(run: ProjectRun, result: ProjectResult, rows, samples, texts, scored) -> Finished:
    """Writes verdicts.png; hands the frame samples.md and metric.png's bars (each continuation's balance)."""
    rates = {k: [100 * (len(a.feminine) - len(a.masculine)) / max(1, a.words) for a in v] for k, v in scored.items()}
    verdict_figure(run.folder(), result)
    jobs = [(role, prompt, j) for role, prompt in rows for j in range(samples)]
    table = [{"input": f"{role} (sample {j + 1} of {samples}, seed {result.extra['seed'] + k}): {prompt}",
              "before": prompt + texts["before"][k], "after": prompt + texts["after"][k],
              "before_score": _score(scored["before"][k]), "after_score": _score(scored["after"][k])}
             for k, (role, prompt, j) in enumerate(jobs)]
    x = result.extra
    note = (f"Before: unperturbed sampling (top-k 10). After: PPLM, {x['mode']} (knobs {x['knobs']}). Same seed per "
            "sample before and after. Scores: genderdecoder3's verdict and coded words, on the continuation only. "
            f"{x['new_tokens']} new tokens, {samples} sample(s) per role.\n\n"
            f"Totals: masculine-coded words per 100 words {x['masculine_per_100_before']:.2f} -> "
            f"{x['masculine_per_100_after']:.2f}, feminine-coded {x['feminine_per_100_before']:.2f} -> "
            f"{x['feminine_per_100_after']:.2f}; balance (feminine - masculine) {result.before:+.2f} -> "
            f"{result.after:+.2f}; verdicts before {x['verdicts_before']}, after {x['verdicts_after']}. The coded "
            f"words found most often, with their counts: before {_top(x, 'before')}; after {_top(x, 'after')}. "
            "(PPLM at a large step size tends to repeat a bag word; the counts show how much of a rise that is.) "
            "The steered "
            f"bag's probability mass per step (the steering's own signal, a diagnostic only): "
            f"{x['bag_mass_per_step_before']:.5f} -> {x['bag_mass_per_step_after']:.5f}.")
    return Finished(result, Samples(f"{TITLE}: unperturbed vs PPLM", table, note), labels=("unperturbed", "PPLM"),
                    unit="per 100 words", per_item=(rates["before"], rates["after"]), files=["verdicts.png"])


def verdict_figure(out, result: ProjectResult) -> Path:
    """verdicts.png: genderdecoder3's verdicts before/after, and coded words per 100 words."""
    fig = new_figure()
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    x = range(len(VERDICTS))
    for off, key, color, label in ((-0.2, "verdicts_before", "#9aa5b1", "unperturbed"),
                                   (0.2, "verdicts_after", "#1a7f37", "PPLM")):
        ax1.bar([i + off for i in x], [result.extra[key][v] for v in VERDICTS], width=0.4, color=color, label=label)
    ax1.set_xticks(list(x), [v.replace(" ", "\n", 1).replace("-coded", "") for v in VERDICTS], fontsize=8)
    ax1.set(ylabel="continuations", title="genderdecoder3 verdicts")
    ax1.legend(fontsize=8)
    pairs = [("masculine", result.extra["masculine_per_100_before"], result.extra["masculine_per_100_after"]),
             ("feminine", result.extra["feminine_per_100_before"], result.extra["feminine_per_100_after"])]
    for i, (label, b, a) in enumerate(pairs):
        ax2.bar([i - 0.2, i + 0.2], [b, a], width=0.4, color=["#9aa5b1", "#1a7f37"])
        for xx, v in ((i - 0.2, b), (i + 0.2, a)):
            ax2.annotate(f"{v:.2f}", (xx, v), ha="center", va="bottom", fontsize=8)
    ax2.set_xticks([0, 1], ["masculine-coded", "feminine-coded"])
    ax2.set(ylabel="coded words per 100 words", title="grey: unperturbed, green: PPLM")
    for ax in (ax1, ax2):
        ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, Path(out) / "verdicts.png", "Ethical hiring tool: before vs after, the same seeds")


PROJECT = Project(
    name=NAME, title=TITLE, technique="PPLM", run=run, sizes=SIZES,
    description="PPLM steers job adverts for 10 roles away from masculine-coded words (its avoid mode) and towards "
                "feminine-coded ones (genderdecoder3's lists, expanded to GPT-2 tokens); genderdecoder3 measures the "
                "coded words before and after, with the same seeds.",
    needs=("genderdecoder3",), trains=False,   # steers only: no --precision
    options=add_options, preflight=preflight)


if __name__ == "__main__":
    raise SystemExit(PROJECT.main())
