"""Prefix-Tuning+ (techniques/prefix/prefix_plus.py) against its math (arXiv 2506.13674, Eq. 2-7): the paper's φ,
the three steps of the derivation, M = 0 is the frozen model, and the wrapper is the per-head equation from raw
q, k, v with several heads, left padding and a KV cache (incremental decoding equals one full pass)."""
from __future__ import annotations

import copy
import functools
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from helpers import make_hf_model
from minigpt import GPT
from techniques.prefix import (FEATURE_MAPS, PrefixTuningPlus, linear_prefix_output, phi, prefix_memory,
                               split_prefix_attention)

_DIR = Path(tempfile.mkdtemp(prefix="test-prefix-plus-"))


@functools.lru_cache(maxsize=None)
def _saved(n_head: int) -> Path:
    """A random GPT-2-shaped model (transformers, save_pretrained; biases and LayerNorms randomised too)."""
    return make_hf_model(_DIR / f"h{n_head}", vocab_size=128, n_positions=32, n_embd=32, n_layer=2,
                         n_head=n_head)[1]


@functools.lru_cache(maxsize=None)
def _loaded(n_head: int) -> GPT:
    return GPT.from_pretrained(str(_saved(n_head))).eval()


def micro(n_head: int = 4) -> GPT:
    """A fresh copy of the micro model (2 layers, d = 32), loaded through minigpt's loader; biases non-zero."""
    return copy.deepcopy(_loaded(n_head))


def logits(model, idx, **kw):
    return model(idx, **kw).logits


# ---- φ: the paper's map -------------------------------------------------------------------------------------------
def test_phi_is_the_papers_elu_by_default():
    """The paper's φ(x) = elu(x) (negative inputs give values in (-1, 0)), its gelu, and linear attention's elu + 1;
    "elu" is the default everywhere (the library, the wrapper, the command)."""
    from techniques.prefix.__main__ import build_parser, check_options
    x = torch.linspace(-4, 4, 81)
    assert torch.equal(phi(x), F.elu(x)) and phi(x).min() < -0.9
    assert torch.equal(phi(x, "gelu"), F.gelu(x))
    assert torch.equal(phi(x, "elu+1"), F.elu(x) + 1)
    assert FEATURE_MAPS[0] == "elu" and set(FEATURE_MAPS) == {"elu", "gelu", "elu+1"}
    pt = PrefixTuningPlus(micro())
    assert pt.feature_map == "elu" and all(w.feature_map == "elu" for w in pt.wrappers.values())
    args = build_parser().parse_args(["train", "--variant", "plus", "--data", "d", "--out", "o"])
    check_options(args)
    assert args.phi == "elu"
    with pytest.raises(ValueError, match="unknown feature map 'relu'.*elu, gelu, elu\\+1"):
        phi(x, "relu")
    with pytest.raises(ValueError, match="unknown feature map"):
        PrefixTuningPlus(micro(), feature_map="relu")


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(0, 10_000))
def test_elu_plus_one_is_elu_plus_a_per_head_bias(nh, T, seed):
    """φ = elu + 1 adds the query-independent 1ᵀM to every position of a head: (elu(q) + 1)ᵀM = elu(q)ᵀM + 1ᵀM."""
    g = torch.Generator().manual_seed(seed)
    q, M = torch.randn(2, nh, T, 8, generator=g, dtype=torch.float64), torch.randn(nh, 8, 8, generator=g,
                                                                                 dtype=torch.float64)
    bias = M.sum(-2)[None, :, None, :]                                             # 1ᵀM per head: (1, nh, 1, hs)
    torch.testing.assert_close(linear_prefix_output(q, M, "elu+1"), linear_prefix_output(q, M, "elu") + bias)


