"""The prefix-tuning projects of issue 10 (summarizer, explainer, table_to_text, squad_qa) on the micro random
model (--smoke).

A random model's numbers mean nothing, so the end-to-end tests check that each project runs and writes what it
promises (metrics.json with exactly the contract's keys and finite numbers, samples.md, metric.png, its adapter),
that a saved prefix loads back (--prefix) and gives the same "after", and that bad inputs are one-line errors.
The yardsticks written here are checked against their definitions on hand-worked cases: SQuAD v1.1's
normalisation, exact match and F1 (the values the official evaluate-v1.1.py gives), Flesch reading ease, and
BLEU with a different number of references per input.
"""
from __future__ import annotations

import json
import math

import pytest

from demos.kits import e2e_prompt, group_by_mr
from demos.projects import explainer, squad_qa, summarizer, table_to_text
from demos.projects.squad_qa import best_over_gold, exact_match, f1, normalize, squad_scores
from helpers import PNG_MAGIC, check_project_contract, help_text, smoke_runs_of

PROJECTS = tuple(m.PROJECT for m in (summarizer, explainer, table_to_text, squad_qa))


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Each project once with --smoke: {name: (exit code, out folder)}."""
    return smoke_runs_of(PROJECTS, tmp_path_factory, "--no-progress")


@pytest.mark.parametrize("project", PROJECTS, ids=lambda p: p.name)
def test_smoke_run_writes_the_contract(smoke_runs, project):
    code, out = smoke_runs[project.name]
    metrics = check_project_contract(project, code, out)
    assert metrics["higher_is_better"] is True
    assert (out / "loss.png").read_bytes().startswith(PNG_MAGIC)


def test_smoke_runs_report_their_extra_numbers(smoke_runs):
    extra = {name: json.loads((out / "metrics.json").read_text())["extra"] for name, (_, out) in smoke_runs.items()}
    for k in ("rouge1_before", "rouge1_after", "rouge2_before", "rouge2_after", "rougeL_before", "rougeL_after"):
        assert math.isfinite(extra["summarizer"][k]), k
    for k in ("loss_simple_before", "loss_simple_after", "loss_expert_before", "loss_expert_after"):
        assert math.isfinite(extra["explainer"][k]), k
    assert extra["squad_qa"]["em_before"] >= 0 and extra["squad_qa"]["em_after"] >= 0
    assert extra["table_to_text"]["paper_bleu"]["prefix-tuning (0.1%), GPT-2 medium, arXiv v1 Table 1"] == 69.7
    assert extra["table_to_text"]["decoding"] == "beam 5"
    for k in ("greedy_bleu_before", "greedy_bleu_after"):
        assert 0 <= extra["table_to_text"][k] <= 100, k


def test_explainer_gap_without_prefixes_is_zero(smoke_runs):
    """Both levels ask the same prompt with the same seeds, so the unprefixed model's gap is exactly 0."""
    metrics = json.loads((smoke_runs["explainer"][1] / "metrics.json").read_text())
    assert metrics["before"] == 0.0
    assert metrics["extra"]["flesch_simple_no_prefix"] == metrics["extra"]["flesch_expert_no_prefix"]
    assert (smoke_runs["explainer"][1] / "readability.png").read_bytes().startswith(PNG_MAGIC)


def test_smoke_runs_save_their_prefixes(smoke_runs):
    for name in ("summarizer", "table_to_text", "squad_qa"):
        config = json.loads((smoke_runs[name][1] / "adapter" / "adapter_config.json").read_text())
        assert config["peft_type"] == "PREFIX_TUNING", name
    for level in explainer.LEVELS:
        config = json.loads((smoke_runs["explainer"][1] / "adapter" / level / "adapter_config.json").read_text())
        assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 10


@pytest.mark.parametrize("name", ["table_to_text", "explainer"])
def test_a_saved_prefix_loads_back(smoke_runs, name, tmp_path):
    """--prefix OUT/adapter gives exactly the trained prefix: the same held-out loss and score after."""
    project = {"table_to_text": table_to_text, "explainer": explainer}[name].PROJECT
    first = json.loads((smoke_runs[name][1] / "metrics.json").read_text())
    code = project.main(["--smoke", "--out", str(tmp_path), "--seed", "1", "--no-progress", "--prefix",
                         str(smoke_runs[name][1] / "adapter")])
    assert code == 0
    again = json.loads((tmp_path / "metrics.json").read_text())
    assert again["before"] == first["before"] and again["after"] == pytest.approx(first["after"], abs=1e-9)
    loss_keys = [k for k in first["extra"] if k.startswith("loss") and k.endswith("after")]
    assert loss_keys
    for k in loss_keys:
        assert again["extra"][k] == pytest.approx(first["extra"][k], rel=1e-4), k
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "loss.png").exists()  # nothing trained


