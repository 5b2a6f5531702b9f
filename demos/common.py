"""What every demo shares: the model choice, the options, figures, the report files, timing.

The demos (`python -m demos.tour`, the tutorial's projects) are commands in the
project's sense (see minigpt/cli.py): they parse options here, run the library,
and fail through `minigpt.cli.run_command`. Pieces:

- options: `add_demo_args` = minigpt.cli.add_model_args (--model, --weights,
  --device, --seed) plus --out, --smoke, --precision where a demo trains, and,
  where a demo has a short form, --quick;
- the model: `choose_model` loads what the options name. Without --model or
  --weights it takes GPT-2 when that loads (from the Hugging Face cache, or a
  download when online) and otherwise the bundled "tiny" model, and says in ONE
  line which it used and why. --smoke builds a micro random model in-process
  (for tests: seconds, no files);
- figures: `new_figure` / `save_figure` draw with matplotlib's Agg canvas
  (no display, no pyplot state), at 8 x 4.5 in and 110 dpi: legible at the size
  a README shows them;
- reports: `Report` collects headings, text, tables, images and text pairs and
  writes them twice: `index.html`, self-contained (images embedded as base64
  PNG, opens in any browser), and `report.md` (images linked beside it);
- timing: `Stopwatch`.
"""
from __future__ import annotations

import argparse
import base64
import html
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from minigpt import GPT, GPTConfig, resolve_device
from minigpt.cli import add_model_args, add_precision_arg

__all__ = ["MICRO_CONFIG", "AUTO", "add_demo_args", "ChosenModel", "choose_model", "new_figure", "save_figure",
           "Report", "Stopwatch", "format_seconds", "finite_or_none", "bow_stepsize", "STEPSIZE_FACTORS",
           "moving_average", "run_mode"]

# The --smoke model: two layers of width 32, random weights, built in-process in well under a second.
MICRO_CONFIG = dict(n_layer=2, n_head=2, n_embd=32, n_positions=128)
AUTO = "auto"          # --model's default: GPT-2 when it loads, else the bundled tiny model
FALLBACK = "tiny"
PREFERRED = "gpt2"
FIGSIZE = (8.0, 4.5)   # inches: what a README shows at full width
DPI = 110
# PPLM's bag-of-words step size is the paper's (0.03, for GPT-2 medium, width 1024) on models at least 512 wide.
# Narrower models need a larger step for the same pull; measured with the tour's bag and sampling (positive_words,
# top-k 10, 30 tokens, seed 300, 4 samples for each of 3 openings):
# - width 256 (the bundled tiny v2): bag mass per token 0.021-0.035 unperturbed, 0.022-0.053 at 0.03, 0.069-0.092
#   at 0.1 with the text still sentences, 0.32-0.50 at 0.3, where it becomes a list ("friendly friendly ...");
#   so 0.1, the paper's x 10/3.
# - width 128 (the first bundled model): at 0.03 its bag mass rose ~4% (0.071 -> 0.073), at 0.3 ~60% with the
#   text still readable; so 0.3, the paper's x 10 (and the same below, e.g. the --smoke micro model).
STEPSIZE_FACTORS = ((512, 1.0), (256, 10 / 3), (0, 10.0))   # (from this width up, factor on the paper's step)


# ---- options ---------------------------------------------------------------------------------
def add_demo_args(parser: argparse.ArgumentParser, *, out: str, quick: bool = True,
                  quick_help: str = "a shorter run with smaller sizes", trains: bool = True) -> None:
    """--model/--weights/--device/--seed (minigpt.cli's), --out, --smoke, optionally --quick, and --precision
    for a demo that trains."""
    add_model_args(parser, default_model=AUTO)
    if trains:
        add_precision_arg(parser, default="fp32", note="the numbers in docs/projects.md are fp32 runs")
    for action in parser._actions:  # the shared --model help, plus what "auto" means for a demo
        if action.dest == "model":
            action.help = (f"{FALLBACK} (the small model bundled with the package, offline), or a GPT-2 size from "
                           "the Hugging Face cache: gpt2, gpt2-medium, gpt2-large, gpt2-xl (downloaded once if "
                           f"online). Default: {AUTO} = {PREFERRED} when it loads, else {FALLBACK}")
    g = parser.add_argument_group("output")
    g.add_argument("--out", default=out, help=f"folder for the figures and reports (default: {out})")
    if quick:
        g.add_argument("--quick", action="store_true", help=quick_help)
    g.add_argument("--smoke", action="store_true",
                   help="a micro random model built in-process and the smallest sizes: checks that everything "
                        "runs, in seconds (the numbers mean nothing)")


# ---- the model ---------------------------------------------------------------------------------
@dataclass
class ChosenModel:
    model: GPT
    name: str      # what summary.json records
    reason: str    # the one line printed: which model and why


