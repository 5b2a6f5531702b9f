"""python -m demos.projects: the list, and a run of two projects into one index."""
from __future__ import annotations

import json

import importlib
import pkgutil

import pytest

import demos.projects
from demos.projects import PROJECT_NAMES, load, load_all
from demos.projects.__main__ import main
from demos.projects.common import Project

NOT_PROJECTS = {"common", "__main__"}


def test_every_module_in_the_folder_is_a_listed_project():
    """A project declares itself once, as PROJECT in its module: the folder and the list agree, and no
    module keeps a second declaration (module-level TECHNIQUE/NEEDS/main beside the record)."""
    found = {m.name for m in pkgutil.iter_modules(demos.projects.__path__)} - NOT_PROJECTS
    assert found == set(PROJECT_NAMES)
    for name in PROJECT_NAMES:
        module = importlib.import_module(f"demos.projects.{name}")
        assert isinstance(module.PROJECT, Project)
        assert not {"TECHNIQUE", "NEEDS", "TRAINS", "main", "build_parser"} & set(vars(module)), name


def test_every_project_follows_the_contract():
    for name, p in zip(PROJECT_NAMES, load_all()):
        assert p.name == name and p.title and p.technique and isinstance(p.needs, tuple)
        assert set(p.sizes) == {"full", "quick", "smoke"}
        assert callable(p.run) and callable(p.main)


def test_an_unknown_project_is_named():
    with pytest.raises(ValueError, match="unknown project 'nope'; choose from sentiment_story"):
        load("nope")


def test_list_names_every_project(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for p in load_all():
        assert p.name in out and p.title in out


def test_run_writes_one_index_of_the_runs(tmp_path, capsys):
    out = tmp_path / "projects"
    assert main(["run", "poetry", "hiring_ad", "--smoke", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["project"] for r in summary["projects"]] == ["hiring_ad", "poetry"]   # the tutorial's order
    for r in summary["projects"]:
        assert r["model"] == "micro-random" and r["n"] > 0
        assert json.loads((out / r["project"] / "metrics.json").read_text()) == r
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "hiring_ad" in page
    # a later run into the same folder joins the page; `index` rebuilds it from the folder alone
    assert main(["run", "scifi", "--smoke", "--out", str(out)]) == 0
    assert [r["project"] for r in json.loads((out / "summary.json").read_text())["projects"]] == \
        ["hiring_ad", "poetry", "scifi"]
    (out / "index.html").unlink()
    assert main(["index", "--out", str(out)]) == 0
    assert (out / "index.html").read_text().count("data:image/png;base64,") == 3


def test_index_of_an_empty_folder_is_one_line(tmp_path, capsys):
    assert main(["index", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path} holds no project runs") and err.count("\n") == 1


def test_unknown_project_is_one_line(tmp_path, capsys):
    assert main(["run", "nope", "--smoke", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown project(s) nope") and err.count("\n") == 1
