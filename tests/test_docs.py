"""The docs stay true: README.md and docs/*.md checked against the repository.

- every relative link resolves to a file or folder, and every #anchor to a heading of its page, by GitHub's slug
  rule (the heading's text lower-cased, punctuation other than - and _ dropped, each space a -, repeats -1, -2);
- every `python -m MODULE [SUBCOMMAND]` (or `torchrun ... -m MODULE`) written in code names a module that exists,
  and its `--help` exits 0;
- every `--option` written after such a command, on the same command line, is in that command's --help.

Each distinct command's --help runs once, in this process (runpy, argv patched), so the check costs one import of
each command module rather than one interpreter per command.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import runpy
import sys
import warnings
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_OURS = {"pytest", "pip"}  # modules of other projects: checked to exist, their --help not run

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"`([^`]+)`")
COMMAND = re.compile(r"(?:^|\s)-m\s+([A-Za-z_][\w.]*)(?=(\s|$|[^\w.]))(.*)")
OPTION = re.compile(r"(?<![\w-])--[a-z][\w-]*")


def split_fences(text: str) -> tuple[list[str], list[str]]:
    """(prose lines, code lines) of a Markdown page; fenced blocks' lines are code, with `\\` continuations joined."""
    prose, code, fenced, pending = [], [], False, ""
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            prose.append(line)
        elif line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
        else:
            code.append(pending + line)
            pending = ""
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link syntax to its text, lower case, punctuation but - and _ dropped."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(page: Path) -> frozenset[str]:
    """Every heading anchor of a Markdown page, with GitHub's -1, -2 suffixes for repeats."""
    prose, _ = split_fences(page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for line in prose:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        s = slug(m.group(1))
        n = seen.get(s, 0)
        out.add(s if n == 0 else f"{s}-{n}")
        seen[s] = n + 1
    return frozenset(out)


def links(page: Path) -> list[str]:
    """The link targets written in a page's prose (code spans blanked, so `[x](y)` in code is not a link)."""
    prose, _ = split_fences(page.read_text(encoding="utf-8"))
    return [t for line in prose for t in LINK.findall(CODE_SPAN.sub("code", line))]


def link_problem(page: Path, target: str) -> str | None:
    """Why a link does not resolve, or None when it does (web and mail links are not followed)."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):
        return None
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    if not dest.exists():
        return f"{target}: {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest} does not exist"
    if anchor:
        if dest.suffix != ".md" or dest.is_dir():
            return f"{target}: an anchor into {dest.name}, which is not a Markdown page"
        if anchor not in anchors(dest):
            return f"{target}: no heading of {dest.name} has the anchor #{anchor}"
    return None


def commands(page: Path) -> list[tuple[str, list[str]]]:
    """(module, the rest of its command line) for every `-m MODULE` in a page's code blocks and code spans."""
    text = page.read_text(encoding="utf-8")
    prose, code = split_fences(text)
    lines = code + [span for line in prose for span in CODE_SPAN.findall(line)]
    out = []
    for line in lines:
        for m in COMMAND.finditer(line):
            rest = re.split(r"\s#|&&|;", m.group(3))[0] if m.group(2).isspace() else ""
            out.append((m.group(1), rest.split()))
    return out


def invocation(module: str, rest: list[str]) -> tuple[str, str | None, list[str]]:
    """(module, subcommand or None, the options named) of one command line."""
    sub = rest[0] if rest and re.fullmatch(r"[a-z][a-z0-9-]*", rest[0]) else None
    return module, sub, OPTION.findall(" ".join(rest))


@lru_cache(maxsize=None)
def run_help(module: str, sub: str | None) -> tuple[int, str]:
    """`python -m module [sub] --help`, in this process: (exit code, the text it printed)."""
    argv, buf = sys.argv, io.StringIO()
    sys.argv = [module] + ([sub] if sub else []) + ["--help"]
    code = 0
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module was imported by another command
            runpy.run_module(module, run_name="__main__", alter_sys=False)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return code, buf.getvalue()


def all_invocations() -> dict[tuple[str, str | None], set[str]]:
    """Each distinct (module, subcommand) the pages name, with every option named after it."""
    found: dict[tuple[str, str | None], set[str]] = {}
    for page in PAGES:
        for module, rest in commands(page):
            module, sub, options = invocation(module, rest)
            found.setdefault((module, sub), set()).update(f"{page.name}: {o}" for o in options)
    return found


def test_the_pages_exist_and_the_front_door_is_short():
    names = {p.name for p in PAGES}
    assert {"README.md", "lora.md", "prefix.md", "pplm.md", "decoding.md", "training.md", "projects.md",
            "benchmarks.md", "weights.md"} <= names
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 260


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_and_anchor_resolves(page):
    bad = [p for t in links(page) if (p := link_problem(page, t))]
    assert not bad, f"{page.name}: " + "; ".join(bad)


def test_every_docs_page_is_linked_from_the_readme():
    targets = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md")}
    assert not [p.name for p in PAGES[1:] if p not in targets]


def test_every_command_named_exists_and_its_help_exits_0_and_lists_its_options():
    found = all_invocations()
    assert ("techniques.lora", "train") in found and ("minigpt", "check") in found  # the scan sees commands
    problems = []
    for (module, sub), options in sorted(found.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
            problems.append(f"python -m {module}: no such module")
            continue
        if module.split(".")[0] in NOT_OURS:
            continue
        code, text = run_help(module, sub)
        if code != 0:
            problems.append(f"python -m {module} {sub or ''} --help exited {code}: {text.strip()[-300:]}")
            continue
        for where_opt in sorted(options):
            where, opt = where_opt.split(": ")
            if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text):
                problems.append(f"{where}: python -m {module} {sub or ''} has no option {opt} in its --help")
    assert not problems, "\n".join(problems)


def test_the_checks_catch_a_broken_link_a_missing_anchor_and_an_unknown_option(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A page: `with code`\n\n[ok](#a-page-with-code) [bad](#a-page) [gone](nowhere.md)\n\n"
                    "```bash\npython -m minigpt generate \"x\" --no-such-option 3\n```\n", encoding="utf-8")
    assert [link_problem(page, t) is None for t in links(page)] == [True, False, False]
    (module, rest), = commands(page)
    assert invocation(module, rest) == ("minigpt", "generate", ["--no-such-option"])
    code, text = run_help("minigpt", "generate")
    assert code == 0 and "--max-new-tokens" in text and "--no-such-option" not in text


def test_slugs_follow_githubs_rule():
    assert slug("Training at scale: bf16, accumulation, checkpoints, several processes") == \
        "training-at-scale-bf16-accumulation-checkpoints-several-processes"
    assert slug("The tour: `python -m demos.tour`") == "the-tour-python--m-demostour"
    assert slug("Benchmark (`benchmarks/bench_prefix.py`)") == "benchmark-benchmarksbench_prefixpy"


def test_the_notebook_links_each_technique_to_its_docs_page():
    import nbformat
    nb = nbformat.read(ROOT / "demos" / "tour.ipynb", as_version=4)
    page = ROOT / "demos" / "tour.ipynb"
    targets = [t for c in nb.cells if c.cell_type == "markdown" for t in LINK.findall(CODE_SPAN.sub("code", c.source))]
    assert {"../docs/lora.md", "../docs/prefix.md", "../docs/pplm.md"} <= set(targets)
    bad = [p for t in targets if (p := link_problem(page, t))]
    assert not bad, bad
