"""The project frame: what every tutorial project shares, and the record by which it declares itself.

A project (`python -m demos.projects.<name>`) is one `Project(...)` record at the end of its module: its
name, title, technique, the yardstick packages it needs, its sizes per run mode and its `run`. The frame
does the rest, the same way for all eleven:

    parse the options (--model/--weights/--device/--seed, --out, --smoke, --quick, --precision and the
    project's own) -> pick the run mode's sizes -> the project's `preflight` (fail fast) -> load the model
    -> the project's `run` (its data, its technique calls, its measure before and after) -> write OUT.

A run returns a `Finished`: the yardstick's numbers (`ProjectResult`), the samples before and after and
the labels of the two bars. From it the frame writes into --out:

- `metrics.json`: {"project", "metric", "higher_is_better", "before", "after", "model", "n",
  "seconds"} plus any extra numbers under "extra";
- `samples.md`: inputs with the outputs before and after;
- `metric.png`: the metric before and after.

What only one project writes (an adapter, `loss.png`, a second figure) it writes itself into
`run.folder()` and names in `Finished.files`.

`python -m demos.projects` lists and runs them all from the same records (demos.projects.PROJECT_NAMES)
and writes runs/projects/index.html; the tests read the same records.

The projects are leaves: each imports the kits (demos.kits), this frame and the library, never another
project. The command-line options that several projects share (the LoRA and the prefix-tuning groups)
live here too.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from minigpt import GPT, atomic_save_dir, write_json
from minigpt.cli import positive_int, run_command

from ..common import (ChosenModel, Stopwatch, add_demo_args, choose_model, format_seconds, new_figure, run_mode,
                      save_figure)

__all__ = ["Project", "ProjectRun", "Finished", "Samples", "run_project", "ProjectResult", "project_parser",
           "progress", "add_lora_args", "lora_training",
           "add_prefix_args", "prefix_training", "add_prompts_arg", "read_prompts_file",
           "require", "vader_analyzer", "write_metrics", "write_samples",
           "metric_figure", "loss_figure", "bars_figure", "DEMOS_EXTRA", "REPO"]

REPO = Path(__file__).resolve().parents[2]     # the repository root: data/ lives there
DEMOS_EXTRA = 'pip install -e ".[demos]"'


@dataclass
class ProjectResult:
    """What metrics.json holds. before/after are the yardstick's numbers on the same inputs."""
    project: str
    metric: str
    higher_is_better: bool
    before: float
    after: float
    model: str
    n: int
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def improved(self) -> bool:
        return self.after > self.before if self.higher_is_better else self.after < self.before

    def to_json(self) -> dict:
        d = {"project": self.project, "metric": self.metric, "higher_is_better": self.higher_is_better,
             "before": _num(self.before), "after": _num(self.after), "model": self.model, "n": int(self.n),
             "seconds": round(float(self.seconds), 2)}
        if self.extra:
            d["extra"] = self.extra
        return d


@dataclass
class Samples:
    """samples.md: a title, a note under it, one row per input (input, before, after, and optionally
    reference / before_score / after_score), and an appendix of markdown after the rows (a second
    setting, a table of every configuration)."""
    title: str
    rows: Sequence[dict]
    note: str = ""
    appendix: str = ""


@dataclass
class Finished:
    """What a project's run hands back to the frame: the numbers, the samples, the labels of metric.png's
    two bars (with the unit of its axis and, optionally, each item's value before and after as dots), and
    the names of the other files it wrote into OUT (for the closing line)."""
    result: ProjectResult
    samples: Samples
    labels: tuple[str, str] = ("before", "after")
    unit: str = ""
    per_item: Optional[tuple[Sequence[float], Sequence[float]]] = None
    files: Sequence[str] = ()


