"""`minigpt generate --lora A --lora B --lora-weights .. --combine ..` equals the library calls (issue 30)."""
from __future__ import annotations

import pytest
import torch

from minigpt import GPT
from minigpt.__main__ import _load, build_parser
from techniques.lora import add_weighted_adapter, load_combined, load_named_adapter, merge_lora, set_adapter
from test_adapters import ids, saved_two_adapters

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base, _, dirs = saved_two_adapters(tmp_path_factory, "cli")
    return base, dirs


def cli_model(base, dirs, *more):
    argv = ["generate", "Hi", "--weights", str(base), "--device", "cpu"]
    for d in dirs:
        argv += ["--lora", str(d)]
    return _load(build_parser().parse_args(argv + list(more)))[0].eval()


@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
def test_cli_combination_equals_library(folders, combination):
    base, dirs = folders
    ours = cli_model(base, dirs, "--lora-weights", "0.7,-0.3", "--combine", combination)
    lib = GPT.from_pretrained(str(base))
    load_named_adapter(lib, dirs[0], "x")
    load_named_adapter(lib, dirs[1], "y")
    add_weighted_adapter(lib, ["x", "y"], [0.7, -0.3], "m", combination)
    set_adapter(lib, "m")
    lib = merge_lora(lib).eval()
    with torch.no_grad():
        assert torch.equal(ours(ids()).logits, lib(ids()).logits)
        plain = GPT.from_pretrained(str(base)).eval()(ids()).logits
        assert not torch.allclose(ours(ids()).logits, plain)


def test_cli_one_lora_is_that_adapter(folders):
    base, dirs = folders
    ours = cli_model(base, dirs[:1])
    lib = merge_lora(load_combined(GPT.from_pretrained(str(base)), dirs[:1])).eval()
    with torch.no_grad():
        assert torch.equal(ours(ids()).logits, lib(ids()).logits)


def test_cli_bad_weights(folders, capsys):
    base, dirs = folders
    with pytest.raises(ValueError, match="one weight per folder"):
        cli_model(base, dirs, "--lora-weights", "0.5")
    with pytest.raises(SystemExit) as e:  # argparse's error line (minigpt.cli.float_list), exit code 2
        cli_model(base, dirs, "--lora-weights", "0.5;0.5")
    assert e.value.code == 2 and "comma-separated numbers such as 0.5,0.5, got '0.5;0.5'" in capsys.readouterr().err


def test_cli_help_names_options(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    out = capsys.readouterr().out
    for opt in ("--lora-weights", "--combine", "linear", "cat", "svd"):
        assert opt in out
