"""Prefix-Tuning+ (techniques/prefix/prefix_plus.py) against its math: M = 0 is the frozen model, the term equals
the unnormalised linear-attention prefix output, and incremental decoding equals one full pass."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt import GPT, GPTConfig
from techniques.prefix import PrefixTuningPlus, linear_prefix_output, phi, prefix_memory


def micro(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                          embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)).eval()
    with torch.no_grad():  # non-zero biases, so a bias added twice shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def logits(model, idx):
    return model(idx).logits


@settings(max_examples=5, deadline=None)
@given(st.sampled_from(["elu", "gelu"]), st.integers(0, 1000))
def test_zero_M_is_frozen_model(fmap, seed):
    model = micro()
    idx = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(seed))
    before = logits(model, idx)
    pt = PrefixTuningPlus(model, feature_map=fmap)
    assert torch.equal(logits(pt, idx), before)


@settings(max_examples=5, deadline=None)
@given(st.integers(1, 6), st.integers(0, 1000))
def test_M_from_prefix_is_unnormalised_linear_attention(P, seed):
    g = torch.Generator().manual_seed(seed)
    nh, hs = 3, 8
    q, k, v = (torch.randn(nh, n, hs, generator=g) for n in (5, P, P))
    M = prefix_memory(k, v)
    direct = torch.einsum("htp,hpd->htd", phi(q) @ phi(k).transpose(-2, -1), v)  # Σ_j φ(q)ᵀφ(k_j) v_j
    torch.testing.assert_close(phi(q) @ M, direct)


def test_incremental_decoding_equals_full_pass():
    model = micro()
    pt = PrefixTuningPlus(model)
    with torch.no_grad():
        for p in pt.trainable_parameters():
            p.normal_(0, 0.5)
    idx = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    full = logits(pt, idx)
    assert not torch.allclose(full, logits(micro(), idx))  # the term does something
    out = pt(idx[:, :5])
    steps = [out.logits]
    for t in range(5, 8):
        out = pt(idx[:, t:t + 1], past_key_values=out.past_key_values)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def _random_M(pt, seed=0, std=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pt.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _capture_attn_io(pt, layer):
    """(input x, output) of one wrapped attention, by a forward hook (the wrapper itself is untouched)."""
    seen = {}

    def hook(mod, args, out):
        seen["x"], seen["out"] = args[0].detach(), out[0].detach()
    return seen, pt.wrappers[str(layer)].register_forward_hook(hook)


def test_wrapper_is_the_per_head_equation_with_left_padding():
    """o_i = softmax(q_i Kᵀ/√hs + causal + padding) V + φ(q_i)ᵀ M per head, from raw q, k, v; then c_proj once."""
    model = micro()
    pt = PrefixTuningPlus(model)
    _random_M(pt)
    B, T, pad = 2, 7, 3
    idx = torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(2))
    am = torch.ones(B, T, dtype=torch.long)
    am[1, :pad] = 0  # row 1 is left-padded
    for layer in (0, 1):
        seen, h = _capture_attn_io(pt, layer)
        with torch.no_grad():
            pt(idx, attention_mask=am)
        h.remove()
        attn, M = pt.wrappers[str(layer)].attn, pt.wrappers[str(layer)].M
        x = seen["x"]
        q, k, v = (attn.split_heads(t) for t in attn.c_attn(x).split(x.size(-1), dim=2))  # (B, nh, T, hs)
        scores = q @ k.transpose(-2, -1) / attn.head_dim ** 0.5
        allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & am.bool()[:, None, None, :]
        o = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v + phi(q) @ M[None]
        want = attn.c_proj(o.transpose(1, 2).reshape(x.shape))
        real = am.bool()
        torch.testing.assert_close(seen["out"][real], want[real], atol=1e-5, rtol=1e-5)
    # the padded row's real tokens give the logits they give alone
    with torch.no_grad():
        padded = pt(idx, attention_mask=am).logits[1, pad:]
        alone = pt(idx[1:, pad:]).logits[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_c_proj_bias_is_added_once():
    """wrapped − frozen = W_proj · (φ(q)ᵀM), with no bias in the difference (micro() has non-zero biases)."""
    model = micro()
    assert model.transformer.h[0].attn.c_proj.bias.abs().sum() > 0
    pt = PrefixTuningPlus(model)
    _random_M(pt, seed=3)
    w = pt.wrappers["0"]
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        frozen = w.attn(x)[0]
        wrapped = w(x)[0]
        term = linear_prefix_output(w.query(x), w.M).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(wrapped - frozen, term @ w.attn.c_proj.weight.T, atol=1e-5, rtol=1e-5)


def test_training_only_M_lowers_the_loss():
    model = micro()
    pt = PrefixTuningPlus(model)
    idx = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))  # a small fixed "text"

    def loss():
        lg = pt(idx[:, :-1]).logits
        return torch.nn.functional.cross_entropy(lg.reshape(-1, lg.size(-1)), idx[:, 1:].reshape(-1))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "M" not in n.split(".")}
    opt = torch.optim.AdamW(pt.trainable_parameters(), lr=5e-2, weight_decay=0.0)
    start = loss().item()
    for _ in range(30):
        opt.zero_grad()
        loss().backward()
        opt.step()
    end = loss().item()
    assert end < start - 0.1, (start, end)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_save_load_round_trip(tmp_path):
    from minigpt.io import read_json
    from techniques.prefix import load_prefix_plus, save_prefix_plus
    model = micro()
    pt = PrefixTuningPlus(model, layers=[1], feature_map="gelu")
    _random_M(pt, seed=6)
    idx = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = pt(idx).logits
    save_prefix_plus(pt, tmp_path / "a")
    save_prefix_plus(model, tmp_path / "b")  # from the wrapped GPT too
    conf = read_json(tmp_path / "a" / "prefix_plus_config.json")
    assert conf["adapter_type"] == "PREFIX_TUNING_PLUS" and conf["layers"] == [1] and conf["feature_map"] == "gelu"
    for d in ("a", "b"):
        back = load_prefix_plus(micro(), tmp_path / d)
        assert back.layers == [1] and back.feature_map == "gelu"
        with torch.no_grad():
            assert torch.equal(back(idx).logits, want)


def test_load_into_another_model_size_is_a_clear_error(tmp_path):
    import pytest

    from techniques.prefix import load_prefix_plus, save_prefix_plus
    save_prefix_plus(PrefixTuningPlus(micro()), tmp_path / "a")
    other = GPT(GPTConfig(vocab_size=128, n_positions=32, n_embd=48, n_layer=2, n_head=4))
    with pytest.raises(ValueError, match="another model size.*n_embd=32"):
        load_prefix_plus(other, tmp_path / "a")
    with pytest.raises(FileNotFoundError):
        load_prefix_plus(micro(), tmp_path / "missing")
