"""KV-cache decoding: equal to transformers' generate, batched with left padding, reproducible."""
from __future__ import annotations

import pytest
import torch

from minigpt import generate, stream
from minigpt import sample_next_token


def test_greedy_equals_transformers_left_padded_batch(tiny_hf, tokenizer):
    hf, ours, _ = tiny_hf
    ids, mask = tokenizer.encode_batch(["The dog", "Once upon a time there was", "Hi"])
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=50256)
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=20)
    assert torch.equal(got, want)


def test_greedy_batch_rows_equal_rows_alone(tiny_hf, tokenizer):
    _, ours, _ = tiny_hf
    prompts = ["The dog", "Once upon a time there was", "Hi"]
    ids, mask = tokenizer.encode_batch(prompts)
    batch = generate(ours, ids, attention_mask=mask, max_new_tokens=12)
    for i, p in enumerate(prompts):
        alone = generate(ours, torch.tensor([tokenizer.encode(p)]), max_new_tokens=12)
        assert batch[i, -12:].tolist() == alone[0, -12:].tolist()


def test_eos_stops_rows_and_pads(tiny_hf):
    _, ours, _ = tiny_hf
    ids = torch.randint(0, 50257, (3, 4), generator=torch.Generator().manual_seed(1))
    free = generate(ours, ids, max_new_tokens=10)
    eos = int(free[0, 6])  # the token row 0 emits third: make it the end of text
    out = generate(ours, ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    for r in range(3):
        row, ref = out[r, 4:].tolist(), free[r, 4:].tolist()
        if eos in ref[:len(row)]:
            k = ref.index(eos)
            assert row[:k + 1] == ref[:k + 1] and all(t == 0 for t in row[k + 1:])
        else:
            assert row == ref[:len(row)]
    assert out.shape[1] <= free.shape[1]


def test_sampling_is_reproducible_with_a_seed(tiny_hf):
    _, ours, _ = tiny_hf
    ids = torch.randint(0, 50257, (2, 3), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=15, do_sample=True, temperature=0.9, top_k=50, top_p=0.9)
    a = generate(ours, ids, generator=torch.Generator().manual_seed(7), **kw)
    b = generate(ours, ids, generator=torch.Generator().manual_seed(7), **kw)
    c = generate(ours, ids, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_and_top_p_filter():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next_token(logits, do_sample=True, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {0, 1}
    draws = {int(sample_next_token(logits, do_sample=True, top_p=0.7, generator=g)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7, so the second token is needed; 0.8 >= 0.7 stops there
    draws = {int(sample_next_token(logits, do_sample=True, top_p=0.4, generator=g)) for _ in range(50)}
    assert draws == {0}
    assert int(sample_next_token(logits, do_sample=True, temperature=0)) == 0


def test_initial_past_is_continued(tiny_hf):
    """generate(past=P, ids) equals generating after the tokens that made P."""
    _, ours, _ = tiny_hf
    ids = torch.randint(0, 50257, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        past = ours(ids[:, :5]).past_key_values
    a = generate(ours, ids[:, 5:], past_key_values=past, max_new_tokens=6)
    b = generate(ours, ids, max_new_tokens=6)
    assert a[0, -6:].tolist() == b[0, -6:].tolist()


def test_stream_yields_each_step(tiny_hf):
    _, ours, _ = tiny_hf
    ids = torch.tensor([[464, 3290]])
    steps = list(stream(ours, ids, max_new_tokens=5))
    assert len(steps) == 5 and all(s.shape == (1,) for s in steps)
    assert torch.stack(steps, 1).tolist() == generate(ours, ids, max_new_tokens=5)[:, 2:].tolist()


@pytest.mark.parametrize("kw, msg", [
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=0), "top_k must be >= 1"),
    (dict(max_new_tokens=100), "n_positions 64"),
    (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
    (dict(attention_mask=torch.ones(1, 5)), "attention_mask must be"),
])
def test_invalid_settings_raise(tiny_hf, kw, msg):
    _, ours, _ = tiny_hf
    kw = {"max_new_tokens": 3, **kw}
    with pytest.raises(ValueError, match=msg):
        generate(ours, torch.tensor([[1, 2]]), **kw)
