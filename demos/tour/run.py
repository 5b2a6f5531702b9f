"""The whole tour: the steps in order (`STEPS`, `run_tour`), a forecast of their seconds timed on this model
here (`forecast`, `estimate_seconds`), summary.json and the report (`build_summary`, `build_report`), the
command line (`build_parser`, `main`) and the notebook's three helpers (`setup`, `show`, `finish`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from minigpt import atomic_save_dir, get_tokenizer, resolve_precision, write_json
from minigpt.cli import run_command

from ..common import (
    Report,
    Stopwatch,
    add_demo_args,
    choose_model,
    format_seconds,
    html_item,
    run_mode,
)
from .attention import step_attention
from .context import SIZES, StepResult, TourContext
from .hybrid import step_hybrid
from .lora import step_lora
from .next_token import step_next_token
from .pplm import step_pplm
from .prefix import step_prefix

# The docs page that explains each step (the README's "Where to read next" lists them all).
DOCS = Path(__file__).resolve().parents[2] / "docs"
STEP_DOCS = {"next_token": "decoding.md", "attention": "model.md", "lora": "lora.md", "prefix": "prefix.md",
             "pplm": "pplm.md", "hybrid": "projects.md"}

STEPS: tuple[Callable[[TourContext], StepResult], ...] = (step_next_token, step_attention, step_lora, step_prefix,
                                                          step_pplm, step_hybrid)


def forecast(ctx: TourContext) -> dict[str, float]:
    """A rough forecast of each step's seconds: its sizes times a timed forward/backward and a timed
    one-token decode of this model on this machine, plus a fixed cost per figure."""
    model, s = ctx.model, ctx.sizes
    per_train_token, per_decode = _time_model(ctx)
    # Measured on the bundled model: a PPLM token costs about 12 one-token forwards (2 plain, then 3 iterations
    # of a forward and a backward through the whole past); an optimizer step about 1.3 forward/backwards.
    pplm_cost, step_overhead = 12, 1.3
    figure = 1.5    # seconds to draw and save one PNG
    verse, record = 26, 70  # padded tokens per example in a batch: a verse, an E2E record
    lora_eval = (s.lora_steps / s.lora_eval_every + 1) * (s.lora_eval_verses or 105) * verse / 3
    prefix_eval = (s.prefix_steps / s.prefix_eval_every + 2) * s.prefix_eval_mrs * 7 * record / 3
    return {
        "next_token": s.draws * model.config.vocab_size * 6e-8 + figure,   # a sort of each draw's row (top-p)
        "attention": figure,
        "lora": (step_overhead * s.lora_steps * s.lora_batch * verse + lora_eval) * per_train_token
                + 2 * s.samples * s.sample_tokens * per_decode + 3 * figure,
        "prefix": (step_overhead * s.prefix_steps * s.prefix_batch * record + prefix_eval) * per_train_token
                  + 2 * s.samples * s.prefix_tokens * per_decode + figure + 2,  # + reading and tokenizing E2E
        "pplm": s.pplm_tokens * s.pplm_samples * (1 + pplm_cost) * per_decode + 2 * figure,
        "hybrid": s.hybrid_inputs * s.hybrid_tokens * (3 + 2 * pplm_cost) * per_decode + figure,
    }


def _time_model(ctx: TourContext) -> tuple[float, float]:
    """(seconds per token of a training step, seconds of a one-token decode step), timed here and now."""
    model = ctx.model
    T = min(32, model.config.n_positions // 2)
    ids = torch.randint(0, model.config.vocab_size, (8, T), generator=torch.Generator().manual_seed(0))
    ids = ids.to(ctx.device)

    def train_like():  # forward and backward through the whole model, to the input embeddings only
        emb = model.transformer.wte(ids).detach().requires_grad_(True)
        with torch.enable_grad():
            torch.autograd.grad(model(None, inputs_embeds=emb).logits.float().logsumexp(-1).mean(), emb)

    def fastest(fn, n: int) -> float:  # the minimum over a few runs: robust to other programs' bursts
        times = []
        for _ in range(n):
            clock = Stopwatch()
            fn()
            times.append(clock.elapsed())
        return min(times)

    train_like()  # warm-up
    per_train_token = fastest(train_like, 3) / ids.numel()
    with torch.no_grad():
        past = model(ids[:1]).past_key_values
        per_decode = fastest(lambda: model(ids[:1, :1], past_key_values=past), 5)
    return per_train_token, per_decode


def estimate_seconds(ctx: TourContext) -> float:
    """The forecast of the whole tour, in seconds (see `forecast`)."""
    ctx.forecast = forecast(ctx)
    return sum(ctx.forecast.values())


def run_tour(ctx: TourContext, steps: Sequence[Callable] = STEPS) -> list[StepResult]:
    """Run the steps in order on one context, each timed (StepResult.seconds)."""
    results = []
    for step in steps:
        clock = Stopwatch()
        result = step(ctx)
        result.seconds = clock.elapsed()
        print(f"  ({format_seconds(result.seconds)})")
        results.append(result)
    return results


def build_summary(ctx: TourContext, results: Sequence[StepResult], seconds: float) -> dict:
    """summary.json: the run's settings, each step's numbers under its key, then the seconds (each step's, the
    forecast's when there is one, the whole run's wall clock and CPU)."""
    summary = {"model": ctx.model_name, "mode": ctx.mode, "seed": ctx.seed,
               "device": str(ctx.device), "parameters": ctx.model.num_parameters()}
    for r in results:
        summary[r.key] = r.numbers
    summary["step_seconds"] = {r.key: round(r.seconds, 2) for r in results}
    if ctx.forecast is not None:
        summary["forecast_seconds"] = {k: round(v, 1) for k, v in ctx.forecast.items()}
    summary["figures"] = [p.name for r in results for p in r.figures]
    summary["seconds"] = round(seconds, 2)
    summary["cpu_seconds"] = round(time.process_time() - ctx.cpu_start, 2)  # all threads
    return summary


def build_report(ctx: TourContext, results: Sequence[StepResult], summary: dict, model_line: str) -> Report:
    """report.md and index.html: the model and the run's settings, each step's report in order, then the
    headline numbers of summary.json."""
    report = Report(f"minigpt tour: {ctx.model_name}")
    report.text(f"{model_line}. Mode: {ctx.mode}; seed {ctx.seed}; device {ctx.device}; "
                f"{summary['seconds']:.0f} s in all. Every number and sample below comes from this run.")
    for i, r in enumerate(results, 1):
        report.heading(f"{i}. {r.title}")
        report.extend(r.report)
        report.text(f"({format_seconds(r.seconds)})")
        if r.key in STEP_DOCS:
            page = DOCS / STEP_DOCS[r.key]
            report.link(f"Read more: docs/{page.name}", Path(os.path.relpath(page, ctx.out)).as_posix())
    report.heading("summary.json")
    keys = ("model", "lora", "prefix", "pplm", "seconds")
    brief = {k: summary[k] for k in keys if k in summary}
    for k in ("lora", "prefix", "pplm"):
        if k in brief:
            brief[k] = {n: v for n, v in brief[k].items() if not isinstance(v, (list, dict))}
    report.code(json.dumps(brief, indent=2))
    return report


def _context(chosen, out: Path, args) -> TourContext:
    """A fresh context for the model choose_model picked and the parsed options, its files going to `out`."""
    mode = run_mode(args)
    return TourContext(model=chosen.model, model_name=chosen.name, tokenizer=get_tokenizer(), out=Path(out),
                       seed=args.seed, sizes=SIZES[mode], mode=mode, progress=not args.no_progress,
                       precision=resolve_precision(args.precision, chosen.model.device),
                       model_line=chosen.reason, cpu_start=time.process_time())


def build_parser() -> argparse.ArgumentParser:
    title = sys.modules[__package__].__doc__.split("\n\n")[0]  # the package docstring's first line
    p = argparse.ArgumentParser(prog="python -m demos.tour", description=title,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Steps: " + "; ".join(f"{i}. {t}" for i, t in enumerate(
                                    ("next-token probabilities", "attention", "LoRA on poem verses",
                                     "prefix tuning on E2E", "PPLM (positive words)", "hybrid"), 1)))
    add_demo_args(p, out="runs/tour", quick_help="the short tour (at most 10 min on a 2-core CPU with the bundled "
                                                 "model): fewer training steps and samples")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _run(args) -> None:
    """The command: pick the model, forecast, run every step, save the files atomically into --out (nothing
    there unless the whole tour ran) and print the headline numbers."""
    clock = Stopwatch()
    chosen = choose_model(args)
    print(chosen.reason)
    with atomic_save_dir(args.out) as tmp:
        ctx = _context(chosen, tmp, args)
        expected = estimate_seconds(ctx)
        print(f"{ctx.mode} tour, {len(STEPS)} steps; expected time: about {format_seconds(expected)} "
              "(forecast from a timed forward/backward of this model here)")
        results = run_tour(ctx)
        summary = build_summary(ctx, results, clock.elapsed())
        write_json(summary, tmp / "summary.json")
        build_report(ctx, results, summary, chosen.reason).write(tmp)
    out = Path(args.out)
    print(f"\ndone in {format_seconds(clock.elapsed())}: {out / 'index.html'}, {out / 'report.md'}, "
          f"{out / 'summary.json'} and {len(summary['figures'])} figures")
    print(f"LoRA eval loss {summary['lora']['eval_loss_before']:.3f} -> {summary['lora']['eval_loss_after']:.3f}; "
          f"prefix eval loss {summary['prefix']['eval_loss_before']:.3f} -> "
          f"{summary['prefix']['eval_loss_after']:.3f}; PPLM bag mass {summary['pplm']['attribute_unperturbed']:.4f}"
          f" -> {summary['pplm']['attribute_perturbed']:.4f}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _run(args), out=args.out)


# ==== the notebook's helpers =========================================================================
def setup(argv: Sequence[str] = ()) -> TourContext:
    """Parse the tour's options (a list, as on the command line), load the model and print which one:
    the notebook's first cell. Files go straight into --out (the notebook shows them as it goes)."""
    args = build_parser().parse_args(list(argv))
    chosen = choose_model(args)
    print(chosen.reason)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    ctx = _context(chosen, Path(args.out), args)
    ctx.clock = Stopwatch()
    print(f"{ctx.mode} tour; expected time: about {format_seconds(estimate_seconds(ctx))}")
    return ctx


def show(result: StepResult) -> None:
    """Display a step's report (text, tables, figures) in a notebook."""
    from IPython.display import HTML, display
    display(HTML("\n".join(html_item(i) for i in result.report)))


def finish(ctx: TourContext, results: Sequence[StepResult]) -> dict:
    """Write summary.json, index.html and report.md for the steps run so far; returns the summary."""
    if ctx.clock is None:
        raise ValueError("finish(ctx, results) reads the clock that setup() starts; make the context with setup(...)")
    summary = build_summary(ctx, results, ctx.clock.elapsed())
    write_json(summary, ctx.out / "summary.json")
    build_report(ctx, results, summary, ctx.model_line).write(ctx.out)
    return summary
