"""The shared training loop and its data helpers."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt import (GPT, GPTConfig, TrainConfig, causal_lm_loss, collate_lm, examples_from_pairs,
                     examples_from_text, load_lm_data, lm_loss_fn, save_history, split_examples, train)

CFG = GPTConfig(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)


def tiny_run(seed=0, **kw):
    torch.manual_seed(0)
    model = GPT(CFG)
    data = examples_from_text([i % 7 for i in range(400)], 16)  # a repeating pattern: learnable
    cfg = TrainConfig(**{"epochs": 3, "batch_size": 4, "lr": 3e-2, "seed": seed, "progress": False, **kw})
    history = train(model.parameters(), lm_loss_fn(model), data[:-3], eval_examples=data[-3:], config=cfg,
                    eval_modules=[model])
    return model, history


def test_loss_falls_and_history_is_complete():
    _, h = tiny_run(eval_every=5)
    assert len(h) == 3 * 6 and [r["step"] for r in h] == list(range(18))
    assert h[-1]["loss"] < 0.5 * h[0]["loss"]
    assert [r["step"] for r in h if "eval_loss" in r] == [4, 9, 14, 17]


def test_seeded_runs_are_identical_and_seeds_differ():
    a, ha = tiny_run(seed=1)
    b, hb = tiny_run(seed=1)
    _, hc = tiny_run(seed=2)
    assert ha == hb and [r["loss"] for r in ha] != [r["loss"] for r in hc]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_warmup_then_linear_decay():
    _, h = tiny_run(warmup_steps=4, max_steps=10)
    lrs = [r["lr"] for r in h]
    assert len(h) == 10
    assert lrs[:4] == pytest.approx([7.5e-3, 1.5e-2, 2.25e-2, 3e-2])
    assert lrs[4:] == pytest.approx([3e-2 * (10 - s) / 6 for s in range(4, 10)])


def test_max_steps_is_exact_and_overrides_epochs():
    """22 training examples in batches of 4 make 6 steps an epoch: max_steps=14 with epochs=1 runs
    two whole epochs and two steps of a third."""
    from minigpt import plan_steps
    _, h = tiny_run(epochs=1, max_steps=14)
    assert len(h) == 14 and [r["epoch"] for r in h] == [0] * 6 + [1] * 6 + [2] * 2
    assert plan_steps(22, TrainConfig(epochs=1, max_steps=14, batch_size=4)) == (14, 14 / 6)
    assert plan_steps(6, TrainConfig(epochs=3, batch_size=4)) == (6, 3.0)
    _, h = tiny_run(epochs=5, max_steps=3)  # fewer than the epochs would give: stops at 3
    assert len(h) == 3
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(max_steps=0)


def test_only_trainable_params_change_and_clipping_applies():
    torch.manual_seed(0)
    model = GPT(CFG)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for n, p in model.named_parameters():
        p.requires_grad_(n == "transformer.ln_f.bias")
    data = examples_from_text(list(range(64)) * 2, 16)
    h = train(model.parameters(), lm_loss_fn(model), data,
              config=TrainConfig(batch_size=2, lr=1.0, grad_clip=1e-3, progress=False))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"transformer.ln_f.bias"}
    assert all(r["grad_norm"] > 1e-3 for r in h)  # pre-clip norms are reported


def test_loss_mask_counts_only_targets():
    logits = torch.randn(1, 4, 10)
    ids = torch.tensor([[1, 2, 3, 4]])
    full = causal_lm_loss(logits, ids)
    only_last = causal_lm_loss(logits, ids, torch.tensor([[0, 0, 0, 1]]))
    assert only_last == pytest.approx(float(torch.nn.functional.cross_entropy(logits[0, 2:3], ids[0, 3:])))
    assert full != only_last


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(2, 9), V=st.integers(2, 40), seed=st.integers(0, 2 ** 16),
       masked=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_loss_and_gradient_are_cross_entropys(B, T, V, seed, masked, dtype):
    """causal_lm_loss writes the gradient out, (softmax(z) - onehot(t)) / n: the same loss and gradient as
    F.cross_entropy on the shifted targets, zero on positions that are not targets."""
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, T, V, generator=g)).to(dtype).requires_grad_(True)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.randint(0, 2, (B, T), generator=g) if masked else None
    targets = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    if mask is not None:
        targets = targets.masked_fill(torch.nn.functional.pad(mask[:, 1:], (0, 1)) == 0, -100)
    ours = causal_lm_loss(logits, ids, mask)
    (grad,) = torch.autograd.grad(ours, logits)
    if bool((targets == -100).all()):
        assert ours.item() == 0 and not grad.any()
        return
    ref = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-6)
    # in bf16 both sides round an fp32 gradient that differs in its last fp32 bits (the order of the sums), which
    # can land on neighbouring bf16 values: one bf16 step is up to 2^-7 of the value
    rtol = 2 ** -7 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=1e-7)
    assert not grad[targets == -100].any()


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(2, 9), V=st.integers(2, 40), C=st.integers(1, 16),
       seed=st.integers(0, 2 ** 16), masked=st.booleans(), dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_loss_under_autocast_is_fp32_cross_entropy_of_the_autocast_logits(B, T, V, C, seed, masked, dtype):
    """Under autocast the logits come out of the head's matmul in bf16/fp16; causal_lm_loss takes them as they
    are but computes the softmax, the loss and its gradient in fp32: the same loss as F.cross_entropy on
    logits.float(), and the same gradient flowing back into the head's input (fp32 parameters)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, C, generator=g).requires_grad_(True)
    W = torch.randn(V, C, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.randint(0, 2, (B, T), generator=g) if masked else None
    targets = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    if mask is not None:
        targets = targets.masked_fill(torch.nn.functional.pad(mask[:, 1:], (0, 1)) == 0, -100)
    with torch.autocast("cpu", dtype=dtype):
        logits = h @ W.t()                                  # (B, T, V), in bf16/fp16: autocast's matmul
        ours = causal_lm_loss(logits, ids, mask)
    assert logits.dtype == dtype and ours.dtype == torch.float32
    g_logits, grad = torch.autograd.grad(ours, (logits, h))
    if bool((targets == -100).all()):
        assert ours.item() == 0 and not grad.any()
        return
    with torch.autocast("cpu", dtype=dtype):
        logits_ref = h @ W.t()
    ref = torch.nn.functional.cross_entropy(logits_ref.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
    g_logits_ref, ref_grad = torch.autograd.grad(ref, (logits_ref, h))
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-6)
    # The fp32 gradient is rounded to the logits' dtype on its way back into the matmul; two fp32 values that
    # differ in their last bits can round to neighbouring bf16/fp16 values, so they may differ by one unit there,
    # and the gradient into h by at most that unit times |W| summed over the vocabulary.
    eps = torch.finfo(dtype).eps
    assert g_logits.dtype == dtype
    torch.testing.assert_close(g_logits.float(), g_logits_ref.float(), rtol=eps, atol=1e-7)
    bound = eps * (g_logits_ref.float().abs() @ W.abs()) + 1e-7
    assert bool(((grad - ref_grad).abs() <= bound).all())


def test_pairs_mask_the_prompt(tokenizer):
    (ex,) = examples_from_pairs(tokenizer, [("name: Ann", " Hello Ann")], 32)
    n_prompt = len(tokenizer.encode("name: Ann"))
    assert ex.loss_mask == [0] * n_prompt + [1] * (len(ex.input_ids) - n_prompt)
    assert ex.input_ids[-1] == 50256
    batch = collate_lm([ex, ex])
    assert batch["input_ids"].shape == batch["loss_mask"].shape == (2, len(ex.input_ids))
    with pytest.raises(ValueError, match="pair 1: the prompt alone"):
        examples_from_pairs(tokenizer, [("a b c d e f g", "x")], 4)


@pytest.mark.parametrize("name, content, match", [
    ("empty.txt", b"  \n", "is empty"),
    ("latin1.txt", b"ok\nna\xefve", "line 2: not UTF-8"),
    ("short.txt", b"just a few words", "shorter than one block"),
    ("bad.jsonl", b'{"prompt": "a", "completion": "b"}\nnot json\n', "line 2: not valid JSON"),
    ("field.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n',
     "line 2: needs a string field 'completion'"),
])
def test_bad_data_files_name_file_and_line(tokenizer, tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as e:
        load_lm_data(path, tokenizer, block_size=16)
    assert str(path) in str(e.value)
    with pytest.raises(FileNotFoundError):
        load_lm_data(tmp_path / "missing.txt", tokenizer, 16)


def test_split_history_and_config_errors(tmp_path):
    tr, ev = split_examples(list(range(20)), 0.2, seed=0)
    assert len(ev) == 4 and sorted(tr + ev) == list(range(20))
    path = save_history([{"step": 0, "loss": 1.0}], tmp_path / "run")
    assert json.loads(path.read_text()) == {"history": [{"step": 0, "loss": 1.0}]}
    for bad in (dict(lr=0), dict(epochs=0), dict(eval_every=0)):
        with pytest.raises(ValueError):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="nothing to train"):
        train([torch.zeros(1)], lambda b: 0, [1])
