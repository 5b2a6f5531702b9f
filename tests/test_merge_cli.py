"""`python -m techniques.lora merge` with generate's adapter options (issue 30): --lora (repeated), --lora-weights,
--combine, and --mtl-lora DIR --task T. The saved checkpoint, loaded back by minigpt's loader, is the model that
`minigpt generate` runs with the same options, and the model peft's add_weighted_adapter + merge_and_unload makes."""
from __future__ import annotations

import pytest
import torch

from minigpt import GPT
from minigpt.__main__ import _load, build_parser as generate_parser
from minigpt.cli import COMBINE_CHOICES
from techniques.lora import COMBINATIONS, apply_lora, load_adapter, merge_lora, save_adapter
from techniques.lora.__main__ import main as lora_main
from test_adapters import ids, randomise, saved_two_adapters

peft = pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402
from transformers import GPT2LMHeadModel  # noqa: E402

WEIGHTS = "0.7,-0.3"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(base model folder, [adapter "a" on c_attn r=4, adapter "b" on c_attn r=4 alpha=16, adapter "c" on mlp.c_fc])."""
    base, _, dirs = saved_two_adapters(tmp_path_factory, "merge")
    other = apply_lora(GPT.from_pretrained(str(base)), r=4, alpha=8, targets=["mlp.c_fc"], verbose=False)
    randomise(other, 3)
    dirs.append(save_adapter(other, tmp_path_factory.mktemp("merge_c")))
    return base, dirs


def merge(capsys, base, out, *options):
    try:
        code = lora_main(["merge", "--weights", str(base), "--device", "cpu", "--out", str(out), *map(str, options)])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def loras(dirs):
    return [a for d in dirs for a in ("--lora", str(d))]


def generated_model(base, *options):
    """The model `minigpt generate` decodes with these options."""
    argv = ["generate", "Hi", "--weights", str(base), "--device", "cpu", *map(str, options)]
    return _load(generate_parser().parse_args(argv))[0].eval()


def test_the_options_are_defined_once():
    """generate and merge parse the adapter options to the same values (one helper, minigpt.cli.add_adapter_args);
    its --combine choices are the library's combination types."""
    from techniques.lora.__main__ import build_parser as lora_parser
    assert COMBINE_CHOICES == COMBINATIONS
    opts = ["--lora", "a", "--lora", "b", "--lora-weights", "0.5,-1", "--combine", "svd", "--mtl-lora", "m",
            "--task", "t"]
    g = vars(generate_parser().parse_args(["generate", "Hi", *opts]))
    m = vars(lora_parser().parse_args(["merge", "--out", "o", *opts]))
    keys = ("lora", "lora_weights", "combine", "mtl_lora", "task")
    assert [g[k] for k in keys] == [m[k] for k in keys] == [["a", "b"], [0.5, -1.0], "svd", "m", "t"]


@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
def test_merged_checkpoint_is_generates_model_and_pefts(folders, tmp_path, capsys, combination):
    base, dirs = folders
    out = tmp_path / "merged"
    code, stdout, err = merge(capsys, base, out, *loras(dirs[:2]), "--lora-weights", WEIGHTS, "--combine", combination)
    assert code == 0, err
    assert f"merged 2 LoRA adapters ({combination}, weights 0.7,-0.3)" in stdout
    ours = GPT.from_pretrained(str(out)).eval()
    gen = generated_model(base, *loras(dirs[:2]), "--lora-weights", WEIGHTS, "--combine", combination)
    x = ids(4)
    with torch.no_grad():
        mine = ours(x).logits
        assert torch.equal(mine, gen(x).logits)            # the saved model is the one generate runs, bit for bit
        plain = GPT.from_pretrained(str(base)).eval()(x).logits
    assert (mine - plain).abs().max() > 1e-3                # and the adapters changed it

    pm = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(str(base)), str(dirs[0]), adapter_name="a")
    pm.load_adapter(str(dirs[1]), adapter_name="b")
    pm.add_weighted_adapter(["a", "b"], [0.7, -0.3], "mix", combination_type=combination)
    pm.set_adapter("mix")
    hf = pm.merge_and_unload().eval()
    with torch.no_grad():
        logit_diff = float((hf(input_ids=x).logits - mine).abs().max())
    theirs = hf.state_dict()
    saved = GPT2LMHeadModel.from_pretrained(str(out)).state_dict()   # our file, read by transformers
    tensor_diff = max(float((saved[k] - theirs[k]).abs().max()) for k in theirs)
    print(f"\n{combination}: merged checkpoint vs peft add_weighted_adapter + merge_and_unload: "
          f"max |logits diff| {logit_diff:.2e}, max |weight diff| {tensor_diff:.2e}")
    assert logit_diff < 1e-5 and tensor_diff < 1e-5


def test_one_lora_merges_as_before(folders, tmp_path, capsys):
    base, dirs = folders
    code, stdout, err = merge(capsys, base, tmp_path / "one", "--lora", dirs[1])
    assert code == 0, err
    assert f"merged {dirs[1]} into the weights" in stdout
    want = merge_lora(load_adapter(GPT.from_pretrained(str(base)), dirs[1])).eval()
    x = ids(5)
    with torch.no_grad():
        got = GPT.from_pretrained(str(tmp_path / "one")).eval()(x).logits
        assert torch.equal(got, want(x).logits)
        assert torch.equal(got, generated_model(base, "--lora", dirs[1])(x).logits)


