"""Properties of the weighted merges (techniques/lora/named.py `_combine`) against the math, not peft.

On one small `LoRALinear` per adapter (A_i: r_i x in, B_i: out x r_i, scaling s_i, weight w_i); the new
adapter has alpha = r', so its ΔW' = B'·A'. What is checked:
- cat:    ΔW' = Σ w_i·s_i·B_i·A_i exactly, and r' = Σ r_i.
- linear: as named.py implements it (peft's choice), the weight enters *both* factors through a square
          root, with the sign on A:  A' = Σ sign(w_i s_i)·sqrt|w_i s_i|·A_i,  B' = Σ sqrt|w_i s_i|·B_i, so
          ΔW' = (Σ_i sqrt|w_i s_i| B_i)(Σ_j sign(w_j s_j) sqrt|w_j s_j| A_j)  (cross terms included).
- svd:    ΔW' is a best rank-r' approximation of Δ = Σ w_i·ΔW_i: ||Δ - ΔW'||_F = sqrt(Σ_{k>r'} σ_k²)
          (Eckart–Young), and rank(ΔW') <= r'.
- all weights 0: ΔW' = 0 for every combination.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from techniques.lora.lora import LoRALinear
from techniques.lora.named import _combine

IN, OUT = 7, 6


def layers(seed, ranks, alphas):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(IN, OUT).double()
    out = []
    for r, a in zip(ranks, alphas):
        m = LoRALinear(base, r=r, alpha=a).double()
        with torch.no_grad():
            m.A.copy_(torch.randn(m.A.shape, generator=g, dtype=torch.float64))
            m.B.copy_(torch.randn(m.B.shape, generator=g, dtype=torch.float64))
        out.append(m)
    return out


def delta(m):
    return m.scaling * (m.B @ m.A)


weight = st.floats(-2, 2, allow_nan=False).filter(lambda w: w == 0 or abs(w) > 1e-3)
case = st.integers(1, 4).flatmap(lambda n: st.tuples(
    st.integers(0, 2**16), st.lists(st.integers(1, 3), min_size=n, max_size=n),
    st.lists(st.sampled_from([1.0, 2.0, 8.0]), min_size=n, max_size=n),
    st.lists(weight, min_size=n, max_size=n)))


@settings(max_examples=60, deadline=None)
@given(case)
@torch.no_grad()
def test_cat_is_exact_sum(c):
    seed, ranks, alphas, weights = c
    ms = layers(seed, ranks, alphas)
    A, B = _combine(list(zip(ms, weights)), "cat", sum(ranks))
    assert A.shape == (sum(ranks), IN) and B.shape == (OUT, sum(ranks))
    want = sum(w * delta(m) for m, w in zip(ms, weights))
    torch.testing.assert_close(B @ A, want, rtol=1e-10, atol=1e-10)


@settings(max_examples=60, deadline=None)
@given(case.map(lambda c: (c[0], [c[1][0]] * len(c[1]), c[2], c[3])))  # linear: one rank
@torch.no_grad()
def test_linear_sqrt_on_both_sides_sign_on_A(c):
    seed, ranks, alphas, weights = c
    ms = layers(seed, ranks, alphas)
    A, B = _combine(list(zip(ms, weights)), "linear", ranks[0])
    k = [w * m.scaling for m, w in zip(ms, weights)]
    wantB = sum(math.sqrt(abs(x)) * m.B for m, x in zip(ms, k))
    wantA = sum(math.copysign(math.sqrt(abs(x)), x) * m.A for m, x in zip(ms, k))
    torch.testing.assert_close(A, wantA, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(B, wantB, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(B @ A, wantB @ wantA, rtol=1e-10, atol=1e-10)
    if len(ms) == 1:  # one adapter: exactly w·ΔW
        torch.testing.assert_close(B @ A, weights[0] * delta(ms[0]), rtol=1e-10, atol=1e-10)


@settings(max_examples=60, deadline=None)
@given(case, st.integers(1, 6))
@torch.no_grad()
def test_svd_is_best_rank_r(c, r):
    seed, ranks, alphas, weights = c
    ms = layers(seed, ranks, alphas)
    A, B = _combine(list(zip(ms, weights)), "svd", r)
    assert A.shape == (r, IN) and B.shape == (OUT, r)
    target = sum(w * delta(m) for m, w in zip(ms, weights))
    sigma = torch.linalg.svdvals(target)
    tail = sigma[r:].square().sum().sqrt()
    err = torch.linalg.matrix_norm(target - B @ A)
    assert abs(err - tail) <= 1e-9 * (1 + sigma.sum())
    assert torch.linalg.matrix_rank(B @ A, atol=1e-9 * (1 + sigma.sum())) <= r


@settings(max_examples=30, deadline=None)
@given(case)
@torch.no_grad()
def test_all_zero_weights_give_zero(c):
    seed, ranks, alphas, weights = c
    ms = layers(seed, ranks, alphas)
    pairs = [(m, 0.0) for m in ms]
    for kind, r in (("cat", sum(ranks)), ("svd", max(ranks)), ("linear", ranks[0])):
        if kind == "linear":
            pairs = [(m, 0.0) for m in layers(seed, [ranks[0]] * len(ranks), alphas)]
        A, B = _combine(pairs, kind, r)
        assert torch.equal(B @ A, torch.zeros(OUT, IN, dtype=torch.float64)), kind
