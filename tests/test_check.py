"""`python -m minigpt check`: the table on agreeing files, a real disagreement, adapters, and its errors."""
from __future__ import annotations

import copy
import math
import sys

import pytest
import torch

from minigpt import EOT_ID, generate
from minigpt.__main__ import build_parser, main
from minigpt.check import (FP32_TOL, PREFIX_GENERATE_NOTE, Row, diff_row, format_table, greedy_by_forward,
                           tokens_row)

BASE_ROWS = ("logits max |Δ|, 3 prompts one at a time", "hidden states max |Δ|, embeddings + 2 blocks",
             "logits max |Δ|, left-padded batch", "greedy tokens, 1 prompt", "greedy tokens, left-padded batch",
             "tokenizer ids")


def run(argv, capsys):
    capsys.readouterr()  # drop what fixtures printed (transformers' save_pretrained progress bars)
    code = main(["check", *argv, "--device", "cpu"])
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(out: str) -> dict[str, str]:
    """'what' -> 'ok' / 'FAIL', from the printed table."""
    rows = {}
    for line in out.splitlines():
        if line.endswith("  ok") or line.endswith("  FAIL"):
            rows[line.split("  ")[0].strip()] = line.rsplit(" ", 1)[1]
    return rows


def row(rows: dict[str, str], start: str) -> str:
    found = [v for k, v in rows.items() if k.startswith(start)]
    assert len(found) == 1, (start, rows)
    return found[0]


# ---- the command on agreeing files -----------------------------------------------------------
def test_tiny_model_every_row_ok(tiny_hf, capsys):
    code, out, err = run(["--weights", str(tiny_hf[2])], capsys)
    assert code == 0, out + err
    rows = table_rows(out)
    assert len(rows) == len(BASE_ROWS)
    assert all(row(rows, what) == "ok" for what in BASE_ROWS)
    assert "all 6 rows ok" in out and "FAIL" not in out
    assert "minigpt vs transformers" in out.splitlines()[0]
    assert "Loading weights" not in err  # transformers kept quiet


@pytest.fixture(scope="module")
def adapters(tiny_hf, tmp_path_factory):
    """A LoRA adapter (B random, so it changes the logits) and a direct prefix, saved in peft's format."""
    from techniques.lora import apply_lora, save_adapter as save_lora
    from techniques.prefix import PrefixTuning, save_adapter as save_prefix
    base = tiny_hf[1]
    folder = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    adapted = apply_lora(copy.deepcopy(base), r=4, alpha=8, targets=("c_attn", "c_fc"), verbose=False)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith(".B"):
                p.normal_(0, 0.5)  # B = 0 would make the adapter a no-op and the check trivial
    save_lora(adapted, folder / "lora")
    prefix = PrefixTuning(base.config, 3)
    with torch.no_grad():
        prefix.embedding.weight.mul_(4)  # large enough to steer the tiny model
    save_prefix(prefix, folder / "prefix")
    ids = torch.tensor([[464, 3290, 318, 257]])
    with torch.no_grad():
        assert (adapted(ids).logits - base(ids).logits).abs().max() > 1e-2
        assert (base(ids, past_key_values=prefix.past_key_values(1)).logits - base(ids).logits).abs().max() > 1e-2
    return folder / "lora", folder / "prefix"


@pytest.mark.parametrize("which", [("lora",), ("prefix",), ("lora", "prefix")], ids=["lora", "prefix", "both"])
def test_adapters_every_row_ok(tiny_hf, adapters, capsys, which):
    lora, prefix = adapters
    argv = ["--weights", str(tiny_hf[2])]
    argv += ["--lora", str(lora)] if "lora" in which else []
    argv += ["--prefix", str(prefix)] if "prefix" in which else []
    code, out, err = run(argv, capsys)
    assert code == 0, out + err
    rows = table_rows(out)
    expected = list(BASE_ROWS)
    if "lora" in which:
        expected += ["LoRA logits vs peft, unmerged", "LoRA logits vs peft, merged"]
    if "prefix" in which:
        over = " (LoRA merged)" if "lora" in which else ""
        expected += [f"prefix logits vs peft forward{over}", f"prefix greedy tokens vs peft forward loop{over}"]
    assert len(rows) == len(expected)
    assert all(row(rows, what) == "ok" for what in expected)
    assert f"all {len(expected)} rows ok" in out
    note = [line for line in out.splitlines() if line.startswith("note:")]
    assert note == ([f"note: {PREFIX_GENERATE_NOTE}"] if "prefix" in which else [])
    assert "PeftModel.generate" in PREFIX_GENERATE_NOTE and "drop" in PREFIX_GENERATE_NOTE


