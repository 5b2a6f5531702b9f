"""Issue 30's "Bad input" items that the other adapter tests leave open, each with its one clear error.

Where each item is checked (the audit):
  an adapter name not loaded   set_adapter: test_adapters.py::test_switching_disabling_and_deleting;
                               add_weighted_adapter: test_adapters.py::test_bad_input; delete_adapter and the
                               names listed: here
  a weights count that differs add_weighted_adapter: test_adapters.py::test_bad_input; load_combined (generate):
                               test_adapters_cli.py::test_cli_bad_weights; merge: test_merge_cli.py
  cat/svd on other targets     cat: test_adapters.py::test_bad_input; cat and svd from the command line
                               (naming the --lora folders): test_merge_cli.py; svd in the library: here
  a DoRA adapter in a mix      cat: test_adapters.py::test_bad_input; every type, either order, the command
                               line, and what peft does instead: here
  MTL-LoRA into plain LoRA     load_adapter and load_mtl_lora: test_mtl_lora.py (refuse each other); generate
                               --lora: test_mtl_lora.py; merge --lora: test_merge_cli.py; load_named_adapter,
                               load_adapters (a subfolder), load_combined, and peft's own loader: here
"""
from __future__ import annotations

import copy

import pytest
import torch

from minigpt import GPT
from techniques.lora import (add_adapter, add_weighted_adapter, apply_mtl_lora, delete_adapter, load_adapters,
                             load_combined, load_named_adapter, lora_modules, save_adapter, save_mtl_lora,
                             set_adapter)
from test_adapters import two_adapters

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import GPT2LMHeadModel  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from helpers import make_hf_model
    return make_hf_model(tmp_path_factory.mktemp("bad_input"), seed=5, vocab_size=1000)[1]


def test_a_name_not_loaded_is_named_with_the_loaded_ones(folder):
    model = two_adapters(folder)
    for call in (lambda: set_adapter(model, "zz"), lambda: delete_adapter(model, "zz"),
                 lambda: add_weighted_adapter(model, ["default", "zz"], [1, 1], "m", "cat")):
        with pytest.raises(KeyError, match=r"no adapter named 'zz' on this model \(loaded: 'default', 'b'\); "
                                           "add_adapter or load_named_adapter it first"):
            call()
    with pytest.raises(ValueError, match="an adapter named 'b' is already loaded"):
        add_weighted_adapter(model, ["default", "b"], [1, 1], "b", "cat")


def test_svd_on_other_targets_is_refused(folder):
    model = two_adapters(folder, targets_b=("c_attn", "mlp.c_fc"))
    with pytest.raises(ValueError, match="'svd' needs adapters on the same layers, but 'default' adapts 2 layer"):
        add_weighted_adapter(model, ["default", "b"], [1, 1], "m", "svd")
    add_weighted_adapter(model, ["default", "b"], [1, 1], "m", "linear")  # linear takes the union, as peft


def _dora_and_lora(folder):
    model = two_adapters(folder)
    add_adapter(model, "d", r=4, alpha=8, targets=["c_attn"], use_dora=True)
    return model


@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
@pytest.mark.parametrize("order", [("d", "default"), ("default", "d")])
def test_a_dora_adapter_in_any_combination_is_refused(folder, combination, order):
    model = _dora_and_lora(folder)
    with pytest.raises(ValueError, match="adapter 'd' is DoRA, which weighted merging does not combine.*Merge the "
                                         "DoRA into the base first"):
        add_weighted_adapter(model, list(order), [0.5, 0.5], "m", combination)
    assert "m" not in model.lora_adapters


def test_the_command_line_names_the_dora_folder(folder, tmp_path):
    model = _dora_and_lora(folder)
    for name in ("default", "d"):
        set_adapter(model, name)
        save_adapter(model, tmp_path / name)
    fresh = GPT.from_pretrained(str(folder))
    with pytest.raises(ValueError, match=f"adapter --lora {tmp_path / 'd'} is DoRA"):
        load_combined(fresh, [tmp_path / "default", tmp_path / "d"], [1, 1], "cat")
    alone = load_combined(GPT.from_pretrained(str(folder)), [tmp_path / "d"])   # one DoRA, weight 1: just that
    assert all(layer.magnitude is not None for _, layer in lora_modules(alone))


def test_what_peft_makes_of_a_dora_in_a_combination():
    """Why we refuse (named.py's docstring): peft's add_weighted_adapter copies the first adapter's config. A DoRA
    first: the result is a DoRA whose magnitude is ||W0|| (computed at injection, B = 0), not the DoRA's trained
    m. A LoRA first: the result has no magnitude at all, the DoRA's m is dropped."""
    from transformers import GPT2Config
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    for first, second in (("dora", "plain"), ("plain", "dora")):
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"],
                                                            use_dora=True), adapter_name="dora")
        pm.add_adapter("plain", LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"]))
        layer = pm.base_model.model.transformer.h[0].attn.c_attn
        with torch.no_grad():                               # "trained": B != 0, m moved away from ||W0||
            for name in ("dora", "plain"):
                layer.lora_B[name].weight.normal_(std=0.3)
            layer.lora_magnitude_vector["dora"].weight.mul_(1.5)
        pm.add_weighted_adapter([first, second], [1, 1], "mix", combination_type="cat")
        w0_norm = layer.base_layer.weight.detach().norm(dim=0)    # Conv1D [in, out]: ||W0|| per output
        trained_m = layer.lora_magnitude_vector["dora"].weight.detach()
        if first == "dora":
            m = layer.lora_magnitude_vector["mix"].weight.detach()
            torch.testing.assert_close(m, w0_norm, atol=1e-6, rtol=1e-6)   # ||W0||, whatever the DoRA learnt
            assert float(((m - trained_m).abs() / trained_m).min()) > 0.3
        else:
            assert "mix" not in layer.lora_magnitude_vector


def _mtl_folder(folder, path):
    model = apply_mtl_lora(GPT.from_pretrained(str(folder)), n_tasks=2, targets=("c_attn",), r=2)
    return save_mtl_lora(model, path, ["a", "b"])


def test_an_mtl_folder_is_refused_by_every_plain_lora_loader(folder, tmp_path):
    mtl = _mtl_folder(folder, tmp_path / "mtl")
    says = r"'MTL_LORA' adapter, not 'LORA' \(load it with --mtl-lora and --task\)"
    with pytest.raises(ValueError, match=says):
        load_named_adapter(GPT.from_pretrained(str(folder)), mtl, "x")
    with pytest.raises(ValueError, match=says):
        load_combined(GPT.from_pretrained(str(folder)), [mtl])
    multi = tmp_path / "multi"                                 # peft's multi-adapter layout, one subfolder MTL
    model = two_adapters(folder)
    set_adapter(model, "default")
    save_adapter(model, multi)
    save_mtl_lora(apply_mtl_lora(GPT.from_pretrained(str(folder)), 2, targets=("c_attn",), r=2), multi / "t",
                  ["a", "b"])
    fresh = GPT.from_pretrained(str(folder))
    with pytest.raises(ValueError, match=says):
        load_adapters(fresh, multi)
    with pytest.raises(KeyError, match="MTL_LORA"):            # and peft's own loader does not take it for LoRA
        PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(str(folder)), str(mtl))
