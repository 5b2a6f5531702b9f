"""The steering comparison (demos/projects/steering.py) and --prompts FILE on the projects that take openings.

On the micro random model (--smoke) the numbers mean nothing: these tests check that the whole table runs and is
written (every row, every column, finite where it must be), that the rows share seeds (BR's candidate 0 is B's own
sample, so BR's head rating can only be at least B's), that --prompts feeds the user's openings in, and that bad
input (an empty prompts file, k < 1, a head trained for another width) is one line.
"""
from __future__ import annotations

import json
import math

import pytest

from demos.projects import hiring_ad, hybrid, hypothesis, poetry, sentiment_story, steering
from helpers import PNG_MAGIC, check_project_contract
from techniques import pplm

COLUMNS = {"method", "key", "vader_mean", "vader_positive_share", "head_accuracy", "head_is_steering_signal",
           "perplexity_unsteered", "perplexity_judge", "dist_1", "dist_2", "dist_3", "seconds_per_sample",
           "train_seconds", "extra_parameters", "note"}
ROWS = ["B", "BR", "BC_bag", "BC_discrim", "BCR", "WD", "JAM", "LoRA_GRPO"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("steering")
    return steering.PROJECT.main(["--smoke", "--out", str(out), "--seed", "1", "--no-progress"]), out


def one_line_error(capsys, code: int, *words: str) -> str:
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def test_smoke_writes_the_whole_table(smoke):
    code, out = smoke
    metrics = check_project_contract(steering.PROJECT, code, out)
    table = metrics["extra"]["table"]
    assert [r["key"] for r in table] == ROWS
    for r in table:
        assert set(r) == COLUMNS
        for k in ("vader_mean", "vader_positive_share", "head_accuracy", "dist_1", "dist_2", "dist_3",
                  "seconds_per_sample", "train_seconds", "perplexity_unsteered"):
            assert isinstance(r[k], float) and math.isfinite(r[k]), (r["key"], k)
        assert 0 <= r["dist_1"] <= 1 and -1 <= r["vader_mean"] <= 1 and r["perplexity_unsteered"] > 1
        assert r["perplexity_judge"] is None                  # --smoke: no larger model
    by = {r["key"]: r for r in table}
    assert metrics["before"] == by["B"]["vader_mean"] and metrics["after"] == by["JAM"]["vader_mean"]
    assert {k for k, r in by.items() if r["head_is_steering_signal"]} == {"BR", "BC_discrim", "BCR", "JAM", "LoRA_GRPO"}
    assert by["B"]["extra_parameters"] == 0 and by["JAM"]["extra_parameters"] == 2 * 32 + 2
    assert by["LoRA_GRPO"]["extra_parameters"] > 0 and by["LoRA_GRPO"]["train_seconds"] > 0
    assert "not available" not in (out / "table.md").read_text() and "GRPO reward" in metrics["extra"]["lora_grpo"]
    assert (out / "steering.png").read_bytes().startswith(PNG_MAGIC)
    assert "# Every method, the same samples" in (out / "samples.md").read_text()



def test_index_page_shows_the_whole_table(smoke, tmp_path):
    from demos.projects.__main__ import write_index
    code, out = smoke
    metrics = json.loads((out / "metrics.json").read_text())
    write_index(tmp_path, [metrics])
    page = (tmp_path / "index.html").read_text()
    for r in metrics["extra"]["table"]:                    # every method's row and its VADER mean, as measured
        assert r["method"] in page and f"{r['vader_mean']:.4g}" in page
    assert "head_is_steering_signal" in page and "dist_3" in page

def test_reranking_is_at_least_its_first_candidate(smoke):
    """BR's candidate 0 is B's own sample and BCR's is BC (bag)'s, and reranking keeps the candidate the head rates
    highest: per sample the head's p(positive) can only rise, so its accuracy (p >= 0.5) can only rise too."""
    code, out = smoke
    by = {r["key"]: r for r in json.loads((out / "metrics.json").read_text())["extra"]["table"]}
    assert by["BR"]["head_accuracy"] >= by["B"]["head_accuracy"]
    assert by["BCR"]["head_accuracy"] >= by["BC_bag"]["head_accuracy"]
    head = pplm.load_discriminator(out / "discriminator")
    assert code == 0 and head.class_names == ["negative", "positive"]


def test_own_prompts_reach_every_project_that_takes_openings(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("# my openings\nThe lighthouse keeper counted the ships\n\nA parcel came for my aunt\n")
    for project in (steering.PROJECT, sentiment_story.PROJECT, hiring_ad.PROJECT, hypothesis.PROJECT, poetry.PROJECT):
        out = tmp_path / project.name
        quiet = [] if project is poetry.PROJECT else ["--no-progress"]   # poetry has no progress option
        args = ["--smoke", "--out", str(out), "--seed", "1", *quiet, "--prompts", str(f)]
        assert project.main(args) == 0, project.name
        samples = (out / "samples.md").read_text()
        assert "The lighthouse keeper counted the ships" in samples and "A parcel came for my aunt" in samples
        assert json.loads((out / "metrics.json").read_text())["n"] >= 2


def test_own_prompts_reach_hybrid_before_its_model_loads(tmp_path, capsys):
    """hybrid takes openings too; its --smoke trains two adapters (minutes on a loaded 2-core CPU), so this checks
    the seam it shares with the others: --prompts parsed, the file read by its preflight into the openings its run
    uses (hybrid.run: `openings = own or neutral_openings(...)`), and an empty file refused in one line."""
    f = tmp_path / "mine.txt"
    f.write_text("# my openings\nThe lighthouse keeper counted the ships\n\nA parcel came for my aunt\n")
    args = hybrid.PROJECT.build_parser().parse_args(["--smoke", "--prompts", str(f)])
    _, own = hybrid.preflight(args, hybrid.SIZES["smoke"])
    assert own == ["The lighthouse keeper counted the ships", "A parcel came for my aunt"]
    _, none = hybrid.preflight(hybrid.PROJECT.build_parser().parse_args(["--smoke"]), hybrid.SIZES["smoke"])
    assert none is None
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    code = hybrid.PROJECT.main(["--smoke", "--out", str(tmp_path / "o"), "--prompts", str(empty)])
    one_line_error(capsys, code, "holds no openings")
    assert not (tmp_path / "o").exists()


def test_bad_input_is_one_line(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    base = ["--smoke", "--out", str(tmp_path / "o"), "--no-progress"]
    one_line_error(capsys, steering.PROJECT.main([*base, "--prompts", str(empty)]), "holds no openings")
    one_line_error(capsys, steering.PROJECT.main([*base, "--prompts", str(tmp_path / "nope.txt")]), "no such file")
    one_line_error(capsys, steering.PROJECT.main([*base, "--rerank", "0"]), "K must be >= 1")
    wide = tmp_path / "wide"
    pplm.Discriminator(64, ["negative", "positive"]).save(wide)
    one_line_error(capsys, steering.PROJECT.main([*base, "--discrim", str(wide)]), "n_embd=64", "n_embd=32")
    assert not (tmp_path / "o").exists()
