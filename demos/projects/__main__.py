"""python -m demos.projects: list the tutorial's projects, run any or all, and write one index.html.

    python -m demos.projects                      # the list: name, technique, yardstick
    python -m demos.projects run poetry e2e ...   # those projects, each into OUT/<name>
    python -m demos.projects run all --quick      # every project, shorter runs
    python -m demos.projects run all --smoke      # every project on a micro random model (seconds each)
    python -m demos.projects index --out DIR      # rebuild DIR/index.html from the runs already in DIR

Model options (--model/--weights/--device/--seed) and --smoke/--quick are passed on to every project.
OUT/index.html (self-contained) and OUT/summary.json hold the metric before and after, with its figure, of
every project that has a run in OUT (OUT/<name>/metrics.json), in the tutorial's order: runs made one at a
time, or by several commands into the same OUT, end up on one page.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from minigpt.cli import run_command

from ..common import AUTO, Report, Stopwatch, add_demo_args, format_seconds
from . import PROJECT_NAMES as PROJECTS
from . import load
from .common import read_metrics


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m demos.projects", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    sub.add_parser("list", help="name, technique and yardstick of every project (the default)")
    r = sub.add_parser("run", help="run projects and write OUT/index.html")
    r.add_argument("names", nargs="+", metavar="NAME", help=f"'all' or any of: {', '.join(PROJECTS)}")
    add_demo_args(r, out="runs/projects", quick_help="each project's shorter run")
    i = sub.add_parser("index", help="rebuild OUT/index.html and OUT/summary.json from the runs in OUT")
    i.add_argument("--out", default="runs/projects", help="the folder the projects ran into (default: %(default)s)")
    return p


def list_projects() -> None:
    rows = []
    for name in PROJECTS:
        p = load(name)
        rows.append((p.name, p.technique, p.title, ", ".join(p.needs) or "-"))
    width = [max(len(r[i]) for r in rows + [("name", "technique", "title", "needs")]) for i in range(4)]
    for r in [("name", "technique", "title", "needs (the demos extra)")] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip())
    print("\nrun one:  python -m demos.projects.<name> --help   or   python -m demos.projects run <name> ...")


def forwarded(args, name: str) -> list[str]:
    """The options every project takes, as they were given here (and --precision to those that train)."""
    out = ["--device", args.device, "--seed", str(args.seed)]
    if load(name).trains:
        out += ["--precision", args.precision]
    if args.weights:
        out += ["--weights", args.weights]
    elif args.model != AUTO:
        out += ["--model", args.model]
    return out + (["--smoke"] if args.smoke else []) + (["--quick"] if args.quick else [])


def run_projects(args) -> None:
    names = list(PROJECTS) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in PROJECTS]
    if unknown:
        raise ValueError(f"unknown project(s) {', '.join(unknown)}; choose from {', '.join(PROJECTS)} or 'all'")
    out, clock = Path(args.out), Stopwatch()
    out.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names, 1):
        print(f"\n=== [{i}/{len(names)}] {name} ===", flush=True)
        code = load(name).main(forwarded(args, name) + ["--out", str(out / name)])
        if code != 0:
            raise ValueError(f"project {name} failed (exit code {code}); its error is printed above")
    results = collect(out)
    write_index(out, results)
    print(f"\n{len(names)} project(s) in {format_seconds(clock.elapsed())}; {len(results)} in {out / 'index.html'}")


def collect(out: Path) -> list[dict]:
    """The metrics.json of every project with a run in OUT, in the tutorial's order."""
    return [read_metrics(out / name) for name in PROJECTS if (out / name / "metrics.json").is_file()]


def rebuild_index(args) -> None:
    out = Path(args.out)
    results = collect(out)
    if not results:
        raise ValueError(f"{out} holds no project runs (no {out}/<project>/metrics.json); run some with "
                         "`python -m demos.projects run NAME ... --out DIR` first")
    write_index(out, results)
    print(f"{len(results)} project(s): {out / 'index.html'}")


def write_index(out: Path, results: list[dict]) -> None:
    report = Report("minigpt: the tutorial's projects, measured")
    report.text("Each project ran its task before and after the technique, with the same inputs and seeds, and "
                "measured both with a yardstick nobody here wrote. Every number below comes from these runs.")
    rows = []
    for r in results:
        better = "higher" if r["higher_is_better"] else "lower"
        won = (r["after"] > r["before"]) if r["higher_is_better"] else (r["after"] < r["before"])
        rows.append((r["project"], r["metric"], f"{better} is better", _fmt(r["before"]), _fmt(r["after"]),
                     "yes" if won else "no", r["model"], r["n"], format_seconds(r["seconds"])))
    report.table(("project", "metric", "", "before", "after", "after better?", "model", "n", "time"), rows)
    for r in results:
        report.heading(r["project"], 2)
        figure = out / r["project"] / "metric.png"
        if figure.is_file():  # beside index.html too, for report.md's links (the HTML embeds it anyway)
            copy = out / f"{r['project']}-metric.png"
            copy.write_bytes(figure.read_bytes())
            report.image(copy, f"{r['project']}: {r['metric']} before and after")
        table = r.get("extra", {}).get("table")
        if table:  # a project that compares several methods (steering) shows its whole table, not only before/after
            keys = [k for k in table[0] if k not in ("key", "note")]
            report.table(keys, [[_cell(row.get(k)) for k in keys] for row in table])
    report.write(out)
    (out / "summary.json").write_text(json.dumps({"projects": results}, indent=2) + "\n", encoding="utf-8")


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _cell(x) -> str:
    """One cell of a project's own table: numbers to 4 significant digits, flags as yes/no."""
    if isinstance(x, bool):
        return "yes" if x else "no"
    return _fmt(x) if isinstance(x, (int, float)) or x is None else str(x)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in (None, "list"):
        return run_command(list_projects)
    if args.command == "index":
        return run_command(lambda: rebuild_index(args))
    return run_command(lambda: run_projects(args), out=args.out)


if __name__ == "__main__":
    sys.exit(main())
