"""MTL-LoRA vs one shared LoRA vs three separate LoRAs on three of the tutorial's LoRA tasks (issue 30).

MTL-LoRA (Yang et al., AAAI 2025, arXiv:2410.09437; techniques/lora/mtl.py) keeps one down-projection A, a
task-specific diagonal Λ_t and n up-projections B^i mixed per task by softmax(w_t/τ):
h = W0·x + s·Σ_i softmax(w_t/τ)_i·B^i·Λ_t·A·x. The paper's claim: on multi-task data it beats one LoRA shared
by all tasks at a similar number of trainable parameters. Here the three tasks are the shipped data of the
poetry, sci-fi and chemistry projects:

    poetry     data/poem_sentiment train verses; held out: the test verses
    scifi      data/scifi/snippets.txt (100);   held out: data/scifi/heldout.txt (25)
    chemistry  data/chemistry/reactions.jsonl, split "train" (prompt -> report); held out: split "test",
               each report scored after its prompt

Four adapters on c_attn of every block, the same steps, batch, lr and seed for each run:
  - one MTL-LoRA on the mixed data (r=4, n=3 up-projections, τ=1), every example tagged with its task;
  - one shared LoRA on the same mixed data, r=10: 40·d parameters per layer, as many as the MTL-LoRA's
    r·d + n·3d·r = 40·d (plus its tiny Λ_t and w_t);
  - three separate LoRAs (r=10 each), one per task, each trained for the same number of steps on its task alone
    (three times the parameters and the compute of the others: the "one adapter per task" reference).
The yardstick is each task's held-out perplexity, computed by its definition over the held-out texts' own
tokens (demos.kits.text_perplexity), plus the trainable parameters and the train time of each run. The
headline (metric.png) is the mean over the three tasks of the held-out perplexity: one shared LoRA ("before")
vs MTL-LoRA ("after"); compare.png shows every task and method, with the base model for scale.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from minigpt import GPT, Example, examples_from_pairs, get_tokenizer, lm_loss_fn, train
from minigpt.cli import describe_plan, positive_int
from techniques.lora import (apply_lora, apply_mtl_lora, collate_mtl, lora_parameters, mtl_loss_fn, mtl_parameters,
                             save_mtl_lora, task_examples, task_ids)

from ..common import finite_or_none, new_figure, save_figure
from ..kits import EOT, lora_train_config, read_verses, text_perplexity, verse_examples
from .common import REPO, Finished, Project, ProjectResult, ProjectRun, Samples, lora_training

NAME = "mtl_compare"
TITLE = "MTL-LoRA vs shared and separate LoRAs"
TASKS = ("poetry", "scifi", "chemistry")
MTL = dict(r=4, alpha=8, n_up=3, tau=1.0)          # s = alpha / r = 2 for every adapter here
LORA_R = 10                                        # 40·d per c_attn: the MTL-LoRA's count at r=4, n=3
TARGETS = ["c_attn"]


@dataclass
class Sizes:
    steps: int = 150
    batch_size: int = 8
    eval_every: int = 50
    per_task_train: Optional[int] = 150   # at most this many training examples per task (None = all)
    per_task_heldout: Optional[int] = 25  # held-out texts per task (None = all)
    max_len: int = 64


SIZES = {"full": Sizes(),
         "quick": Sizes(steps=60, batch_size=4, eval_every=30, per_task_train=60, per_task_heldout=12, max_len=48),
         "smoke": Sizes(steps=2, batch_size=4, eval_every=1, per_task_train=8, per_task_heldout=3, max_len=32)}


# ---- the three tasks' data -------------------------------------------------------------------------------
def _lines(path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this project needs the data shipped in {path.parent}")
    return [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]


def _reactions(split: str) -> list[tuple[str, str]]:
    path = REPO / "data" / "chemistry" / "reactions.jsonl"
    rows = [json.loads(line) for line in _lines(path)]
    pairs = [(EOT + r["prompt"], r["completion"]) for r in rows if r.get("split") == split]
    if not pairs:
        raise ValueError(f"{path} has no rows with split {split!r}")
    return pairs


def _first(xs: list, n: Optional[int]) -> list:
    return xs if n is None else xs[:n]


def task_data(sizes: Sizes, max_len: int) -> dict[str, tuple[list[Example], list[str], list[str]]]:
    """{task: (training examples, held-out texts, their contexts)}, each text read after its context."""
    tok = get_tokenizer()
    verses_train, verses_test = read_verses("train"), read_verses("test")
    scifi = REPO / "data" / "scifi"
    snippets, heldout = _lines(scifi / "snippets.txt"), _lines(scifi / "heldout.txt")
    chem_train, chem_test = _reactions("train"), _reactions("test")
    n, h = sizes.per_task_train, sizes.per_task_heldout
    data = {
        "poetry": (verse_examples(_first(verses_train, n), max_len),
                   [" " + v for v in _first(verses_test, h)], None),
        "scifi": (examples_from_pairs(tok, [(EOT, " " + s) for s in _first(snippets, n)], max_len),
                  [" " + s for s in _first(heldout, h)], None),
        "chemistry": (examples_from_pairs(tok, _first(chem_train, n), max_len),
                      [c for _, c in _first(chem_test, h)], [p for p, _ in _first(chem_test, h)]),
    }
    return {t: (ex, texts, ctx or [EOT] * len(texts)) for t, (ex, texts, ctx) in data.items()}


# ---- the runs ----------------------------------------------------------------------------------------------
def _train(params, loss_fn, examples, config, model, collate=None) -> tuple[list[dict], float]:
    model.eval()   # no dropout: the loss curve and the measure see the same network
    start = time.perf_counter()
    kw = {} if collate is None else {"collate_fn": collate}
    history = train(params, loss_fn, list(examples), config=config, eval_modules=[model], **kw)
    return history, time.perf_counter() - start


def run_lora(base: GPT, examples: Sequence[Example], config, seed: int) -> tuple[GPT, list[dict], float, int]:
    torch.manual_seed(seed)
    model = apply_lora(copy.deepcopy(base), r=LORA_R, alpha=2 * LORA_R, targets=TARGETS, verbose=False)
    params = lora_parameters(model)
    history, seconds = _train(params, lm_loss_fn(model), examples, config, model)
    return model, history, seconds, sum(p.numel() for p in params)


def run_mtl(base: GPT, per_task: Sequence[Sequence[Example]], config, seed: int):
    torch.manual_seed(seed)
    model = apply_mtl_lora(copy.deepcopy(base), len(per_task), targets=TARGETS, **MTL)
    params = mtl_parameters(model)
    history, seconds = _train(params, mtl_loss_fn(model), task_examples(per_task), config, model, collate_mtl)
    return model, history, seconds, sum(p.numel() for p in params)


def perplexities(model: GPT, data: dict, mtl: bool = False) -> dict[str, float]:
    out = {}
    for t, (name, (_, texts, contexts)) in enumerate(data.items()):
        if mtl:
            with task_ids(model, [t]):   # one id for the whole batch: every held-out text is task t's
                out[name] = text_perplexity(model, texts, contexts).value
        else:
            out[name] = text_perplexity(model, texts, contexts).value
    return out


def one_seed(base: GPT, data: dict, config, seed: int) -> tuple[dict, GPT, dict]:
    """The four adapters trained from `seed` (the same seed, data order and steps for each): {row: {ppl, params,
    seconds}}, the MTL-LoRA model and the two mixed-data runs' histories."""
    per_task = [data[t][0] for t in TASKS]
    mixed = [e for ex in per_task for e in ex]
    rows = {}
    mtl_model, mtl_hist, sec, n = run_mtl(base, per_task, config, seed)
    rows["MTL-LoRA (mixed data)"] = {"ppl": perplexities(mtl_model, data, mtl=True), "params": n, "seconds": sec}
    print(f"MTL-LoRA: {n:,} parameters, {sec:.1f} s; held-out perplexity {_fmt(rows['MTL-LoRA (mixed data)'])}")

    shared, shared_hist, sec, n = run_lora(base, mixed, config, seed)
    rows["one shared LoRA (mixed data)"] = {"ppl": perplexities(shared, data), "params": n, "seconds": sec}
    print(f"shared LoRA: {n:,} parameters, {sec:.1f} s; held-out perplexity "
          f"{_fmt(rows['one shared LoRA (mixed data)'])}")

    sep = {"ppl": {}, "params": 0, "seconds": 0.0}
    for name, examples in zip(TASKS, per_task):
        model, _, sec, n = run_lora(base, examples, config, seed)
        sep["ppl"][name] = perplexities(model, {name: data[name]})[name]
        sep["params"] += n
        sep["seconds"] += sec
    rows["three separate LoRAs"] = sep
    print(f"separate LoRAs: {sep['params']:,} parameters in all, {sep['seconds']:.1f} s; held-out perplexity "
          f"{_fmt(sep)}")
    for v in rows.values():
        v["mean_ppl"] = sum(v["ppl"].values()) / len(TASKS)
    return rows, mtl_model, {"mtl": mtl_hist, "shared": shared_hist}


