"""LoRA (techniques/lora/): against the math, against peft, adapter files both ways, training, the command.

peft and transformers appear only here, as the reference."""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from minigpt import GPT, Example, TrainConfig, causal_lm_loss, collate_lm, lm_loss_fn, train
from techniques.lora import (LoRALinear, LoRAQKV, NF4Linear, apply_lora, load_adapter, lora_modules,
                             lora_parameters, lora_summary, merge_lora, save_adapter)
from techniques.lora.__main__ import build_parser, main

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from transformers import GPT2LMHeadModel  # noqa: E402

PEFT_PREFIX = "base_model.model."
ROOT = Path(__file__).resolve().parents[1]


# ---- helpers ---------------------------------------------------------------------------
SMALL_VOCAB = 1000  # the comparisons do not need GPT-2's 50257 rows; a small head keeps them fast


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A random GPT-2 (TINY shape, 1000-token vocabulary) saved by transformers."""
    from helpers import make_hf_model
    return make_hf_model(tmp_path_factory.mktemp("lora_small"), seed=3, vocab_size=SMALL_VOCAB)[1]


@pytest.fixture(scope="module")
def base(folder):
    return GPT.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def full_folder(tiny_hf):
    """TINY with the real vocabulary, for anything that goes through the tokenizer."""
    return tiny_hf[2]


def ours(folder, seed=0, **lora):
    torch.manual_seed(seed)
    return apply_lora(GPT.from_pretrained(str(folder)), verbose=False, **lora)


def randomise_B(model, seed=1, std=0.2):
    """B starts at zero; give it values so the adapter actually does something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_modules(model):
            for name, p in layer.named_parameters():
                if name.startswith("B"):
                    p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def peft_for(folder, *, r, alpha, targets, rslora=False):
    hf = GPT2LMHeadModel.from_pretrained(str(folder))
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), fan_in_fan_out=True, lora_dropout=0.0,
                     use_rslora=rslora, task_type="CAUSAL_LM")
    return get_peft_model(hf, cfg)


def peft_layers(pm) -> dict[str, LoraLayer]:
    return {n[len(PEFT_PREFIX):]: m for n, m in pm.named_modules() if isinstance(m, LoraLayer)}


def copy_into_peft(model, pm):
    """Our A, B into peft's lora_A/lora_B (nn.Linear weights, [r, in] and [out, r], whatever fan_in_fan_out says)."""
    layers = peft_layers(pm)
    assert set(layers) == {n for n, _ in lora_modules(model)}
    with torch.no_grad():
        for name, layer in lora_modules(model):
            layers[name].lora_A["default"].weight.copy_(layer.A)
            layers[name].lora_B["default"].weight.copy_(layer.B)


def batch(seed=0, B=2, T=12, vocab=SMALL_VOCAB):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


# ---- the layer against its equation ----------------------------------------------------
layer_shapes = st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 8))


@given(shape=layer_shapes, alpha=st.floats(0.5, 64), rslora=st.booleans(), lead=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_layer_is_the_equation(shape, alpha, rslora, lead, seed):
    n_in, n_out, r = shape
    torch.manual_seed(seed)
    base = nn.Linear(n_in, n_out).double()
    layer = LoRALinear(base, r=r, alpha=alpha, rslora=rslora)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(lead, 5, n_in, dtype=torch.float64)
    s = alpha / (math.sqrt(r) if rslora else r)
    expected = x @ base.weight.T + base.bias + s * (x @ layer.A.T @ layer.B.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.delta_weight(), s * (layer.B @ layer.A), rtol=1e-12, atol=1e-12)
    assert not base.weight.requires_grad and layer.A.requires_grad and layer.B.requires_grad


@given(shape=layer_shapes, rslora=st.booleans(), seed=st.integers(0, 2**16))
def test_init_kaiming_A_zero_B(shape, rslora, seed):
    n_in, n_out, r = shape
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(n_in, n_out), r=r, alpha=8, rslora=rslora)
    assert torch.count_nonzero(layer.B) == 0
    bound = 1 / math.sqrt(n_in)  # kaiming_uniform(a=sqrt(5)) on [r, in] draws from U(-1/sqrt(in), 1/sqrt(in))
    assert layer.A.shape == (r, n_in) and layer.A.abs().max() <= bound


