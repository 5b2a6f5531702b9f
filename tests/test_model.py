"""The model against transformers' GPT2LMHeadModel, and its own invariants."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

from helpers import ODD_HEADS, make_hf_model
from minigpt import GPT, GPTConfig

FULL_124M = dict(n_positions=1024, n_embd=768, n_layer=12, n_head=12)


@pytest.mark.parametrize("cfg", [FULL_124M, ODD_HEADS], ids=["gpt2-124M", "odd-heads"])
def test_logits_and_hidden_states_match_transformers(tmp_path, cfg):
    hf, folder = make_hf_model(tmp_path, seed=1, **cfg)
    ours = GPT.from_pretrained(str(folder))
    torch.manual_seed(0)
    ids = torch.randint(0, 50257, (2, 24))
    with torch.no_grad():
        a = hf(ids, output_hidden_states=True)
        b = ours(ids, output_hidden_states=True)
    assert len(a.hidden_states) == len(b.hidden_states) == cfg["n_layer"] + 1
    assert (a.logits - b.logits).abs().max() <= 1e-4
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert (x - y).abs().max() <= 1e-4


def test_past_matches_transformers_cache(tiny_hf):
    hf, ours, _ = tiny_hf
    ids = torch.randint(0, 50257, (2, 10))
    with torch.no_grad():
        a = hf(ids, use_cache=True).past_key_values
        b = ours(ids).past_key_values
    for i, (k, v) in enumerate(b):
        assert k.shape == (2, 4, 10, 8)
        assert torch.allclose(a.layers[i].keys, k, atol=1e-5)
        assert torch.allclose(a.layers[i].values, v, atol=1e-5)


def test_explicit_attention_path_equals_sdpa(tiny_hf):
    _, ours, _ = tiny_hf
    ids = torch.randint(0, 50257, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        fast = ours(ids, attention_mask=mask)
        slow = ours(ids, attention_mask=mask, output_attentions=True)
    assert (fast.logits - slow.logits).abs().max() < 1e-5
    assert len(slow.attentions) == 2 and slow.attentions[0].shape == (3, 4, 12, 12)
    probs = slow.attentions[0]
    assert torch.allclose(probs.sum(-1), torch.ones(3, 4, 12))
    assert probs[0].triu(1).abs().max() == 0  # causal: nothing from the future
    assert probs[1, :, 4:, :4].abs().max() == 0  # real tokens never look at padding


@given(B=st.integers(1, 3), T=st.integers(1, 7), T_past=st.integers(0, 5),
       form=st.sampled_from(["none", "bool", "add"]), seed=st.integers(0, 2 ** 16))
def test_plain_attention_equals_sdpa_for_every_mask_form(tiny_hf, B, T, T_past, form, seed):
    """The plain path (output_attentions, and bf16/fp16 training on a CPU) takes the masks the fast path takes:
    None (causal for T > 1, with or without a past), boolean, or additive; in fp32 it gives SDPA's output."""
    attn = tiny_hf[1].transformer.h[0].attn
    g = torch.Generator().manual_seed(seed)
    H, hs = attn.n_head, attn.head_dim
    q = torch.randn(B, H, T, hs, generator=g)
    k, v = torch.randn(B, H, T_past + T, hs, generator=g), torch.randn(B, H, T_past + T, hs, generator=g)
    if form == "none" and T_past and T > 1:  # SDPA's is_causal aligns the corner differently: give it the mask
        form = "bool"
    allowed = torch.ones(T, T_past + T, dtype=torch.bool).tril(T_past)
    itself = torch.arange(T_past + T)[None, :] == torch.arange(T)[:, None] + T_past  # a query always sees itself
    allowed = allowed & (torch.rand(B, 1, 1, T_past + T, generator=g) > 0.3) | itself
    mask = {"none": None, "bool": allowed, "add": torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))}[form]
    plain, _ = attn.plain_attention(q, k, v, mask)
    fast = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)
    torch.testing.assert_close(plain, fast, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_logits_stay_close_to_fp32(tiny_hf):
    """Under bf16 autocast on a CPU the model takes the plain attention path (softmax in fp32); its logits stay
    within bf16's rounding of the fp32 ones, with padding and a past."""
    _, ours, _ = tiny_hf
    ids = torch.randint(0, 50257, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        ref = ours(ids, attention_mask=mask).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = ours(ids, attention_mask=mask).logits
    assert low.dtype == torch.bfloat16
    keep = mask.bool()
    err = (low.float() - ref).abs()[keep].max().item()
    assert err < 0.02 * ref.abs()[keep].max().item(), err


def test_frozen_head_under_autocast_gives_autocasts_logits_and_gradients(tiny_hf):
    """With wte frozen (LoRA, prefix tuning), the head under autocast multiplies by a cached bf16 copy of wte:
    the same logits and input gradients, bit for bit, as autocast casting wte itself (wte trainable)."""
    import copy
    model = copy.deepcopy(tiny_hf[1])
    ids = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(1))
    results = []
    for frozen in (True, False, True):
        model.requires_grad_(False)
        model.transformer.wte.weight.requires_grad_(not frozen)
        emb = model.transformer.wte(ids).detach().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(None, inputs_embeds=emb).logits
        (grad,) = torch.autograd.grad(logits.float().square().mean(), emb)
        results.append((logits, grad))
    (a, ga), (b, gb), (c, gc) = results
    assert a.dtype == torch.bfloat16 and torch.equal(a, b) and torch.equal(ga, gb)
    assert torch.equal(a, c) and model._head_low is not None  # the cache was used, and reused
    with torch.no_grad():
        model.transformer.wte.weight.mul_(1.5)  # an in-place change bumps _version: the cache follows
        with torch.autocast("cpu", dtype=torch.bfloat16):
            d = model(None, inputs_embeds=emb).logits
    assert not torch.equal(a, d)


@given(length=st.integers(2, 40), data=st.data())
def test_kv_cache_any_split_equals_full_forward(tiny_hf, length, data):
    _, ours, _ = tiny_hf
    cuts = sorted(set(data.draw(st.lists(st.integers(1, length - 1), max_size=4))))
    ids = torch.randint(0, 50257, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        full = ours(ids).logits
        past, pieces = None, []
        for lo, hi in zip([0] + cuts, cuts + [length]):
            out = ours(ids[:, lo:hi], past_key_values=past)
            past, pieces = out.past_key_values, pieces + [out.logits]
    assert (torch.cat(pieces, 1) - full).abs().max() < 1e-5


@given(lengths=st.lists(st.integers(1, 12), min_size=2, max_size=4))
def test_left_padded_batch_equals_each_row_alone(tiny_hf, lengths):
    _, ours, _ = tiny_hf
    g = torch.Generator().manual_seed(sum(lengths))
    rows = [torch.randint(0, 50257, (n,), generator=g) for n in lengths]
    T = max(lengths)
    ids = torch.full((len(rows), T), 50256)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    with torch.no_grad():
        batch = ours(ids, attention_mask=mask).logits
        for i, r in enumerate(rows):
            alone = ours(r[None]).logits[0]
            assert (batch[i, T - len(r):] - alone).abs().max() < 1e-5


def test_past_is_differentiable(tiny_hf):
    _, ours, _ = tiny_hf
    ids = torch.randint(0, 50257, (1, 6))
    with torch.no_grad():
        past = ours(ids[:, :4]).past_key_values
    past = tuple((k.clone().requires_grad_(), v.clone().requires_grad_()) for k, v in past)
    ours(ids[:, 4:], past_key_values=past).logits.sum().backward()
    assert all(k.grad is not None and k.grad.abs().sum() > 0 for k, _ in past)


def test_padding_rows_stay_finite_for_gradients(tiny_hf):
    _, ours, _ = tiny_hf
    ids = torch.randint(0, 50257, (2, 6))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    emb = ours.transformer.wte(ids).detach().requires_grad_()
    out = ours(None, inputs_embeds=emb, attention_mask=mask)
    assert torch.isfinite(out.logits).all()
    (out.logits * mask[..., None]).sum().backward()
    assert torch.isfinite(emb.grad).all()


def test_inputs_embeds_equals_ids(tiny_hf):
    _, ours, _ = tiny_hf
    ids = torch.randint(0, 50257, (2, 5))
    with torch.no_grad():
        a = ours(ids).logits
        b = ours(None, inputs_embeds=ours.transformer.wte(ids)).logits
    assert torch.equal(a, b)


def test_config_from_name():
    assert (GPTConfig.from_name("gpt2-medium").n_layer, GPTConfig.from_name("gpt2-xl").n_head) == (24, 25)
    c = GPTConfig.from_name("gpt2-large")
    assert (c.n_embd, c.n_positions, c.vocab_size, c.layer_norm_epsilon) == (1280, 1024, 50257, 1e-5)
    with pytest.raises(ValueError, match="unknown GPT-2 size"):
        GPTConfig.from_name("gpt3")
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=10, n_head=3)
    with torch.device("meta"):
        assert GPT(GPTConfig.from_name("gpt2")).num_parameters() == 124_439_808  # lm_head tied


# ---- error paths -----------------------------------------------------------------------
def test_too_long_raises(tiny_hf):
    _, ours, _ = tiny_hf
    with pytest.raises(ValueError, match="n_positions 64"):
        ours(torch.zeros(1, 65, dtype=torch.long))
    past = ours(torch.zeros(1, 60, dtype=torch.long)).past_key_values
    with pytest.raises(ValueError, match="60 past \\+ 5 new"):
        ours(torch.zeros(1, 5, dtype=torch.long), past_key_values=past)


def test_bad_token_ids_raise(tiny_hf):
    _, ours, _ = tiny_hf
    with pytest.raises(ValueError, match="50257 is outside the vocabulary"):
        ours(torch.tensor([[1, 50257]]))
    with pytest.raises(ValueError, match="-1 is outside"):
        ours(torch.tensor([[-1]]))
    with pytest.raises(ValueError, match="2-D"):
        ours(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="integer token ids"):
        ours(torch.tensor([[1.0]]))


def test_bad_mask_raises(tiny_hf):
    _, ours, _ = tiny_hf
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, T_past \+ T\] = \[1, 3\]"):
        ours(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 4))


