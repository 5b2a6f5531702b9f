"""The LoRA projects of issue 10 (poetry, scifi, chemistry, hybrid), on the micro random model (--smoke).

A random model's numbers mean nothing, so the end-to-end tests check that each project runs and writes what it
promises (metrics.json with exactly the contract's keys and finite numbers, samples.md, metric.png), that a saved
adapter loads back (--lora), and that a bad adapter folder is a one-line error. The yardsticks and the one piece
of new machinery (perplexity under PPLM, teacher-forced) are checked against their definitions.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from demos.kits import Perplexity, text_perplexity
from demos.projects import chemistry, hybrid, poetry, scifi
from helpers import PNG_MAGIC, check_project_contract, help_text, smoke_runs_of
from minigpt import EOT_ID, GPT, GPTConfig, causal_lm_loss, get_tokenizer
from techniques import pplm
from techniques.prefix import PrefixTuning

PROJECTS = tuple(m.PROJECT for m in (poetry, scifi, chemistry, hybrid))


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Each project once with --smoke: {name: (exit code, out folder)}."""
    return smoke_runs_of(PROJECTS, tmp_path_factory)


@pytest.mark.parametrize("project", PROJECTS, ids=lambda p: p.name)
def test_smoke_run_writes_the_contract(smoke_runs, project):
    code, out = smoke_runs[project.name]
    check_project_contract(project, code, out)