@given(n_embd=st.sampled_from([4, 8, 16]), r=st.integers(1, 6), alpha=st.floats(1, 32),
       parts=st.sampled_from([None, "q", "k", "v", "qv", "qk", "kv", "qkv"]), seed=st.integers(0, 2**16))
def test_merge_equals_unmerged_and_unmerge_restores(n_embd, r, alpha, parts, seed):
    torch.manual_seed(seed)
    base = nn.Linear(n_embd, 3 * n_embd)
    W0 = base.weight.detach().clone()
    layer = LoRALinear(base, r=r, alpha=alpha) if parts is None else LoRAQKV(base, parts, r=r, alpha=alpha)
    for name, p in layer.named_parameters():
        if name.startswith("B"):
            torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(3, n_embd)
    unmerged = layer(x)
    delta = layer.delta_weight().detach()
    # float32 rounding grows with the size of the terms summed (alpha up to 32 makes Δ large): the tolerance
    # is relative to Σ|terms| of each output and to |W0| + |Δ| of each weight, far below any real mistake
    terms = (x.abs() @ (W0.abs() + delta.abs()).T + base.bias.abs()).max().item()
    weights = (W0.abs() + delta.abs()).max().item()
    layer.merge()
    assert max_diff(layer(x), unmerged) < 1e-6 * (1 + terms)
    layer.unmerge()
    assert max_diff(layer.base.weight, W0) < 1e-6 * (1 + weights)
    assert max_diff(layer(x), unmerged) < 1e-6 * (1 + terms)


