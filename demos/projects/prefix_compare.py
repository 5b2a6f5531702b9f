"""Prefix tuning, Prefix-Tuning+ and LoRA side by side (issue 28; Wang et al. 2025, arXiv 2506.13674).

Four ways to adapt the same frozen model, trained on the same data, for the same steps, from the same seed,
each at the best of the same small learning-rate grid (each method's default times 1/3, 1 and 3, chosen by the
held-out loss, never by the test metric):

- prefix tuning, direct: P virtual key/value vectors per layer, P_theta [P, 2·L·d] trained as is;
- prefix tuning, MLP-reparametrised (Li & Liang 2021, section 4.3): P'[P, d] through an MLP of width 512,
  folded to P_theta after training (so it decodes exactly like the direct one);
- Prefix-Tuning+: o_i = Attn(q_i, K, V) + φ(q_i)ᵀ M per layer and head, M [hs, hs] (techniques.prefix.prefix_plus);
- LoRA on q and v of every c_attn (Hu et al. 2021), rank r, alpha = 2r (the paper's 16 / 8).

The trainable-parameter counts are matched to Prefix-Tuning+'s L·d·hs: LoRA's 4·r·d per layer gives r = hs/4,
the direct prefix's 2·L·d·P gives P = hs/2 (the bundled tiny model: 65,536 each); the MLP-reparametrised prefix
has the same P, so the same count after folding, and its MLP's parameters while it trains (both reported).

Two tasks from the data we ship:
- E2E table-to-text (data/e2e, as demos/projects/table_to_text.py): train on devset.csv rows, score corpus BLEU
  (sacrebleu, every reference) on test inputs, beam 5 (the prefix-tuning paper's decoding);
- SST-2 as classification-as-generation (data/sst2): ` Review: {sentence} Sentiment:` -> ` positive` or
  ` negative`, trained as text; scored by the label word the model ranks higher at the end of the prompt
  (rank classification over the two label words: the paper's headline tables are few-shot classification),
  accuracy on dev.tsv rows (kept out of the bundled model's pre-training).

Measured per method and task: trainable parameters, the mean train step time (wall clock of the training loop /
steps, same batch size), the peak memory one train step adds (bytes torch's allocator holds: CUDA's counters,
or on CPU every allocation the profiler records), the held-out loss and the task metric. The table is
comparison.md and metrics.json's "extra"; comparison.png draws the metrics, tradeoff.png the trade-off that
motivates Prefix-Tuning+ (demos.kits.tradeoff_curves) on the same model. The frame's before/after is the E2E
BLEU of the frozen model vs Prefix-Tuning+.
"""
from __future__ import annotations

import argparse
import copy
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from minigpt import (GPT, TrainConfig, collate_lm, examples_from_pairs, get_tokenizer, lm_loss_fn, resolve_precision,
                     train)
from minigpt.cli import positive_int
from techniques.lora import apply_lora, lora_parameters
from techniques.pplm import load_labelled_tsv
from techniques.prefix import PrefixTuning, PrefixTuningPlus

from ..common import new_figure, save_figure
from ..kits import (EOT, PREFIX_HIDDEN, TRADEOFF_PS, complete, corpus_bleu, e2e_prompt, group_by_mr, lora_lr,
                    prefix_lr, read_e2e, tradeoff_curves, tradeoff_figure)
from .common import REPO, Finished, Project, ProjectResult, ProjectRun, Samples, progress, require

__all__ = ["NAME", "TITLE", "PROJECT", "METHODS", "matched_sizes", "sst2_prompt", "label_accuracy", "run"]

NAME = "prefix_compare"
TITLE = "Prefix tuning vs Prefix-Tuning+ vs LoRA"
NUM_BEAMS = 5
LABELS = (" negative", " positive")         # SST-2's label words (class 0, class 1)
METHODS = ("prefix (direct)", "prefix (MLP)", "Prefix-Tuning+", "LoRA")


@dataclass
class Sizes:
    steps: int
    batch_size: int
    e2e_train: int          # devset rows to train on
    e2e_test: int           # test inputs (mr) decoded and scored
    e2e_loss: int           # test references for the held-out loss (lr choice)
    new_tokens: int
    sst_train: int
    sst_dev: int
    lr_factors: tuple
    lengths: tuple          # the trade-off's input lengths


