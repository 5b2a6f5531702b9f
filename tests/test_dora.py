"""DoRA (Liu et al. 2024) on top of techniques/lora: the paper's equation, the detached norm, merge and unmerge,
peft interchange both ways (logits, gradients, merged weights, adapter files, per-projection c_attn), training."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2LMHeadModel

from helpers import make_hf_model
from minigpt import GPT, causal_lm_loss
from techniques.lora import apply_lora, load_adapter, lora_parameters, merge_lora, save_adapter
from techniques.lora.lora import LoRALinear, LoRAQKV, lora_modules

VOCAB = 1000


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("dora"), seed=5, vocab_size=VOCAB)[1]


def batch(seed=0, B=2, T=10):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def perturb(model, seed=1):
    """B away from zero and m away from ||W0||, so the adapter, and each part of DoRA, does something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_modules(model):
            for name, p in layer.named_parameters():
                if name.startswith("B"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            layer.magnitude.mul_(1 + 0.2 * torch.randn(layer.magnitude.shape, generator=g))
    return model


# ---- the layer against the paper's equation ----------------------------------------------------------------
@given(n_in=st.integers(1, 10), n_out=st.integers(1, 10), r=st.integers(1, 5), alpha=st.floats(0.5, 32),
       seed=st.integers(0, 2 ** 16))
def test_dora_layer_is_eq_5(n_in, n_out, r, alpha, seed):
    """y = m · (W0 + s·B·A) / ||W0 + s·B·A||_row · x + b; at B = 0 (the start) it is the base layer."""
    torch.manual_seed(seed)
    base = nn.Linear(n_in, n_out).double()
    layer = LoRALinear(base, r=r, alpha=alpha, use_dora=True)
    x = torch.randn(3, n_in, dtype=torch.float64)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.magnitude, base.weight.norm(dim=1), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        layer.B.normal_()
        layer.magnitude.mul_(torch.rand(n_out, dtype=torch.float64) + 0.5)
    V = base.weight + alpha / r * layer.B @ layer.A
    W = layer.magnitude[:, None] * V / V.norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer(x), x @ W.T + base.bias, rtol=1e-10, atol=1e-10)


