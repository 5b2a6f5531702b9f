"""GRPO proven three ways: hypothesis properties of the math; TRL 1.16's loss and advantage formulas on the same
tensors; and a functional run on a tiny random GPT where a simple reward rises."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from techniques.grpo import GRPOConfig, aggregate, group_advantages, grpo_loss, grpo_train, kl_k3, per_token_loss

seeds = st.integers(0, 2**31 - 1)


def _tensors(seed, N=6, L=5):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(N, L, generator=g, dtype=torch.float64) * 3
    old = logp + 0.3 * torch.randn(N, L, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(N, L, generator=g, dtype=torch.float64)
    mask = (torch.rand(N, L, generator=g) > 0.3).long()
    mask[:, 0] = 1
    rewards = torch.randn(N, generator=g, dtype=torch.float64)
    return logp, old, ref, mask, rewards


@settings(max_examples=30, deadline=None)
@given(seeds)
def test_rho_one_beta_zero_is_the_policy_gradient(seed):
    logp, _, _, mask, rewards = _tensors(seed)
    A = group_advantages(rewards, 3)
    x = logp.clone().requires_grad_(True)
    aggregate(per_token_loss(x, x.detach(), A, beta=0.0), mask, "bnpo", 5).backward()
    y = logp.clone().requires_grad_(True)
    (-(A[:, None] * y * mask).sum() / mask.sum()).backward()  # −Σ Â·∇log π / N_tokens
    torch.testing.assert_close(x.grad, y.grad, atol=1e-12, rtol=0)


@settings(max_examples=50, deadline=None)
@given(seeds)
def test_kl_k3_nonnegative_and_zero_iff_equal(seed):
    logp, _, ref, _, _ = _tensors(seed)
    kl = kl_k3(logp, ref)
    assert (kl >= 0).all()
    assert (kl[ref != logp] > 0).all()
    assert torch.equal(kl_k3(logp, logp), torch.zeros_like(logp))


@settings(max_examples=50, deadline=None)
@given(seeds, st.sampled_from(["group", "batch", "none"]))
def test_group_advantages_have_mean_zero(seed, scale):
    _, _, _, _, rewards = _tensors(seed)
    A = group_advantages(rewards, 3, scale)
    torch.testing.assert_close(A.view(-1, 3).mean(1), torch.zeros(2, dtype=A.dtype), atol=1e-12, rtol=0)


def test_equal_rewards_give_no_policy_gradient():
    logp, old, _, mask, _ = _tensors(1)
    A = group_advantages(torch.ones(6, dtype=torch.float64), 3)
    x = logp.clone().requires_grad_(True)
    aggregate(per_token_loss(x, old, A), mask, "grpo", 5).backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_clip_passes_no_gradient_outside_the_trust_region():
    logp = torch.zeros(1, 2, dtype=torch.float64)
    old = torch.log(torch.tensor([[1 / 1.5, 1 / 0.5]], dtype=torch.float64))  # ρ = 1.5 and 0.5
    x = logp.clone().requires_grad_(True)
    per_token_loss(x, old, torch.tensor([1.0, ], dtype=torch.float64)).sum().backward()
    assert x.grad[0, 0] == 0 and x.grad[0, 1] != 0  # Â>0 pushes ρ up: clipped above 1.2, not below 0.8
    x.grad = None
    per_token_loss(x, old, torch.tensor([-1.0], dtype=torch.float64)).sum().backward()
    assert x.grad[0, 0] != 0 and x.grad[0, 1] == 0


# ---- TRL 1.16 -------------------------------------------------------------------------------------------------
# Calling GRPOTrainer._compute_loss needs a built trainer (model, accelerator, datasets, a processing class), so the
# test reproduces its formula line by line from trl/trainer/grpo_trainer.py (TRL 1.16): advantages lines 2765-2799
# (mean per group; std by nanstd, unbiased; + 1e-4), per-token loss lines 3095-3150 (importance_sampling_level
# "token", delta None, no bias-corrected KL), aggregation lines 3153-3173 (one process, no grad accumulation, so
# dapo's normaliser num_items_in_batch / num_processes is the mask's sum).
def _trl_advantages(rewards, G, scale):
    from trl.trainer.utils import nanstd
    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    if scale == "batch":
        std = nanstd(rewards).expand_as(rewards)
    else:
        std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    adv = rewards - mean
    return adv / (std + 1e-4) if scale != "none" else adv


def _trl_loss(per_token_logps, old, ref, advantages, mask, loss_type, beta, eps_low, eps_high, max_len):
    advantages = advantages.unsqueeze(1)
    coef_1 = torch.exp(per_token_logps - old)
    if beta != 0.0:
        per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_len)
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)


def test_equals_trl_formulas():
    worst = 0.0
    for seed in range(5):
        logp, old, ref, mask, rewards = [t.float() if t.is_floating_point() else t for t in _tensors(seed)]
        for scale in ("group", "batch", "none"):
            A = group_advantages(rewards, 3, scale)
            A_trl = _trl_advantages(rewards, 3, scale)
            worst = max(worst, float((A - A_trl).abs().max()))
            for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
                for beta in (0.0, 0.04):
                    for mu_old in (logp.detach(), old):  # μ = 1: π_old = π_θ at the first pass; μ = 2: it moved
                        cfg = GRPOConfig(loss_type=loss_type, beta=beta, max_completion_length=5,
                                         epsilon_low=0.2, epsilon_high=0.28)
                        ours = grpo_loss(logp, mu_old, ref, A, mask, cfg)
                        theirs = _trl_loss(logp, mu_old, ref, A_trl, mask.float(), loss_type, beta, 0.2, 0.28, 5)
                        worst = max(worst, float((ours - theirs).abs()))
    assert worst <= 1e-6, worst


# ---- functional -----------------------------------------------------------------------------------------------
def test_reward_rises_on_a_tiny_random_model(tmp_path, tokenizer):
    from helpers import make_hf_model

    from minigpt import GPT
    from techniques.lora import apply_lora
    folder = make_hf_model(tmp_path / "m", seed=0)[1]
    model = apply_lora(GPT.from_pretrained(str(folder)), r=4, alpha=8, targets=("c_attn", "c_proj"), verbose=False)

    def reward(texts):  # the rate of tokens in the lower half of the vocabulary: ~0.5 at random, learnable fast
        return [sum(t < 25128 for t in tokenizer.encode(x)) / max(1, len(tokenizer.encode(x))) for x in texts]

    cfg = GRPOConfig(num_generations=8, max_completion_length=8, beta=0.0, lr=3e-2, steps=30, top_k=50, seed=0)
    hist = grpo_train(model, tokenizer, ["Hello", "A story"], reward, cfg, batch_prompts=2)
    before = sum(h["reward_mean"] for h in hist[:5]) / 5
    after = sum(h["reward_mean"] for h in hist[-5:]) / 5
    assert after > before + 0.1, (before, after)


def test_lora_disabled_is_the_base_model_and_bad_input_is_named(tmp_path, tokenizer):
    import pytest
    from helpers import make_hf_model

    from minigpt import GPT
    from techniques.grpo import check_rewards
    from techniques.lora import apply_lora, lora_disabled
    folder = make_hf_model(tmp_path / "m", seed=1)[1]
    base = GPT.from_pretrained(str(folder))
    model = apply_lora(GPT.from_pretrained(str(folder)), r=4, verbose=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)
        x = torch.tensor([[1, 2, 3, 4]])
        with lora_disabled(model):
            torch.testing.assert_close(model(x).logits, base(x).logits, atol=1e-5, rtol=0)
        assert (model(x).logits - base(x).logits).abs().max() > 1e-3  # adapters back on afterwards
    with pytest.raises(ValueError, match="G >= 2"):
        grpo_train(model, tokenizer, ["a"], lambda t: [0.0] * len(t), GRPOConfig(num_generations=1))
    with pytest.raises(ValueError, match="2 values for 3"):
        check_rewards([1.0, 2.0], 3)
    with pytest.raises(ValueError, match="NaN"):
        check_rewards([1.0, float("nan")], 2)
    with pytest.raises(ValueError, match="not a number"):
        check_rewards(["x"], 1)
    with pytest.raises(ValueError, match="exceeds the context"):
        grpo_train(model, tokenizer, ["word " * 70], lambda t: [0.0] * len(t), GRPOConfig(steps=1))
