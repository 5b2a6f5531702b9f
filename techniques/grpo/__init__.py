"""GRPO (DeepSeekMath, arXiv 2402.03300) on LoRA adapters, by hand: the algorithm in `grpo.py`."""
from .grpo import (LOSS_TYPES, SCALES, GRPOConfig, Rollout, accumulate_gradients, aggregate, check_rewards,
                   completion_logps, grpo_loss, grpo_train, rollout,
                   group_advantages, kl_k3, per_token_loss, sample_group)
from .rewards import REWARD_NAMES, AttributeReward, BagOfWordsReward, load_callable, load_reward

__all__ = ["GRPOConfig", "LOSS_TYPES", "SCALES", "group_advantages", "kl_k3", "per_token_loss", "aggregate",
           "grpo_loss", "completion_logps", "sample_group", "check_rewards", "Rollout", "rollout",
           "accumulate_gradients", "grpo_train",
           "REWARD_NAMES", "AttributeReward", "BagOfWordsReward", "load_callable", "load_reward"]
