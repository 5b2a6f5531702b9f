"""The prefix-tuning trade-off measurement (issue 28): the prefix's share of attention against input length."""
from __future__ import annotations

import torch

from demos.kits.prefix import prefix_attention_share
from minigpt import GPT, GPTConfig
from techniques.prefix import PrefixTuning


def _model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=128, n_positions=128, n_embd=32, n_layer=2, n_head=4)).eval()


def test_share_is_the_softmax_mass_on_the_prefix():
    model = _model()
    prefix = PrefixTuning(model.config, 5)
    ids = torch.randint(0, 128, (2, 7))
    share = prefix_attention_share(model, prefix, ids)
    past, mask = prefix.inputs_for(ids)
    out = model(ids, past_key_values=past, attention_mask=mask, output_attentions=True)
    direct = sum(float(a.detach()[..., :5].sum(-1).mean()) for a in out.attentions) / len(out.attentions)
    assert abs(share - direct) < 1e-6
    assert 0.0 < share < 1.0


def test_share_falls_with_length_and_rises_with_P():
    model = _model()
    ids = torch.randint(0, 128, (2, 80))
    shares = {}
    for P in (5, 40):
        torch.manual_seed(1)
        prefix = PrefixTuning(model.config, P)
        shares[P] = [prefix_attention_share(model, prefix, ids[:, :T]) for T in (4, 16, 80)]
    for P in (5, 40):
        assert shares[P][0] > shares[P][1] > shares[P][2]
    assert all(b > a for a, b in zip(shares[5], shares[40]))
