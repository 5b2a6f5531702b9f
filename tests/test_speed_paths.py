"""The fast paths give the plain paths' numbers: the preallocated past (KVBuffer) against the
growing (k, v) tuple, the head's fast forms (`_lm_head`) against `lm_head_reference`, the projections'
packed bf16 kernel (minigpt.linear) against F.linear, and the errors the buffer raises. The LoRA layer's fast
forward against its reference is in test_lora.py."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

from minigpt import GPT, generate, stream
from minigpt.linear import Linear, packed_linear_available
from minigpt.past import KVBuffer, left_pad, past_length


def buffer_for(model: GPT, B: int, max_length: int) -> KVBuffer:
    cfg = model.config
    return KVBuffer(cfg.n_layer, B, cfg.n_head, max_length, cfg.head_dim)


def prompts(lengths, seed):
    """Left-padded random prompts with these lengths: (ids [B, T], mask [B, T])."""
    g = torch.Generator().manual_seed(seed)
    return left_pad([torch.randint(0, 50257, (n,), generator=g).tolist() for n in lengths], 50256)


def random_past(model: GPT, B: int, P: int, seed: int):
    """A learned-prefix-like past: random keys/values, P positions, attended by every row."""
    cfg, g = model.config, torch.Generator().manual_seed(seed)
    return tuple((torch.randn(B, cfg.n_head, P, cfg.head_dim, generator=g),
                  torch.randn(B, cfg.n_head, P, cfg.head_dim, generator=g)) for _ in range(cfg.n_layer))


# ---- decoding: buffered against the growing tuple ------------------------------------------
@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4), prefix=st.integers(0, 5),
       use_eos=st.booleans(), new=st.integers(1, 12), seed=st.integers(0, 2 ** 16))
def test_buffered_decode_gives_the_growing_tuple_tokens(tiny_hf, lengths, prefix, use_eos, new, seed):
    """Greedy tokens identical across batch sizes, left padding, eos and an initial past."""
    _, model, _ = tiny_hf
    ids, mask = prompts(lengths, seed)
    kw = dict(max_new_tokens=new, attention_mask=mask)
    if prefix:
        kw["past_key_values"] = random_past(model, len(lengths), prefix, seed)
    if use_eos:  # the token row 0 emits second ends its text, so rows stop at different steps
        free = generate(model, ids, preallocate=False, **kw)
        kw.update(eos_token_id=int(free[0, ids.size(1) + min(1, new - 1)]), pad_token_id=0)
    grown = generate(model, ids, preallocate=False, **kw)
    buffered = generate(model, ids, preallocate=True, **kw)
    assert torch.equal(grown, buffered)


@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4), prefix=st.integers(0, 5),
       steps=st.lists(st.integers(1, 4), min_size=1, max_size=6), seed=st.integers(0, 2 ** 16))
def test_buffered_forward_gives_the_tuple_logits_and_past(tiny_hf, lengths, prefix, steps, seed):
    """Chunks fed one after another: logits within 1e-5 and the same past, the buffer's past
    being views of the buffer, each chunk after a padded prompt and an optional initial past."""
    _, model, _ = tiny_hf
    B, g = len(lengths), torch.Generator().manual_seed(seed)
    ids, mask = prompts(lengths, seed)
    chunks = [ids] + [torch.randint(0, 50257, (B, n), generator=g) for n in steps]
    initial = random_past(model, B, prefix, seed) if prefix else None
    full = torch.cat([torch.ones(B, prefix, dtype=torch.long), mask,
                      torch.ones(B, sum(steps), dtype=torch.long)], dim=1)
    buf = buffer_for(model, B, full.size(1))
    past_t, past_b, seen = initial, initial, prefix
    with torch.no_grad():
        for x in chunks:
            seen += x.size(1)
            a = model(x, attention_mask=full[:, :seen], past_key_values=past_t)
            b = model(x, attention_mask=full[:, :seen], past_key_values=past_b, kv_buffer=buf)
            past_t, past_b = a.past_key_values, None  # the buffer holds its own past from here on
            assert (a.logits - b.logits).abs().max() <= 1e-5
            assert buf.length == seen == past_length(b.past_key_values)
            for (kt, vt), (kb, vb), layer in zip(a.past_key_values, b.past_key_values, buf.data):
                assert torch.equal(kt, kb) and torch.equal(vt, vb)
                assert kb.data_ptr() == layer[0].data_ptr() and vb.data_ptr() == layer[1].data_ptr()


def test_returned_views_survive_later_steps_and_the_initial_past_is_not_written(tiny_hf):
    _, model, _ = tiny_hf
    ids = torch.randint(0, 50257, (2, 6), generator=torch.Generator().manual_seed(4))
    initial = random_past(model, 2, 3, 4)
    before = [(k.clone(), v.clone()) for k, v in initial]
    buf = buffer_for(model, 2, 3 + 6)
    with torch.no_grad():
        first = model(ids[:, :4], past_key_values=initial, kv_buffer=buf).past_key_values
        kept = [(k.clone(), v.clone()) for k, v in first]
        model(ids[:, 4:], kv_buffer=buf)
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(first, kept))
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(initial, before))


def test_stream_steps_equal_with_and_without_the_buffer(tiny_hf):
    _, model, _ = tiny_hf
    ids, mask = prompts([3, 7, 1], 9)
    a = list(stream(model, ids, attention_mask=mask, max_new_tokens=8, preallocate=True))
    b = list(stream(model, ids, attention_mask=mask, max_new_tokens=8, preallocate=False))
    assert len(a) == len(b) == 8 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert list(stream(model, ids, max_new_tokens=0)) == []


def test_buffered_decode_equals_transformers(tiny_hf, tokenizer):
    hf, model, _ = tiny_hf
    ids, mask = tokenizer.encode_batch(["A cat", "The weather today is", "Yes"])
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=15, do_sample=False, pad_token_id=50256)
    assert torch.equal(generate(model, ids, attention_mask=mask, max_new_tokens=15), want)


# ---- the head: each no-grad form against lm_head ------------------------------------------
@pytest.mark.parametrize("rows", [1, 2, 8, GPT.HEAD_LEFT_ROWS, GPT.HEAD_LEFT_ROWS + 1])
def test_no_grad_head_forms_equal_lm_head(tiny_hf, rows):
    """Batched decode steps read wte as (wte · xᵀ)ᵀ, one row through the cached wteᵀ, many rows
    through lm_head: all give lm_head's logits, contiguous, in the [B, T, V] layout."""
    _, model, _ = tiny_hf
    ids = torch.randint(0, 50257, (rows, 1), generator=torch.Generator().manual_seed(rows))
    with torch.no_grad():
        fast = model(ids).logits
    plain = model(ids).logits.detach()  # autograd on: always the plain lm_head
    assert fast.shape == plain.shape and fast.is_contiguous()
    assert (fast - plain).abs().max() <= 1e-5


