"""Prefix-Tuning+ (techniques/prefix/prefix_plus.py) against its math: M = 0 is the frozen model, the term equals
the unnormalised linear-attention prefix output, and incremental decoding equals one full pass."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt import GPT, GPTConfig
from techniques.prefix import PrefixTuningPlus, phi, prefix_memory


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