# ---- the derivation, step by step -------------------------------------------------------------------------------
@settings(max_examples=10, deadline=None)
@given(st.integers(1, 3), st.integers(1, 7), st.integers(1, 6), st.floats(0.1, 3.0), st.integers(0, 10_000))
def test_step1_split_is_exact(nh, T, P, scale, seed):
    """Eq. 2 = Eq. 4 before λ is fixed: one causal softmax over [prefix; input] is (1 - λ_i)·(input attention,
    normalised alone) + λ_i·(prefix attention, normalised alone), λ_i the prefix's share of the mass."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (scale * torch.randn(nh, T, 8, generator=g, dtype=torch.float64) for _ in range(3))
    kp, vp = (scale * torch.randn(nh, P, 8, generator=g, dtype=torch.float64) for _ in range(2))
    o_in, o_pre, lam = split_prefix_attention(q, k, v, kp, vp)
    allowed = torch.cat([torch.ones(T, P, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()], 1)
    scores = (q @ torch.cat([kp, k], 1).transpose(-2, -1) / 8 ** 0.5).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, -1)                                              # (nh, T, P + T)
    torch.testing.assert_close((1 - lam) * o_in + lam * o_pre, probs @ torch.cat([vp, v], 1))
    torch.testing.assert_close(lam[..., 0], probs[..., :P].sum(-1))
    assert ((lam >= 0) & (lam <= 1)).all()                                      # a share (it can round to 0 or 1)


@settings(max_examples=10, deadline=None)
@given(st.sampled_from(FEATURE_MAPS), st.integers(1, 6), st.integers(0, 10_000))
@example("elu+1", 2, 1324)   # in float32 the two orders of summation differed by 1.2e-5 here: hence float64
def test_M_from_prefix_is_unnormalised_linear_attention(fmap, P, seed):
    """Step 2 (Eq. 5): with M = Σ_j φ(W_K s_j)(W_V s_j)ᵀ (the paper's b_1) the term φ(q_i)ᵀM is the linear-attention
    prefix output before normalisation, Σ_j φ(q_i)ᵀφ(k_j) v_j, computed directly (float64: the identity, not the
    rounding of two summation orders, is what is tested)."""
    g = torch.Generator().manual_seed(seed)
    nh, hs = 3, 8
    q, k, v = (torch.randn(nh, n, hs, generator=g, dtype=torch.float64) for n in (5, P, P))
    M = prefix_memory(k, v, fmap)
    direct = torch.einsum("htp,hpd->htd", phi(q, fmap) @ phi(k, fmap).transpose(-2, -1), v)
    torch.testing.assert_close(linear_prefix_output(q[None], M, fmap)[0], direct)


@settings(max_examples=6, deadline=None)
@given(st.sampled_from(FEATURE_MAPS), st.integers(0, 1000))
def test_zero_M_is_frozen_model(fmap, seed):
    """Step 3 with M = 0 (our init): exactly the frozen model's logits, bit for bit."""
    model = micro()
    idx = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(seed))
    before = logits(model, idx)
    pt = PrefixTuningPlus(model, feature_map=fmap)
    assert torch.equal(logits(pt, idx), before)


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


@settings(max_examples=8, deadline=None)
@given(n_head=st.sampled_from([1, 2, 4, 8]), fmap=st.sampled_from(FEATURE_MAPS), T=st.integers(2, 9),
       pad=st.integers(0, 8), seed=st.integers(0, 10_000))
@example(n_head=4, fmap="elu", T=7, pad=3, seed=2)
def test_wrapper_is_the_per_head_equation_with_left_padding(n_head, fmap, T, pad, seed):
    """Eq. 7 per head, from raw q, k, v: o_i = softmax(q_i Kᵀ/√hs + causal + padding) V + φ(q_i)ᵀM for every head,
    then the heads concatenated and c_proj applied once; row 1 is left-padded by `pad` tokens."""
    pad = min(pad, T - 1)
    model = micro(n_head)
    pt = PrefixTuningPlus(model, feature_map=fmap)
    _random_M(pt, seed)
    idx = torch.randint(0, 128, (2, T), generator=torch.Generator().manual_seed(seed))
    am = torch.ones(2, T, dtype=torch.long)
    am[1, :pad] = 0
    for layer in (0, 1):
        seen, h = _capture_attn_io(pt, layer)
        with torch.no_grad():
            pt(idx, attention_mask=am)
        h.remove()
        attn, M = pt.wrappers[str(layer)].attn, pt.wrappers[str(layer)].M
        x = seen["x"]
        q, k, v = (attn.split_heads(t) for t in attn.c_attn(x).split(x.size(-1), dim=2))  # (B, nh, T, hs)
        assert q.shape[1] == n_head and M.shape == (n_head, 32 // n_head, 32 // n_head)
        scores = q @ k.transpose(-2, -1) / attn.head_dim ** 0.5
        allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & am.bool()[:, None, None, :]
        o = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v + phi(q, fmap) @ M[None]
        want = attn.c_proj(o.transpose(1, 2).reshape(x.shape))
        real = am.bool()
        torch.testing.assert_close(seen["out"][real], want[real], atol=1e-5, rtol=1e-5)
    with torch.no_grad():   # the padded row's real tokens give the logits they give alone
        padded = logits(pt, idx, attention_mask=am)[1, pad:]
        alone = logits(pt, idx[1:, pad:])[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


@settings(max_examples=8, deadline=None)
@given(n_head=st.sampled_from([1, 2, 4, 8]), fmap=st.sampled_from(FEATURE_MAPS),
       rows=st.lists(st.integers(2, 9), min_size=1, max_size=3), prefill=st.integers(1, 8),
       seed=st.integers(0, 10_000))
@example(n_head=4, fmap="elu", rows=[5, 2, 4], prefill=3, seed=1)
def test_kv_cache_decoding_equals_one_full_pass(n_head, fmap, rows, prefill, seed):
    """Batched, left-padded rows: a prefill then one token at a time through the KV cache gives, at every real
    position, the logits of one full pass over that row alone (the term needs only the current query)."""
    from minigpt import left_pad
    model = micro(n_head)
    pt = PrefixTuningPlus(model, feature_map=fmap)
    _random_M(pt, seed)
    g = torch.Generator().manual_seed(seed)
    toks = [torch.randint(0, 128, (n,), generator=g).tolist() for n in rows]
    ids, mask = left_pad(toks, pad_id=0)
    T = ids.size(1)
    prefill = min(prefill, T - 1)
    with torch.no_grad():
        out = pt(ids[:, :prefill], attention_mask=mask[:, :prefill])
        steps, past = [out.logits], out.past_key_values
        for t in range(prefill, T):
            out = pt(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=past)
            steps.append(out.logits)
            past = out.past_key_values
        incremental = torch.cat(steps, 1)
        assert not torch.allclose(logits(pt, ids[:1]), logits(micro(n_head), ids[:1]))   # the term does something
        for b, r in enumerate(toks):
            full = logits(pt, torch.tensor([r]))[0]
            torch.testing.assert_close(incremental[b, T - len(r):], full, atol=1e-5, rtol=1e-5)


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
    """The paper's φ = elu, M = 0: 30 AdamW steps on the M's alone fit a fixed text (the random micro model starts
    at about ln 128 = 4.85 nats), and no frozen weight moves."""
    model = micro()
    pt = PrefixTuningPlus(model)
    idx = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))  # a small fixed "text"

    def loss():
        lg = pt(idx[:, :-1]).logits
        return torch.nn.functional.cross_entropy(lg.reshape(-1, lg.size(-1)), idx[:, 1:].reshape(-1))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "M" not in n.split(".")}
    opt = torch.optim.AdamW(pt.trainable_parameters(), lr=2e-1, weight_decay=0.0)
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
    assert conf["format_version"] == 2
    for d in ("a", "b"):
        back = load_prefix_plus(micro(), tmp_path / d)
        assert back.layers == [1] and back.feature_map == "gelu"
        with torch.no_grad():
            assert torch.equal(back(idx).logits, want)


