"""Prefix-Tuning+ items of issue 28 that no other test file proved: it composes with PPLM, its folder is saved all or
nothing, bf16 autocast tracks fp32, a damaged folder is one clear error, the trade-off for P = 5, 10, 20 and 40,
and the benchmark runs end to end (tiny shape; no timing asserted)."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from helpers import PNG_MAGIC, make_hf_model
from minigpt import GPT, autocast, generate
from minigpt.__main__ import main as minigpt_main
from techniques.prefix import PLUS_WEIGHTS, PrefixTuningPlus, load_prefix_plus, save_prefix_plus

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def wrapped(base: GPT, seed: int = 0, scale: float = 50.0) -> PrefixTuningPlus:
    """A copy of `base` with Prefix-Tuning+ (the paper's φ = elu) and random M's, large enough to change its text."""
    pp = PrefixTuningPlus(copy.deepcopy(base))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for M in pp.trainable_parameters():
            M.copy_(torch.randn(M.shape, generator=g) * scale)
    return pp


# ---- composes with PPLM ------------------------------------------------------------------------------------------
def test_pplm_runs_on_a_prefix_plus_model(tiny_hf, tokenizer):
    """PPLM perturbs the past of the wrapped model: with stepsize 0 it is the wrapped model's own greedy text (which
    differs from the base model's); with a real step the gradient flows through the wrapped attentions, the past is
    perturbed, and neither the M's nor the frozen weights move."""
    from techniques import pplm
    _, base, _ = tiny_hf
    pp = wrapped(base)
    ids = torch.tensor([tokenizer.encode("The dog")])
    plain = generate(pp.model, ids, max_new_tokens=5)
    assert not torch.equal(plain, generate(base, ids, max_new_tokens=5))
    out = pplm.generate(pp.model, ids, bow="military", max_new_tokens=5, stepsize=0)
    assert torch.equal(out.sequences, plain) and not any(s.perturbed for s in out.steps)
    before = {n: p.detach().clone() for n, p in pp.model.named_parameters()}
    out = pplm.generate(pp.model, ids, bow="military", max_new_tokens=3, stepsize=0.05, num_iterations=2)
    assert out.sequences.shape == (1, ids.size(1) + 3) and any(s.perturbed for s in out.steps)
    assert all(torch.equal(p, before[n]) for n, p in pp.model.named_parameters())


# ---- saved all or nothing ----------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:an earlier save")
def test_a_plus_folder_overwrite_killed_at_any_operation_loads_the_old_or_the_new_adapter(tiny_hf, tmp_path):
    """save_prefix_plus goes through minigpt.io.atomic_save_dir: killed at each file-system operation in turn, the
    folder then loads as exactly the old adapter or exactly the new one (the kill harness of test_atomic_save)."""
    from test_atomic_save import kill_each_operation_of_a_save
    _, base, _ = tiny_hf
    old, new = wrapped(base, seed=1), wrapped(base, seed=2)
    x = torch.tensor([[464, 3290, 318]])
    with torch.no_grad():
        want = {"old": old(x).logits, "new": new(x).logits}
    def logits_of(d):
        with torch.no_grad():
            return load_prefix_plus(copy.deepcopy(base), d)(x).logits

    seen, k = kill_each_operation_of_a_save(tmp_path / "plus", lambda d: save_prefix_plus(old, d),
                                            lambda d: save_prefix_plus(new, d), logits_of, want)
    assert seen == {"old", "new"} and k > 2


# ---- bf16 --------------------------------------------------------------------------------------------------------
def test_bf16_autocast_tracks_fp32(tiny_hf):
    """Under bf16 autocast the wrapped model's logits stay near fp32's (bf16 has 8 mantissa bits), and the gradient
    reaches the M's in fp32, close to fp32's gradient."""
    _, base, _ = tiny_hf
    pp = wrapped(base, seed=3, scale=5.0)
    ids = torch.tensor([[464, 3290, 318, 257, 922, 1110]])
    runs = {}
    for precision in ("fp32", "bf16"):
        for M in pp.trainable_parameters():
            M.grad = None
        with autocast(ids.device, precision):
            lg = pp(ids).logits
            loss = torch.nn.functional.cross_entropy(lg[0, :-1].float(), ids[0, 1:])
        loss.backward()
        runs[precision] = (lg.float().detach(), [M.grad.clone() for M in pp.trainable_parameters()])
    (l32, g32), (l16, g16) = runs["fp32"], runs["bf16"]
    assert l16.dtype == torch.float32 and all(g.dtype == torch.float32 for g in g16)
    assert (l16 - l32).abs().max() < 0.05 * l32.abs().max()
    for a, b in zip(g32, g16):
        assert (a - b).norm() < 0.1 * a.norm()


# ---- bad input ---------------------------------------------------------------------------------------------------
def test_generate_with_a_damaged_plus_folder_is_one_line(tiny_hf, tmp_path, capsys):
    _, base, folder = tiny_hf
    save_prefix_plus(wrapped(base), tmp_path / "plus")
    (tmp_path / "plus" / PLUS_WEIGHTS).unlink()
    code = minigpt_main(["generate", "Hi", "--weights", str(folder), "--prefix", str(tmp_path / "plus"),
                         "--device", "cpu", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert PLUS_WEIGHTS in err


# ---- the trade-off, P = 5, 10, 20, 40 ------------------------------------------------------------------------------
def test_tradeoff_for_the_issues_four_prefix_lengths(tmp_path):
    """The default curves cover P = 5, 10, 20, 40: the prefix's share of attention falls with the input length and
    rises with P; prefix tuning's output change shrinks at long inputs while Prefix-Tuning+'s, matched to the same
    prefix at T = 4, does not; the figure is written."""
    from demos.kits.prefix import TRADEOFF_PS, tradeoff_curves, tradeoff_figure
    _, folder = make_hf_model(tmp_path / "hf", vocab_size=128, n_positions=256, n_embd=32, n_layer=2, n_head=4)
    model = GPT.from_pretrained(str(folder)).eval()
    curves = tradeoff_curves(model, [4, 32, 200], batch=4, seed=0)
    assert tuple(curves["Ps"]) == TRADEOFF_PS == (5, 10, 20, 40)
    share = curves["share"]
    for P in TRADEOFF_PS:
        assert share[P][0] > share[P][1] > share[P][2]
        pt, pp = curves["prefix"][P], curves["plus"][P]
        assert pt[0] == pytest.approx(pp[0], rel=1e-3)
        assert pt[-1] < 0.5 * pt[0] and pp[-1] > 0.6 * pp[0], (P, pt, pp)
    for k in range(3):
        assert share[5][k] < share[10][k] < share[20][k] < share[40][k]
    path = tradeoff_figure(curves, tmp_path / "tradeoff.png", "micro-random")
    assert path.read_bytes().startswith(PNG_MAGIC)


# ---- the benchmark -----------------------------------------------------------------------------------------------
def test_bench_prefix_plus_tiny_runs_every_method(capsys):
    """benchmarks/bench_prefix_plus.py end to end on the tiny shape: every method takes real steps, the counts are
    matched (the MLP trains more and folds to P·θ), memory comes from the worker (run in-process with --tiny), the
    table is printed."""
    pytest.importorskip("transformers")
    import bench_prefix_plus as bench
    res = bench.main(["--quick", "--tiny", "--threads", "1"])
    out = capsys.readouterr().out
    counts = res["counts"]
    assert counts["Prefix-Tuning+"] == counts["LoRA"] == counts["prefix (direct)"] == 2 * 64 * 16
    assert counts["prefix (MLP)"] > counts["Prefix-Tuning+"]
    assert "Prefix-Tuning+ at init: max |logits - frozen logits| = 0.00e+00" in out
    for m in bench.METHODS:
        assert res["seconds"][m] > 0 and res["memory"][m]["allocated"] > 0
        assert f"| {m} | {counts[m]:,} |" in out