@pytest.mark.parametrize("project", PROJECTS, ids=lambda p: p.name)
def test_help_names_the_options_and_the_extra(project, capsys):
    text = help_text(project, capsys)
    for flag in ("--model", "--weights", "--out", "--smoke", "--quick", "--prefix", "--num-virtual-tokens"):
        assert flag in text, flag
    assert ('pip install -e ".[demos]"' in text) == bool(project.needs)
    assert all(package in text for package in project.needs)
    assert project.technique == "prefix tuning"


def _one_line_error(code, capsys, *words) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


@pytest.mark.parametrize("project", PROJECTS, ids=lambda p: p.name)
def test_a_missing_prefix_folder_is_one_line(project, tmp_path, capsys):
    code = project.main(["--smoke", "--out", str(tmp_path / "out"), "--prefix", str(tmp_path / "nowhere")])
    _one_line_error(code, capsys, "nowhere", "does not exist", "nothing was saved")
    assert not (tmp_path / "out").exists()


def test_a_lora_adapter_as_prefix_is_one_line(tmp_path, capsys):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM"}))
    code = table_to_text.PROJECT.main(["--smoke", "--out", str(tmp_path / "out"), "--prefix", str(tmp_path / "lora")])
    _one_line_error(code, capsys, "LORA")


def test_bad_squad_files_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": "c", "qas": [{"id": "q", "question": "why?", "answers": []}]}]}]}))
    code = squad_qa.PROJECT.main(["--smoke", "--out", str(tmp_path / "out"), "--data", str(bad)])
    _one_line_error(code, capsys, str(bad), "data[0].paragraphs[0].qas[0]", "answers")
    bad.write_text("{not json")
    code = squad_qa.PROJECT.main(["--smoke", "--out", str(tmp_path / "out"), "--data", str(bad)])
    _one_line_error(code, capsys, str(bad), "not valid JSON")
    code = squad_qa.PROJECT.main(["--smoke", "--out", str(tmp_path / "out"), "--data", str(tmp_path / "none.json")])
    _one_line_error(code, capsys, "none.json", "not found")
    assert not (tmp_path / "out").exists()


def test_a_missing_e2e_folder_is_one_line(tmp_path, capsys):
    code = table_to_text.PROJECT.main(["--smoke", "--out", str(tmp_path / "out"), "--data", str(tmp_path)])
    _one_line_error(code, capsys, "devset.csv", "is missing")


# ---- SQuAD v1.1's metric, on cases worked by hand from the official script's definition ------------------------
@pytest.mark.parametrize("text, expected", [
    ("The Denver Broncos!", "denver broncos"),
    ("  An   apple,\ta day  ", "apple day"),
    ("the-cat", "thecat"),              # punctuation goes first, so the glued "the" is no longer a word
    ("Theatre and Anthem", "theatre and anthem"),   # articles only as whole words
    ("A.M. (local time)", "am local time"),
    ("Ludwig van Beethoven's", "ludwig van beethovens"),
    ("", ""),
])
def test_squad_normalisation(text, expected):
    assert normalize(text) == expected


def test_squad_exact_match_and_f1_by_hand():
    assert exact_match("the Ming dynasty", "Ming Dynasty.") == 1.0
    assert exact_match("Ming", "Ming dynasty") == 0.0
    assert exact_match("the", "") == 1.0                            # both normalise to the empty string
    assert f1("Denver Broncos won", "Denver Broncos") == pytest.approx(0.8)        # P 2/3, R 1
    assert f1("the cat the cat", "a cat") == pytest.approx(2 / 3)                  # bags: P 1/2, R 1
    assert f1("in 1368 to 1644", "from 1368 to 1644") == pytest.approx(0.75)       # P 3/4, R 3/4
    assert f1("dog", "cat") == 0.0
    assert f1("", "") == 0.0                                        # v1.1: no shared token -> 0
    assert best_over_gold(f1, "Ming", ["the Ming dynasty", "Ming"]) == 1.0
    assert best_over_gold(exact_match, "dynasty", ["the Ming dynasty", "Ming"]) == 0.0


def test_squad_totals_are_means_times_100():
    em, score = squad_scores(["Ming dynasty", "1987"], [["the Ming dynasty"], ["in 1987", "1987"]])
    assert (em, score) == (100.0, 100.0)
    em, score = squad_scores(["Denver Broncos won", "x"], [["Denver Broncos"], ["y"]])
    assert em == 0.0 and score == pytest.approx(40.0)
    with pytest.raises(ValueError):
        squad_scores(["a"], [["a"], ["b"]])