# ---- a real disagreement: exit 1 -------------------------------------------------------------
def test_a_loader_bug_is_a_mismatch_and_exits_1(tiny_hf, monkeypatch, capsys):
    """The classic GPT-2 loading bug, made on purpose: attn.c_proj is square, so forgetting its
    Conv1D transpose loads without a shape error. check must catch it by values: logits and hidden
    states FAIL, the tokenizer (not a weight) stays ok, exit code 1 and no error line."""
    import minigpt.model
    right = minigpt.model.hf_to_minigpt_state_dict

    def forgets_a_transpose(sd, expected):
        out = right(sd, expected)
        key = "transformer.h.0.attn.c_proj.weight"
        out[key] = out[key].t()
        return out

    monkeypatch.setattr(minigpt.model, "hf_to_minigpt_state_dict", forgets_a_transpose)
    code, out, err = run(["--weights", str(tiny_hf[2])], capsys)
    assert code == 1, out + err
    rows = table_rows(out)
    assert row(rows, "logits max |Δ|, 3 prompts") == "FAIL"
    assert row(rows, "logits max |Δ|, left-padded batch") == "FAIL"
    assert row(rows, "hidden states") == "FAIL"
    assert row(rows, "tokenizer ids") == "ok"
    assert "rows FAIL" in out.splitlines()[-1]
    assert err == ""  # a failed comparison is a result, not an error


# ---- the row logic -----------------------------------------------------------------------------
def test_diff_row_decides_ok_and_fail():
    a = torch.zeros(2, 3, 4)
    assert diff_row("x", a, a).ok
    assert diff_row("x", a + 0.5 * FP32_TOL, a).ok
    bad = diff_row("x", a + 2 * FP32_TOL, a)
    assert not bad.ok and bad.value == "2.0e-04" and bad.tolerance == "1.0e-04"
    big = torch.full((2, 3, 4), 1000.0)  # tolerance scales with the values compared: 1e-4 · 1000
    assert diff_row("x", big + 0.05, big).ok and not diff_row("x", big + 0.2, big).ok
    nan = a.clone()
    nan[0, 0, 0] = math.nan
    assert not diff_row("x", nan, a).ok and not diff_row("x", a, nan).ok
    assert not diff_row("x", a, torch.zeros(2, 3, 5)).ok
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    padded = a.clone()
    padded[0, 0] = 7.0  # a pad position: not compared
    assert diff_row("x", padded, a, mask).ok and not diff_row("x", padded, a).ok


def test_tokens_row_and_table():
    t = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert tokens_row("t", t, t.clone()).ok
    other = t.clone()
    other[1, 2] = 9
    r = tokens_row("t", t, other)
    assert not r.ok and "row 1 pos 2" in r.value
    assert not tokens_row("t", t, t[:, :2]).ok  # one side stopped early
    table = format_table([Row("a", "1", "2", True), Row("b", "3", "4", False)])
    lines = table.splitlines()
    assert lines[0].split() == ["what", "value", "tolerance", "result"]
    assert lines[2].endswith("ok") and lines[3].endswith("FAIL") and lines[-1] == "1 of 2 rows FAIL"
    assert format_table([Row("a", "1", "2", True)]).splitlines()[-1] == "all 1 rows ok"


def test_greedy_loop_over_a_forward_is_generate(tiny_hf, tokenizer):
    """The reference loop for the prefix (no cache, stop at eos) gives minigpt.generate's tokens on our model."""
    model = tiny_hf[1]
    ids, mask = tokenizer.encode_batch(["The dog", "Once upon a time there"])
    with torch.no_grad():
        loop = greedy_by_forward(lambda x, m: model(x, attention_mask=m).logits, ids, mask, 8)
    want = generate(model, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=EOT_ID, pad_token_id=EOT_ID)
    assert torch.equal(loop, want)


# ---- options and errors ------------------------------------------------------------------------
def test_options_and_offline_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # so argparse does not wrap a phrase across lines
    args = build_parser().parse_args(["check"])
    assert args.model == "tiny" and args.weights is None and args.lora is None and args.prefix is None
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    out = capsys.readouterr().out
    for opt in ("--model", "--weights", "--lora", "--prefix", "--device", "--seed", "test extra"):
        assert opt in out


def assert_one_line_error(err: str, *words: str):
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize("missing,flags", [("transformers", []), ("peft", ["lora"])])
def test_without_the_test_extra_one_line_and_exit_2(tiny_hf, adapters, monkeypatch, capsys, missing, flags):
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now raises ImportError
    argv = ["--weights", str(tiny_hf[2])] + (["--lora", str(adapters[0])] if flags else [])
    code, out, err = run(argv, capsys)
    assert code == 2
    assert_one_line_error(err, "not installed", 'pip install -e ".[test]"', missing)
    assert out == ""  # nothing was compared


def test_bad_folders_one_line_and_exit_2(tiny_hf, adapters, tmp_path, capsys):
    code, out, err = run(["--weights", str(tmp_path / "nowhere")], capsys)
    assert code == 2
    assert_one_line_error(err, "nowhere")
    code, out, err = run(["--weights", str(tiny_hf[2]), "--prefix", str(adapters[0])], capsys)  # a LoRA folder
    assert code == 2
    assert_one_line_error(err, "'LORA' adapter", "--lora")