@dataclass
class ProjectRun:
    """What the frame hands a project's run: the parsed options, this run mode's sizes, the model the
    options chose (seeded with --seed, in eval mode), the clock started before it loaded, and what the
    project's preflight returned (its data, its yardstick), or None."""
    args: argparse.Namespace
    sizes: Any
    chosen: ChosenModel
    clock: Stopwatch
    prepared: Any = None

    @property
    def model(self) -> GPT:
        return self.chosen.model

    def folder(self) -> Path:
        """--out, created now: a project calls this when it has something to write, so a run that fails
        earlier leaves no folder behind."""
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        return out


@dataclass(frozen=True)
class Project:
    """A tutorial project, declared once. The command (`main`), `python -m demos.projects` (the list, the
    runner, the index) and the tests all read this record.

    sizes: the project's sizes for each run mode ("full", "quick", "smoke").
    run: the project itself, ProjectRun -> Finished: its data, its technique calls, its measure.
    preflight: what should fail before the model loads (options, a yardstick package, a data file, an
        adapter folder), (args, sizes) -> what it read or made, handed to run as `run.prepared`.
    options: adds the project's own options to its parser.
    """
    name: str
    title: str
    technique: str
    description: str
    sizes: Mapping[str, Any]
    run: Callable[[ProjectRun], Finished]
    needs: tuple[str, ...] = ()
    trains: bool = True
    options: Optional[Callable[[argparse.ArgumentParser], None]] = None
    preflight: Optional[Callable[[argparse.Namespace, Any], Any]] = None

    def build_parser(self) -> argparse.ArgumentParser:
        p = project_parser(self.name, self.description, needs=self.needs, trains=self.trains)
        if self.options is not None:
            self.options(p)
        return p

    def main(self, argv: Optional[Sequence[str]] = None) -> int:
        args = self.build_parser().parse_args(argv)
        return run_command(lambda: run_project(self, args), out=args.out)


def run_project(project: Project, args: argparse.Namespace) -> ProjectResult:
    """The frame: sizes for the run mode, the preflight, the model, the project's run, then OUT's files."""
    clock = Stopwatch()
    sizes = project.sizes[run_mode(args)]
    prepared = project.preflight(args, sizes) if project.preflight is not None else None
    chosen = choose_model(args)
    print(chosen.reason)
    run = ProjectRun(args, sizes, chosen, clock, prepared)
    done = project.run(run)
    out, result = run.folder(), done.result
    write_samples(out, done.samples.title, done.samples.rows, note=done.samples.note,
                  appendix=done.samples.appendix)
    metric_figure(out, result, labels=done.labels, unit=done.unit, per_item=done.per_item)
    result.seconds = clock.elapsed()
    write_metrics(result, out)
    files = ", ".join(["metrics.json", "samples.md", "metric.png", *done.files])
    print(f"{project.title}: {result.metric} {result.before:.4g} -> {result.after:.4g} "
          f"({'higher' if result.higher_is_better else 'lower'} is better); wrote {out}: {files} "
          f"in {format_seconds(result.seconds)}")
    return result


def _num(x) -> Optional[float]:
    x = float(x)
    return x if math.isfinite(x) else None


def project_parser(name: str, description: str, *, needs: Sequence[str] = (), out: Optional[str] = None,
                   trains: bool = True) -> argparse.ArgumentParser:
    """The options every project has: --model/--weights/--device/--seed, --out, --smoke, --quick, and
    --precision for a project that trains."""
    extra = (f" Needs the `demos` extra ({DEMOS_EXTRA}) for: {', '.join(needs)}." if needs else "")
    p = argparse.ArgumentParser(prog=f"python -m demos.projects.{name}", description=description + extra)
    add_demo_args(p, out=out or f"runs/{name}", quick_help="fewer steps and examples (minutes on a 2-core CPU)",
                  trains=trains)
    return p


def progress() -> bool:
    """Progress bars only on a terminal (a log file gets the one-line summaries)."""
    return sys.stderr.isatty()