def test_bad_past_raises(tiny_hf):
    _, ours, _ = tiny_hf
    past = ours(torch.zeros(2, 3, dtype=torch.long)).past_key_values
    x = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="1 layers, the model has 2"):
        ours(x, past_key_values=past[:1])
    with pytest.raises(ValueError, match="n_head=4"):
        ours(x, past_key_values=tuple((k[:, :2], v) for k, v in past))
    with pytest.raises(ValueError, match="batch=1"):
        ours(x[:1], past_key_values=past)
    with pytest.raises(ValueError, match="key, value"):
        ours(x, past_key_values=tuple((k,) for k, v in past))


def test_inference_head_cache_follows_the_weights(tiny_hf):
    """A one-row step without autograd reads a cached wteᵀ; it must give the module's
    logits and notice any change to the tied weight."""
    _, _, folder = tiny_hf
    model = GPT.from_pretrained(str(folder))
    ids = torch.randint(0, 50257, (1, 1))
    with torch.no_grad():
        cached = model(ids).logits
    assert model._head_t is not None  # the cached path really ran
    assert (cached - model(ids).logits.detach()).abs().max() < 1e-5  # grad-enabled: plain lm_head
    with torch.no_grad():
        model.transformer.wte.weight.mul_(2.0)  # in place: same tensor, new _version
        doubled = model(ids).logits
        model.head_cache = False
        plain = model(ids).logits
    assert (doubled - plain).abs().max() < 1e-5
    assert (doubled - cached).abs().max() > 1e-3
