"""JAM (techniques/pplm/jam.py) and the PPLM paper's baselines (baselines.py): weighted decoding and reranking.

Property tests against the math (the move reaches the target margin, is the smallest such move, lies along the
boundary's normal; WD is p·exp(λ·1_bag) renormalised), a zero move and λ = 0 give minigpt.generate's tokens bit
for bit, and a functional test that JAM raises the head's own rating of the text on a small model.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt import GPT, GPTConfig, generate
from techniques import pplm

SETTINGS = settings(max_examples=40, deadline=None)


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, n_positions=128)).eval()


def binary_head(n_embd: int, seed: int = 0) -> pplm.Discriminator:
    torch.manual_seed(seed)
    head = pplm.Discriminator(n_embd, ["negative", "positive"])
    return head.eval()


vectors = st.integers(0, 10_000).map(lambda s: torch.Generator().manual_seed(s))


@SETTINGS
@given(vectors, st.floats(-5, 5), st.integers(1, 8))
def test_move_reaches_the_target_margin_and_no_further(gen, mu, B):
    C = 16
    u, c = torch.randn(C, generator=gen, dtype=torch.float64), torch.randn((), generator=gen, dtype=torch.float64)
    h = 3 * torch.randn(B, C, generator=gen, dtype=torch.float64)
    delta = pplm.minimal_move(h, u, c, mu)
    after = pplm.margin(h + delta, u, c)
    before = pplm.margin(h, u, c)
    assert torch.all(after >= mu - 1e-9)
    assert torch.allclose(after, torch.maximum(before, torch.full_like(before, mu)), atol=1e-9)
    # the smallest move: its norm is the distance to the half-space m >= mu, (mu - m)+ / ||u||
    assert torch.allclose(delta.norm(dim=-1), (mu - before).clamp(min=0) / u.norm(), atol=1e-9)
    # along the normal: orthogonal to every direction inside the boundary (v with u·v = 0)
    v = torch.randn(C, generator=gen, dtype=torch.float64)
    v = v - (v @ u) / (u @ u) * u
    assert torch.allclose(delta @ v, torch.zeros(B, dtype=torch.float64), atol=1e-9)


@SETTINGS
@given(vectors, st.floats(-3, 3))
def test_no_shorter_move_reaches_the_target(gen, mu):
    C = 8
    u, c = torch.randn(C, generator=gen, dtype=torch.float64), torch.randn((), generator=gen, dtype=torch.float64)
    h = torch.randn(1, C, generator=gen, dtype=torch.float64) - 3 * u   # below the target
    delta = pplm.minimal_move(h, u, c, mu)
    other = delta + 0.5 * delta.norm() * torch.randn(C, generator=gen, dtype=torch.float64)  # any other move
    shorter = other * (0.999 * delta.norm() / other.norm())
    if delta.norm() > 1e-6:
        assert pplm.margin(h + shorter, u, c).item() < mu


def test_head_direction_is_the_log_odds_of_the_target():
    head = binary_head(12)
    h = torch.randn(5, 12)
    u, c = pplm.head_direction(head, "positive")
    logp = head(h).log_softmax(-1)
    assert torch.allclose(pplm.margin(h, u, c), logp[:, 1] - logp[:, 0], atol=1e-5)
    u2, c2 = pplm.head_direction(head, "negative")
    assert torch.allclose(u2, -u) and torch.allclose(c2, -c)


def test_jam_logits_are_the_head_applied_to_the_moved_state(micro):
    head = binary_head(32)
    adjust = pplm.jam_adjust(micro, head, "positive", pplm.JAMConfig(margin=3.0))
    out = micro(torch.tensor([[1, 2, 3]]), output_hidden_states=True)
    h, logits = out.hidden_states[-1][:, -1], out.logits[:, -1]
    u, c = pplm.head_direction(head, "positive")
    moved = h + pplm.minimal_move(h, u, c, 3.0)
    assert torch.allclose(adjust(h, logits.float()), micro.lm_head_reference(moved), atol=1e-4)
    assert pplm.margin(moved, u, c).item() >= 3.0 - 1e-4


def test_zero_move_and_zero_weight_give_plain_generation_bit_for_bit(micro):
    ids = torch.tensor([[50256, 10, 20, 30]])
    plain = generate(micro, ids, max_new_tokens=12, do_sample=True, top_k=10, preallocate=False,
                     generator=torch.Generator().manual_seed(3))
    head = binary_head(32)
    never = pplm.jam_adjust(micro, head, "positive", pplm.JAMConfig(margin=-1e9))   # every state is past it
    runs = {"none": None, "jam_zero": never, "wd_zero": pplm.weighted_decoding([5, 6], 50257, 0.0)}
    for name, adjust in runs.items():
        got = pplm.steered_generate(micro, ids, max_new_tokens=12, adjust=adjust, top_k=10,
                                    generator=torch.Generator().manual_seed(3))
        assert torch.equal(got, plain), name


def test_weighted_decoding_is_p_times_exp_lambda_on_the_bag():
    logits = torch.randn(2, 50)
    bag, lam = [3, 7, 11], 1.7
    p = logits.softmax(-1)
    want = p * torch.exp(lam * torch.isin(torch.arange(50), torch.tensor(bag)).float())
    want = want / want.sum(-1, keepdim=True)
    got = pplm.weighted_decoding(bag, 50, lam)(torch.zeros(2, 4), logits).softmax(-1)
    assert torch.allclose(got, want, atol=1e-6)


def test_jam_raises_the_heads_rating_of_the_text(micro):
    """Functional: on the micro model, text generated under JAM is rated positive by the head far more often."""
    torch.manual_seed(1)
    head = binary_head(32, seed=1)
    with torch.no_grad():
        head.mlp.weight.mul_(20)          # a head with a clear direction in this model's states
    u, c = pplm.head_direction(head, "positive")
    ids = torch.tensor([[50256, 11, 12]])

    def share(adjust):
        rated = []
        for s in range(6):
            seq = pplm.steered_generate(micro, ids, max_new_tokens=10, adjust=adjust, top_k=10,
                                        generator=torch.Generator().manual_seed(s))
            feats = pplm.mean_hidden(micro, seq[:, ids.size(1) - 1:])
            rated.append(pplm.margin(feats, u, c).item())
        return sum(rated) / len(rated)

    plain, moved = share(None), share(pplm.jam_adjust(micro, head, "positive", pplm.JAMConfig(margin=4.0)))
    assert moved > plain


def test_rerank_keeps_the_best_and_checks_k():
    assert pplm.rerank([0.1, 0.9, 0.5], 3) == 1
    assert pplm.rerank([0.1, 0.9, 0.5], 1) == 0
    assert pplm.rerank([0.4, 0.4], 2) == 0
    with pytest.raises(ValueError, match="k must be >= 1"):
        pplm.rerank([0.1], 0)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="non-empty bag"):
        pplm.weighted_decoding([], 50, 1.0)
    with pytest.raises(ValueError, match="two-class head"):
        pplm.head_direction(pplm.Discriminator(8, ["a", "b", "c"]), "a")
    micro = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, n_positions=32))
    with pytest.raises(ValueError, match="n_embd=32"):
        pplm.jam_adjust(micro, binary_head(32), "positive")