def add_lora_args(parser: argparse.ArgumentParser, sizes: dict) -> None:
    """The LoRA projects' options: --lora DIR, --steps, --lr (sizes: the project's SIZES, for the defaults)."""
    g = parser.add_argument_group("LoRA")
    g.add_argument("--lora", metavar="DIR", help="load this adapter (saved by an earlier run in OUT/adapter) "
                                                 "instead of training one")
    g.add_argument("--steps", type=positive_int, default=None,
                   help=f"LoRA optimizer steps (default: {sizes['full'].steps}; --quick {sizes['quick'].steps})")
    g.add_argument("--lr", type=float, default=None,
                   help="AdamW peak learning rate (default: 2e-3 for models narrower than 512, else 1e-3)")


def lora_training(args, steps: int) -> dict:
    """demos.kits.lora_train_config's arguments from the options add_lora_args added: --steps (else the
    project's `steps`), --lr (else the kit's lora_lr), and the run's --seed and --precision; progress bars
    only on a terminal."""
    return dict(steps=args.steps or steps, lr=args.lr, seed=args.seed, precision=args.precision, progress=progress())


def add_prefix_args(parser: argparse.ArgumentParser, *, P: Optional[int], P_note: str, steps: dict[str, int],
                    prefix_help: str = "load the prefix adapter a run saved in OUT/adapter (peft's layout) "
                                       "instead of training one") -> None:
    """The prefix projects' options: --prefix, --num-virtual-tokens, --max-steps, --batch-size, --lr,
    --no-progress (steps: the project's steps per run mode, for the help)."""
    g = parser.add_argument_group("prefix tuning")
    g.add_argument("--prefix", metavar="DIR", help=prefix_help)
    g.add_argument("--num-virtual-tokens", type=positive_int, default=P, metavar="P",
                   help=f"P, the prefix length (default: {P_note})")
    g.add_argument("--max-steps", type=positive_int, default=None, metavar="N",
                   help=f"optimizer steps (default: {steps['full']}; {steps['quick']} with --quick, "
                        f"{steps['smoke']} with --smoke)")
    g.add_argument("--batch-size", type=positive_int, default=None, metavar="N", help="examples per step (default: 8)")
    g.add_argument("--lr", type=float, default=None,
                   help="AdamW peak learning rate, linear decay to 0 (default: the paper's 8e-5 for GPT-2 medium "
                        "and wider, 5e-4 for gpt2, 3e-3 for narrower models such as tiny)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def prefix_training(args, steps: int) -> dict:
    """demos.kits.fit_prefix's training arguments from the options add_prefix_args added: --max-steps (else
    the project's `steps`), --batch-size (else 8), --lr (else the kit's prefix_lr), --no-progress, and the
    run's --seed and --precision."""
    return dict(steps=args.max_steps or steps, batch_size=args.batch_size or 8, lr=args.lr, seed=args.seed,
                precision=args.precision, progress=not args.no_progress)


def add_prompts_arg(group, what: str = "openings") -> None:
    """--prompts FILE: the user's own inputs, one a line, in place of the project's (the same seeds apply)."""
    group.add_argument("--prompts", metavar="FILE",
                       help=f"your own {what}, one a line (blank lines and lines starting with # are skipped), "
                            "instead of the project's; before and after use the same seeds")


def read_prompts_file(path: str | Path) -> list[str]:
    """The non-blank, non-comment lines of a --prompts file, or one-line errors naming the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file; give a text file with one opening a line")
    lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"--prompts {path} holds no openings: write one a line (lines starting with # are skipped)")
    return prompts


def require(module: str, package: Optional[str] = None):
    """Import a yardstick package, or fail with one line naming the `demos` extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"this project measures with {package or module}, which is not installed; "
                         f"install the demos extra: {DEMOS_EXTRA}") from None


def vader_analyzer():
    """VADER's sentiment analyzer (Hutto & Gilbert 2014; the sentiment projects' yardstick), or one line
    naming the demos extra."""
    return require("vaderSentiment.vaderSentiment", "vaderSentiment").SentimentIntensityAnalyzer()


