"""The layout rules of README.md's map of the package, checked on the source: no import circles, no command
line inside library modules, the one direction of imports (techniques -> minigpt's public names), and the
demos' shape: the tutorial's projects are leaves (none imports another; what they share is in demos/kits),
the tour's steps too (one module each; what they share is in demos/tour/context.py and shared.py), and the
kits import no project and not the tour."""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("minigpt", "techniques", "demos")
LIBRARY = ("minigpt", "techniques")   # library packages: their modules have no command line
# Modules that are command lines (they compose the pieces and may use argparse).
COMMANDS = {"minigpt.__main__", "minigpt.cli", "minigpt.check", "techniques.lora.__main__",
            "techniques.prefix.__main__", "techniques.pplm.__main__", "techniques.grpo.__main__",
            "demos.playground.__main__"}
# demos/projects/: every module is a project, except the frame the projects share and the runner.
NOT_PROJECTS = {"demos.projects.common", "demos.projects.__main__"}
# demos/tour/: one module per step of the tour.
TOUR_STEPS = {"demos.tour.next_token", "demos.tour.attention", "demos.tour.lora", "demos.tour.prefix",
              "demos.tour.pplm", "demos.tour.hybrid"}


def project_modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that `name` imports, anywhere in the file (lazy imports included)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule sub when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # a.b.c -> the nearest project module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_the_expected_modules_exist():
    mods = project_modules()
    for m in ("minigpt.past", "minigpt.cli", "minigpt.config", "techniques.lora.lora", "techniques.lora.peft_files",
              "techniques.prefix.prefix", "techniques.pplm.pplm", "techniques.pplm.attributes", *COMMANDS):
        assert m in mods, m


def test_no_import_circles():
    g = graph()
    done, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError("import circle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in done:
            return
        stack.append(m)
        for n in sorted(g[m]):
            # a package's own submodules are its parts, not a circle back to it
            if not n.startswith(m + "."):
                visit(n)
        stack.pop()
        done.add(m)

    for m in sorted(g):
        visit(m)


def demo_projects(modules) -> set[str]:
    """The tutorial's projects: the modules of demos/projects/ less NOT_PROJECTS."""
    return {m for m in modules if m.startswith("demos.projects.") and m not in NOT_PROJECTS}


def test_library_modules_have_no_command_line():
    for name, path in project_modules().items():
        if name in COMMANDS or not name.startswith(LIBRARY):
            continue
        source = path.read_text(encoding="utf-8")
        assert "argparse" not in source, f"{path} is a library module but uses argparse"
        assert "def main(" not in source, f"{path} is a library module but has a main()"


def test_imports_go_one_way():
    for name, deps in graph().items():
        if name.startswith("techniques") and name not in COMMANDS:
            minigpt_deps = {d for d in deps if d.startswith("minigpt")}
            assert minigpt_deps <= {"minigpt"}, (f"{name} reaches into {minigpt_deps - {'minigpt'}}; "
                                                 "use minigpt's public names")
        if name.startswith("minigpt") and name not in COMMANDS:
            assert not any(d.startswith("techniques") for d in deps), f"library module {name} imports techniques"


def test_projects_are_leaves():
    g = graph()
    projects = demo_projects(g)
    assert {"demos.projects.poetry", "demos.projects.table_to_text", "demos.projects.sentiment_story",
            "demos.projects.hybrid"} <= projects
    for name in sorted(projects):
        siblings = g[name] & projects
        assert not siblings, (f"project {name} imports the project(s) {', '.join(sorted(siblings))}; a project "
                              "is a leaf: move what it shares into demos/kits (or demos/projects/common.py)")


def test_tour_steps_are_leaves():
    g = graph()
    assert TOUR_STEPS <= set(g)
    for name in sorted(TOUR_STEPS):
        siblings = g[name] & TOUR_STEPS
        assert not siblings, (f"tour step {name} imports the step(s) {', '.join(sorted(siblings))}; a step reads "
                              "what an earlier one left on the TourContext, and what steps share lives in "
                              "demos/tour/context.py or shared.py")


def test_kits_import_no_project_and_not_the_tour():
    g = graph()
    kits = {m for m in g if m == "demos.kits" or m.startswith("demos.kits.")}
    assert {"demos.kits", "demos.kits.lora", "demos.kits.prefix", "demos.kits.pplm", "demos.kits.data",
            "demos.kits.measures"} <= kits
    for name in sorted(kits):
        bad = {d for d in g[name] if d.startswith(("demos.projects", "demos.tour.")) or d == "demos.tour"}
        assert not bad, f"kit {name} imports {', '.join(sorted(bad))}; kits sit below the projects and the tour"


def test_ruff_finds_nothing():
    """pyproject.toml's ruff rules (syntax errors, pyflakes' unused or undefined names, 120 columns) hold
    for every Python file in the tree."""
    pytest.importorskip("ruff")
    from ruff.__main__ import find_ruff_bin
    proc = subprocess.run([find_ruff_bin(), "check", ".", "--output-format", "concise", "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