# full: 4 methods x 2 tasks x 5 lrs x 150 steps of batch 8 (1,200 training rows each), five beam-5 decodings of 50
# E2E inputs, 400 SST-2 dev sentences: about 30 minutes for the tiny model on a 2-core CPU. The 5-point lr grid is
# there because a 3-point one left most methods' best lr on its upper edge (a 30-step run measured 2026-12-07).
LR_FACTORS_FULL = (1 / 9, 1 / 3, 1.0, 3.0, 9.0)
SIZES = {"full": Sizes(150, 8, 1200, 50, 32, 24, 1200, 400, LR_FACTORS_FULL, (4, 16, 64, 200)),
         "quick": Sizes(10, 8, 160, 6, 8, 16, 160, 60, (1.0,), (4, 16, 64, 200)),
         "smoke": Sizes(2, 2, 6, 2, 2, 3, 6, 4, (1.0, 3.0), (4, 12))}


def matched_sizes(model: GPT) -> dict:
    """The sizes that give every method Prefix-Tuning+'s trainable-parameter count L·d·hs: LoRA r = hs/4 (q and v:
    4·r·d per layer), prefix P = hs/2 (2·L·d·P)."""
    cfg = model.config
    hs = cfg.n_embd // cfg.n_head
    if hs % 4:
        raise ValueError(f"head_dim {hs} is not a multiple of 4: LoRA's rank hs/4 cannot match Prefix-Tuning+'s count")
    return {"r": hs // 4, "P": hs // 2, "count": cfg.n_layer * cfg.n_embd * hs}


def sst2_prompt(sentence: str) -> str:
    return f" Review: {sentence.strip()} Sentiment:"


# ---- the methods: each gives (a model to run, its trainable parameters, the prefix it decodes with) --------------
@dataclass
class Adapted:
    model: GPT
    params: list
    prefix: Optional[PrefixTuning] = None
    finish: Callable[[], None] = lambda: None      # after training (fold the MLP prefix)
    trainable: int = 0                             # parameters while training


def adapt(base: GPT, method: str, sizes: dict, seed: int) -> Adapted:
    torch.manual_seed(seed)
    if method == "LoRA":
        m = apply_lora(copy.deepcopy(base), r=sizes["r"], alpha=2 * sizes["r"], targets=["c_attn"], qkv="qv",
                       verbose=False).eval()
        return Adapted(m, lora_parameters(m))
    if method == "Prefix-Tuning+":
        m = copy.deepcopy(base)
        plus = PrefixTuningPlus(m)
        return Adapted(m.eval(), plus.trainable_parameters())
    base.requires_grad_(False)
    prefix = PrefixTuning(base.config, sizes["P"], projection=method == "prefix (MLP)",
                          hidden_size=PREFIX_HIDDEN).to(base.device)
    a = Adapted(base, list(prefix.parameters()), prefix)
    if prefix.projection:
        def finish():
            with torch.no_grad():
                a.prefix = prefix.fold().eval()
        a.finish = finish
    return a


def base_lr(model: GPT, method: str) -> float:
    """Each method's default lr, the centre of the grid: the kits' prefix_lr and lora_lr; Prefix-Tuning+ (M from
    zero, like LoRA's B) takes LoRA's."""
    return prefix_lr(model) if method.startswith("prefix") else lora_lr(model)


def loss_fn_of(a: Adapted):
    if a.prefix is None:
        return lm_loss_fn(a.model)
    prefix = a.prefix
    return lm_loss_fn(a.model, past_fn=lambda B: (prefix.past_key_values(B), prefix.num_virtual_tokens))


def step_peak_bytes(a: Adapted, batch: dict) -> int:
    """Peak bytes one forward + backward on `batch` adds (torch's allocator: CUDA counters, or on CPU every
    allocation the profiler records), gradients cleared after."""
    loss_fn = loss_fn_of(a)
    dev = a.model.device
    batch = {k: v.to(dev) for k, v in batch.items()}
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        loss_fn(batch).backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
    else:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            loss_fn(batch).backward()
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        total = peak = 0
        for _, n in events:
            total += n
            peak = max(peak, total)
    for p in a.params:
        p.grad = None
    return int(peak)


@dataclass
class Trained:
    adapted: Adapted
    lr: float
    eval_loss: float
    step_seconds: float
    grid: dict           # lr -> held-out loss


def fit(base: GPT, method: str, train_ex, eval_ex, sizes: dict, size: Sizes, args) -> Trained:
    """The method at each lr of the grid (same seed, data order and steps); keep the lowest held-out loss."""
    best, grid = None, {}
    for factor in size.lr_factors:
        lr = base_lr(base, method) * factor
        a = adapt(base, method, sizes, args.seed)
        a.trainable = sum(p.numel() for p in a.params)
        config = TrainConfig(max_steps=size.steps, batch_size=size.batch_size, lr=lr, eval_every=size.steps,
                             seed=args.seed, progress=progress() and not args.no_progress,
                             precision=resolve_precision(args.precision, base.device))
        if a.prefix is not None:
            a.prefix.train()
        t0 = time.perf_counter()
        history = train(a.params, loss_fn_of(a), list(train_ex), eval_examples=list(eval_ex), config=config,
                        eval_modules=[a.model])
        seconds = (time.perf_counter() - t0) / size.steps
        a.finish()
        if a.prefix is not None:
            a.prefix.eval()
        loss = [h["eval_loss"] for h in history if "eval_loss" in h][-1]
        grid[lr] = round(loss, 4)
        print(f"  {method}: lr {lr:.3g} -> held-out loss {loss:.4f} ({seconds:.3f} s/step)", flush=True)
        if best is None or loss < best.eval_loss:
            best = Trained(a, lr, loss, seconds, grid)
    best.grid = grid
    return best


@torch.no_grad()
def label_accuracy(model: GPT, prompts: Sequence[Sequence[int]], labels: Sequence[int],
                   prefix: Optional[PrefixTuning] = None) -> float:
    """The share of prompts whose true label word's first token gets the higher logit of the two at the prompt's
    last position (one forward per prompt, no padding)."""
    tok = get_tokenizer()
    words = [tok.encode(w)[0] for w in LABELS]
    right = 0
    for ids, y in zip(prompts, labels):
        x = torch.tensor([list(ids)], device=model.device)
        if prefix is not None:
            past, mask = prefix.inputs_for(x)
            logits = model(x, past_key_values=past, attention_mask=mask).logits
        else:
            logits = model(x).logits
        right += int(int(logits[0, -1, words].argmax()) == y)
    return right / max(1, len(prompts))


# ---- the run ------------------------------------------------------------------------------------------------
def add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("comparison")
    g.add_argument("--steps", type=positive_int, default=None,
                   help=f"optimizer steps per method and lr (default {SIZES['full'].steps}; --quick "
                        f"{SIZES['quick'].steps})")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--data", metavar="DIR", default=str(REPO / "data"),
                   help="folder holding e2e/ (devset.csv, testset_w_refs.csv) and sst2/ (train.tsv, dev.tsv) "
                        "(default: data)")


