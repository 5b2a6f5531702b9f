"""GRPO with the training infrastructure (issue 27): micro-batches that sum to the batch, bf16 autocast, exact
resume from an atomic checkpoint, 2 gloo processes against 1, DoRA and QLoRA adapters, the timing split.

Each claim is checked against the run it replaces, as tests/test_scale.py does for minigpt.train."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpo_worker
import pytest
import torch
from helpers import make_hf_model
from safetensors.torch import load_file
from test_scale import clean_env, free_port, max_diff

from minigpt import GPT, TrainingInterrupted
from techniques.grpo import (LOSS_TYPES, GRPOConfig, Rollout, accumulate_gradients, completion_logps,
                             group_advantages, grpo_train, rollout)
from techniques.lora import apply_lora, lora_disabled, lora_parameters, quantize_base

WORKER = Path(__file__).resolve().parent / "grpo_worker.py"
PROMPTS = grpo_worker.PROMPTS
reward = grpo_worker.reward


def lora_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def rows(ro: Rollout, a: int, b: int) -> Rollout:
    """Rows a..b of a rollout: a micro-batch of its whole groups."""
    return Rollout(ro.seqs[a:b], ro.attention[a:b], ro.cmask[a:b], ro.T, ro.rewards[a:b],
                   None if ro.old is None else ro.old[a:b],
                   None if ro.ref is None else ro.ref[a:b], ro.texts[a:b], ro.advantages[a:b])


# ---- grad accumulation: micro-batches sum to the batch ---------------------------------------------------------
def accumulated_grads(model, ro, cfg, parts, global_norm=True):
    for p in lora_parameters(model):
        p.grad = None
    n_tok, n_seq = int(ro.cmask.sum()), ro.seqs.size(0)
    micro = [rows(ro, a, b) for a, b in parts]
    if global_norm:
        loss, _ = accumulate_gradients(model, micro, cfg, n_tok, n_seq)
    else:  # the bug the test guards against: each micro-batch normalised by its own counts
        loss = sum(accumulate_gradients(model, [m], cfg, None, None)[0] for m in micro) / len(micro)
    return loss, {i: p.grad.clone() for i, p in enumerate(lora_parameters(model))}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grad_accum_two_equals_one_on_the_same_sampled_batch(loss_type):
    """One sampled batch of 4 groups of G = 3 (ratios moved off 1 so the clip acts, β = 0.04, the completion
    masks cut to 1..6 tokens): its gradient as one micro-batch and as two (1 + 3 groups, so they differ in size)
    agree within 1e-6 for every loss_type, and so do the losses (measured: 6e-9 at most)."""
    model = grpo_worker.model()
    cfg = GRPOConfig(num_generations=3, max_completion_length=6, beta=0.04, loss_type=loss_type, top_k=50,
                     num_iterations=2)  # μ = 2: π_old is kept, so it can be moved off π_θ
    ro = rollout(model, grpo_worker.get_tokenizer(), PROMPTS, reward, cfg, torch.Generator().manual_seed(0))
    ro.old = ro.old + 0.3 * torch.randn(ro.old.shape, generator=torch.Generator().manual_seed(1))
    ro.advantages = group_advantages(ro.rewards, 3)
    for i in range(12):  # completions of 1..6 tokens, as if eos had come early: the normalisers matter
        ro.cmask[i, 1 + (5 * i) % 6:] = 0
    loss1, g1 = accumulated_grads(model, ro, cfg, [(0, 12)])
    loss2, g2 = accumulated_grads(model, ro, cfg, [(0, 3), (3, 12)])
    assert max_diff(g1, g2) < 1e-6 and abs(loss1 - loss2) < 1e-6
    assert max(g.abs().max() for g in g1.values()) > 1e-3  # a real gradient
    _, g_local = accumulated_grads(model, ro, cfg, [(0, 3), (3, 12)], global_norm=False)
    assert max_diff(g1, g_local) > 1e-4  # micro-batches normalised by their own counts would differ


# ---- bf16 ------------------------------------------------------------------------------------------------------
def test_bf16_autocasts_the_forward_and_keeps_log_probs_and_weights_fp32():
    model = grpo_worker.model()
    cfg = GRPOConfig(num_generations=3, max_completion_length=6, top_k=50)
    ro = rollout(model, grpo_worker.get_tokenizer(), PROMPTS, reward, cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        lp32 = completion_logps(model, ro.seqs, ro.attention, ro.T)
        lp16 = completion_logps(model, ro.seqs, ro.attention, ro.T, "bf16")
    assert lp16.dtype == torch.float32
    gap = float(((lp16 - lp32).abs() * ro.cmask).max())
    assert 0 < gap < 0.1, gap  # bf16 really ran, and stays close
    hist = grpo_train(model, grpo_worker.get_tokenizer(), PROMPTS, reward,
                      GRPOConfig(num_generations=3, max_completion_length=6, steps=2, top_k=50, precision="bf16"),
                      batch_prompts=2)
    assert all(p.dtype == torch.float32 for p in lora_parameters(model))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)


# ---- exact resume ----------------------------------------------------------------------------------------------
class StopAt:
    """A reward that presses Ctrl-C at its n-th call (as a user would, mid-run)."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self, texts):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return reward(texts)