def average(per_seed: list[dict]) -> dict:
    """The rows averaged over seeds: per-task perplexity, its mean, the mean's standard deviation over seeds (0 for
    one seed), the parameters and the mean train time."""
    out = {}
    for k in per_seed[0]:
        vs = [rows[k] for rows in per_seed]
        means = torch.tensor([v["mean_ppl"] for v in vs], dtype=torch.float64)
        out[k] = {"ppl": {t: sum(v["ppl"][t] for v in vs) / len(vs) for t in TASKS}, "params": vs[0]["params"],
                  "seconds": sum(v["seconds"] for v in vs) / len(vs), "mean_ppl": float(means.mean()),
                  "sd": float(means.std()) if len(vs) > 1 else 0.0}
    return out


def run(run: ProjectRun) -> Finished:
    args, sizes, base = run.args, run.sizes, run.model
    max_len = min(sizes.max_len, base.config.n_positions)
    data = task_data(sizes, max_len)
    seeds = [args.seed + i for i in range(args.seeds)]
    configs = [lora_train_config(base, batch_size=sizes.batch_size, eval_every=sizes.eval_every,
                                 **(lora_training(args, sizes.steps) | {"seed": s})) for s in seeds]
    config = configs[0]
    n_mixed = sum(len(data[t][0]) for t in TASKS)
    print(describe_plan(n_mixed, 0, config) + f"; for each of the 5 runs, seeds {', '.join(map(str, seeds))}",
          flush=True)
    base_ppl = perplexities(base, data)
    base_row = {"ppl": base_ppl, "params": 0, "seconds": 0.0, "mean_ppl": sum(base_ppl.values()) / len(TASKS)}
    per_seed, histories = [], {}
    for s, cfg in zip(seeds, configs):
        print(f"-- seed {s}", flush=True)
        rows_s, model_s, hist_s = one_seed(base, data, cfg, s)
        per_seed.append({"base model": dict(base_row)} | rows_s)
        histories[str(s)] = hist_s
        if s == seeds[0]:
            mtl_model = model_s
    rows = average(per_seed)
    mean = {k: v["mean_ppl"] for k, v in rows.items()}
    verdict = _verdict(rows, per_seed)
    print(verdict)
    out = run.folder()
    save_mtl_lora(mtl_model, out / "mtl_adapter", TASKS)
    (out / "history.json").write_text(json.dumps(histories, indent=1) + "\n")
    table = _table(rows, len(seeds))
    (out / "table.md").write_text(table + "\n\n" + verdict + "\n", encoding="utf-8")
    _figure(out / "compare.png", rows, run.chosen.name, len(seeds))
    result = ProjectResult(NAME, "mean held-out perplexity over the 3 tasks", False,
                           mean["one shared LoRA (mixed data)"], mean["MTL-LoRA (mixed data)"], run.chosen.name,
                           sum(len(d[1]) for d in data.values()), run.clock.elapsed(), extra={
                               "rows": {k: {"perplexity": {t: finite_or_none(p) for t, p in v["ppl"].items()},
                                            "mean_perplexity": finite_or_none(v["mean_ppl"]),
                                            "mean_perplexity_sd_over_seeds": finite_or_none(v["sd"]),
                                            "trainable_parameters": int(v["params"]),
                                            "train_seconds": round(float(v["seconds"]), 2)}
                                        for k, v in rows.items()},
                               "per_seed_mean_perplexity": [{k: finite_or_none(v["mean_ppl"]) for k, v in r.items()}
                                                            for r in per_seed],
                               "steps": config.max_steps, "batch_size": config.batch_size, "lr": config.lr,
                               "seeds": seeds, "mtl": MTL, "lora_r": LORA_R, "targets": TARGETS,
                               "examples_per_task": {t: len(data[t][0]) for t in TASKS},
                               "heldout_per_task": {t: len(d[1]) for t, d in data.items()},
                               "verdict": verdict})
    samples = Samples(f"{TITLE}: held-out perplexity per task", [
        {"input": t, "before": f"shared LoRA: {rows['one shared LoRA (mixed data)']['ppl'][t]:.2f}",
         "after": f"MTL-LoRA: {rows['MTL-LoRA (mixed data)']['ppl'][t]:.2f}"} for t in TASKS],
        note=(f"Model {run.chosen.name}; {config.max_steps} steps of batch {config.batch_size} at lr {config.lr:g}, "
              f"seeds {', '.join(map(str, seeds))} (perplexities averaged over them), for every run. Perplexity by "
              "its definition over each held-out text's own tokens (lower is better)."),
        appendix=table + "\n\n" + verdict)
    return Finished(result, samples, labels=("one shared LoRA", "MTL-LoRA"), unit="perplexity",
                    files=["table.md", "compare.png", "mtl_adapter/", "history.json"])