def preflight(args, size: Sizes):
    require("sacrebleu", "sacrebleu")
    data = Path(args.data)
    for f in (data / "e2e" / "devset.csv", data / "e2e" / "testset_w_refs.csv", data / "sst2" / "train.tsv",
              data / "sst2" / "dev.tsv"):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing; --data must hold e2e/ and sst2/ as the repository's data/ does")
    e2e_train = read_e2e(data / "e2e" / "devset.csv")
    e2e_test = group_by_mr(read_e2e(data / "e2e" / "testset_w_refs.csv"))
    sst_train = load_labelled_tsv(data / "sst2" / "train.tsv", class_names=["negative", "positive"])[:2]
    sst_dev = load_labelled_tsv(data / "sst2" / "dev.tsv", class_names=["negative", "positive"])[:2]
    return e2e_train, e2e_test, sst_train, sst_dev


def _sample(rows: Sequence, n: int, seed: int) -> list:
    keep = sorted(random.Random(seed).sample(range(len(rows)), min(n, len(rows))))
    return [rows[i] for i in keep]


def run(run: ProjectRun) -> Finished:
    args, model, tok = run.args, run.model, get_tokenizer()
    size = run.sizes
    if args.steps:
        size = Sizes(**{**size.__dict__, "steps": args.steps})
    sacrebleu = require("sacrebleu", "sacrebleu")
    e2e_rows, e2e_tests, (sst_x, sst_y), (dev_x, dev_y) = run.prepared
    sizes = matched_sizes(model)
    max_len = model.config.n_positions - sizes["P"]
    print(f"matched trainable parameters: Prefix-Tuning+ L·d·hs = {sizes['count']:,}; LoRA r = {sizes['r']} "
          f"(q, v); prefix P = {sizes['P']}")

    # E2E
    mrs = list(e2e_tests)
    random.Random(args.seed).shuffle(mrs)
    test_mrs, loss_mrs = mrs[:size.e2e_test], mrs[size.e2e_test:size.e2e_test + size.e2e_loss]
    e2e_train = examples_from_pairs(tok, [(e2e_prompt(mr), " " + ref) for mr, ref in
                                          _sample(e2e_rows, size.e2e_train, args.seed)], max_len)
    e2e_eval = examples_from_pairs(tok, [(e2e_prompt(mr), " " + e2e_tests[mr][0]) for mr in loss_mrs], max_len)
    e2e_prompts = [tok.encode(e2e_prompt(mr)) for mr in test_mrs]
    refs = [e2e_tests[mr] for mr in test_mrs]
    # SST-2: training rows from train.tsv; the lr is chosen on a slice of them held out, scored on dev.tsv
    pairs = _sample(list(zip(sst_x, sst_y)), size.sst_train + size.sst_dev // 2, args.seed)
    sst_pairs = [(sst2_prompt(x), LABELS[y]) for x, y in pairs]
    sst_train = examples_from_pairs(tok, sst_pairs[:size.sst_train], max_len)
    sst_eval = examples_from_pairs(tok, sst_pairs[size.sst_train:], max_len)
    dev = _sample(list(zip(dev_x, dev_y)), size.sst_dev, args.seed)
    dev_prompts = [tok.encode(sst2_prompt(x))[-(max_len - 1):] for x, _ in dev]
    dev_labels = [y for _, y in dev]

    def bleu(m, prefix=None):
        outs = complete(m, e2e_prompts, max_new_tokens=size.new_tokens, prefix=prefix, num_beams=NUM_BEAMS)
        outs = [o.strip().split("\n")[0].strip() for o in outs]
        return corpus_bleu(sacrebleu, outs, refs), outs

    bleu_frozen, frozen_outs = bleu(model)
    acc_frozen = label_accuracy(model, dev_prompts, dev_labels)
    rows, outs_by = [], {"frozen": frozen_outs}
    batch = collate_lm(e2e_train[:size.batch_size])          # the batch whose step's peak memory is measured
    for method in METHODS:
        print(f"== {method}", flush=True)
        row = {"method": method}
        for task, (tr, ev) in {"e2e": (e2e_train, e2e_eval), "sst2": (sst_train, sst_eval)}.items():
            t = fit(model, method, tr, ev, sizes, size, args)
            a = t.adapted
            if task == "e2e":
                row["e2e_bleu"], outs_by[method] = bleu(a.model, a.prefix)
            else:
                row["sst2_accuracy"] = label_accuracy(a.model, dev_prompts, dev_labels, a.prefix)
            row.update({f"{task}_lr": t.lr, f"{task}_eval_loss": round(t.eval_loss, 4), f"{task}_lr_grid": t.grid,
                        f"{task}_step_seconds": round(t.step_seconds, 4)})
            if task == "e2e":
                row["trainable_training"] = a.trainable
                row["trainable"] = (sum(p.numel() for p in a.prefix.parameters()) if a.prefix is not None
                                    else a.trainable)
                probe = adapt(model, method, sizes, args.seed)
                row["step_peak_bytes"] = step_peak_bytes(probe, batch)
        print(f"  {method}: BLEU {row['e2e_bleu']:.2f}, SST-2 accuracy {row['sst2_accuracy']:.3f}", flush=True)
        rows.append(row)

    out = run.folder()
    curves = tradeoff_curves(model, [t for t in size.lengths if t + max(curves_Ps(size)) <= model.config.n_positions],
                             curves_Ps(size), batch=4, seed=args.seed)
    tradeoff_figure(curves, out / "tradeoff.png", run.chosen.name)
    table = comparison_table(rows, bleu_frozen, acc_frozen)
    (out / "comparison.md").write_text(f"# {TITLE} ({run.chosen.name})\n\n{table}", encoding="utf-8")
    comparison_figure(rows, bleu_frozen, acc_frozen, out / "comparison.png", run.chosen.name,
                      f"{size.steps} steps of batch {size.batch_size} per method and task, "
                      f"best of {len(size.lr_factors)} lr")
    print(table)
    plus = next(r for r in rows if r["method"] == "Prefix-Tuning+")
    lora = next(r for r in rows if r["method"] == "LoRA")
    result = ProjectResult(NAME, "E2E BLEU (frozen -> Prefix-Tuning+)", True, bleu_frozen, plus["e2e_bleu"],
                           run.chosen.name, len(test_mrs), run.clock.elapsed(),
                           extra={"methods": rows, "frozen": {"e2e_bleu": bleu_frozen, "sst2_accuracy": acc_frozen},
                                  "matched": sizes, "steps": size.steps, "batch_size": size.batch_size,
                                  "decoding": f"beam {NUM_BEAMS}", "sst2_dev_rows": len(dev),
                                  "plus_minus_lora": {"e2e_bleu": plus["e2e_bleu"] - lora["e2e_bleu"],
                                                      "sst2_accuracy": plus["sst2_accuracy"]
                                                      - lora["sst2_accuracy"]},
                                  "tradeoff": {k: {str(p): v for p, v in curves[k].items()}
                                               for k in ("share", "prefix", "plus", "scale")}
                                  | {"lengths": curves["lengths"]}})
    samples = Samples(f"{TITLE}: E2E outputs (beam {NUM_BEAMS})",
                      [{"input": mr, "reference": "\n".join(e2e_tests[mr][:2]), "before": outs_by["frozen"][i],
                        "after": " | ".join(f"{m}: {outs_by[m][i]}" for m in METHODS)}
                       for i, mr in enumerate(test_mrs[:3])],
                      note=f"before = the frozen model; after = each method. {EOT} ends every output.",
                      appendix="\n" + table)
    return Finished(result, samples, labels=("frozen", "Prefix-Tuning+"), unit="sacrebleu, 0-100",
                    files=["comparison.md", "comparison.png", "tradeoff.png"])


def curves_Ps(size: Sizes) -> tuple:
    """The trade-off's prefix lengths: the issue's 5, 10, 20, 40 (a smoke run: 5 only)."""
    return TRADEOFF_PS if size.lengths[-1] > 16 else (5,)


def comparison_table(rows: list[dict], bleu_frozen: float, acc_frozen: float) -> str:
    head = ("| method | trainable params (training) | train step (s, E2E / SST-2) | peak memory of a step (MiB) | "
            "E2E BLEU (beam 5) | SST-2 accuracy | lr (E2E / SST-2) |\n|---|---|---|---|---|---|---|\n")
    lines = [f"| frozen model | 0 | - | - | {bleu_frozen:.2f} | {acc_frozen:.3f} | - |"]
    for r in rows:
        tr = f"{r['trainable']:,}" + (f" ({r['trainable_training']:,})" if r["trainable_training"] != r["trainable"]
                                      else "")
        lines.append(f"| {r['method']} | {tr} | {r['e2e_step_seconds']:.3f} / {r['sst2_step_seconds']:.3f} | "
                     f"{r['step_peak_bytes'] / 2**20:.1f} | {r['e2e_bleu']:.2f} | {r['sst2_accuracy']:.3f} | "
                     f"{_lr_cell(r, 'e2e')} / {_lr_cell(r, 'sst2')} |")
    return head + "\n".join(lines) + "\n" + EDGE_NOTE


EDGE_NOTE = "\n† the best lr is at an end of the grid: a wider grid might do better.\n"


def _lr_cell(row: dict, task: str) -> str:
    """The chosen lr, marked † when it is the grid's smallest or largest (the search did not bracket the best)."""
    lr, grid = row[f"{task}_lr"], [float(k) for k in row[f"{task}_lr_grid"]]
    edge = len(grid) > 1 and lr in (min(grid), max(grid))
    return f"{lr:.3g}{' †' if edge else ''}"


def comparison_figure(rows: list[dict], bleu_frozen: float, acc_frozen: float, path: Path, model_name: str,
                      budget: str) -> Path:
    """The two metrics as bars; `budget` (steps, batch, lr grid) goes in the title, so a short run says so."""
    fig = new_figure((10, 4))
    names = ["frozen"] + [r["method"] for r in rows]
    for k, (key, frozen, ylabel) in enumerate((("e2e_bleu", bleu_frozen, "E2E BLEU (sacrebleu, 0-100)"),
                                              ("sst2_accuracy", acc_frozen, "SST-2 dev accuracy (share)"))):
        ax = fig.add_subplot(1, 2, k + 1)
        vals = [frozen] + [r[key] for r in rows]
        bars = ax.bar(range(len(vals)), vals, color=["#9aa5b1", "#4c72b0", "#55a868", "#c44e52", "#8172b2"])
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.3g}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=9)
        ax.set_xticks(range(len(vals)), names, rotation=20, fontsize=8)
        ax.set(ylabel=ylabel, title=ylabel.split(" (")[0])
        ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path, title=f"Same model ({model_name}), data, seed and matched trainable parameters\n"
                                        f"{budget}")


PROJECT = Project(
    name=NAME, title=TITLE, technique="prefix tuning, Prefix-Tuning+, LoRA", run=run, sizes=SIZES,
    description="Prefix tuning (direct and MLP-reparametrised), Prefix-Tuning+ and LoRA at a matched trainable-"
                "parameter count, same model, data, steps, seed and lr grid: E2E BLEU (sacrebleu, beam 5) and SST-2 "
                "label-word accuracy, train step time and peak memory, and the prefix-tuning trade-off figure.",
    needs=("sacrebleu",), options=add_options, preflight=preflight)


if __name__ == "__main__":
    raise SystemExit(PROJECT.main())