def test_smoke_runs_save_their_adapters(smoke_runs):
    for name in ("poetry", "scifi", "chemistry"):
        out = smoke_runs[name][1]
        assert (out / "adapter" / "adapter_config.json").is_file() and (out / "loss.png").is_file(), name
    out = smoke_runs["hybrid"][1]
    assert json.loads((out / "adapter" / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert json.loads((out / "adapter" / "prefix" / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    assert (out / "ablation.png").read_bytes().startswith(PNG_MAGIC)


def test_hybrid_reports_all_eight_configurations(smoke_runs):
    out = smoke_runs["hybrid"][1]
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    rows = metrics["extra"]["ablation"]   # a list: the table's order
    assert [r["key"] for r in rows] == [c[0] for c in hybrid.CONFIGS] and len(rows) == 8
    assert len({(r["lora"], r["prefix"], r["pplm"]) for r in rows}) == 8  # every combination once
    table = {r["key"]: r for r in rows}
    for row in rows:
        for m in ("vader_compound_mean", "style_perplexity", "label_preference"):
            assert math.isfinite(row[m]), m
    assert metrics["before"] == table["none"]["vader_compound_mean"]
    assert metrics["after"] == table["all"]["vader_compound_mean"]
    samples = (out / "samples.md").read_text(encoding="utf-8")
    assert all(c[1] in samples for c in hybrid.CONFIGS)


def test_a_saved_lora_adapter_loads_back(smoke_runs, tmp_path, capsys):
    """--lora OUT/adapter gives exactly the trained adapter: the same held-out perplexity after."""
    first = json.loads((smoke_runs["poetry"][1] / "metrics.json").read_text())
    code = poetry.PROJECT.main(["--smoke", "--out", str(tmp_path), "--seed", "1", "--lora",
                        str(smoke_runs["poetry"][1] / "adapter")])
    assert code == 0
    again = json.loads((tmp_path / "metrics.json").read_text())
    assert again["after"] == pytest.approx(first["after"], rel=1e-5)
    assert again["before"] == pytest.approx(first["before"], rel=1e-6)
    assert again["after"] != again["before"]
    assert not (tmp_path / "adapter").exists()  # nothing trained, nothing saved


@pytest.mark.parametrize("project", PROJECTS, ids=lambda p: p.name)
def test_help_names_the_options_and_the_extra(project, capsys):
    text = help_text(project, capsys)
    for flag in ("--model", "--weights", "--out", "--smoke", "--lora"):
        assert flag in text, flag
    assert ('pip install -e ".[demos]"' in text) == bool(project.needs)
    assert all(package in text for package in project.needs)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("project", PROJECTS, ids=lambda p: p.name)
def test_a_missing_adapter_folder_is_one_line(project, tmp_path, capsys):
    code = project.main(["--smoke", "--out", str(tmp_path / "out"), "--lora", str(tmp_path / "nowhere")])
    assert code == 2
    err = _one_line_error(capsys)
    assert "nowhere" in err and "does not exist" in err
    assert not (tmp_path / "out").exists()


def test_hybrid_refuses_a_lora_adapter_as_prefix(smoke_runs, tmp_path, capsys):
    lora_dir = smoke_runs["hybrid"][1] / "adapter" / "lora"
    code = hybrid.PROJECT.main(["--smoke", "--out", str(tmp_path), "--prefix", str(lora_dir)])
    assert code == 2
    assert "--lora" in _one_line_error(capsys)  # it names the flag that fits


def test_scifi_trains_on_exactly_100_snippets(tmp_path, monkeypatch, capsys):
    for name in ("snippets.txt", "heldout.txt", "genre_words.txt"):
        (tmp_path / name).write_text((scifi.DATA / name).read_text(encoding="utf-8"), encoding="utf-8")
    lines = (tmp_path / "snippets.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 100 == len(scifi.read_snippets())
    (tmp_path / "snippets.txt").write_text("\n".join(lines[:99]) + "\n", encoding="utf-8")
    monkeypatch.setattr(scifi, "DATA", tmp_path)
    assert scifi.PROJECT.main(["--smoke", "--out", str(tmp_path / "out")]) == 2
    assert "99 snippets" in _one_line_error(capsys)


# ---- the yardsticks against their definitions ---------------------------------------------------------
@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64)).eval()


def test_text_perplexity_is_exp_of_the_token_mean_cross_entropy(micro):
    tok = get_tokenizer()
    texts = [" the moon is high", " and a long road runs over the hills to the sea", " oh"]
    got = text_perplexity(micro, texts, batch_size=2)   # padded batches
    nll, n = 0.0, 0
    for text, own in zip(texts, got.per_text):
        ids = torch.tensor([[EOT_ID] + tok.encode(text)])
        with torch.no_grad():
            mean = causal_lm_loss(micro(ids).logits, ids).item()  # every token after the EOT, one text alone
        k = ids.size(1) - 1
        assert own == pytest.approx(math.exp(mean), rel=1e-4)
        nll, n = nll + mean * k, n + k
    assert got.tokens == n
    assert got.value == pytest.approx(math.exp(nll / n), rel=1e-4)  # token-weighted, not a mean of per-text means
    assert got.value != pytest.approx(sum(got.per_text) / len(got.per_text), rel=1e-3)


def test_text_perplexity_scores_only_the_text_after_its_context(micro):
    one = text_perplexity(micro, [" and the sea"], ["<|endoftext|> the river"])
    tok = get_tokenizer()
    ctx, text = [EOT_ID] + tok.encode(" the river"), tok.encode(" and the sea")
    ids = torch.tensor([ctx + text])
    with torch.no_grad():
        loss = causal_lm_loss(micro(ids).logits, ids, torch.tensor([[0] * len(ctx) + [1] * len(text)])).item()
    assert one.tokens == len(text) and one.value == pytest.approx(math.exp(loss), rel=1e-4)


def _bag_rows(model):
    bag = pplm.load_bag("positive_words", get_tokenizer())
    rows = torch.zeros(1, model.config.vocab_size)
    rows[0, bag.token_ids] = 1
    return bag, rows


@pytest.mark.parametrize("with_prefix", [False, True])
def test_pplm_perplexity_follows_pplm_generation(micro, with_prefix):
    """Teacher-forcing PPLM's own greedy text gives back its tokens as the argmax at every step: the scorer
    runs exactly PPLM's steps (perturbed past carried forward, prefix in front)."""
    bag, rows = _bag_rows(micro)
    torch.manual_seed(1)
    prefix = PrefixTuning(micro.config, 4).eval() if with_prefix else None
    knobs = {**hybrid.PPLM_KNOBS, "do_sample": False, "top_k": 0, "stepsize": 0.2}
    start = torch.tensor([[EOT_ID]])
    past = prefix.past_key_values(1) if prefix is not None else None
    out = pplm.generate(micro, start, bow=bag, max_new_tokens=8, past_key_values=past, **knobs)
    plain = pplm.generate(micro, start, bow=bag, max_new_tokens=8, past_key_values=past,
                          **{**knobs, "stepsize": 0.0})
    assert not torch.equal(out.sequences, plain.sequences)  # the perturbation changed the text
    _, argmax = hybrid.pplm_forced(micro, out.sequences, rows, pplm.PPLMConfig(**knobs), prefix)
    assert torch.equal(argmax[0], out.sequences[0, 1:])


def test_pplm_perplexity_with_stepsize_zero_is_plain_perplexity(micro):
    bag, _ = _bag_rows(micro)
    texts = [" the moon is high", " and a long road runs over the hills", " oh"]
    prefix = PrefixTuning(micro.config, 3).eval()
    for pre in (None, prefix):
        plain = text_perplexity(micro, texts, prefix=pre)
        off = hybrid.pplm_perplexity(micro, texts, bag, {**hybrid.PPLM_KNOBS, "stepsize": 0.0}, prefix=pre,
                                     batch_size=2)
        on = hybrid.pplm_perplexity(micro, texts, bag, hybrid.PPLM_KNOBS, prefix=pre, batch_size=2)
        assert off.tokens == plain.tokens and off.value == pytest.approx(plain.value, rel=1e-4)
        assert on.value != pytest.approx(plain.value, rel=1e-6)


def test_chemistry_check_needs_every_name():
    r = chemistry.Reaction(["zinc", "hydrochloric acid"], ["zinc chloride", "hydrogen"], " ref", "test")
    assert r.prompt == "Reaction: zinc + hydrochloric acid -> zinc chloride + hydrogen\nReport:"
    full = " Zinc reacts with Hydrochloric Acid to give zinc chloride and hydrogen gas."
    assert chemistry.names_everything(full, r)
    assert not chemistry.names_everything(" Zinc reacts with hydrochloric acid, giving hydrogen.", r)
    s = chemistry.check_summary([full, " zinc and hydrochloric acid fizz", " nothing"], [r, r, r])
    assert s["all_named"] == pytest.approx(1 / 3) and s["all_reactants_named"] == pytest.approx(2 / 3)
    assert s["all_products_named"] == pytest.approx(1 / 3)
    assert s["names_found_mean"] == pytest.approx((1 + 0.5 + 0) / 3)


def test_scifi_genre_share_counts_whole_words():
    bag = {"robot", "star"}
    assert scifi.genre_count("The Robot saw a star; robotic starfish stared.", bag) == (2, 8)
    assert scifi.genre_share(["robot robot", "a b"], bag) == pytest.approx(0.5)
    assert scifi.genre_share([""], bag) == 0.0


def test_hybrid_label_preference_is_the_cross_entropy_gap():
    held = hybrid.HeldOut([" a", " b", " c", " d"], positive=[0, 2], negative=[1])
    scores = Perplexity(text_nll=[2.0, 9.0, 4.0, 100.0], text_tokens=[1, 3, 3, 1])
    # negative: 9 nats / 3 tokens = 3; positive: (2 + 4) nats / (1 + 3) tokens = 1.5 (token-weighted)
    assert hybrid.label_preference(scores, held) == pytest.approx(1.5)
    assert math.isnan(hybrid.label_preference(scores, hybrid.HeldOut([" a"], [0], [])))


def test_hybrid_prompts_are_neutral_verse_openings():
    vader = pytest.importorskip("vaderSentiment.vaderSentiment").SentimentIntensityAnalyzer()
    openings = hybrid.neutral_openings(vader, 20)
    assert len(openings) == 20 and openings[0] == hybrid.TUTORIAL_PROMPT
    assert all(vader.polarity_scores(o)["compound"] == 0 for o in openings)
    held = hybrid.held_out(None)
    assert held.positive and held.negative and not set(held.positive) & set(held.negative)


def test_hybrid_trains_the_poetry_projects_adapter():
    """The hybrid's style LoRA is the poetry project's: the same batch, eval interval and verses per run mode
    (quick takes poetry's full run with fewer steps), so the two cannot drift apart unnoticed."""
    for mode, poetry_mode in (("full", "full"), ("quick", "full"), ("smoke", "smoke")):
        h, p = hybrid.SIZES[mode], poetry.SIZES[poetry_mode]
        assert (h.lora_batch, h.lora_eval_every, h.lora_train_verses, h.lora_dev_verses) == \
            (p.batch_size, p.eval_every, p.train_verses, p.dev_verses), mode
    assert hybrid.SIZES["full"].lora_steps == poetry.SIZES["full"].steps