def dropout_model():
    torch.manual_seed(0)
    m = GPT(grpo_worker.CFG)
    apply_lora(m, r=4, alpha=8, targets=("c_attn", "mlp.c_fc"), dropout=0.2, verbose=False)
    return m


def without_times(history):
    return [{k: v for k, v in h.items() if not k.startswith("t_")} for h in history]


def test_resumed_equals_uninterrupted(tmp_path):
    """6 steps, grad_accum 2, μ = 2, β = 0.04, dropout 0.2 on the LoRA branch: Ctrl-C during step 5 (reward call
    9), resumed from the checkpoint of step 2 in a model rebuilt from scratch: the same LoRA weights and
    history (less its timings), to the bit."""
    tok = grpo_worker.get_tokenizer()
    base = dict(num_generations=3, max_completion_length=6, beta=0.04, lr=1e-2, steps=6, top_k=50, seed=5,
                num_iterations=2, grad_accum=2)
    model = dropout_model()
    full = grpo_train(model, tok, PROMPTS, reward, GRPOConfig(**base), batch_prompts=4)
    want = lora_state(model)
    ckpt = tmp_path / "train_state"
    with pytest.raises(TrainingInterrupted, match=r"the last checkpoint \(step 4\) is in .*--resume"):
        grpo_train(dropout_model(), tok, PROMPTS, StopAt(9), GRPOConfig(**base, save_every=2,
                   checkpoint_dir=str(ckpt)), batch_prompts=4)
    meta = json.loads((ckpt / "trainer_state.json").read_text())
    assert meta["step"] == 4 and len(meta["history"]) == 4
    model, counting = dropout_model(), StopAt(0)  # n = 0: never stops, counts the calls
    resumed = grpo_train(model, tok, PROMPTS, counting, GRPOConfig(**base, resume_from=str(ckpt)), batch_prompts=4)
    assert counting.calls == 4  # steps 5 and 6 x 2 micro-batches: it resumed, rather than rerunning all 6 steps
    assert max_diff(want, lora_state(model)) == 0.0
    assert without_times(full) == without_times(resumed) and len(resumed) == 6
    assert max_diff(want, lora_state(dropout_model())) > 1e-3  # it trained
    with pytest.raises(ValueError, match="a checkpoint of a different run.*lr"):
        grpo_train(dropout_model(), tok, PROMPTS, reward, GRPOConfig(**{**base, "lr": 2e-2}, resume_from=str(ckpt)),
                   batch_prompts=4)


# ---- several processes -----------------------------------------------------------------------------------------
def test_two_gloo_processes_equal_one_process(tmp_path):
    """2 gloo processes x 1 micro-batch == 1 process x grad_accum 2 (the same micro-batches, so the same samples):
    3 steps of 4 prompts, dapo, scale "batch", μ = 2, β = 0.04; the final LoRA weights within 1e-6."""
    env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    out = tmp_path / "two.safetensors"
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(out), "--grad-accum", "1"],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    results = [(p.wait(timeout=180), p.communicate()) for p in procs]
    assert all(code == 0 for code, _ in results), results
    one = grpo_worker.run(grad_accum=2)
    two = load_file(str(out))
    diff = max_diff(one, two)
    print(f"2 processes vs 1: max abs diff {diff:.3g}")
    assert diff < 1e-6, diff
    assert max_diff(one, grpo_worker.run(grad_accum=2, steps=1)) > 1e-4  # it trains


