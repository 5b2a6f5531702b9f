"""techniques/grpo/rewards.py: the PPLM-head reward (read on the frozen base), bag-of-words rate, module:function."""
from __future__ import annotations

import pytest
import torch

from techniques.grpo import AttributeReward, BagOfWordsReward, check_rewards, load_callable, load_reward


def double_length(texts):  # a user reward, loaded by name in the test below
    return [2.0 * len(t) for t in texts]


def test_attribute_reward_is_the_heads_probability_on_the_base_model(tmp_path):
    from helpers import make_hf_model

    from minigpt import EOT_ID, GPT, get_tokenizer
    from techniques.lora import apply_lora
    from techniques.pplm import Discriminator
    from techniques.pplm.attributes import mean_hidden
    folder = make_hf_model(tmp_path / "m", seed=3)[1]
    base = GPT.from_pretrained(str(folder))
    torch.manual_seed(0)
    head = Discriminator(base.config.n_embd, ["negative", "positive"], "m")
    head.save(tmp_path / "head")
    policy = apply_lora(GPT.from_pretrained(str(folder)), r=4, verbose=False)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.5)  # the adapters change the policy; the reward must not see them
    texts = ["a fine day", "terrible, awful"]
    r = AttributeReward(policy, tmp_path / "head", "positive")(texts)
    tok = get_tokenizer()
    want = []
    with torch.no_grad():
        for t in texts:
            h = mean_hidden(base, torch.tensor([[EOT_ID] + tok.encode(t)]))
            want.append(torch.softmax(head(h), -1)[0, 1].item())
    assert max(abs(a - b) for a, b in zip(r, want)) < 1e-5, (r, want)
    assert all(0 < v < 1 for v in r)
    assert load_reward("sst2", policy, discrim=tmp_path / "head", label="negative")(texts)[0] == pytest.approx(1 - r[0])
    assert any(p.requires_grad for p in policy.parameters())  # adapters switched back on
    with pytest.raises(ValueError, match="not one of this head's classes"):
        AttributeReward(policy, tmp_path / "head", "joyful")
    small = Discriminator(16, ["negative", "positive"], "other")
    small.save(tmp_path / "small")
    with pytest.raises(ValueError, match="n_embd=16"):
        AttributeReward(policy, tmp_path / "small")


def test_bag_of_words_rate_and_loading_by_name():
    bow = BagOfWordsReward(["good", "Great"])
    assert bow(["good and great", "nothing here", ""]) == [pytest.approx(2 / 3), 0.0, 0.0]
    assert load_reward("bow", bag="positive_words")(["happy happy joy"])[0] > 0
    fn = load_reward("test_grpo_rewards:double_length")
    assert check_rewards(fn(["ab", "c"]), 2).tolist() == [4.0, 2.0]
    with pytest.raises(ValueError, match="unknown --reward"):
        load_reward("vader")
    with pytest.raises(ValueError, match="needs --discrim"):
        load_reward("sst2")
    with pytest.raises(ValueError, match="needs --bag"):
        load_reward("bow")
    with pytest.raises(ValueError, match="unknown bag of words"):
        BagOfWordsReward("no_such_bag")
    with pytest.raises(ValueError, match="cannot load the reward"):
        load_callable("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="module:function"):
        load_callable("just_a_name:")