def _fmt(row: dict) -> str:
    return ", ".join(f"{t} {p:.2f}" for t, p in row["ppl"].items())


def _table(rows: dict, n_seeds: int) -> str:
    over = f" (mean of {n_seeds} seeds)" if n_seeds > 1 else ""
    head = ("| adapter | " + " | ".join(TASKS) + f" | mean{' ± sd over seeds' if n_seeds > 1 else ''} | "
            f"trainable parameters | train time (s){over} |")
    lines = [head, "|" + "---|" * (len(TASKS) + 4)]
    for k, v in rows.items():
        sd = f" ± {v['sd']:.2f}" if n_seeds > 1 else ""
        lines.append(f"| {k} | " + " | ".join(f"{v['ppl'][t]:.2f}" for t in TASKS)
                     + f" | {v['mean_ppl']:.2f}{sd} | {v['params']:,} | {v['seconds']:.1f} |")
    return "\n".join(lines)


def _verdict(rows: dict, per_seed: list[dict]) -> str:
    """Whether MTL-LoRA's mean held-out perplexity (over tasks, then seeds) is below the shared LoRA's, on how many
    tasks, and in how many seeds; with one seed it says that one seed cannot settle a small difference."""
    m, sh = "MTL-LoRA (mixed data)", "one shared LoRA (mixed data)"
    mtl, shared = rows[m], rows[sh]
    wins = [t for t in TASKS if mtl["ppl"][t] < shared["ppl"][t]]
    holds = mtl["mean_ppl"] < shared["mean_ppl"]
    seed_wins = sum(r[m]["mean_ppl"] < r[sh]["mean_ppl"] for r in per_seed)
    n = len(per_seed)
    spread = (f" MTL-LoRA's mean is lower in {seed_wins} of {n} seeds; the seeds' standard deviation of the mean is "
              f"{mtl['sd']:.2f} (MTL-LoRA) and {shared['sd']:.2f} (shared)." if n > 1 else
              " One run, one seed: a small difference is within what another seed could change.")
    return (f"The paper's claim (MTL-LoRA beats one shared LoRA at similar parameters: {mtl['params']:,} vs "
            f"{shared['params']:,}) {'holds' if holds else 'does not hold'} here on the mean held-out perplexity "
            f"({mtl['mean_ppl']:.2f} vs {shared['mean_ppl']:.2f}{', averaged over seeds' if n > 1 else ''}); "
            f"MTL-LoRA is lower on {len(wins)} of {len(TASKS)} tasks ({', '.join(wins) or 'none'})." + spread)


