"""MTL-LoRA (techniques/lora/mtl.py): properties against the paper's equation (arXiv:2410.09437),
h = W0·x + b + s·Σ_i softmax(w_t/τ)_i·B^i·Λ_t·A·x, and the task-id plumbing on a GPT-2-shaped model."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from techniques.lora import LoRALinear, MTLLoRALinear, apply_mtl_lora, mtl_modules, set_task_ids, task_ids

dims = st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(2, 6), st.integers(1, 3), st.booleans(),
                 st.integers(0, 2**16))


def _layer(n_tasks, r, n_up, full, seed, randomise=True):
    torch.manual_seed(seed)
    m = MTLLoRALinear(nn.Linear(5, 7), n_tasks, r=r, alpha=2 * r, n_up=n_up, tau=0.7, full_lambda=full)
    if randomise:
        with torch.no_grad():
            for p in (m.Lambda, m.B, m.w):
                p.copy_(torch.randn_like(p))
    return m


def _paper(m: MTLLoRALinear, x: torch.Tensor, t: int) -> torch.Tensor:
    """The equation as the paper writes it, one example (T, in), one task t, by a Python sum over i."""
    lam = m.lambda_matrix()[t]
    mix = torch.softmax(m.w[t] / m.tau, dim=-1)
    delta = sum(mix[i] * (m.B[i] @ lam @ m.A @ x.T).T for i in range(m.n_up))
    return m.base(x) + m.scaling * delta


@given(dims)
def test_forward_is_the_papers_equation_per_row(d):
    n_tasks, batch, r, n_up, full, seed = d
    m = _layer(n_tasks, r, n_up, full, seed)
    x = torch.randn(batch, 3, 5)
    ids = torch.randint(0, n_tasks, (batch,))
    m.task_ids = ids
    y = m(x)
    for b in range(batch):  # a mixed-task batch = each row computed alone with its own task
        torch.testing.assert_close(y[b], _paper(m, x[b], int(ids[b])), atol=1e-5, rtol=1e-5)


@given(dims)
def test_init_is_the_base_exactly(d):
    n_tasks, batch, r, n_up, full, seed = d
    m = _layer(n_tasks, r, n_up, full, seed, randomise=False)
    assert torch.equal(m.lambda_matrix(), torch.eye(r).expand(n_tasks, r, r)) and not m.B.any()
    x = torch.randn(batch, 3, 5)
    m.task_ids = torch.randint(0, n_tasks, (batch,))
    assert torch.equal(m(x), m.base(x))


@given(dims)
def test_one_task_one_up_identity_lambda_is_plain_lora(d):
    _, batch, r, _, full, seed = d
    m = _layer(1, r, 1, full, seed)
    with torch.no_grad():
        m.Lambda.copy_(torch.eye(r)[None] if full else torch.ones(1, r))
        m.w.copy_(torch.randn_like(m.w) * 10)  # one up-projection: the weights cannot matter
    lora = LoRALinear(m.base, r=r, alpha=m.alpha)
    with torch.no_grad():
        lora.A.copy_(m.A)
        lora.B.copy_(m.B[0])
    x = torch.randn(batch, 3, 5)
    m.task_ids = torch.zeros(batch, dtype=torch.long)
    torch.testing.assert_close(m(x), lora(x), atol=1e-5, rtol=1e-5)


def test_model_task_ids_and_bad_ids(tiny_hf):
    _, ours, _ = tiny_hf
    model = apply_mtl_lora(copy.deepcopy(ours).eval(), n_tasks=3, r=4, n_up=2)
    assert len(mtl_modules(model)) > 0
    with torch.no_grad():
        for m in mtl_modules(model):
            m.B.normal_()
            m.Lambda.normal_()  # at init Λ_t = I for every task: make the tasks differ
    x = torch.randint(0, 50257, (3, 8))
    with torch.no_grad():
        with task_ids(model, [0, 1, 2]):
            mixed = model(x).logits                                  # (3, T, vocab), three tasks in one batch
        for b in range(3):
            set_task_ids(model, [b])
            torch.testing.assert_close(mixed[b:b + 1], model(x[b:b + 1]).logits, atol=1e-5, rtol=1e-5)
        set_task_ids(model, [0])
        o0 = model(x[:1]).logits
        set_task_ids(model, [1])
        assert not torch.allclose(o0, model(x[:1]).logits)          # the task id changes the output
    with pytest.raises(ValueError, match="out of range"):
        set_task_ids(model, [0, 3])
    set_task_ids(model, None)
    with pytest.raises(RuntimeError, match="set_task_ids"):
        model(x)