@given(parts=st.sampled_from(["q", "k", "v", "qv", "qk", "kv", "qkv"]), n_head=st.sampled_from([1, 2, 4]),
       r=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_per_projection_changes_only_its_slices(parts, n_head, r, seed):
    torch.manual_seed(seed)
    C = 4 * n_head
    base = nn.Linear(C, 3 * C)
    layer = LoRAQKV(base, parts, r=r, alpha=2 * r)
    for p in layer.B.values():
        torch.nn.init.normal_(p)
    x = torch.randn(2, 5, C)
    got, plain = layer(x).split(C, -1), base(x).split(C, -1)
    delta = layer.delta_weight().split(C, 0)
    for i, name in enumerate("qkv"):
        if name in parts:
            assert max_diff(got[i], plain[i]) > 1e-4
            assert torch.count_nonzero(delta[i]) > 0
        else:
            assert torch.equal(got[i], plain[i])
            assert torch.count_nonzero(delta[i]) == 0


# ---- the fast forward against forward_reference (eq. 3 as written) --------------------------
def adapted_layer(kind, C, r, alpha, dropout=0.0, rslora=False, nf4=False, seed=0):
    """LoRA on a [3C, C] projection: LoRALinear for kind "whole", else LoRAQKV with those parts; B drawn
    away from zero (std 0.5) so that the branch counts, the base optionally stored in 4-bit NF4."""
    torch.manual_seed(seed)
    base = nn.Linear(C, 3 * C)
    base = NF4Linear.from_linear(base) if nf4 else base
    layer = (LoRALinear(base, r=r, alpha=alpha, dropout=dropout, rslora=rslora) if kind == "whole"
             else LoRAQKV(base, kind, r=r, alpha=alpha, dropout=dropout, rslora=rslora))
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("B"):
                p.normal_(std=0.5)
    return layer


adapted = {"kind": st.sampled_from(["whole", "qv", "qkv"]), "C": st.sampled_from([4, 8, 16]), "r": st.integers(1, 6),
           "alpha": st.floats(1, 16), "rslora": st.booleans(), "seed": st.integers(0, 2**16)}


@given(**adapted, dropout=st.sampled_from([0.0, 0.5]), nf4=st.booleans(), lead=st.integers(1, 3))
def test_fast_forward_is_the_reference(kind, C, r, alpha, rslora, seed, dropout, nf4, lead):
    """forward (one in-place addmm_; LoRAQKV's parts packed into a block-diagonal B) gives forward_reference's
    W0·x + b + s·B·A·dropout(x) to fp32 rounding: in eval mode, and in train mode from the same dropout mask."""
    layer = adapted_layer(kind, C, r, alpha, dropout, rslora, nf4, seed).eval()
    x = torch.randn(lead, 5, C)
    with torch.no_grad():
        ref = layer.forward_reference(x)
        fast = layer(x)
        scale = max(1.0, ref.abs().max().item())
        assert max_diff(ref, layer.base(x)) > 1e-2  # the branch counts, so a fast path that lost it would fail
        assert fast.shape == ref.shape == (lead, 5, 3 * C)
        assert max_diff(fast, ref) <= 1e-5 * scale
        if dropout:
            layer.train()
            torch.manual_seed(seed)
            fast_d = layer(x)
            torch.manual_seed(seed)
            ref_d = layer.forward_reference(x)
            assert max_diff(fast_d, ref) > 1e-3  # the mask dropped something
            assert max_diff(fast_d, ref_d) <= 1e-5 * scale


@given(**adapted, nf4=st.booleans(), lead=st.integers(1, 3))
def test_fast_forward_gradients_are_the_references(kind, C, r, alpha, rslora, seed, nf4, lead):
    """Train mode, dropout 0: the gradients of every A and B, and of the input, through the in-place addmm_
    equal those through base(x) + lora_branch(x)."""
    layer = adapted_layer(kind, C, r, alpha, 0.0, rslora, nf4, seed).train()
    x = torch.randn(lead, 5, C, requires_grad=True)
    w = torch.randn(lead, 5, 3 * C)  # a loss that weighs every output differently
    params = [p for p in layer.parameters() if p.requires_grad]
    assert len(params) == 2 * (1 if kind == "whole" else len(kind))  # an A and a B for each adapted part
    fast = torch.autograd.grad((layer(x) * w).sum(), [x, *params])
    ref = torch.autograd.grad((layer.forward_reference(x) * w).sum(), [x, *params])
    for f, g in zip(fast, ref):
        assert g.abs().max() > 0
        assert max_diff(f, g) <= 1e-5 * max(1.0, g.abs().max().item())


@given(**adapted)
def test_fast_forward_under_bf16_autocast_is_the_reference_under_it(kind, C, r, alpha, rslora, seed):
    """Under bf16 autocast on a CPU both paths come out in bf16. forward rounds W0·x + b and then its fused
    multiply-add; the reference rounds W0·x + b, B·A·x, its scaling and the sum: a few bf16 roundings
    (2^-8 relative each) of terms no larger than |W0·x + b| + |s·B·A·x|, so 2^-5 of that bounds them."""
    layer = adapted_layer(kind, C, r, alpha, rslora=rslora, seed=seed).eval()
    x = torch.randn(2, 5, C)
    with torch.no_grad():
        size = (layer.base(x).abs() + layer.lora_branch(x).abs()).max().item()  # fp32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast, ref = layer(x), layer.forward_reference(x)
    assert fast.dtype == ref.dtype == torch.bfloat16
    assert max_diff(fast, ref) <= 2**-5 * size


@given(targets=st.sampled_from([("c_attn",), ("c_proj",), ("mlp.c_fc",), ("attn.c_proj", "mlp.c_proj"),
                                ("c_attn", "c_proj", "c_fc")]),
       qkv=st.sampled_from([None, "qv", "k"]), r=st.integers(1, 8), rslora=st.booleans(), seed=st.integers(0, 99))
def test_zero_B_adapted_model_is_the_base_model_exactly(base, targets, qkv, r, rslora, seed):
    if qkv is not None and "c_attn" not in targets:
        qkv = None
    ids = batch(seed, T=10)
    adapted = apply_lora(copy.deepcopy(base), r=r, alpha=3 * r, targets=targets, qkv=qkv, rslora=rslora,
                         verbose=False)
    assert torch.equal(adapted(ids).logits, base(ids).logits)


# ---- apply_lora: placement, freezing, summary, errors ------------------------------------
def test_apply_lora_places_and_freezes(base):
    model = apply_lora(copy.deepcopy(base), r=4, targets=["c_proj"], verbose=False)
    names = [n for n, _ in lora_modules(model)]
    # suffix match, as peft
    assert names == [f"transformer.h.{i}.{m}.c_proj" for i in range(2) for m in ("attn", "mlp")]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{ab}" for n in names for ab in ("A", "B")}
    assert lora_parameters(model) and all(p.requires_grad for p in lora_parameters(model))


def test_summary_on_the_124M_shape():
    from minigpt import GPTConfig
    with torch.device("meta"):  # no memory: only the parameter counts matter
        model = GPT(GPTConfig.from_name("gpt2"))
    apply_lora(model, r=8, targets=("c_attn",), verbose=False)
    assert lora_summary(model) == "LoRA r=8 on c_attn: 294,912 trainable of 124,734,720 parameters (0.24%)"


@pytest.mark.parametrize("kwargs, match", [
    (dict(targets=["q_proj"]), "match no module"),
    (dict(targets=["attn"]), "CausalSelfAttention"),
    (dict(targets=["lm_head"]), "lm_head"),
    (dict(targets=[]), "empty"),
    (dict(targets="c_attn"), "regular expression"),
    (dict(r=0), "rank"),
    (dict(alpha=-1), "alpha"),
    (dict(dropout=1.0), "dropout"),
    (dict(qkv="qx"), "subset"),
    (dict(targets=["c_fc"], qkv="qv"), "c_attn"),
])
def test_apply_lora_errors(base, kwargs, match):
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=match):
        apply_lora(model, verbose=False, **kwargs)
    assert not list(lora_modules(model))