def choose_model(args) -> ChosenModel:
    """The model the options name, on --device, in eval mode; torch is seeded with --seed.

    Raises FileNotFoundError/ValueError (one-line errors under run_command) for
    a --model/--weights that does not load. Only the automatic choice falls back.
    """
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    if getattr(args, "smoke", False):
        model = GPT(GPTConfig(**MICRO_CONFIG))
        return ChosenModel(model.to(device).eval(), "micro-random",
                           f"model: micro random model (smoke test): GPTConfig({_kwargs(MICRO_CONFIG)}), "
                           "random weights, numbers mean nothing")
    if args.weights:
        return ChosenModel(GPT.from_pretrained(args.weights, device=device), str(args.weights),
                           f"model: weights from {args.weights} (--weights)")
    if args.model != AUTO:
        return ChosenModel(GPT.from_pretrained(args.model, device=device), args.model,
                           f"model: {args.model} (--model {args.model})")
    try:
        model = GPT.from_pretrained(PREFERRED, device=device)
    except (OSError, ValueError) as e:
        why = "not in the Hugging Face cache and not downloadable (offline?)" if isinstance(e, FileNotFoundError) \
            else f"its files did not load ({_first_line(e)})"
        return ChosenModel(GPT.from_pretrained(FALLBACK, device=device), FALLBACK,
                           f"model: {FALLBACK}, the bundled model, because {PREFERRED} is {why}; "
                           f"pass --model {PREFERRED} or --weights DIR to choose")
    return ChosenModel(model, PREFERRED, f"model: {PREFERRED}, loaded from the Hugging Face cache or downloaded "
                                         f"(--model {FALLBACK} runs the bundled model instead)")


def run_mode(args) -> str:
    """smoke, quick or full, from a demo's --smoke and --quick: which of its sizes this run takes."""
    return "smoke" if args.smoke else "quick" if args.quick else "full"


def bow_stepsize(model: GPT, paper: float) -> float:
    """The PPLM bag-of-words step size for this model: the paper's value from width 512, 10/3 of it from
    width 256, 10x it below (STEPSIZE_FACTORS, measured on the bundled models)."""
    return paper * next(f for width, f in STEPSIZE_FACTORS if model.config.n_embd >= width)


def _kwargs(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


# ---- figures -----------------------------------------------------------------------------------
def moving_average(values: Sequence[float], window: int) -> list[float]:
    """The mean of the last `window` values at each position (fewer at the start): a loss curve's trend."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def new_figure(figsize: tuple[float, float] = FIGSIZE) -> Figure:
    """A figure on matplotlib's Agg canvas: no window, no global pyplot state, safe in notebooks."""
    fig = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path, title: Optional[str] = None, tight: bool = True) -> Path:
    """Save as PNG at 110 dpi; `title` goes above all panels. tight=True runs tight_layout; False
    (for figures with a colorbar shared by several panels) crops the saved image to its contents instead."""
    if title:
        fig.suptitle(title, fontsize=11)
    if tight:
        try:
            fig.tight_layout()
        except (ValueError, RuntimeError):  # 3-D axes sometimes refuse; the layout then stays as drawn
            pass
    path = Path(path)
    fig.savefig(path, dpi=DPI, facecolor="white", bbox_inches=None if tight else "tight")
    return path


# ---- reports: index.html and report.md ---------------------------------------------------------
class Report:
    """Report items written twice: a self-contained index.html and a report.md.

    Items: heading, text (a plain paragraph), table (header + rows of cells),
    image (a PNG: embedded in HTML, linked in Markdown), code (preformatted),
    pair (two marked-up texts side by side: spans of (text, marked)), link (a line that points to a page).
    """

    def __init__(self, title: str):
        self.title = title
        self.items: list[tuple] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.items.append(("heading", text, level))

    def text(self, text: str) -> None:
        self.items.append(("text", text))

    def table(self, header: Sequence[str], rows: Sequence[Sequence]) -> None:
        self.items.append(("table", list(header), [list(r) for r in rows]))

    def image(self, path: str | Path, caption: str = "") -> None:
        self.items.append(("image", Path(path), caption))

    def code(self, text: str) -> None:
        self.items.append(("code", text))

    def pair(self, titles: tuple[str, str], left: Sequence[tuple[str, bool]], right: Sequence[tuple[str, bool]]
             ) -> None:
        """Two texts side by side, each a list of (span, marked); marked spans are bold (and coloured in HTML)."""
        self.items.append(("pair", titles, list(left), list(right)))

    def link(self, text: str, href: str) -> None:
        """A paragraph that is one link, e.g. to the docs page that explains a step."""
        self.items.append(("link", text, href))

    def extend(self, items: Sequence[tuple]) -> None:
        self.items.extend(items)

    # -- Markdown
    def to_markdown(self) -> str:
        return "\n".join([f"# {self.title}\n"] + [markdown_item(i) for i in self.items])

    # -- HTML
    def to_html(self) -> str:
        body = "\n".join(html_item(i) for i in self.items)
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
                f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
                f"<title>{html.escape(self.title)}</title>\n<style>{CSS}</style></head>\n"
                f"<body><main>\n<h1>{html.escape(self.title)}</h1>\n{body}\n</main></body></html>\n")

    def write(self, directory: str | Path) -> tuple[Path, Path]:
        """index.html and report.md in `directory` (the images must already be there)."""
        d = Path(directory)
        (d / "index.html").write_text(self.to_html(), encoding="utf-8")
        (d / "report.md").write_text(self.to_markdown(), encoding="utf-8")
        return d / "index.html", d / "report.md"