@given(seed=st.integers(0, 2 ** 16))
def test_the_norm_is_a_constant_in_the_backward_pass(seed):
    """Section 4.3: gradients of m, A and B are those of W' with ||W0 + s·B·A|| detached."""
    torch.manual_seed(seed)
    base = nn.Linear(6, 5).double()
    layer = LoRALinear(base, r=2, alpha=4, use_dora=True)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(4, 6, dtype=torch.float64)
    params = (layer.magnitude, layer.A, layer.B)
    got = torch.autograd.grad(layer(x).pow(2).sum(), params)
    V = base.weight + 2.0 * layer.B @ layer.A
    W = layer.magnitude[:, None] * V / V.norm(dim=1, keepdim=True).detach()
    want = torch.autograd.grad((x @ W.T + base.bias).pow(2).sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    V2 = base.weight + 2.0 * layer.B @ layer.A  # with the norm in the graph the gradient differs
    W2 = layer.magnitude[:, None] * V2 / V2.norm(dim=1, keepdim=True)
    other = torch.autograd.grad((x @ W2.T + base.bias).pow(2).sum(), params)
    assert not torch.allclose(other[1], got[1])


@given(parts=st.sampled_from([None, "qv", "k", "qkv"]), seed=st.integers(0, 2 ** 16))
def test_dora_merge_equals_unmerged_and_unmerge_restores(parts, seed):
    torch.manual_seed(seed)
    base = nn.Linear(8, 24)
    W0 = base.weight.detach().clone()
    layer = (LoRALinear(base, r=3, alpha=6, use_dora=True) if parts is None
             else LoRAQKV(base, parts, r=3, alpha=6, use_dora=True))
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("B"):
                p.normal_()
        layer.magnitude.mul_(1.5)
    x = torch.randn(5, 8)
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(base.weight, W0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


# ---- against peft, on the same weights ----------------------------------------------------------------------
def peft_dora(folder, targets=("c_attn",), r=4, alpha=8):
    hf = GPT2LMHeadModel.from_pretrained(str(folder))
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), fan_in_fan_out=True, lora_dropout=0.0,
                     use_dora=True, init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(7)
    return get_peft_model(hf, cfg)


def grads(loss, params):
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("targets", [("c_attn",), ("c_attn", "c_fc", "c_proj")])
def test_peft_dora_adapter_loads_here_to_equal_logits_gradients_and_merge(folder, tmp_path, targets):
    pm = peft_dora(folder, targets)
    with torch.no_grad():  # move m off its initial value so that the magnitude matters
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["use_dora"] is True
    model = load_adapter(GPT.from_pretrained(str(folder)), tmp_path / "peft")
    ids = batch()
    pm.eval()
    theirs = pm(input_ids=ids).logits
    mine = model(ids).logits
    assert (mine - theirs).abs().max() < 1e-4
    # gradients of every A, B, m through the same loss
    ours_p = {n: p for n, p in model.named_parameters() if p.requires_grad}
    peft_p = {n.replace("base_model.model.", "").replace(".lora_A.default.weight", ".A")
              .replace(".lora_B.default.weight", ".B").replace(".lora_magnitude_vector.default.weight", ".magnitude"):
              p for n, p in pm.named_parameters() if p.requires_grad}
    assert set(ours_p) == set(peft_p)
    names = sorted(ours_p)
    g_ours = grads(causal_lm_loss(model(ids).logits, ids), [ours_p[n] for n in names])
    g_peft = grads(causal_lm_loss(pm(input_ids=ids).logits, ids), [peft_p[n] for n in names])
    for n, a, b in zip(names, g_ours, g_peft):
        assert (a - b).abs().max() < 1e-5 * max(1.0, b.abs().max().item()), n
    # merged: peft's merge_and_unload against ours
    merged_theirs = pm.merge_and_unload()(input_ids=ids).logits
    merged_mine = merge_lora(model)(ids).logits
    assert (merged_mine - merged_theirs).abs().max() < 1e-4
    assert (merged_mine - mine).abs().max() < 1e-4


@pytest.mark.parametrize("qkv", [None, "qv"])
def test_our_dora_adapter_loads_in_peft(folder, tmp_path, qkv):
    """Ours (whole c_attn, or q and v each with their own A, B, saved in peft's fused form) -> peft: same logits,
    unmerged and merged."""
    torch.manual_seed(0)
    model = perturb(apply_lora(GPT.from_pretrained(str(folder)), r=2, alpha=4, targets=["c_attn"], qkv=qkv,
                               use_dora=True, verbose=False))
    save_adapter(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True
    pm = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(str(folder)), tmp_path / "ours").eval()
    ids = batch(1)
    mine = model(ids).logits
    assert (mine - pm(input_ids=ids).logits).abs().max() < 1e-4
    assert (pm.merge_and_unload()(input_ids=ids).logits - mine).abs().max() < 1e-4
    again = load_adapter(GPT.from_pretrained(str(folder)), tmp_path / "ours")  # and back here
    assert (again(ids).logits - mine).abs().max() < 1e-5


def test_dora_trains_and_the_loss_falls(folder):
    """(A random model's head is too weak to fit anything: its embeddings are scaled up first, like a trained
    model's, as in test_lora.)"""
    torch.manual_seed(0)
    model = GPT.from_pretrained(str(folder))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(10)
    model = apply_lora(model, r=4, alpha=8, targets=["c_attn", "c_proj", "c_fc"], use_dora=True, verbose=False)
    params = lora_parameters(model)
    assert any(p.dim() == 1 for p in params)  # the magnitudes train too
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = batch(2, B=4, T=16)
    losses = []
    for _ in range(30):
        loss = causal_lm_loss(model(ids).logits, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses  # measured: 7.61 -> 5.78 nats
    assert "DoRA r=4" in __import__("techniques.lora", fromlist=["lora_summary"]).lora_summary(model)


def test_cli_dora_trains_saves_and_merges(tiny_hf, tmp_path, capsys):
    from techniques.lora.__main__ import main
    folder = tiny_hf[2]
    data = tmp_path / "text.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 30)
    out = tmp_path / "ad"
    argv = ["train", "--data", str(data), "--weights", str(folder), "--device", "cpu", "--out", str(out),
            "--block-size", "16", "--batch-size", "4", "--no-progress", "--max-steps", "3", "--dora", "--qkv", "qv"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "DoRA r=8 on c_attn" in stdout
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    model = load_adapter(GPT.from_pretrained(str(folder)), out)
    assert all(layer.magnitude is not None for _, layer in lora_modules(model))
    assert main(["merge", "--lora", str(out), "--weights", str(folder), "--out", str(tmp_path / "m"),
                 "--device", "cpu"]) == 0
    ids = batch(3)
    with torch.no_grad():
        assert (GPT.from_pretrained(str(tmp_path / "m"))(ids).logits - model(ids).logits).abs().max() < 1e-5