def test_load_into_another_model_size_is_a_clear_error(tmp_path):
    from minigpt import GPTConfig
    from techniques.prefix import load_prefix_plus, save_prefix_plus
    save_prefix_plus(PrefixTuningPlus(micro()), tmp_path / "a")
    other = GPT(GPTConfig(vocab_size=128, n_positions=32, n_embd=48, n_layer=2, n_head=4))
    with pytest.raises(ValueError, match="another model size.*n_embd=32"):
        load_prefix_plus(other, tmp_path / "a")
    with pytest.raises(FileNotFoundError):
        load_prefix_plus(micro(), tmp_path / "missing")


def test_file_format_versions(tmp_path):
    """Format 2 writes the paper's "elu"; a file without format_version (written when "elu" named elu(x) + 1)
    loads as "elu+1" and gives the logits it gave; an unknown version or φ is one clear error naming the file."""
    from minigpt.io import read_json, write_json
    from techniques.prefix import PLUS_CONFIG, load_prefix_plus, save_prefix_plus
    idx = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(8))
    for fmap in ("elu", "elu+1"):
        pt = PrefixTuningPlus(micro(), feature_map=fmap)
        _random_M(pt, seed=9)
        save_prefix_plus(pt, tmp_path / fmap)
        with torch.no_grad():
            want = pt(idx).logits
        back = load_prefix_plus(micro(), tmp_path / fmap)
        assert back.feature_map == fmap
        with torch.no_grad():
            assert torch.equal(back(idx).logits, want)
    assert not torch.equal(load_prefix_plus(micro(), tmp_path / "elu")(idx).logits, want)   # the two φ differ
    conf_path = tmp_path / "elu+1" / PLUS_CONFIG
    conf = read_json(conf_path)
    del conf["format_version"]
    write_json({**conf, "feature_map": "elu"}, conf_path)                                    # as format 1 wrote it
    old = load_prefix_plus(micro(), tmp_path / "elu+1")
    assert old.feature_map == "elu+1"
    with torch.no_grad():
        assert torch.equal(old(idx).logits, want)
    for bad, words in (({"format_version": 3}, "format_version 3"), ({"format_version": 2, "feature_map": "relu"},
                                                                     "unknown feature_map 'relu'")):
        write_json({**conf, **bad}, conf_path)
        with pytest.raises(ValueError, match=words) as e:
            load_prefix_plus(micro(), tmp_path / "elu+1")
        assert PLUS_CONFIG in str(e.value)