# ---- DoRA and QLoRA --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dora", "qlora", "qdora"])
def test_grpo_trains_dora_and_qlora_and_starts_at_kl_zero(kind, tmp_path):
    """π_ref = adapters off is still the base: the (quantised) base's logits, and KL_k3 = 0 at the first step
    (B = 0 at the start); then training moves the adapter (and DoRA's magnitude)."""
    folder = make_hf_model(tmp_path / "m", seed=2)[1]
    model, base = GPT.from_pretrained(str(folder)), GPT.from_pretrained(str(folder))
    if kind != "dora":
        quantize_base(model)
        quantize_base(base)
    apply_lora(model, r=4, alpha=8, targets=("c_attn", "c_proj"), use_dora=kind != "qlora", verbose=False)
    start = lora_state(model)
    x = torch.tensor([[5, 9, 300, 7]])
    with torch.no_grad(), lora_disabled(model):
        assert torch.equal(model(x).logits, base(x).logits)
    cfg = GRPOConfig(num_generations=3, max_completion_length=6, beta=0.04, lr=1e-2, steps=2, top_k=50)
    hist = grpo_train(model, grpo_worker.get_tokenizer(), PROMPTS, reward, cfg, batch_prompts=2)
    print(f"{kind}: KL_k3 at the first step {hist[0]['kl']:.3g}, at the last {hist[-1]['kl']:.3g}")
    assert hist[0]["kl"] < 1e-9, hist[0]["kl"]
    assert hist[-1]["kl"] > 0
    assert max_diff(start, lora_state(model)) > 1e-4
    if kind != "qlora":
        assert any(n.endswith("magnitude") or "magnitude" in n for n in start)


# ---- the timing split ------------------------------------------------------------------------------------------
def test_history_records_the_sampling_and_update_seconds():
    hist = grpo_train(grpo_worker.model(), grpo_worker.get_tokenizer(), PROMPTS, reward,
                      GRPOConfig(num_generations=2, max_completion_length=4, steps=2, num_iterations=2),
                      batch_prompts=2)
    for h in hist:
        assert isinstance(h["t_sample"], float) and isinstance(h["t_update"], float)
        assert h["t_sample"] > 0 and h["t_update"] > 0


def test_bad_settings_are_named():
    m = grpo_worker.model()
    with pytest.raises(ValueError, match="grad_accum x processes"):
        grpo_train(m, grpo_worker.get_tokenizer(), PROMPTS, reward, GRPOConfig(grad_accum=3), batch_prompts=2)
    with pytest.raises(ValueError, match="precision must be"):
        GRPOConfig(precision="int8").check()
    with pytest.raises(ValueError, match="fp16 needs loss scaling.*use bf16"):
        GRPOConfig(precision="fp16").check()
    with pytest.raises(ValueError, match="save_every needs a checkpoint_dir"):
        GRPOConfig(save_every=2).check()


# ---- μ = 1: π_old is π_θ itself -------------------------------------------------------------------------------
def test_one_iteration_takes_pi_old_from_the_update_pass_so_dropout_leaves_rho_at_one():
    """With μ = 1 no π_old pass is run (rollout.old is None) and log π_old = logp.detach(): even with dropout
    active in the update pass (train mode, p = 0.3 here) ρ = 1 exactly and nothing is clipped. A π_old taken from
    a separate eval-mode pass would put ρ off 1 by dropout's noise and clip part of the tokens."""
    from dataclasses import replace
    torch.manual_seed(0)
    model = GPT(replace(grpo_worker.CFG, embd_pdrop=0.3, attn_pdrop=0.3, resid_pdrop=0.3))
    apply_lora(model, r=4, alpha=8, targets=("c_attn",), verbose=False)
    cfg = GRPOConfig(num_generations=3, max_completion_length=6, beta=0.04, top_k=50, num_iterations=1)
    ro = rollout(model, grpo_worker.get_tokenizer(), PROMPTS, reward, cfg, torch.Generator().manual_seed(0))
    assert ro.old is None
    ro.advantages = group_advantages(ro.rewards, 3)
    _, stats = accumulate_gradients(model, [ro], cfg, int(ro.cmask.sum()), ro.seqs.size(0))
    assert stats[1] == 0 and stats[2] > 0          # Σ M·clipped = 0 over Σ M > 0 tokens
    cfg2 = replace(cfg, num_iterations=2)           # the eval-mode π_old: dropout's noise shows in ρ
    ro2 = rollout(model, grpo_worker.get_tokenizer(), PROMPTS, reward, cfg2, torch.Generator().manual_seed(0))
    ro2.advantages = group_advantages(ro2.rewards, 3)
    _, stats2 = accumulate_gradients(model, [ro2], cfg2, int(ro2.cmask.sum()), ro2.seqs.size(0))
    assert stats2[1] > 0
