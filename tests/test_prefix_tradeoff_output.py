"""The trade-off's second half (issue 28): the output change each method causes against input length.

Prefix tuning's change shrinks at long inputs (its share of attention does); Prefix-Tuning+'s, with M matched to
the same prefix, does not: the property arXiv 2506.13674 (section 3) claims, on a micro model."""
from __future__ import annotations

import pytest
import torch

from demos.kits.prefix import matched_prefix_plus, output_change, tradeoff_curves, tradeoff_figure
from minigpt import GPT, GPTConfig
from techniques.prefix import PrefixTuning, PrefixTuningPlus
from tests.helpers import PNG_MAGIC


def _model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=128, n_positions=256, n_embd=32, n_layer=2, n_head=4)).eval()


def test_output_change_is_zero_without_an_effect():
    model = _model()
    ids = torch.randint(0, 128, (2, 9))
    plus = PrefixTuningPlus(model)                          # M = 0: the frozen model exactly
    assert output_change(model, ids, plus=plus) == 0.0
    plus.unwrap()
    prefix = PrefixTuning(model.config, 4)
    with torch.no_grad():
        prefix.embedding.weight.zero_()                     # zero keys: uniform mass on zero values
    assert output_change(model, ids, prefix=prefix) > 0.0   # a prefix still dilutes attention: not 0
    with pytest.raises(ValueError, match="exactly one"):
        output_change(model, ids)


def test_matching_equalises_the_change_at_the_calibration_length():
    model = _model()
    torch.manual_seed(3)
    prefix = PrefixTuning(model.config, 10).eval()
    ids = torch.randint(0, 128, (4, 8))
    target = output_change(model, ids, prefix=prefix)          # on the plain model, before the wrap
    plus, c = matched_prefix_plus(model, prefix, ids)
    try:
        assert c > 0
        assert output_change(model, ids, plus=plus) == pytest.approx(target, rel=1e-3)
    finally:
        plus.unwrap()
    assert not any(hasattr(b.attn, "M") for b in model.transformer.h)   # unwrapped: the plain model again


def test_prefix_tuning_change_shrinks_at_long_inputs_prefix_plus_does_not(tmp_path):
    model = _model()
    curves = tradeoff_curves(model, [4, 32, 200], Ps=(5, 20), batch=4, seed=0)
    for P in (5, 20):
        pt, pp = curves["prefix"][P], curves["plus"][P]
        assert pt[0] == pytest.approx(pp[0], rel=1e-3)              # matched at the shortest input
        assert pt[-1] < 0.4 * pt[0]                                 # prefix tuning: the change shrinks
        assert pp[-1] > 0.6 * pp[0]                                 # Prefix-Tuning+: it does not
        assert curves["share"][P][0] > curves["share"][P][-1]
    path = tradeoff_figure(curves, tmp_path / "tradeoff.png", "micro-random")
    assert path.read_bytes().startswith(PNG_MAGIC)