def test_apply_twice_is_an_error(base):
    model = apply_lora(copy.deepcopy(base), verbose=False)
    with pytest.raises(ValueError, match="already carries LoRA"):
        apply_lora(model, verbose=False)


def test_regex_targets_as_peft(base):
    model = apply_lora(copy.deepcopy(base), targets=r".*\.h\.1\.attn\.c_attn", verbose=False)
    assert [n for n, _ in lora_modules(model)] == ["transformer.h.1.attn.c_attn"]


def test_merge_lora_gives_a_plain_model(folder, base):
    model = randomise_B(ours(folder, targets=["c_attn", "c_fc"], qkv="qv"))
    ids = batch(3)
    with torch.no_grad():
        before = model(ids).logits
        merge_lora(model)
        after = model(ids).logits
    assert max_diff(after, before) < 1e-5
    assert not list(lora_modules(model))
    assert set(model.state_dict()) == set(base.state_dict())
    # the model's own Linear
    assert type(model.transformer.h[0].attn.c_attn) is type(base.transformer.h[0].attn.c_attn)


# ---- against peft ----------------------------------------------------------------------
PEFT_CASES = {
    "c_attn": dict(targets=("c_attn",), rslora=False),
    "c_proj": dict(targets=("c_proj",), rslora=False),
    "c_fc": dict(targets=("c_fc",), rslora=False),
    "rslora": dict(targets=("c_attn", "c_fc"), rslora=True),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_matches_peft_logits_gradients_and_20_adamw_steps(folder, case):
    c = PEFT_CASES[case]
    r, alpha = 4, 12
    model = randomise_B(ours(folder, r=r, alpha=alpha, targets=c["targets"], rslora=c["rslora"]))
    pm = peft_for(folder, r=r, alpha=alpha, targets=c["targets"], rslora=c["rslora"])
    copy_into_peft(model, pm)
    model.train(), pm.train()  # dropout is 0 everywhere, so train mode is deterministic
    ids = batch(1, B=2, T=16)

    ours_logits, peft_logits = model(ids).logits, pm(input_ids=ids).logits
    assert max_diff(ours_logits, peft_logits) < 1e-5
    causal_lm_loss(ours_logits, ids).backward()
    causal_lm_loss(peft_logits, ids).backward()
    layers = peft_layers(pm)
    for name, layer in lora_modules(model):
        assert max_diff(layer.A.grad, layers[name].lora_A["default"].weight.grad) < 1e-5, name
        assert max_diff(layer.B.grad, layers[name].lora_B["default"].weight.grad) < 1e-5, name
    assert all(p.grad is None for n, p in model.named_parameters() if ".base." in n or "ln_" in n)

    peft_params = [p for n, p in pm.named_parameters() if p.requires_grad]
    assert len(peft_params) == len(lora_parameters(model))
    opt_ours = torch.optim.AdamW(lora_parameters(model), lr=1e-2, weight_decay=0.01)
    opt_peft = torch.optim.AdamW(peft_params, lr=1e-2, weight_decay=0.01)
    for step in range(20):
        ids = batch(100 + step, B=2, T=16)
        for opt, logits in ((opt_ours, lambda: model(ids).logits), (opt_peft, lambda: pm(input_ids=ids).logits)):
            opt.zero_grad()
            causal_lm_loss(logits(), ids).backward()
            opt.step()
    for name, layer in lora_modules(model):
        assert max_diff(layer.A, layers[name].lora_A["default"].weight) < 1e-4, name
        assert max_diff(layer.B, layers[name].lora_B["default"].weight) < 1e-4, name
    assert max_diff(model(ids).logits, pm(input_ids=ids).logits) < 1e-4


def test_peft_kaiming_init_has_the_same_distribution(folder):
    """Not bitwise (peft builds nn.Linear first), but the same bound: U(-1/sqrt(in), 1/sqrt(in)), B = 0."""
    pm = peft_for(folder, r=8, alpha=16, targets=("c_fc",))
    model = ours(folder, r=8, alpha=16, targets=("c_fc",))
    for name, layer in lora_modules(model):
        theirs = peft_layers(pm)[name]
        assert layer.A.shape == theirs.lora_A["default"].weight.shape
        assert layer.B.shape == theirs.lora_B["default"].weight.shape
        assert torch.count_nonzero(theirs.lora_B["default"].weight) == 0 == torch.count_nonzero(layer.B)
        bound = 1 / math.sqrt(layer.in_features)
        assert layer.A.abs().max() <= bound and theirs.lora_A["default"].weight.abs().max() <= bound
        assert layer.scaling == theirs.scaling["default"]


# ---- adapter files, both ways ----------------------------------------------------------
def test_our_adapter_loads_in_peft(folder, tmp_path):
    model = randomise_B(ours(folder, r=4, alpha=8, targets=["c_attn", "mlp.c_proj"]))
    save_adapter(model, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"], cfg["fan_in_fan_out"], cfg["bias"],
            cfg["use_rslora"], cfg["target_modules"]) == ("LORA", "CAUSAL_LM", 4, 8, True, "none", False,
                                                          ["c_attn", "mlp.c_proj"])
    assert set(cfg) <= set(LoraConfig.__dataclass_fields__)  # every field we write is one peft knows
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert keys[PEFT_PREFIX + "transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 32)
    assert keys[PEFT_PREFIX + "transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 4)

    pm = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(str(folder)), str(tmp_path / "ad"))
    ids = batch(5)
    with torch.no_grad():
        assert max_diff(pm(input_ids=ids).logits, model(ids).logits) < 1e-5
    assert set(peft_layers(pm)) == {n for n, _ in lora_modules(model)}


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_loads_here(folder, tmp_path, rslora):
    torch.manual_seed(0)
    pm = peft_for(folder, r=6, alpha=10, targets=("c_attn", "c_fc", "c_proj"), rslora=rslora)
    with torch.no_grad():
        for layer in peft_layers(pm).values():
            layer.lora_B["default"].weight.normal_(std=0.2)
    pm.save_pretrained(str(tmp_path / "peft"))
    model = load_adapter(GPT.from_pretrained(str(folder)), tmp_path / "peft")
    assert len(list(lora_modules(model))) == 8  # c_proj is attn.c_proj and mlp.c_proj
    ids = batch(6)
    with torch.no_grad():
        assert max_diff(model(ids).logits, pm(input_ids=ids).logits) < 1e-5


@pytest.mark.parametrize("qkv, targets, rslora", [
    ("qv", ["c_attn"], False),
    ("qv", ["c_attn", "mlp.c_fc"], False),   # the other layers are padded to rank 2r
    ("qkv", ["c_attn", "c_proj"], True),     # rsLoRA: alpha grows by sqrt(3)
    ("k", ["c_attn"], False),
])
def test_per_projection_adapter_survives_the_conversion(folder, tmp_path, qkv, targets, rslora):
    r, alpha = 3, 7
    model = randomise_B(ours(folder, r=r, alpha=alpha, targets=targets, qkv=qkv, rslora=rslora))
    save_adapter(model, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    m = len(qkv)
    assert cfg["r"] == m * r
    assert cfg["lora_alpha"] == pytest.approx(alpha * (math.sqrt(m) if rslora else m))
    ids = batch(7)
    with torch.no_grad():
        expected = model(ids).logits
        pm = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(str(folder)), str(tmp_path / "ad"))
        assert max_diff(pm(input_ids=ids).logits, expected) < 1e-5
        back = load_adapter(GPT.from_pretrained(str(folder)), tmp_path / "ad")
        assert max_diff(back(ids).logits, expected) < 1e-5
    # the fused B holds B_p in p's rows only
    fused = dict(lora_modules(back))["transformer.h.0.attn.c_attn"].B.detach()
    for i, name in enumerate("qkv"):
        rows = fused[i * 32:(i + 1) * 32]
        assert (torch.count_nonzero(rows) > 0) == (name in qkv)


def test_save_is_atomic_and_checks_the_model(folder, tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(GPT.from_pretrained(str(folder)), tmp_path / "none")
    assert not any((tmp_path / "none").glob("adapter_*"))


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory, folder):
    d = tmp_path_factory.mktemp("good")
    save_adapter(randomise_B(ours(folder, r=2, alpha=4, targets=["c_attn"])), d)
    return d


@pytest.mark.parametrize("change, match", [
    ({"use_dora": True}, "lora_magnitude_vector"),  # DoRA without its magnitudes
    ({"rank_pattern": {"c_attn": 4}}, "rank_pattern"),
    ({"alpha_pattern": {"c_attn": 4}}, "alpha_pattern"),
    ({"bias": "all"}, "bias"),
    ({"lora_bias": True}, "lora_bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"layers_to_transform": [0]}, "layers_to_transform"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ({"peft_type": "PREFIX_TUNING"}, "not 'LORA'"),
    ({"task_type": "SEQ_CLS"}, "task_type"),
    ({"use_something_new": True}, "use_something_new"),
    ({"r": 3}, "shape"),
    ({"r": 0}, "rank"),
    ({"target_modules": ["c_attn", "c_fc"]}, "no tensor"),
    ({"target_modules": ["q_proj"]}, "match no module"),
])
def test_unsupported_or_broken_peft_adapters_are_refused(folder, good_adapter, tmp_path, change, match):
    d = tmp_path / "bad"
    shutil.copytree(good_adapter, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    model = GPT.from_pretrained(str(folder))
    with pytest.raises(ValueError, match=match):
        load_adapter(model, d)
    assert not list(lora_modules(model))  # refused before touching the model


def test_adapter_file_problems(folder, good_adapter, tmp_path):
    model = GPT.from_pretrained(str(folder))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(model, tmp_path / "missing")
    d = tmp_path / "extra"
    shutil.copytree(good_adapter, d)
    from safetensors.torch import load_file, save_file
    t = load_file(str(d / "adapter_model.safetensors"))
    save_file({**t, PEFT_PREFIX + "transformer.wte.lora_embedding_A": torch.zeros(2, 3)},
              str(d / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="no LoRA layer takes"):
        load_adapter(model, d)
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickled"):
        load_adapter(model, d)
    (d / "adapter_model.bin").rename(d / "adapter_model.safetensors")
    (d / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="damaged and cannot be read") as e:
        load_adapter(model, d)
    assert str(d / "adapter_model.safetensors") in str(e.value)
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    (d / "adapter_config.json").write_text("{not json")
    (d / "adapter_model.bin").rename(d / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(model, d)
    assert not list(lora_modules(model))


# ---- training does its job -------------------------------------------------------------
def test_training_lowers_loss_and_leaves_base_weights_bit_identical(folder, tokenizer):
    """A random model's head is too weak to fit anything, so its embeddings are scaled up first
    (like a trained model's); the corpus gets its own small vocabulary (its distinct tokens)."""
    text = "the quick brown fox jumps over the lazy dog. " * 40
    ids = tokenizer.encode(text)
    vocab = sorted(set(ids))
    ids = [vocab.index(i) for i in ids]
    examples = [Example(ids[i:i + 16], [1] * 16) for i in range(0, len(ids) - 16, 16)]
    model = GPT.from_pretrained(str(folder))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(10)
    apply_lora(model, r=8, alpha=16, targets=["c_attn", "c_proj", "mlp.c_fc"], verbose=False)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    loss_fn = lm_loss_fn(model)
    with torch.no_grad():
        base_loss = loss_fn(collate_lm(examples)).item()
    history = train(lora_parameters(model), loss_fn, examples,
                    config=TrainConfig(epochs=20, max_steps=40, batch_size=8, lr=1e-2, progress=False))
    with torch.no_grad():
        final = loss_fn(collate_lm(examples)).item()
    assert final < 0.5 * base_loss, (base_loss, final)
    assert history[-1]["loss"] < history[0]["loss"]
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n


# ---- command line ----------------------------------------------------------------------
def run_cli_of(command_main, argv, capsys):
    """A command in-process (no interpreter start-up): (exit code, stdout, stderr)."""
    try:
        code = command_main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def run_cli(argv, capsys):
    return run_cli_of(main, argv, capsys)


def cli_args(data, folder, out, *extra):
    return ["train", "--data", str(data), "--weights", str(folder), "--device", "cpu", "--out", str(out),
            "--block-size", "16", "--batch-size", "4", "--no-progress", *extra]


def test_cli_trains_saves_and_merges(full_folder, tmp_path, capsys):
    folder = full_folder
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Q{i}:", "completion": f" answer {i}"}) for i in range(12)))
    out = tmp_path / "ad"
    code, stdout, err = run_cli(cli_args(data, folder, out, "--max-steps", "4", "--targets", "c_attn,mlp.c_fc",
                                         "--qkv", "qv", "--lr", "1e-3", "--eval-every", "2", "--epochs", "2"), capsys)
    assert code == 0, err
    assert "LoRA r=8 on c_attn, mlp.c_fc" in stdout and "saved LoRA adapter" in stdout
    history = json.loads((out / "history.json").read_text())["history"]
    assert [h["step"] for h in history] == [0, 1, 2, 3] and "eval_loss" in history[-1]
    model = load_adapter(GPT.from_pretrained(str(folder)), out)
    assert len(list(lora_modules(model))) == 4

    code, _, err = run_cli(["merge", "--lora", str(out), "--weights", str(folder), "--out", str(tmp_path / "merged"),
                            "--device", "cpu"], capsys)
    assert code == 0, err
    ids = batch(8)
    with torch.no_grad():
        assert max_diff(GPT.from_pretrained(str(tmp_path / "merged"))(ids).logits, model(ids).logits) < 1e-5


def test_generate_cli_takes_our_adapter(full_folder, good_adapter, capsys):
    """The lead's `python -m minigpt generate --lora DIR` calls load_adapter(model, DIR)."""
    folder = full_folder
    from minigpt.__main__ import main as minigpt_main
    code = minigpt_main(["generate", "Hello", "--weights", str(folder), "--lora", str(good_adapter), "--device", "cpu",
                         "--greedy", "--max-new-tokens", "3"])
    assert code == 0 and capsys.readouterr().out.startswith("Hello")


@pytest.mark.parametrize("name, content, match", [
    ("empty.txt", b"", "empty"),
    ("latin1.txt", "caf\xe9 au lait\n".encode("latin-1") * 3, "line 1: not UTF-8"),
    ("short.txt", b"just a few words", "shorter than one block"),
    ("pairs.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n',
     "line 2: needs a string field 'completion'"),
    ("broken.jsonl", b'{"prompt": "a", "completion": "b"}\n{nope\n', "line 2: not valid JSON"),
])
def test_cli_bad_data_files(full_folder, tmp_path, capsys, name, content, match):
    folder = full_folder
    data = tmp_path / name
    data.write_bytes(content)
    code, _, err = run_cli(cli_args(data, folder, tmp_path / "out"), capsys)
    assert code == 2 and str(data) in err and match in err, err
    assert not any((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


def test_cli_failed_run_leaves_no_adapter(full_folder, tmp_path, capsys):
    folder = full_folder
    data = tmp_path / "text.txt"
    data.write_text("some ordinary words to learn from, repeated. " * 30)
    out = tmp_path / "out"
    code, _, err = run_cli(cli_args(data, folder, out, "--lr", "1e30", "--max-steps", "6"), capsys)
    assert code == 2 and "lower the learning rate" in err and "nothing was saved" in err
    assert not out.exists() or not any(out.iterdir())


def test_cli_eval_fraction_zero_trains_on_everything(full_folder, tmp_path, capsys, tokenizer):
    data = tmp_path / "text.txt"
    data.write_text("a few plain words, said again and again. " * 20)
    code, _, err = run_cli(cli_args(data, full_folder, tmp_path / "out", "--eval-fraction", "0", "--batch-size", "1",
                                    "--eval-every", "1"), capsys)
    assert code == 0, err
    history = json.loads((tmp_path / "out" / "history.json").read_text())["history"]
    assert len(history) == len(tokenizer.encode(data.read_text())) // 16  # every block, one per step
    assert not any("eval_loss" in h for h in history)


def test_cli_help(capsys):
    code, stdout, _ = run_cli(["train", "--help"], capsys)
    assert code == 0 and "--data" in stdout and "--device" in stdout and "--seed" in stdout and "--qkv" in stdout


def assert_one_line_error(code, err, *words):
    """The error policy: exit code 2, one line on stderr starting with 'error:', no traceback."""
    assert code == 2, err
    assert err.startswith("error:") and err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)


def test_cli_max_steps_trains_exactly_that_many_steps(full_folder, tmp_path, capsys):
    """--max-steps 6 with the default single epoch: 6 steps, cycling the data, announced before training."""
    data = tmp_path / "text.txt"
    data.write_text("a short text to go over again and again. " * 6)
    out = tmp_path / "out"
    code, stdout, err = run_cli(cli_args(data, full_folder, out, "--max-steps", "6"), capsys)
    assert code == 0, err
    lines = stdout.splitlines()
    assert lines[0].startswith("LoRA r=8 on c_attn: ") and "trainable of" in lines[0]
    assert lines[1].startswith("training 6 steps (")
    history = json.loads((out / "history.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(6))
    assert history[-1]["epoch"] > 0  # one epoch is fewer than 6 steps here: the data was cycled
    assert "after 6 steps" in lines[-1]


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] if how == "truncated" else b"\x00garbage, not safetensors")


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_damaged_adapter_weights_give_one_line(full_folder, good_adapter, tmp_path, capsys, how):
    d = tmp_path / "ad"
    shutil.copytree(good_adapter, d)
    weights = d / "adapter_model.safetensors"
    damage(weights, how)

    from minigpt.__main__ import main as minigpt_main
    code, stdout, err = run_cli_of(minigpt_main, ["generate", "Hello", "--weights", str(full_folder), "--lora", str(d),
                                                  "--device", "cpu", "--max-new-tokens", "3"], capsys)
    assert_one_line_error(code, err, str(weights), "damaged")
    assert stdout == ""

    merged = tmp_path / "merged"
    code, stdout, err = run_cli(["merge", "--lora", str(d), "--weights", str(full_folder), "--out", str(merged),
                                 "--device", "cpu"], capsys)
    assert_one_line_error(code, err, str(weights), "damaged", f"nothing was saved to {merged}")
    assert not merged.exists()


def test_cli_train_with_damaged_model_weights_gives_one_line(full_folder, tmp_path, capsys):
    weights_dir = tmp_path / "weights"
    shutil.copytree(full_folder, weights_dir)
    damage(weights_dir / "model.safetensors", "truncated")
    data = tmp_path / "text.txt"
    data.write_text("some ordinary words to learn from, repeated. " * 30)
    out = tmp_path / "out"
    code, stdout, err = run_cli(cli_args(data, weights_dir, out, "--max-steps", "2"), capsys)
    assert_one_line_error(code, err, str(weights_dir / "model.safetensors"), "damaged",
                          f"nothing was saved to {out}")
    assert "training" not in stdout and not out.exists()


def shared_training_options() -> dict[str, argparse.Action]:
    """What minigpt.cli.add_train_args gives every training command, with LoRA's default lr."""
    from minigpt.cli import add_train_args
    reference = argparse.ArgumentParser()
    add_train_args(reference, lr=2e-4, lr_help="2e-4")
    return {a.option_strings[0]: a for a in reference._actions if a.option_strings[0] != "-h"}


def test_cli_train_help_shows_every_shared_training_option(capsys):
    code, stdout, _ = run_cli(["train", "--help"], capsys)
    assert code == 0
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    train_parser = subparsers.choices["train"]
    ours = {a.option_strings[0]: a for a in train_parser._actions if a.option_strings}
    for option, shared in shared_training_options().items():
        assert option in stdout, option
        assert ours[option].help == shared.help and ours[option].default == shared.default, option
    assert ours["--lr"].default == 2e-4 and ours["--epochs"].default == 1 and ours["--max-steps"].default is None


def test_python_dash_m_techniques_lora_help():
    r = subprocess.run([sys.executable, "-m", "techniques.lora", "--help"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "train" in r.stdout and "merge" in r.stdout and r.stderr == ""