def write_metrics(result: ProjectResult, out: str | Path) -> Path:
    with atomic_save_dir(out) as tmp:
        write_json(result.to_json(), tmp / "metrics.json")
    return Path(out) / "metrics.json"


def read_metrics(out: str | Path) -> dict:
    return json.loads((Path(out) / "metrics.json").read_text(encoding="utf-8"))


def write_samples(out: str | Path, title: str, rows: Sequence[dict], note: str = "", appendix: str = "") -> Path:
    """samples.md: one section per input, its outputs before and after (each row: input, before, after,
    and optionally reference / scores), then the appendix, if any."""
    lines = [f"# {title}\n"] + ([note + "\n"] if note else [])
    for i, row in enumerate(rows, 1):
        lines.append(f"## {i}. input\n\n{_quote(row['input'])}\n")
        if row.get("reference") is not None:
            lines.append(f"**reference:**\n\n{_quote(row['reference'])}\n")
        for key in ("before", "after"):
            score = f" ({row[key + '_score']})" if row.get(key + "_score") is not None else ""
            lines.append(f"**{key}**{score}:\n\n{_quote(row[key])}\n")
    path = Path(out) / "samples.md"
    path.write_text("\n".join(lines) + appendix, encoding="utf-8")
    return path


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in str(text).strip().splitlines()) or "> (empty)"


def metric_figure(out: str | Path, result: ProjectResult, labels: tuple[str, str] = ("before", "after"),
                  unit: str = "", per_item: Optional[tuple[Sequence[float], Sequence[float]]] = None) -> Path:
    """metric.png: two bars (before, after) with their values; with per_item, the items' values as dots."""
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    values = [result.before, result.after]
    colors = ["#9aa5b1", "#1a7f37" if result.improved else "#c0392b"]
    bars = ax.bar(labels, values, color=colors, width=0.5)
    for b, v in zip(bars, values):
        ax.annotate(f"{v:.3g}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=11)
    if per_item is not None:
        for x, ys in enumerate(per_item):
            ax.scatter([x] * len(ys), ys, s=12, color="#333", alpha=0.5, zorder=3)
    shown = values + [y for ys in (per_item or ()) for y in ys]
    if all(v >= 0 for v in shown):   # a share, a count or a perplexity: no negative axis below the bars
        ax.set_ylim(bottom=0, top=max(shown) * 1.15 or 1)
    better = "higher is better" if result.higher_is_better else "lower is better"
    ylabel = result.metric + (f" ({unit})" if unit and unit not in result.metric else "")
    ax.set_ylabel(textwrap.fill(ylabel, 45))
    ax.set_title(textwrap.fill(f"{result.project}: {result.metric} before vs after ({better}; n={result.n}, "
                               f"model {result.model})", 90), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, Path(out) / "metric.png")


def loss_figure(out: str | Path, history: Sequence[dict], title: str, name: str = "loss.png",
                unit: str = "nats / token") -> Path:
    """Train loss per step and the eval loss where it was taken (cross-entropy, in `unit`)."""
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([h["step"] + 1 for h in history], [h["loss"] for h in history], lw=1, label="train (per batch)")
    ev = [h for h in history if "eval_loss" in h]
    if ev:
        ax.plot([h["step"] + 1 for h in ev], [h["eval_loss"] for h in ev], "o-", label="eval (held out)")
    ax.set(xlabel="optimizer step", ylabel=f"cross-entropy ({unit})", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, Path(out) / name)


def bars_figure(path: str | Path, values: dict[str, float], *, ylabel: str, title: str, fmt: str = "{:.3g}",
                colors: Sequence[str] = ("#9aa5b1", "#4c72b0")) -> Path:
    """A secondary before/after figure: one bar per label, its value written on top."""
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    bars = ax.bar(list(values), list(values.values()), color=list(colors)[:len(values)], width=0.5)
    for b, v in zip(bars, values.values()):
        ax.annotate(fmt.format(v), (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)
