"""The learner's tour end to end, on a micro random model (--smoke): the command and the notebook.

The numbers of a random model mean nothing, so these tests check that every step ran and wrote what it
promises (figures, a self-contained index.html, report.md, summary.json of finite measured numbers), not
that the techniques help; the real run (`--model tiny --quick`) is what shows that.
"""
from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from demos import tour

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("next_token.png", "attention.png", "lora_loss.png", "lora_weights.png", "lora_singular_values.png",
           "prefix_loss.png", "pplm_attribute.png", "pplm_hidden_pca.png", "hybrid.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REQUIRED = {"lora": ("eval_loss_before", "eval_loss_after", "rank", "merged_max_abs_diff"),
            "prefix": ("eval_loss_before", "eval_loss_after"),
            "pplm": ("attribute_unperturbed", "attribute_perturbed")}


def _numbers(obj):
    """Every number in a JSON value, nested or not."""
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)


def _check_outputs(out: Path, model_name: str) -> dict:
    """The files every tour run leaves in `out`; returns summary.json."""
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    html = (out / "index.html").read_text(encoding="utf-8")
    embedded = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(embedded) == len(FIGURES) == html.count("<img ")  # every image embedded, none linked
    assert all(base64.b64decode(b).startswith(PNG_MAGIC) for b in embedded)
    links = re.findall(r'<a href="([^"]+)"', html)  # each step points to the docs page that explains it
    assert any(h.endswith("docs/lora.md") for h in links) and all((out / h).is_file() for h in links), links
    md = (out / "report.md").read_text(encoding="utf-8")
    for name in FIGURES:
        assert f"]({name})" in md, name
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["model"] == model_name
    for key, fields in REQUIRED.items():
        for f in fields:
            v = summary[key][f]
            assert isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), (key, f, v)
    assert isinstance(summary["lora"]["rank"], int) and summary["lora"]["rank"] == 8
    assert isinstance(summary["seconds"], float) and summary["seconds"] > 0
    assert all(math.isfinite(x) for x in _numbers(summary))
    assert sorted(summary["figures"]) == sorted(FIGURES)
    return summary


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tour")
    code = tour.main(["--smoke", "--out", str(out), "--no-progress", "--seed", "3"])
    return code, out


def test_smoke_tour_writes_every_file(smoke_run, capsys):
    code, out = smoke_run
    assert code == 0
    _check_outputs(out, "micro-random")
    assert not list(out.glob(".tmp-save-*"))  # the atomic save cleaned up after itself


def test_prefix_slot_recalls_score_each_decoding_of_its_own_outputs(smoke_run):
    """The four slot recalls (beam and greedy, before and after) are the means over the outputs the
    summary lists: each decoding scored on its own texts."""
    p = json.loads((smoke_run[1] / "summary.json").read_text(encoding="utf-8"))["prefix"]
    for key, field in (("slot_recall_before", "before"), ("slot_recall_after", "after"),
                       ("slot_recall_before_greedy", "before_greedy"), ("slot_recall_after_greedy", "after_greedy")):
        want = sum(tour.slot_recall(o["mr"], o[field]) for o in p["outputs"]) / len(p["outputs"])
        assert p[key] == pytest.approx(want, abs=1e-4), key
    mr = "name[The Eagle], area[riverside]"
    assert tour.mean_slot_recall([mr, mr], ["The Eagle is by the riverside.", "Nothing here."]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2 inputs but 4 outputs"):
        tour.mean_slot_recall([mr, mr], ["a", "b", "c", "d"])


def test_summary_holds_this_runs_measurements(smoke_run):
    _, out = smoke_run
    s = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert s["mode"] == "smoke" and s["seed"] == 3
    # a random model of GPT-2's vocabulary predicts about uniformly: cross-entropy near ln(50257) = 10.82
    for key in ("lora", "prefix"):
        for f in ("eval_loss_before", "eval_loss_after"):
            assert abs(s[key][f] - math.log(50257)) < 0.5, (key, f, s[key][f])
    assert s["lora"]["merged_max_abs_diff"] < 1e-4          # merging W0 + s·B·A changes nothing
    assert s["lora"]["numerical_rank"] == s["lora"]["rank"]  # ΔW = B·A has rank r after training
    assert s["next_token"]["draws_outside_kept"] == 0      # sample_next_token never draws a filtered-out token
    assert 0.0 <= s["pplm"]["attribute_unperturbed"] <= 1.0 and 0.0 <= s["pplm"]["attribute_perturbed"] <= 1.0
    assert set(s["hybrid"]["configs"]) == {"base", "lora", "prefix", "pplm", "hybrid"}
    assert s["prefix"]["parameters_direct"] == 10 * 2 * 2 * 32  # P·2·L·d of the micro model
    assert sum(s["step_seconds"].values()) <= s["seconds"]


def test_a_step_that_reuses_an_earlier_ones_result_says_which_to_run_first(tmp_path):
    """On a fresh context (no step run), the hybrid names the steps whose model and prefix it reuses, and
    finish names setup, whose clock it reads: clear errors before any training or file."""
    from minigpt import GPT, GPTConfig, get_tokenizer
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, n_positions=16))
    ctx = tour.TourContext(model=model, model_name="micro", tokenizer=get_tokenizer(), out=tmp_path, seed=0,
                           sizes=tour.SIZES["smoke"], mode="smoke")
    with pytest.raises(ValueError, match=r"missing: lora_model, prefix, e2e_held_out\); run step_lora\(ctx\) and "
                                         r"step_prefix\(ctx\) first"):
        tour.step_hybrid(ctx)
    with pytest.raises(ValueError, match=r"setup\(\)"):
        tour.finish(ctx, [])
    assert not list(tmp_path.iterdir())