def _figure(path, rows: dict, model_name: str, n_seeds: int):
    fig = new_figure((8.0, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(rows)
    top = max(v["ppl"][t] for v in rows.values() for t in TASKS)
    for i, (k, v) in enumerate(rows.items()):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(TASKS))]
        bars = ax.bar(xs, [v["ppl"][t] for t in TASKS], width, label=f"{k} ({v['params']:,} params)")
        for b, t in zip(bars, TASKS):
            ax.annotate(f"{v['ppl'][t]:.1f}", (b.get_x() + b.get_width() / 2, v["ppl"][t]), ha="center",
                        va="bottom", fontsize=7)
    ax.set_xticks(range(len(TASKS)), TASKS)
    seeds = f"mean of {n_seeds} seeds" if n_seeds > 1 else "one seed"
    ax.set(xlabel="task (held-out texts)", ylabel="held-out perplexity (lower is better)", ylim=(0, top * 1.45),
           title=f"{NAME}: per-task held-out perplexity, same steps, {seeds} (model {model_name})")
    ax.title.set_fontsize(10)
    ax.legend(fontsize=8, loc="upper center", ncol=2)   # above the bars: ylim leaves the room
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def _options(parser) -> None:
    g = parser.add_argument_group("training (the same for all five adapters)")
    g.add_argument("--steps", type=positive_int, default=None,
                   help=f"optimizer steps of each run (default: {SIZES['full'].steps}; --quick {SIZES['quick'].steps})")
    g.add_argument("--lr", type=float, default=None,
                   help="AdamW peak learning rate (default: 2e-3 for models narrower than 512, else 1e-3)")
    g.add_argument("--seeds", type=positive_int, default=1, metavar="N",
                   help="repeat the five runs for seeds SEED .. SEED+N-1 and report the mean over seeds with its "
                        "standard deviation (default: 1)")


PROJECT = Project(
    name=NAME, title=TITLE, technique="MTL-LoRA", run=run, sizes=SIZES,
    description="MTL-LoRA (Yang et al. 2025) vs one shared LoRA at the same parameter count vs three separate "
                "LoRAs on the poetry, sci-fi and chemistry data: each task's held-out perplexity, the trainable "
                "parameters and the train time, same steps and seeds.",
    needs=(),
    options=_options)


if __name__ == "__main__":
    raise SystemExit(PROJECT.main())