HEAD_SHAPES = [(1, 1), (2, 1), (1, 8), (4, GPT.HEAD_LEFT_ROWS // 4), (3, 11), (4, 25)]  # rows 1 .. 100


@pytest.mark.parametrize("head_cache", [True, False])
@pytest.mark.parametrize("shape", HEAD_SHAPES)
def test_fast_head_equals_lm_head_reference(tiny_hf, shape, head_cache):
    """`_lm_head` on hidden states, without autograd: one row through the cached wteᵀ (or the reference when
    head_cache is off), up to HEAD_LEFT_ROWS rows as (wte · xᵀ)ᵀ, more as the reference: each gives
    lm_head_reference(x) = x · wteᵀ within 1e-5 of its largest logit, in its [B, T, V] layout, contiguous."""
    model = tiny_hf[1]
    x = torch.randn(*shape, model.config.n_embd, generator=torch.Generator().manual_seed(sum(shape)))
    model.head_cache = head_cache
    try:
        with torch.no_grad():
            fast, ref = model._lm_head(x), model.lm_head_reference(x)
    finally:
        model.head_cache = True
    assert fast.shape == ref.shape == (*shape, model.config.vocab_size) and fast.is_contiguous()
    assert (fast - ref).abs().max() <= 1e-5 * ref.abs().max()
    torch.testing.assert_close(ref, x @ model.transformer.wte.weight.T, rtol=1e-5, atol=1e-5)  # tied to wte


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (4, 25)])
def test_frozen_head_under_autocast_is_the_reference_under_it(tiny_hf, shape):
    """With wte frozen, the head under bf16 autocast multiplies by a cached bf16 copy of wte: the reference's
    logits under the same autocast, bit for bit, whatever the row count."""
    model = copy.deepcopy(tiny_hf[1]).requires_grad_(False)
    x = torch.randn(*shape, model.config.n_embd, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast, ref = model._lm_head(x), model.lm_head_reference(x)
    assert model._head_low is not None and fast.dtype == ref.dtype == torch.bfloat16
    assert torch.equal(fast, ref)


# ---- the projections: oneDNN's packed bf16 kernel against F.linear -----------------------------
needs_packed = pytest.mark.skipif(not packed_linear_available(), reason="this PyTorch has no oneDNN packed linear")


@needs_packed
@given(n_in=st.integers(1, 300), n_out=st.integers(1, 300), rows=st.integers(1, 40), bias=st.booleans(),
       batched=st.booleans(), seed=st.integers(0, 2 ** 16))
@example(n_in=140, n_out=11, rows=26, bias=False, batched=True, seed=17793)  # cancellation (see the docstring)
@example(n_in=25, n_out=59, rows=1, bias=False, batched=True, seed=25)       # a rounding tie
def test_packed_bf16_linear_is_f_linear_bit_for_bit(n_in, n_out, rows, bias, batched, seed):
    """Without autograd, a bf16 Linear on CPU takes oneDNN's kernel on its packed weight: the numbers of
    F.linear(x, W, b), for any shape, with or without bias, 2-D or 3-D input. Both sum the same products in
    fp32, but not always in the same order, so where the exact result sits on a bf16 rounding boundary the two
    may round to neighbours: hypothesis found one such element in 118 (n_in 25, n_out 59, 2 x 1 rows, seed 25;
    exact 5.20051e-6, the boundary 5.20051e-6); and where the products cancel (n_in 140, a result of 3.2e-6 from
    terms of order 1, seed 17793) the two fp32 orders differ by more than one bf16 step of so small a result. So:
    bit for bit but for such ties, each within one bf16 step plus the fp32 summation-order bound 2·n·2^-24·Σ|x w|."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the layer's initial weights too, so a failing example replays exactly
    lin = Linear(n_in, n_out, bias=bias).to(torch.bfloat16)
    x = torch.randn((2, rows, n_in) if batched else (rows, n_in), generator=g).bfloat16()
    with torch.no_grad():
        assert lin.takes_fast_path(x)
        fast = lin(x)
        ref = F.linear(x, lin.weight, lin.bias)
    assert lin._packed is not None and fast.shape == ref.shape and fast.dtype == ref.dtype
    differ = fast != ref
    _, exponent = torch.frexp(torch.maximum(fast.abs(), ref.abs()).float())
    one_step = torch.ldexp(torch.ones_like(fast, dtype=torch.float32), exponent - 8)  # bf16's spacing there
    # Two fp32 sums of the same n products in different orders each lie within γ_n·S of the exact sum
    # (S = Σ|x_i w_i| + |b|, γ_n ≈ n·2^-24), so they differ by at most 2γ_n·S; where the products cancel (a result
    # far smaller than S) that can exceed one bf16 step of the result. Rounding both to bf16 adds one step.
    S = x.float().abs() @ lin.weight.float().abs().t() + (lin.bias.float().abs() if bias else 0.0)
    fp32_orders = 2 * n_in * 2.0 ** -24 * S
    assert ((fast.float() - ref.float()).abs() <= one_step + fp32_orders).all()
    assert differ.sum() <= 1 + differ.numel() // 100


@needs_packed
def test_packed_weight_follows_the_weight():
    """An in-place update (a LoRA merge, an optimizer step) or a new weight tensor re-packs; autograd,
    fp32 and fast_cpu = False take F.linear itself."""
    lin = Linear(16, 24).to(torch.bfloat16)
    x = torch.randn(3, 16).bfloat16()
    with torch.no_grad():
        lin(x)
        lin.weight.add_(1.0)                       # in place: _version moves
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
        lin.weight = nn.Parameter(torch.randn(24, 16).bfloat16())   # a new tensor
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
        lin.weight.data.mul_(2.0)                  # through .data: not counted, so drop_packed() is the way
        lin.drop_packed()
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    assert not lin.takes_fast_path(x)              # autograd on
    with torch.no_grad():
        assert not lin.takes_fast_path(x.float())  # fp32 input
        lin.fast_cpu = False
        assert not lin.takes_fast_path(x)


@needs_packed
def test_bf16_model_decodes_as_with_plain_linears(tiny_hf):
    """A whole bf16 model: the packed projections and head give the logits and greedy tokens of the same
    model with every fast path off (F.linear everywhere), bit for bit."""
    model = copy.deepcopy(tiny_hf[1]).to(torch.bfloat16)
    ids, mask = prompts([5, 3, 7], seed=1)
    with torch.no_grad():
        fast_logits = model(ids, attention_mask=mask).logits
        fast_tokens = generate(model, ids, attention_mask=mask, max_new_tokens=8)
        for m in model.modules():
            if isinstance(m, Linear):
                m.fast_cpu = False
        model.head_cache = False
        plain_logits = model(ids, attention_mask=mask).logits
        plain_tokens = generate(model, ids, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(fast_logits, plain_logits) and torch.equal(fast_tokens, plain_tokens)


# ---- the buffer's errors -------------------------------------------------------------------
def test_buffer_errors(tiny_hf):
    _, model, _ = tiny_hf
    x = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="torch.no_grad"):
        model(x, kv_buffer=buffer_for(model, 2, 8))
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"kv_buffer has shape .*batch"):
            model(x, kv_buffer=buffer_for(model, 3, 8))
        buf = buffer_for(model, 2, 4)
        model(x, kv_buffer=buf)
        with pytest.raises(ValueError, match="kv_buffer is full: 3 past \\+ 2 new tokens > its max_length 4"):
            model(x[:, :2], kv_buffer=buf)
        past = model(x).past_key_values
        with pytest.raises(ValueError, match="already holds 3 positions"):
            model(x[:, :1], past_key_values=past, kv_buffer=buf)
        with pytest.raises(ValueError, match="1 layers, the model has 2"):
            model(x[:, :1], past_key_values=past[:1], kv_buffer=buffer_for(model, 2, 8))
        with pytest.raises(ValueError, match="the past holds 3 positions, more than the buffer's 2"):
            model(x[:, :1], past_key_values=past, kv_buffer=buffer_for(model, 2, 2))
    with pytest.raises(ValueError, match="sizes must be positive"):
        KVBuffer(2, 0, 4, 8, 8)
