"""Hybrid sentiment system (the tutorial's mini project): LoRA + prefix + PPLM in one generation, for real.

The tutorial's "hybrid" printed the prompt plus "with joy..." and a hard-coded 3-vector. Here three techniques
that touch the model in different places are composed, and an ablation measures each on its own, each pair and
all three, on the same prompts and seeds:

- style, LoRA (Hu et al. 2021; r = 8, alpha = 16 on q and v): the poetry project's adapter, trained here as the
  poetry project trains it (demos.kits.train_poem_lora, its sizes) on the poem verses (or loaded with --lora DIR),
  merged into the weights (W0 + (alpha/r)·B·A);
- task, prefix tuning (Li & Liang 2021; P = 10 virtual tokens, the paper's table-to-text length, MLP-
  reparametrised with hidden width 512): write a positive verse, trained on the base model on the verses of
  data/poem_sentiment that its annotators labelled positive (train split; the dev split's positive verses for
  the eval loss), each read after "<|endoftext|>" (or --prefix DIR);
- sentiment, PPLM (Dathathri et al. 2020) with the `positive_words` bag and the reference's bag-of-words knobs
  (stepsize 0.03, 3 iterations, gamma 1.5, window 5, kl_scale 0.01, gm_scale 0.95, top-k 10; the step size grows
  below width 512: 0.1 at 256, 0.3 below; demos.common.bow_stepsize, as in the tour), on the past that
  the prefix starts (`techniques.pplm.generate(..., past_key_values=prefix.past_key_values(1))`).

Every configuration samples with the same sampler (PPLM's, with stepsize 0 where PPLM is off, which is plain
top-k 10 sampling) from the same seed per sample. The prompts are neutral verse openings: the tutorial's own
"the day was", then the first two words of the test verses whose opening VADER scores 0. Yardsticks, per
configuration:
- sentiment: the mean VADER compound score (vaderSentiment) of the continuations (headline: before = none,
  after = all three; higher is better), and the share rated positive (compound >= 0.05);
- style: the perplexity of the held-out (test) poem verses under the model with its adapters, by its
  definition over the verses' own tokens; under PPLM, that of PPLM's own next-token distribution,
  p_out ∝ p̃^gm_scale · p^(1 - gm_scale) before top-k, teacher-forced along each verse with the perturbed past
  carried as in generation (`pplm_forced`);
- task: from the same scoring, the held-out label preference CE(negative) - CE(positive): how many more nats per
  token the configuration spends on the test verses the annotators labelled negative than on those labelled
  positive (higher = it prefers positive verses more). The labels are the dataset's, not any model's.
Where the small model forced a change: the LoRA lr (2e-3, not 2e-4) and the prefix lr (3e-3, not the paper's
5e-5 to 8e-5 for GPT-2 medium), both for runs of a few hundred steps; the LoRA and the prefix are trained
apart, on the base model, and composed only at generation.
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from minigpt import EOT_ID, GPT, get_tokenizer, save_history, stack_past
from techniques import pplm
from techniques.lora import merge_lora, save_adapter as save_lora_adapter
from techniques.peft_format import read_adapter_config
from techniques.prefix import PrefixTuning, load_adapter as load_prefix_adapter, save_adapter as save_prefix_adapter

from ..common import Stopwatch, bow_stepsize, finite_or_none, format_seconds, new_figure, save_figure
from ..kits import (EOT, PREFIX_HIDDEN, Perplexity, fit_prefix, load_lora, lora_train_config, read_verses,
                    text_perplexity, train_poem_lora, verse_examples)
from .common import (Finished, Project, ProjectResult, ProjectRun, Samples, add_prompts_arg, loss_figure, progress,
                     read_prompts_file, vader_analyzer)

NAME = "hybrid"
TITLE = "Hybrid sentiment system"

BAG = "positive_words"
TUTORIAL_PROMPT = "the day was"   # the tutorial's hybrid_sentiment('The day was'), lower-cased like the verses
# The paper's bag-of-words settings (Dathathri et al. 2020, appendix; the reference run_pplm.py's BoW example).
PPLM_KNOBS = dict(stepsize=0.03, num_iterations=3, gamma=1.5, window_length=5, kl_scale=0.01, gm_scale=0.95,
                  do_sample=True, top_k=10)
PREFIX = dict(num_virtual_tokens=10, projection=True, hidden_size=PREFIX_HIDDEN)   # what demos.kits.fit_prefix trains
# (key, label, LoRA, prefix, PPLM): none, each alone, each pair, all three.
CONFIGS = (("none", "none (base model)", False, False, False),
           ("lora", "LoRA", True, False, False),
           ("prefix", "prefix", False, True, False),
           ("pplm", "PPLM", False, False, True),
           ("lora+prefix", "LoRA + prefix", True, True, False),
           ("lora+pplm", "LoRA + PPLM", True, False, True),
           ("prefix+pplm", "prefix + PPLM", False, True, True),
           ("all", "LoRA + prefix + PPLM", True, True, True))
@dataclass
class Sizes:
    lora_steps: int = 300         # the poetry project's full run
    lora_batch: int = 16          # batch, eval interval and verses: the poetry project's full run (smoke: its smoke)
    lora_eval_every: int = 50
    lora_train_verses: Optional[int] = None
    lora_dev_verses: Optional[int] = None
    prefix_steps: int = 200       # 133 positive verses at batch 8: about 12 epochs
    prefix_batch: int = 8
    prefix_eval_every: int = 25
    train_verses: Optional[int] = None   # None = every positive verse of the split
    dev_verses: Optional[int] = None
    test_verses: Optional[int] = None    # held-out verses per label scored (None = the whole test split)
    prompts: int = 20
    samples_per_prompt: int = 2
    tokens: int = 30
    pplm_batch: int = 64          # verses scored together under PPLM


SIZES = {"full": Sizes(),
         "quick": Sizes(lora_steps=120, prefix_steps=80, prefix_eval_every=20, test_verses=12, prompts=8),
         "smoke": Sizes(lora_steps=2, lora_batch=4, lora_eval_every=1, lora_train_verses=16, lora_dev_verses=4,
                        prefix_steps=2, prefix_batch=4, prefix_eval_every=1, train_verses=8, dev_verses=2,
                        test_verses=1, prompts=1, samples_per_prompt=1, tokens=3)}


# ---- the style: the poetry project's LoRA ---------------------------------------------------------------------
def style_lora(base: GPT, args, sizes: Sizes) -> tuple[GPT, list[dict], dict]:
    """The style adapter: loaded from --lora DIR, or trained as the poetry project trains it (demos.kits'
    train_poem_lora, at the kit's lora_lr). Returns (LoRA model, history (empty when loaded), what was done)."""
    if args.lora:
        return load_lora(base, args.lora), [], {"adapter": str(args.lora)}
    config = lora_train_config(base, steps=sizes.lora_steps, batch_size=sizes.lora_batch,
                               eval_every=sizes.lora_eval_every, seed=args.seed, precision=args.precision,
                               progress=progress())
    return train_poem_lora(base, config, train_verses=sizes.lora_train_verses, dev_verses=sizes.lora_dev_verses)


# ---- the prefix's task: a positive verse ---------------------------------------------------------------------
POSITIVE, NEGATIVE = 1, -1   # data/poem_sentiment's labels


def labelled_verses(split: str, label: int) -> list[str]:
    return [v for v, y in read_verses(split, with_labels=True) if y == label]


def task_prefix(base: GPT, args, sizes: Sizes) -> tuple[PrefixTuning, list[dict], dict]:
    """The task prefix: loaded from --prefix DIR, or trained on the positive verses (base model frozen)."""
    if args.prefix:
        prefix = load_prefix_adapter(base, args.prefix).eval()
        print(f"loaded the prefix from {args.prefix}: P={prefix.num_virtual_tokens}")
        return prefix, [], {"adapter": str(args.prefix)}
    P = PREFIX["num_virtual_tokens"]
    max_len = min(64, base.config.n_positions - P)
    train_ex = verse_examples(labelled_verses("train", POSITIVE)[:sizes.train_verses], max_len)
    dev_ex = verse_examples(labelled_verses("dev", POSITIVE)[:sizes.dev_verses], max_len)
    run = fit_prefix(base, train_ex, dev_ex, P=P, steps=sizes.prefix_steps, batch_size=sizes.prefix_batch,
                     eval_every=sizes.prefix_eval_every, seed=args.seed, precision=args.precision, progress=progress())
    return run.prefix, run.history, {"steps": len(run.history), "lr": run.lr, "batch_size": sizes.prefix_batch,
                                     "train_verses": len(train_ex), "dev_verses": len(dev_ex), **PREFIX}


def neutral_openings(vader, n: int) -> list[str]:
    """The tutorial's "the day was", then the first two words of test verses whose opening VADER scores 0."""
    openings = [TUTORIAL_PROMPT] + [" ".join(v.split()[:2]) for v in read_verses("test")]
    return [o for o in openings if vader.polarity_scores(o)["compound"] == 0][:n]


# ---- style under PPLM: teacher-forced perplexity -------------------------------------------------------------
@torch.no_grad()
def pplm_forced(model: GPT, ids: torch.Tensor, bags: torch.Tensor, cfg: pplm.PPLMConfig,
                prefix: Optional[PrefixTuning] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ids [B, T] (no padding; rows are independent) under PPLM, feeding the given tokens instead of
    drawing them: at each position t >= 1, the fused distribution p_out ∝ p̃^gm · p^(1-gm) of
    techniques.pplm.generate's steps 1-4 (before top-k and the draw). Returns (log p_out(ids[:, t]), its argmax),
    each [B, T - 1]. The perturbed past is carried forward exactly as generation carries it."""
    B, T = ids.shape
    obj = pplm.Objective(bags=bags, kl_scale=cfg.kl_scale)
    past0 = prefix.past_key_values(B) if prefix is not None else None
    out = model(ids[:, :1], past_key_values=past0, output_hidden_states=True)          # step 1 of the first token
    logits, cache = out.logits[:, -1], out.past_key_values
    cache_before, past_pert, grad_max = past0, None, None
    no_hidden, no_count = out.hidden_states[-1].new_zeros(B, model.config.n_embd), ids.new_zeros(B)  # BoW only
    logps, argmax = [], []
    for t in range(1, T):
        last = ids[:, t - 1:t]                                                          # the current token
        T_past = 0 if cache_before is None else cache_before[0][0].size(2)
        perturb = cfg.stepsize > 0 and cfg.num_iterations > 0 and t - 1 < cfg.grad_length and T_past > 0
        logits_pert = logits
        if perturb or past_pert is not None:
            ctx = pplm.Context(last, past_pert if past_pert is not None else stack_past(cache_before), None,
                               logits.softmax(-1), cache, no_hidden, no_count)
            past = ctx.past
            if perturb:                                                                 # step 2
                delta, grad_max, *_ = pplm.perturb_past(model, ctx, obj, cfg, grad_max)
                past = past + delta
            logits_pert, _, past_pert = pplm.perturbed_step(model, last, None, past)    # step 3
        fused = pplm.fuse(logits, logits_pert, cfg.gm_scale).float()                   # step 4, before top-k
        logps.append(fused.log_softmax(-1).gather(-1, ids[:, t:t + 1])[:, 0])
        argmax.append(fused.argmax(-1))
        if t < T - 1:                                                                   # step 1 of the next token
            cache_before = cache
            logits, _, cache = pplm.unperturbed_step(model, ids[:, t:t + 1], None, cache)
    return torch.stack(logps, 1), torch.stack(argmax, 1)


def pplm_perplexity(model: GPT, texts: Sequence[str], bag, knobs: dict, *, prefix: Optional[PrefixTuning] = None,
                    batch_size: int = 64) -> Perplexity:
    """Perplexity of `texts` (each read after "<|endoftext|>", only its own tokens scored) under PPLM's
    next-token distribution (see pplm_forced); temperature 1, no top-k, whatever the sampling knobs say."""
    cfg = pplm.PPLMConfig(**{**knobs, "temperature": 1.0})
    tok = get_tokenizer()
    bags = torch.zeros(1, model.config.vocab_size, dtype=model.transformer.wte.weight.dtype, device=model.device)
    bags[0, bag.token_ids] = 1
    rows = [[EOT_ID] + tok.encode(t) for t in texts]
    nll, counts = [], []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        T = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), T), EOT_ID, dtype=torch.long)   # short rows run on; their tail is not scored
        scored = torch.zeros(len(chunk), T - 1)
        for b, r in enumerate(chunk):
            ids[b, :len(r)] = torch.tensor(r)
            scored[b, :len(r) - 1] = 1
        logp, _ = pplm_forced(model, ids.to(model.device), bags, cfg, prefix)
        nll += (-(logp.cpu() * scored).sum(1)).tolist()
        counts += scored.sum(1).long().tolist()
    return Perplexity(nll, counts)


# ---- generation and the ablation -------------------------------------------------------------------------
def continuations(model: GPT, prompts: Sequence[str], bag, knobs: dict, *, seed: int, max_new_tokens: int,
                  prefix: Optional[PrefixTuning]) -> list[str]:
    """One PPLM-sampled continuation per prompt (stepsize 0 = plain top-k sampling), prompt i from seed + i."""
    tok, out = get_tokenizer(), []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([tok.encode(prompt)], dtype=torch.long, device=model.device)   # (1, T)
        g = torch.Generator(device=model.device).manual_seed(seed + i)
        past = prefix.past_key_values(1) if prefix is not None else None
        res = pplm.generate(model, ids, bow=bag, max_new_tokens=max_new_tokens, eos_token_id=EOT_ID, generator=g,
                            past_key_values=past, **knobs)
        out.append(tok.decode([t for t in res.sequences[0, ids.size(1):].tolist() if t != EOT_ID]))
    return out


@dataclass
class HeldOut:
    """The held-out verses scored for style (all of them) and task (the labelled positive and negative ones)."""
    texts: list[str]
    positive: list[int]   # indices into texts
    negative: list[int]


def held_out(n: Optional[int]) -> HeldOut:
    """The test split; with n, only the first n verses of each label (positive, negative, the others)."""
    rows = read_verses("test", with_labels=True)
    if n is not None:
        rows = ([r for r in rows if r[1] == POSITIVE][:n] + [r for r in rows if r[1] == NEGATIVE][:n]
                + [r for r in rows if r[1] not in (POSITIVE, NEGATIVE)][:n])
    return HeldOut([" " + v for v, _ in rows], [i for i, (_, y) in enumerate(rows) if y == POSITIVE],
                   [i for i, (_, y) in enumerate(rows) if y == NEGATIVE])


def label_preference(scores: Perplexity, held: HeldOut) -> float:
    """CE(negative verses) - CE(positive verses), nats/token (nan when either set is empty)."""
    if not held.positive or not held.negative:
        return float("nan")
    return scores.subset(held.negative).mean_cross_entropy - scores.subset(held.positive).mean_cross_entropy


def run_ablation(models: dict[bool, GPT], prefix: PrefixTuning, bag, prompts: Sequence[str], held: HeldOut, vader,
                 *, seed: int, sizes: Sizes, pplm_knobs: dict) -> tuple[dict, dict]:
    """Every configuration on the same prompts and seeds: (rows of metrics, texts per configuration)."""
    contexts = [EOT + " " + p for p in prompts]
    rows, texts = {}, {}
    for key, label, use_lora, use_prefix, use_pplm in CONFIGS:
        clock = Stopwatch()
        model, pre = models[use_lora], (prefix if use_prefix else None)
        knobs = pplm_knobs if use_pplm else {**pplm_knobs, "stepsize": 0.0}
        outs = continuations(model, contexts, bag, knobs, seed=seed, max_new_tokens=sizes.tokens, prefix=pre)
        scores = (pplm_perplexity(model, held.texts, bag, knobs, prefix=pre, batch_size=sizes.pplm_batch)
                  if use_pplm else text_perplexity(model, held.texts, prefix=pre))
        compound = [vader.polarity_scores(t)["compound"] for t in outs]
        rows[key] = {"label": label, "lora": use_lora, "prefix": use_prefix, "pplm": use_pplm,
                     "vader_compound_mean": sum(compound) / len(compound),
                     "vader_positive_share": sum(c >= 0.05 for c in compound) / len(compound),
                     "style_perplexity": scores.value,
                     "label_preference": label_preference(scores, held),
                     "words_per_sample": sum(len(t.split()) for t in outs) / len(outs)}
        texts[key] = [(t, c) for t, c in zip(outs, compound)]
        r = rows[key]
        print(f"  {label:<22} VADER {r['vader_compound_mean']:+.3f}  style perplexity {r['style_perplexity']:8.2f}  "
              f"label preference {r['label_preference']:+.3f}  ({format_seconds(clock.elapsed())})", flush=True)
    return rows, texts


# ---- the project ---------------------------------------------------------------------------------------
def add_options(p: argparse.ArgumentParser) -> None:
    """--lora and --prefix: adapters from earlier runs instead of training them here."""
    g = p.add_argument_group("adapters")
    g.add_argument("--lora", metavar="DIR", help="load this LoRA adapter (e.g. runs/poetry/adapter, or OUT/adapter/"
                                                 "lora of an earlier run) instead of training the poetry adapter")
    g.add_argument("--prefix", metavar="DIR", help="load this prefix adapter (OUT/adapter/prefix of an earlier run) "
                                                   "instead of training one")
    add_prompts_arg(p.add_argument_group("this project"), "openings")


def preflight(args: argparse.Namespace, sizes: Sizes) -> object:
    """Before the model loads: the yardstick is installed, and a --lora / --prefix folder holds that kind of
    adapter (a wrong folder fails now, not after minutes of training the other adapter)."""
    vader = vader_analyzer()
    for folder, kind in ((args.lora, "LORA"), (args.prefix, "PREFIX_TUNING")):
        if folder:
            read_adapter_config(folder, kind)
    return vader, (read_prompts_file(args.prompts) if args.prompts else None)


def run(run: ProjectRun) -> Finished:
    """The ablation: none, each technique alone, each pair and all three, on the same prompts and seeds."""
    args, sizes, base = run.args, run.sizes, run.model
    vader, own = run.prepared   # the analyzer and the --prompts openings (None: the project's) preflight made
    bag = pplm.load_bag(BAG, get_tokenizer())
    openings = own or neutral_openings(vader, sizes.prompts)
    prompts = [o for o in openings for _ in range(sizes.samples_per_prompt)]   # sample i draws from seed + i
    held = held_out(sizes.test_verses)

    print("style: the poetry project's LoRA adapter")
    lora_model, lora_history, lora_info = style_lora(base, args, sizes)
    print("task: a prefix for positive verses")
    prefix, prefix_history, prefix_info = task_prefix(base, args, sizes)
    merged = merge_lora(copy.deepcopy(lora_model))       # W0 + (alpha/r)·B·A folded in: a plain GPT again
    print(f"ablation: {len(CONFIGS)} configurations x {len(prompts)} samples ({len(openings)} openings), "
          f"{sizes.tokens} tokens, the same seeds; {len(held.texts)} held-out verses scored")
    knobs = {**PPLM_KNOBS, "stepsize": bow_stepsize(base, PPLM_KNOBS["stepsize"])}
    rows, texts = run_ablation({False: base, True: merged}, prefix, bag, prompts, held, vader, seed=args.seed,
                               sizes=sizes, pplm_knobs=knobs)

    result = ProjectResult(NAME, "VADER compound (mean)", True, rows["none"]["vader_compound_mean"],
                           rows["all"]["vader_compound_mean"], run.chosen.name, len(prompts), run.clock.elapsed(),
                           extra={
                               "ablation": [{"key": k, **{m: (finite_or_none(v) if isinstance(v, float) else v)
                                                          for m, v in r.items()}} for k, r in rows.items()],
                               "before_is": "none (base model)", "after_is": "LoRA + prefix + PPLM",
                               "openings": openings, "samples_per_opening": sizes.samples_per_prompt,
                               "tokens": sizes.tokens, "heldout_verses": len(held.texts),
                               "heldout_positive": len(held.positive), "heldout_negative": len(held.negative),
                               "pplm": {"bag": BAG, **knobs}, "lora": lora_info, "prefix": prefix_info})
    out, files = run.folder(), ["ablation.png"]
    if lora_history:
        save_lora_adapter(lora_model, out / "adapter" / "lora")
        save_history(lora_history, out, "lora_history.json")
        loss_figure(out, lora_history, "Style: LoRA on poem verses (r=8, alpha=16, q and v): loss", "lora_loss.png")
        files += ["adapter/lora/", "lora_history.json", "lora_loss.png"]
    if prefix_history:
        save_prefix_adapter(prefix, out / "adapter" / "prefix", base_model_name_or_path=run.chosen.name)
        save_history(prefix_history, out, "prefix_history.json")
        loss_figure(out, prefix_history, f"Task: prefix (P={PREFIX['num_virtual_tokens']}) on positive verses: loss",
                    "prefix_loss.png")
        files += ["adapter/prefix/", "prefix_history.json", "prefix_loss.png"]
    ablation_figure(out / "ablation.png", rows, result.model, len(prompts), len(held.texts))
    samples = hybrid_samples(rows, texts, prompts, result, sizes)
    return Finished(result, samples, labels=("none (base model)", "LoRA + prefix + PPLM"), files=files)


# ---- reports ---------------------------------------------------------------------------------------------
TABLE_HEADER = ("configuration", "VADER compound (mean)", "rated positive", "style: held-out verse perplexity",
                "task: label preference (nats/token)", "words per sample")


def ablation_table(rows: dict) -> list[list[str]]:
    return [[r["label"], f"{r['vader_compound_mean']:+.3f}", f"{100 * r['vader_positive_share']:.0f}%",
             f"{r['style_perplexity']:.2f}", f"{r['label_preference']:+.3f}", f"{r['words_per_sample']:.1f}"]
            for r in rows.values()]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows])


def hybrid_samples(rows: dict, texts: dict, prompts: Sequence[str], result: ProjectResult, sizes: Sizes) -> Samples:
    """samples.md: the ablation table and settings, each sample's none vs all-three texts, then (the appendix)
    every configuration's text for every sample."""
    knobs = ", ".join(f"{k}={v}" for k, v in result.extra["pplm"].items() if k != "bag")
    x = result.extra
    note = (f"Model: {result.model}. {len(prompts)} samples: {len(x['openings'])} neutral verse openings (the "
            f"tutorial's \"{TUTORIAL_PROMPT}\", then test-verse openings VADER scores 0) x "
            f"{x['samples_per_opening']} seeds, {sizes.tokens} tokens; sample i draws from seed + i in every "
            f"configuration. Style: {_how(x['lora'], 'the poetry project')} LoRA (r=8, alpha=16, q and v), merged. "
            f"Task: {_how(x['prefix'], 'positive verses')} prefix (P={PREFIX['num_virtual_tokens']}, MLP hidden "
            f"{PREFIX['hidden_size']}), trained on the base model. Sentiment: PPLM with the {BAG} bag ({knobs}); "
            "without PPLM the same sampler runs with stepsize 0 (top-k 10). The small model forced higher learning "
            "rates than the papers' (LoRA 2e-3, prefix 3e-3) for runs of a few hundred steps.\n\n"
            "Yardsticks: VADER compound mean of the continuations (vaderSentiment; rated positive = compound >= "
            f"0.05); perplexity of {x['heldout_verses']} held-out poem verses under the model and its adapters (with "
            "PPLM: under PPLM's fused next-token distribution, teacher-forced; lower = closer to the verses); label "
            f"preference = CE of the {x['heldout_negative']} held-out verses labelled negative minus CE of the "
            f"{x['heldout_positive']} labelled positive, nats/token (higher = prefers the positive ones more).\n\n"
            + markdown_table(TABLE_HEADER, ablation_table(rows))
            + "\n\nBelow, each sample: before = none (base model), after = LoRA + prefix + PPLM (VADER compound in "
              "brackets); then every configuration.")
    sample_rows = [{"input": p, "before": texts["none"][i][0], "after": texts["all"][i][0],
                    "before_score": f"VADER {texts['none'][i][1]:+.3f}",
                    "after_score": f"VADER {texts['all'][i][1]:+.3f}"} for i, p in enumerate(prompts)]
    lines = ["\n# Every configuration, every sample\n"]
    for i, p in enumerate(prompts):
        lines.append(f"## {i + 1}. {p}\n")
        table = [[rows[k]["label"], f"{texts[k][i][1]:+.3f}", " ".join(texts[k][i][0].split()) or "(empty)"]
                 for k in rows]
        lines.append(markdown_table(("configuration", "VADER", "continuation"), table) + "\n")
    return Samples(f"{TITLE}: the ablation", sample_rows, note=note, appendix="\n".join(lines))


def _how(info: dict, what: str) -> str:
    if "adapter" in info:
        return f"loaded ({info['adapter']})"
    return f"trained in this run ({what}, {info['steps']} steps)"


def ablation_figure(path: Path, rows: dict, model: str, n_samples: int, n_verses: int) -> Path:
    """Grouped bars: the three yardsticks (one panel each), one bar per configuration."""
    fig = new_figure((11, 4.5))
    axes = fig.subplots(1, 3)
    keys = list(rows)
    colors = ["#9aa5b1", "#4c72b0", "#dd8452", "#55a868", "#8172b3", "#937860", "#da8bc3", "#c44e52"]
    panels = (("vader_compound_mean", f"sentiment: VADER compound\n(mean of {n_samples}; higher = more positive)",
               "{:+.2f}"),
              ("style_perplexity", f"style: perplexity of {n_verses}\nheld-out verses (lower = closer)", "{:.0f}"),
              ("label_preference", "task: CE(negative) - CE(positive), held-out\nverses, nats/token (higher = "
                                   "prefers positive)", "{:+.3f}"))
    for ax, (metric, title, fmt) in zip(axes, panels):
        values = [rows[k][metric] for k in keys]
        bars = ax.bar(range(len(keys)), values, color=colors[:len(keys)])
        for b, v in zip(bars, values):
            ax.annotate(fmt.format(v), (b.get_x() + b.get_width() / 2, v), ha="center",
                        va="bottom" if v >= 0 else "top", fontsize=7)
        ax.set_xticks(range(len(keys)), [rows[k]["label"].replace(" (base model)", "") for k in keys], rotation=60,
                      ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.axhline(0, color="#333", lw=0.6)
        ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path, f"{NAME}: the ablation (model {model}; same prompts and seeds in every bar)")


PROJECT = Project(
    name=NAME, title=TITLE, technique="LoRA + prefix + PPLM", run=run, sizes=SIZES,
    description="LoRA (style: poem verses) + prefix (task: a positive verse) + PPLM (sentiment: the positive_words "
                "bag), composed; an ablation over all 8 combinations on the same prompts and seeds, measured by "
                "VADER, held-out verse perplexity and the held-out preference for positive over negative verses.",
    needs=("vaderSentiment",), options=add_options, preflight=preflight)


if __name__ == "__main__":
    raise SystemExit(PROJECT.main())
