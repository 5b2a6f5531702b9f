"""Named LoRA adapters and weighted merging (techniques/lora/named.py), against peft on the same weights."""
from __future__ import annotations

import pytest
import torch

from minigpt import GPT
from techniques.lora import (add_adapter, add_weighted_adapter, adapter_names, delete_adapter, disable_adapters,
                             load_adapters, lora_modules, merge_lora, save_adapter, save_adapters, set_adapter)

peft = pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402
from transformers import GPT2LMHeadModel  # noqa: E402

VOCAB = 1000


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from helpers import make_hf_model
    return make_hf_model(tmp_path_factory.mktemp("adapters"), seed=5, vocab_size=VOCAB)[1]


def ids(seed=0):
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(seed))


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_modules(model):
            layer.B.copy_(torch.randn(layer.B.shape, generator=g) * 0.2)


def two_adapters(folder, r_b=4, targets_b=("c_attn",)):
    model = GPT.from_pretrained(str(folder))
    torch.manual_seed(0)
    add_adapter(model, "default", r=4, alpha=8, targets=["c_attn"])
    randomise(model, 1)
    add_adapter(model, "b", r=r_b, alpha=16, targets=list(targets_b))
    set_adapter(model, "b")
    randomise(model, 2)
    set_adapter(model, "default")
    return model


def saved_two_adapters(tmp_path_factory, tag: str):
    """A random GPT-2-shaped base folder and two_adapters' "default" and "b" each saved as its own peft folder:
    (base folder, model with both, [default dir, b dir])."""
    from helpers import make_hf_model
    base = make_hf_model(tmp_path_factory.mktemp(f"{tag}_base"), seed=5, vocab_size=VOCAB)[1]
    model = two_adapters(base)
    dirs = []
    for name in ("default", "b"):
        set_adapter(model, name)
        dirs.append(save_adapter(model, tmp_path_factory.mktemp(f"{tag}_{name}")))
    return base, model, dirs


def test_switching_disabling_and_deleting(folder):
    base = GPT.from_pretrained(str(folder)).eval()
    model = two_adapters(folder).eval()
    x = ids()
    with torch.no_grad():
        ref = base(x).logits
        a = model(x).logits
        set_adapter(model, "b")
        b = model(x).logits
        disable_adapters(model)
        off = model(x).logits
        set_adapter(model, "default")
        assert torch.equal(model(x).logits, a)
    assert torch.equal(off, ref)  # all adapters off: the base bit for bit
    assert (a - ref).abs().max() > 1e-3 and (b - a).abs().max() > 1e-3
    with pytest.raises(KeyError, match="no adapter named 'zz'"):
        set_adapter(model, "zz")
    delete_adapter(model, "b")
    assert adapter_names(model) == ["default"]
    merge_lora(model)
    with torch.no_grad():
        assert (model(x).logits - a).abs().max() < 1e-5


def test_peft_multi_adapter_folder_both_ways(folder, tmp_path):
    model = two_adapters(folder, targets_b=("c_attn", "c_fc")).eval()
    save_adapters(model, tmp_path / "ours")
    assert (tmp_path / "ours" / "b" / "adapter_config.json").is_file()
    pm = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(str(folder)), str(tmp_path / "ours")).eval()
    pm.load_adapter(str(tmp_path / "ours" / "b"), adapter_name="b")
    pm.save_pretrained(str(tmp_path / "peft"))
    back = GPT.from_pretrained(str(folder)).eval()
    assert load_adapters(back, tmp_path / "peft") == ["default", "b"]
    x = ids(1)
    with torch.no_grad():
        for name in ("default", "b"):
            set_adapter(model, name), set_adapter(back, name), pm.set_adapter(name)
            ref = pm(input_ids=x).logits
            assert (model(x).logits - ref).abs().max() < 1e-5
            assert (back(x).logits - ref).abs().max() < 1e-5


@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
def test_weighted_merge_equals_peft(folder, tmp_path, combination):
    model = two_adapters(folder).eval()
    save_adapters(model, tmp_path)
    pm = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(str(folder)), str(tmp_path)).eval()
    pm.load_adapter(str(tmp_path / "b"), adapter_name="b")
    w = [0.7, -0.4]
    pm.add_weighted_adapter(["default", "b"], w, "mix", combination_type=combination)
    add_weighted_adapter(model, ["default", "b"], w, "mix", combination_type=combination)
    pm.set_adapter("mix"), set_adapter(model, "mix")
    peft_layers = {n[len("base_model.model."):]: m for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    for name, layer in lora_modules(model):
        pA, pB = peft_layers[name].lora_A["mix"].weight, peft_layers[name].lora_B["mix"].weight
        assert (layer.B @ layer.A - pB @ pA).abs().max() < 1e-5
        if combination != "svd":  # svd's factors are defined up to signs; their product above is not
            assert (layer.A - pA).abs().max() < 1e-5 and (layer.B - pB).abs().max() < 1e-5
    x = ids(2)
    with torch.no_grad():
        assert (model(x).logits - pm(input_ids=x).logits).abs().max() < 1e-5


def test_bad_input(folder):
    model = two_adapters(folder, r_b=2, targets_b=("c_fc",))
    with pytest.raises(ValueError, match="2 weight"):
        add_weighted_adapter(model, ["default"], [1, 2], "m", "cat")
    with pytest.raises(ValueError, match="one rank"):
        add_weighted_adapter(model, ["default", "b"], [1, 1], "m", "linear")
    with pytest.raises(ValueError, match="same layers"):
        add_weighted_adapter(model, ["default", "b"], [1, 1], "m", "cat")
    with pytest.raises(KeyError, match="no adapter named .nope."):
        add_weighted_adapter(model, ["nope"], [1], "m", "svd")
    add_adapter(model, "d", r=2, alpha=4, targets=["c_attn"], use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        add_weighted_adapter(model, ["default", "d"], [1, 1], "m", "cat")