def test_squad_loader_reads_the_official_layout_and_splits_by_title(tmp_path):
    data = {"version": "1.1", "data": [
        {"title": f"T{a}", "paragraphs": [{"context": f"Context {a} says {a}.", "qas": [
            {"id": f"{a}-{q}", "question": f"What does {a} say?",
             "answers": [{"text": f"{a}", "answer_start": len(f"Context {a} says ")}, {"text": f"says {a}",
                                                                                      "answer_start": 10}]}
            for q in range(2)]}]}
        for a in range(5)]}
    path = tmp_path / "dev-v1.1.json"
    path.write_text(json.dumps(data))
    questions = squad_qa.load_squad(path)
    assert len(questions) == 10 and questions[0].answers == ["0", "says 0"] and questions[0].title == "T0"
    assert questions[3].context[questions[3].answer_start:].startswith(questions[3].answers[0])
    train, test = squad_qa.split_questions(questions, None)                       # no splits file: 80/20
    assert {q.title for q in train} == {"T0", "T1", "T2", "T3"} and {q.title for q in test} == {"T4"}
    train, test = squad_qa.split_questions(questions, {"train": ["T1"], "test": ["T0", "T2"]})
    assert len(train) == 2 and len(test) == 4
    with pytest.raises(ValueError, match="0 training"):
        squad_qa.split_questions(questions, {"train": ["nope"], "test": ["T0"]})


# ---- Flesch reading ease and BLEU --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dic():
    import pyphen
    return pyphen.Pyphen(lang="en_US")


def test_flesch_reading_ease_is_the_1948_formula(dic):
    # 6 one-syllable words in 2 sentences: 206.835 - 1.015 * 3 - 84.6 * 1
    assert explainer.flesch_reading_ease("The cat sat. The dog ran.", dic) == pytest.approx(119.19)
    # "gravity" gra-vi-ty (3), "pulls" (1), "objects" ob-jects (2): 3 words, 6 syllables, 1 unfinished sentence
    assert [explainer.count_syllables(w, dic) for w in ("gravity", "pulls", "objects")] == [3, 1, 2]
    assert explainer.flesch_reading_ease("Gravity pulls objects", dic) == pytest.approx(
        206.835 - 1.015 * 3 - 84.6 * 6 / 3)
    assert explainer.flesch_reading_ease("  3.5 !! ", dic) is None


@pytest.mark.parametrize("text, sentences", [
    ("One. Two! Three?", 3), ("It is 3.5 m long. Then", 2), ("No end at all", 1), ("Quoted (\"yes.\") done.", 2),
    ("", 0), ("Wait...", 1)])
def test_sentence_count(text, sentences):
    assert explainer.count_sentences(text) == sentences


def test_corpus_bleu_takes_every_reference():
    import sacrebleu
    refs = [["a dog barked loudly at night", "the cat sat on the mat"], ["it was a sunny day in the park"]]
    assert table_to_text.corpus_bleu(sacrebleu, ["the cat sat on the mat", "it was a sunny day in the park"],
                                     refs) == pytest.approx(100.0)
    one_ref = table_to_text.corpus_bleu(sacrebleu, ["the cat sat on the mat", "it was a sunny day in the park"],
                                        [[r[0]] for r in refs])
    assert one_ref < 100.0


def test_e2e_groups_references_by_input():
    rows = [("a[1]", "x"), ("b[2]", "y"), ("a[1]", "z")]
    assert group_by_mr(rows) == {"a[1]": ["x", "z"], "b[2]": ["y"]}
    assert e2e_prompt("name[X]") == " name[X] <|endoftext|>"


def test_summarizer_inputs():
    assert summarizer.detokenize("Recognition ( NER ) systems , which work .") == \
        "Recognition (NER) systems, which work."
    assert summarizer.first_sentence(" They find X. Then Y.\nMore") == "They find X."
    assert summarizer.first_sentence("no end\nsecond line") == "no end"
    from minigpt import get_tokenizer
    tok = get_tokenizer()
    sents = ["First sentence is here.", "Second one.", "Third and last."]
    assert summarizer.fit_abstract(tok, sents, 100) == " ".join(sents)
    assert summarizer.fit_abstract(tok, sents, len(tok.encode(" Second one. Third and last."))) == \
        "Second one. Third and last."                              # whole sentences, dropped from the start
    assert len(tok.encode(" " + summarizer.fit_abstract(tok, ["word " * 50], 10))) <= 11