def _mtl_folder(base, path):
    from techniques.lora import apply_mtl_lora, mtl_modules, save_mtl_lora
    torch.manual_seed(6)
    model = apply_mtl_lora(GPT.from_pretrained(str(base)).eval(), n_tasks=3, targets=("c_attn", "mlp.c_proj"), r=4,
                           n_up=2, tau=0.5, full_lambda=True)
    with torch.no_grad():
        for m in mtl_modules(model):
            for p in (m.A, m.Lambda, m.B, m.w):
                p.copy_(torch.randn_like(p) * 0.3)
    save_mtl_lora(model, path, ["poetry", "scifi", "chemistry"])
    return model


def test_merge_mtl_task_equals_the_unmerged_mtl_model(folders, tmp_path, capsys):
    """ΔW_t = s·(Σ_i softmax(w_t/τ)_i·B^i)·Λ_t·A folded into W0: the merged model run alone = the MTL-LoRA model
    run with task t; the other tasks give other logits."""
    from techniques.lora import task_ids
    base, _ = folders
    mtl = _mtl_folder(base, tmp_path / "mtl")
    x = ids(6)[:1]
    seen = []
    for t, name in enumerate(("poetry", "scifi", "chemistry")):
        out = tmp_path / f"m{t}"
        code, stdout, err = merge(capsys, base, out, "--mtl-lora", tmp_path / "mtl", "--task", name)
        assert code == 0, err
        assert f"merged task {name!r} of {tmp_path / 'mtl'}" in stdout
        with torch.no_grad(), task_ids(mtl, [t]):
            want = mtl(x).logits
        with torch.no_grad():
            got = GPT.from_pretrained(str(out)).eval()(x).logits
            assert torch.equal(got, generated_model(base, "--mtl-lora", tmp_path / "mtl", "--task", name)(x).logits)
        diff = float((got - want).abs().max())
        print(f"\ntask {name}: max |merged - unmerged MTL-LoRA logits| = {diff:.2e}")
        assert diff < 1e-5
        seen.append(got)
    assert (seen[0] - seen[1]).abs().max() > 1e-3


def one_line(code, err, *parts):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for part in parts:
        assert part in lines[0], lines[0]


def test_bad_input_gives_one_clear_error(folders, tmp_path, capsys):
    base, dirs = folders
    out = tmp_path / "never"
    cases = [
        ((*loras(dirs[:2]), "--lora-weights", "0.5"), ["--lora-weights has 1 weight(s) for 2 --lora folder(s)",
                                                       "one weight per folder"]),
        ((*loras([dirs[0], dirs[2]]), "--combine", "cat"), ["'cat' needs adapters on the same layers",
                                                            f"--lora {dirs[0]} adapts", f"and --lora {dirs[2]}"]),
        ((*loras([dirs[0], dirs[2]]), "--combine", "svd"), ["'svd' needs adapters on the same layers"]),
        (("--lora", base), [f"{base} holds a model (config.json), not an adapter", "--weights"]),
        (("--lora", tmp_path), ["adapter_config.json not found"]),
        (("--lora", tmp_path / "missing"), ["does not exist"]),
        ((), ["nothing to merge"]),
        (("--task", "poetry"), ["--mtl-lora and --task go together"]),
        (("--lora-weights", "1"), ["--lora-weights needs --lora"]),
    ]
    for options, parts in cases:
        code, _, err = merge(capsys, base, out, *options)
        one_line(code, err, *parts, f"nothing was saved to {out}")
    _mtl_folder(base, tmp_path / "mtl")
    code, _, err = merge(capsys, base, out, "--lora", tmp_path / "mtl")
    one_line(code, err, "'MTL_LORA' adapter, not 'LORA'", "--mtl-lora and --task")
    code, _, err = merge(capsys, base, out, "--mtl-lora", tmp_path / "mtl", "--task", "jokes")
    one_line(code, err, "unknown task 'jokes'", "poetry, scifi, chemistry")
    code, _, err = merge(capsys, base, out, "--mtl-lora", dirs[0], "--task", "0")
    one_line(code, err, "'LORA' adapter, not 'MTL_LORA'", "--lora")
    code, _, err = merge(capsys, base, out, "--mtl-lora", tmp_path / "mtl", "--task", "0", "--quantize", "nf4")
    one_line(code, err, "--quantize nf4 is for LoRA adapters")
    code, _, err = merge(capsys, base, out, *loras(dirs[:2]), "--lora-weights", "0.5;0.5")
    assert code == 2 and "comma-separated numbers" in err           # argparse's own error line
    assert not out.exists()


def test_generate_refuses_the_same_way(folders, tmp_path, capsys):
    """The same options, the same loader: generate's errors are merge's."""
    from minigpt.__main__ import main as minigpt_main
    base, dirs = folders
    code = minigpt_main(["generate", "Hi", "--weights", str(base), "--device", "cpu", *loras([dirs[0], dirs[2]]),
                         "--combine", "cat"])
    one_line(code, capsys.readouterr().err, "'cat' needs adapters on the same layers")
    code = minigpt_main(["generate", "Hi", "--weights", str(base), "--device", "cpu", "--lora", str(base)])
    one_line(code, capsys.readouterr().err, "holds a model (config.json), not an adapter")