def test_filtered_probs_match_the_samplers_support():
    import torch

    from minigpt import sample_next_token
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, generator=g) * 3
    p = tour.filtered_probs(logits, temperature=0.7, top_k=20, top_p=0.8)
    assert torch.isclose(p.sum(), torch.tensor(1.0)) and 0 < int((p > 0).sum()) <= 20
    draws = sample_next_token(logits.expand(4000, -1), do_sample=True, temperature=0.7, top_k=20, top_p=0.8,
                              generator=g)
    assert bool((p[draws] > 0).all())
    freq = torch.bincount(draws, minlength=200).float() / 4000
    assert float((freq - p).abs().max()) < 0.04


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        tour.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--weights", "--out", "--quick", "--smoke", "--device", "--seed"):
        assert flag in text


def test_missing_weights_is_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    code = tour.main(["--weights", str(tmp_path / "no-such-model"), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error:") and "Traceback" not in err
    assert "no-such-model" in err and f"nothing was saved to {out}" in err
    assert not (out / "summary.json").exists()


def test_notebook_is_committed_without_outputs():
    import nbformat
    nb = nbformat.read(ROOT / "demos" / "tour.ipynb", as_version=4)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells and all(c.execution_count is None and c.outputs == [] for c in code_cells)
    text = "\n".join(c.source for c in code_cells)
    for step in tour.STEPS:  # thin: the notebook calls the tour's own step functions
        assert f"tour.{step.__name__}(ctx)" in text


def test_notebook_runs_in_smoke_mode(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient
    out = tmp_path / "nb"
    monkeypatch.setenv("MINIGPT_TOUR_SMOKE", "1")
    monkeypatch.setenv("MINIGPT_TOUR_OUT", str(out))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread, as conftest sets in-process: a busy CI box
    nb = nbformat.read(ROOT / "demos" / "tour.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    shown = [o for o in outputs if o.output_type == "display_data" and "text/html" in o.data]
    assert sum(o.data["text/html"].count("data:image/png;base64,") for o in shown) == len(FIGURES)  # inline plots
    _check_outputs(out, "micro-random")


def test_bag_step_size_is_the_papers_from_width_512_a_third_of_ten_times_from_256_and_ten_times_below():
    from demos.common import bow_stepsize
    from minigpt import GPT, GPTConfig
    narrow, mid, wide, wider = (GPT(GPTConfig(n_layer=1, n_head=2, n_embd=c, n_positions=8, vocab_size=16))
                                for c in (32, 256, 512, 1024))
    assert bow_stepsize(wide, 0.03) == 0.03 and bow_stepsize(wider, 0.03) == 0.03
    assert bow_stepsize(mid, 0.03) == pytest.approx(0.1) and bow_stepsize(narrow, 0.03) == pytest.approx(0.3)
    assert tour.pplm_knobs(narrow)["stepsize"] == pytest.approx(0.3)
    assert tour.pplm_knobs(narrow, steer=False)["stepsize"] == 0


@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=40), st.integers(1, 12))
def test_moving_average_is_the_mean_of_the_last_window_values(values, window):
    from demos.common import moving_average
    got = moving_average(values, window)
    want = [sum(values[max(0, i + 1 - window):i + 1]) / min(i + 1, window) for i in range(len(values))]
    assert got == pytest.approx(want, abs=1e-6)
