"""The PPLM projects of issue 10 (sentiment story, hiring advert, scientific hypothesis), on the micro random
model (--smoke).

A random model's numbers mean nothing, so the end-to-end tests check that each project runs and writes what it
promises (metrics.json with exactly the contract's keys and finite numbers, samples.md, metric.png), that the
discriminator a run saves loads back (--discrim DIR), and that the errors a user can make are one line. The pieces
with their own logic are checked against their definitions: the same seed per sample (an unperturbed PPLM sample
is minigpt.generate's), the stems-to-tokens expansion of the masculine-coded list, the word count genderdecoder3
uses, the ACLSum prompts and the perplexity of a continuation.
"""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from demos.kits import continuations
from demos.projects import hiring_ad, hypothesis, sentiment_story
from demos.projects.common import DEMOS_EXTRA
from helpers import PNG_MAGIC, check_project_contract, help_text, smoke_runs_of
from minigpt import EOT_ID, GPT, GPTConfig, generate, get_tokenizer

PROJECTS = tuple(m.PROJECT for m in (sentiment_story, hiring_ad, hypothesis))


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Each project once with --smoke: {name: (exit code, out folder)}."""
    return smoke_runs_of(PROJECTS, tmp_path_factory, "--no-progress")


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, n_positions=128)).eval()


def one_line_error(capsys, code: int, *words: str) -> str:
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# ---- the contract ------------------------------------------------------------------------------------
@pytest.mark.parametrize("project", PROJECTS, ids=lambda p: p.name)
def test_smoke_run_writes_the_contract(smoke_runs, project):
    code, out = smoke_runs[project.name]
    check_project_contract(project, code, out)


@pytest.mark.parametrize("project", PROJECTS, ids=lambda p: p.name)
def test_help_names_the_options_and_the_extra(project, capsys):
    text = help_text(project, capsys)
    for option in ("--model", "--weights", "--out", "--smoke", "--quick"):
        assert option in text, option
    assert DEMOS_EXTRA in text and project.needs[0] in text


def test_each_project_writes_its_own_numbers(smoke_runs):
    s = json.loads((smoke_runs["sentiment_story"][1] / "metrics.json").read_text())
    assert s["metric"] == "VADER compound (mean)" and s["higher_is_better"] is True
    assert -1 <= s["before"] <= 1 and -1 <= s["after"] <= 1
    assert 0 <= s["extra"]["discriminator_dev_accuracy"] <= 1
    # without the paper's head the bag leads and the head trained here is the second setting
    assert s["extra"]["setting"] == "PPLM bag of words (positive_words)"
    assert s["extra"]["second_setting"]["setting"].startswith("PPLM discriminator (trained here on 64 SST-2 rows)")
    assert -1 <= s["extra"]["second_setting"]["vader_compound_mean"] <= 1
    assert {"positive_share_before", "positive_share_after"} <= set(s["extra"])
    assert s["n"] == 2 * 1                                   # smoke: 2 prompts x 1 sample
    h = json.loads((smoke_runs["hiring_ad"][1] / "metrics.json").read_text())
    assert h["metric"] == "feminine- minus masculine-coded words per 100 words" and h["higher_is_better"] is True
    assert sum(h["extra"]["verdicts_before"].values()) == h["n"] == sum(h["extra"]["verdicts_after"].values())
    for when in ("before", "after"):   # the headline is the balance of the two reported rates
        assert h[when] == pytest.approx(h["extra"][f"feminine_per_100_{when}"]
                                        - h["extra"][f"masculine_per_100_{when}"])
    assert h["extra"]["mode"] == "avoid masculine-coded + attract feminine-coded"
    assert set(h["extra"]["top_words"]) == {"masculine_before", "masculine_after", "feminine_before", "feminine_after"}
    assert 0 < h["extra"]["bag_mass_per_step_before"] < 1 and 0 < h["extra"]["bag_mass_per_step_after"] < 1
    y = json.loads((smoke_runs["hypothesis"][1] / "metrics.json").read_text())
    assert y["metric"].startswith("science-bag tokens") and 0 <= y["before"] <= 100 and 0 <= y["after"] <= 100
    assert y["extra"]["perplexity_before"] > 1 and y["extra"]["perplexity_after"] > 1
    assert "own signal" in (smoke_runs["hypothesis"][1] / "samples.md").read_text().lower()


def test_the_extra_figures_and_the_bag_section(smoke_runs):
    out = smoke_runs["sentiment_story"][1]
    assert (out / "settings.png").read_bytes().startswith(PNG_MAGIC)
    assert (out / "loss.png").read_bytes().startswith(PNG_MAGIC)
    assert "# Second setting: PPLM discriminator" in (out / "samples.md").read_text()
    assert (smoke_runs["hiring_ad"][1] / "verdicts.png").read_bytes().startswith(PNG_MAGIC)
    assert (smoke_runs["hypothesis"][1] / "perplexity.png").read_bytes().startswith(PNG_MAGIC)


# ---- the discriminator -------------------------------------------------------------------------------
def test_a_saved_discriminator_loads_back(smoke_runs, tmp_path):
    saved = smoke_runs["sentiment_story"][1] / "discriminator"
    assert (saved / "discriminator.json").is_file()
    out = tmp_path / "again"
    assert sentiment_story.PROJECT.main(["--smoke", "--out", str(out), "--seed", "1", "--no-progress",
                                 "--discrim", str(saved)]) == 0
    first = json.loads((smoke_runs["sentiment_story"][1] / "metrics.json").read_text())
    again = json.loads((out / "metrics.json").read_text())
    assert again["extra"]["second_setting"]["setting"].startswith(f"PPLM discriminator (loaded from {saved})")
    # the same head, seeds and model: the same texts, so the same scores and dev accuracy
    assert again["after"] == first["after"] and again["before"] == first["before"]
    assert again["extra"]["second_setting"]["vader_compound_mean"] == first["extra"]["second_setting"][
        "vader_compound_mean"]
    assert again["extra"]["discriminator_dev_accuracy"] == pytest.approx(first["extra"]["discriminator_dev_accuracy"])
    assert not (out / "discriminator").exists()


def test_the_paper_head_on_the_wrong_model_is_one_line(tmp_path, capsys):
    code = sentiment_story.PROJECT.main(["--smoke", "--out", str(tmp_path), "--discrim", "sentiment", "--no-progress"])
    one_line_error(capsys, code, "n_embd=1024", "gpt2-medium")
    assert not (tmp_path / "metrics.json").exists()


def test_the_paper_head_leads_only_when_it_is_used():
    parse = sentiment_story.PROJECT.build_parser().parse_args
    assert sentiment_story.headline_setting(parse(["--discrim", "sentiment"])) == "discrim"
    assert sentiment_story.headline_setting(parse(["--discrim", "runs/x/discriminator"])) == "bow"
    assert sentiment_story.headline_setting(parse([])) == "bow"


def test_an_unknown_discriminator_is_one_line(tmp_path, capsys):
    code = sentiment_story.PROJECT.main(["--smoke", "--out", str(tmp_path), "--discrim", str(tmp_path / "nope")])
    one_line_error(capsys, code, "unknown discriminator", "nope")


def test_an_unknown_class_is_one_line(tmp_path, capsys):
    code = sentiment_story.PROJECT.main(["--smoke", "--out", str(tmp_path), "--class-label", "joyful", "--no-progress"])
    one_line_error(capsys, code, "joyful", "negative", "positive")


def test_a_missing_yardstick_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "vaderSentiment.vaderSentiment", None)   # import now raises ImportError
    code = sentiment_story.PROJECT.main(["--smoke", "--out", str(tmp_path)])
    one_line_error(capsys, code, "vaderSentiment", DEMOS_EXTRA)
    monkeypatch.setitem(sys.modules, "genderdecoder3", None)
    one_line_error(capsys, hiring_ad.PROJECT.main(["--smoke", "--out", str(tmp_path)]), "genderdecoder3", DEMOS_EXTRA)


def test_sst2_subsets_are_seeded_and_sized():
    a, la = sentiment_story.sst2_rows("dev.tsv", 50, seed=3)
    b, lb = sentiment_story.sst2_rows("dev.tsv", 50, seed=3)
    c, _ = sentiment_story.sst2_rows("dev.tsv", 50, seed=4)
    full, labels = sentiment_story.sst2_rows("dev.tsv", 0, seed=3)
    assert (a, la) == (b, lb) and a != c and len(a) == 50
    assert len(full) == 872 and set(labels) == {0, 1} and set(a) <= set(full)


# ---- the same seed per sample --------------------------------------------------------------------------
def test_an_unperturbed_sample_is_minigpt_generate_with_its_seed(micro):
    prompts = ["The lake", "A letter came"]
    got = continuations(micro, prompts, samples=2, seed=5, max_new_tokens=6, progress=False,
                        bow="positive_words", stepsize=0.0, do_sample=True, top_k=10)
    assert len(got.tokens) == len(got.attribute) == 4
    for k, prompt in enumerate(p for p in prompts for _ in range(2)):
        ids = torch.tensor([[EOT_ID] + get_tokenizer().encode(prompt)])
        want = generate(micro, ids, max_new_tokens=6, do_sample=True, top_k=10,
                        generator=torch.Generator().manual_seed(5 + k))
        assert got.tokens[k] == want[0, ids.size(1):].tolist(), k


# ---- the hiring advert's bag and yardstick -------------------------------------------------------------
def test_stems_expand_to_the_tokens_that_start_a_coded_word():
    tok = get_tokenizer()
    bag, missing = hiring_ad.stem_bag(["compet", "lead", "selfrelian"], "test")
    words = {tok.token_str(i) for i in bag.token_ids}
    assert {" competitive", " compete", " leader", " Leadership", " leading"} <= words
    assert not words & {" company", " complete", " competitive ", "competitive", " lea", " misleading"}
    assert all(w.startswith(" ") and w[1:].lower().startswith(("compet", "lead")) for w in words)
    assert missing == ["selfrelian"]
    # every token of the vocabulary that qualifies is in: a brute-force count over the vocabulary
    count = sum(1 for i in range(tok.vocab_size) if tok.token_str(i).startswith(" ")
                and tok.token_str(i)[1:].lower().startswith(("compet", "lead")))
    assert len(bag.token_ids) == count


def test_every_avoided_token_is_what_genderdecoder3_counts():
    import genderdecoder3
    bag, _ = hiring_ad.stem_bag(genderdecoder3.masculine_coded_words, "masculine-coded")
    tok = get_tokenizer()
    for i in bag.token_ids:
        word = tok.token_str(i).strip()
        found = genderdecoder3.assess(f"We want a {word} person")["masculine_coded_words"]
        assert found and set(found) == {word}, word


def test_word_count_and_rates_follow_genderdecoder3():
    import genderdecoder3
    text = "A leader, (driven) and kind: we want our\tteam. Ünïcode ok"
    assert hiring_ad.ad_words(text) == ["A", "leader", "driven", "and", "kind", "we", "want", "our", "team",
                                        "n", "code", "ok"]
    items = hiring_ad.assess_all(genderdecoder3, [text, "plain words only here"])
    assert [a.verdict for a in items] == ["masculine-coded", "neutral"]
    assert items[0].masculine == ["leader", "driven"] and items[0].feminine == ["kind"]
    assert hiring_ad.per_100(items, "masculine") == pytest.approx(100 * 2 / 16)
    assert hiring_ad.verdict_counts(items) == {"strongly feminine-coded": 0, "feminine-coded": 0, "neutral": 1,
                                               "masculine-coded": 1, "strongly masculine-coded": 0}
    twice = hiring_ad.assess_all(genderdecoder3, ["Kind and kind, a leader.", "kind"])
    assert hiring_ad.most_common_words(twice, "feminine") == {"kind": 3}
    assert hiring_ad.most_common_words(twice, "masculine") == {"leader": 1}


def test_the_prompts_file_is_neutral_and_has_ten_roles():
    import genderdecoder3
    rows = hiring_ad.read_prompts()
    assert len(rows) == 10 and len({r for r, _ in rows}) == 10
    for role, prompt in rows:
        assert genderdecoder3.assess(prompt)["result"] == "neutral", role


def test_a_prompt_line_without_a_tab_is_refused(tmp_path):
    bad = tmp_path / "p.txt"
    bad.write_text("# comment\nnurse: a nurse is\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        hiring_ad.read_prompts(bad)


# ---- the hypothesis prompts and perplexity ---------------------------------------------------------------
def test_challenge_prompts_are_the_first_half_of_the_test_sentences():
    from aclsum import ACLSum
    prompts = hypothesis.challenge_prompts("test")
    first = ACLSum("test")[0].summaries["challenge"].split()
    assert prompts[0] == " ".join(first[:len(first) // 2])
    assert len(prompts) == len(set(prompts)) and 90 <= len(prompts) <= 100
    assert hypothesis.challenge_prompts("test", limit=3) == prompts[:3]


def test_continuation_perplexity_is_the_models_own(micro):
    prompt, cont = "The lake", [262, 3797, 13]
    ids = [EOT_ID] + get_tokenizer().encode(prompt) + cont
    with torch.no_grad():
        logp = micro(torch.tensor([ids])).logits[0].log_softmax(-1)
    start = len(ids) - len(cont)
    want = -sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))
    nll, n = hypothesis.continuation_nll(micro, prompt, cont)
    assert n == 3 and nll == pytest.approx(want, rel=1e-5)
    pooled, each = hypothesis.perplexity(micro, [prompt], [cont, cont[:1]], samples=2)
    nll1, _ = hypothesis.continuation_nll(micro, prompt, cont[:1])
    assert pooled == pytest.approx(math.exp((nll + nll1) / 4), rel=1e-5)
    assert each == pytest.approx([math.exp(nll / 3), math.exp(nll1)], rel=1e-5)


def test_bag_share_counts_generated_tokens():
    assert hypothesis.bag_share([[1, 2, 3], [4]], {2, 4}) == 0.5
    assert hypothesis.bag_share([], {1}) == 0.0