CSS = ("body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;line-height:1.45;color:#222;"
       "background:#fafafa}main{max-width:960px;margin:2em auto;padding:0 1em}img{max-width:100%;"
       "border:1px solid #ddd;background:#fff}table{border-collapse:collapse;margin:.6em 0}"
       "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}"
       "th{background:#eee}pre{background:#f0f0f0;padding:.6em;overflow-x:auto;white-space:pre-wrap}"
       "figcaption{color:#555;font-size:.9em}.mark{font-weight:bold;color:#1a7f37;background:#e6f4ea}"
       ".pair td{width:50%;white-space:pre-wrap}")


def _md_cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _md_escape(text: str) -> str:
    for ch in "\\*_`[]<>":
        text = text.replace(ch, "\\" + ch)
    return text


def _marked_md(spans) -> str:
    """Markdown of (span, marked) pieces: marked words in **bold** (their spaces kept outside)."""
    out = []
    for text, marked in spans:
        t = _md_escape(text).replace("\n", " ")
        if marked and t.strip():
            lead, core, trail = t[:len(t) - len(t.lstrip())], t.strip(), t[len(t.rstrip()):]
            t = f"{lead}**{core}**{trail}"
        out.append(t)
    return "".join(out)


def _marked_html(spans) -> str:
    return "".join(f"<span class=\"mark\">{html.escape(t)}</span>" if m else html.escape(t) for t, m in spans)


def markdown_item(item: tuple) -> str:
    kind = item[0]
    if kind == "heading":
        return f"{'#' * item[2]} {item[1]}\n"
    if kind == "text":
        return f"{item[1]}\n"
    if kind == "table":
        header, rows = item[1], item[2]
        lines = ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
        return "\n".join(lines) + "\n"
    if kind == "image":
        path, caption = item[1], item[2]
        return f"![{caption or path.stem}]({path.name})\n" + (f"\n*{caption}*\n" if caption else "")
    if kind == "code":
        return f"```\n{item[1]}\n```\n"
    if kind == "link":
        return f"[{item[1]}]({item[2]})\n"
    if kind == "pair":
        titles, left, right = item[1], item[2], item[3]
        return (f"| {_md_cell(titles[0])} | {_md_cell(titles[1])} |\n|---|---|\n"
                f"| {_md_cell(_marked_md(left))} | {_md_cell(_marked_md(right))} |\n")
    raise ValueError(f"unknown report item {kind!r}")


def html_item(item: tuple) -> str:
    kind = item[0]
    if kind == "heading":
        return f"<h{item[2]}>{html.escape(item[1])}</h{item[2]}>"
    if kind == "text":
        return f"<p>{html.escape(item[1])}</p>"
    if kind == "table":
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in item[1])
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in item[2])
        return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    if kind == "image":
        path, caption = item[1], item[2]
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        return (f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{html.escape(caption or path.stem)}\">"
                f"{cap}</figure>")
    if kind == "code":
        return f"<pre>{html.escape(item[1])}</pre>"
    if kind == "link":
        return f"<p><a href=\"{html.escape(item[2])}\">{html.escape(item[1])}</a></p>"
    if kind == "pair":
        titles, left, right = item[1], item[2], item[3]
        return (f"<table class=\"pair\"><thead><tr><th>{html.escape(titles[0])}</th><th>{html.escape(titles[1])}"
                f"</th></tr></thead><tbody><tr><td>{_marked_html(left)}</td><td>{_marked_html(right)}</td></tr>"
                "</tbody></table>")
    raise ValueError(f"unknown report item {kind!r}")


# ---- timing and numbers ------------------------------------------------------------------------
class Stopwatch:
    """Seconds since start; `lap()` gives the seconds since the previous lap."""

    def __init__(self):
        self.start = self.last = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def lap(self) -> float:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds


def format_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min"


def finite_or_none(x) -> Optional[float]:
    """A float for JSON, or None where it is not finite (JSON has no NaN)."""
    x = float(x)
    return x if math.isfinite(x) else None
