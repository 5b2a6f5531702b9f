"""Beam search, the history rules (repetition penalty, no-repeat n-gram) and stop strings: equal to transformers'
generate on the same weights, consistent with the model's own probabilities, with a prefix and with LoRA."""
from __future__ import annotations

import itertools
import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import make_hf_model
from minigpt import GPT, beam_search, cut_at_stop, generate, penalize

PROMPTS = ["The dog", "Once upon a time there was", "Hi"]


def peaky_pair(folder):
    """(transformers model, ours) on random weights with a scaled-up embedding: a random GPT-2's next-token
    distribution is nearly flat, where beams would tie; x8 makes it peaked, so every decision is a real one."""
    from transformers import GPT2LMHeadModel
    hf, folder = make_hf_model(folder, seed=0)
    with torch.no_grad():
        hf.transformer.wte.weight.mul_(8)
    hf.save_pretrained(folder)
    return GPT2LMHeadModel.from_pretrained(folder).eval(), GPT.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def peaky(tmp_path_factory):
    return peaky_pair(tmp_path_factory.mktemp("peaky"))


def a_token_it_emits(ours, ids, mask, K):
    """A token the unconstrained beam search emits early: as eos it makes hypotheses end at different steps."""
    free = beam_search(ours, ids, attention_mask=mask, max_new_tokens=8, num_beams=K)
    return int(free.sequences[0, ids.shape[1] + 2])


# Every combination of the options, 144 in all, is checked by `python tests/test_decoding.py`; the suite takes a
# seeded sample of them plus the corners.
GRID = list(itertools.product([2, 4], [1.0, 0.8, -0.5], [False, True, "never"], [0, 2], [1.0, 1.3], [False, True]))
CASES = random.Random(0).sample(GRID, 14) + [(5, 1.0, False, 4, 1.0, True), (10, 0.8, False, 4, 1.0, True)]


@pytest.mark.parametrize("K, lp, early, ngram, rep, with_eos", CASES)
def test_beam_search_equals_transformers_on_a_left_padded_batch(peaky, tokenizer, K, lp, early, ngram, rep,
                                                               with_eos):
    hf, ours = peaky
    ids, mask = tokenizer.encode_batch(PROMPTS)
    eos = a_token_it_emits(ours, ids, mask, K) if with_eos else None
    kw = dict(num_beams=K, length_penalty=lp, early_stopping=early, no_repeat_ngram_size=ngram,
              repetition_penalty=rep, eos_token_id=eos, pad_token_id=50256 if eos is None else eos)
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, output_scores=True,
                       return_dict_in_generate=True, **kw)
    got = beam_search(ours, ids, attention_mask=mask, max_new_tokens=12, **kw)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(got.scores, want.sequences_scores, atol=1e-4, rtol=0)


@pytest.mark.parametrize("K", [3, 5])
def test_beam_search_equals_transformers_for_one_prompt(peaky, tokenizer, K):
    hf, ours = peaky
    ids = torch.tensor([tokenizer.encode("A long time ago")])
    want = hf.generate(ids, max_new_tokens=10, num_beams=K, do_sample=False, pad_token_id=50256,
                       eos_token_id=50256, no_repeat_ngram_size=2, output_scores=True, return_dict_in_generate=True)
    got = beam_search(ours, ids, max_new_tokens=10, num_beams=K, eos_token_id=50256, pad_token_id=50256,
                      no_repeat_ngram_size=2)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(got.scores, want.sequences_scores, atol=1e-4, rtol=0)


@pytest.mark.parametrize("ngram, rep", [(1, 1.0), (2, 1.3), (3, 0.7), (0, 1.3)])
def test_greedy_with_the_history_rules_equals_transformers(peaky, tokenizer, ngram, rep):
    hf, ours = peaky
    ids, mask = tokenizer.encode_batch(PROMPTS)
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=15, do_sample=False, pad_token_id=50256,
                       no_repeat_ngram_size=ngram, repetition_penalty=rep)
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=15, no_repeat_ngram_size=ngram,
                   repetition_penalty=rep)
    assert torch.equal(got, want)


def test_one_beam_is_greedy(peaky, tokenizer):
    """(Not with a repetition penalty: greedy applies it to the logits, beams to the log-probabilities, as
    transformers does, and s / θ moves a logit and a log-probability differently.)"""
    _, ours = peaky
    ids, mask = tokenizer.encode_batch(PROMPTS)
    for rules in ({}, {"no_repeat_ngram_size": 2}):
        greedy = generate(ours, ids, attention_mask=mask, max_new_tokens=10, **rules)
        beam = beam_search(ours, ids, attention_mask=mask, max_new_tokens=10, num_beams=1, **rules)
        assert torch.equal(beam.sequences, greedy)


def log_prob_of(model, ids, new, past=None):
    """log p(new | ids) under the model, by one full forward pass (no cache)."""
    full = torch.cat([ids, new], dim=1)
    with torch.no_grad():
        logits = model(full, past_key_values=past).logits[:, ids.shape[1] - 1:-1].float()
    return logits.log_softmax(-1).gather(-1, new[..., None]).squeeze(-1).sum(-1)


@pytest.mark.parametrize("with_prefix, with_lora", [(False, False), (True, False), (False, True), (True, True)])
def test_the_beam_score_is_the_models_length_normalised_log_prob(peaky, tokenizer, with_prefix, with_lora):
    """The cached, reordered beams score what a plain forward pass of the chosen tokens gives: log p / n ** lp,
    also through a learned past (prefix tuning's seam) and a LoRA-wrapped model."""
    from techniques.lora import apply_lora
    _, base = peaky
    model = GPT.from_pretrained(str(base.config.name_or_path)) if with_lora else base
    if with_lora:
        apply_lora(model, r=4, verbose=False)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    ids = torch.tensor([tokenizer.encode("The old house")])
    past = None
    if with_prefix:
        c = model.config
        g = torch.Generator().manual_seed(1)
        past = tuple((torch.randn(1, c.n_head, 5, c.head_dim, generator=g),
                      torch.randn(1, c.n_head, 5, c.head_dim, generator=g)) for _ in range(c.n_layer))
    out = beam_search(model, ids, max_new_tokens=9, num_beams=4, past_key_values=past, length_penalty=0.8)
    new = out.sequences[:, ids.shape[1]:]
    assert new.shape[1] == 9
    want = log_prob_of(model, ids, new, past) / 9 ** 0.8
    torch.testing.assert_close(out.scores, want, atol=1e-4, rtol=1e-5)
    # and no hypothesis of the same length scores higher than greedy's under the same measure
    greedy = generate(model, ids, max_new_tokens=9, past_key_values=past)[:, ids.shape[1]:]
    assert float(out.scores) >= float(log_prob_of(model, ids, greedy, past) / 9 ** 0.8) - 1e-5


def test_stop_strings_end_each_row_on_its_own(peaky, tokenizer):
    _, ours = peaky
    ids, mask = tokenizer.encode_batch(PROMPTS)
    free = generate(ours, ids, attention_mask=mask, max_new_tokens=12)
    texts = [tokenizer.decode(r[ids.shape[1]:]) for r in free.tolist()]
    stop = texts[0][len(texts[0]) // 2:len(texts[0]) // 2 + 2]  # two characters row 0 writes mid-way
    assert stop.strip()
    out = generate(ours, ids, attention_mask=mask, max_new_tokens=12, stop=[stop], tokenizer=tokenizer,
                   pad_token_id=50256)
    for r, text in enumerate(texts):
        got = tokenizer.decode([t for t in out[r, ids.shape[1]:].tolist() if t != 50256])
        if stop in text:  # the row stopped on the token that completed the stop; the text up to it is the same
            assert cut_at_stop(got, [stop]) == cut_at_stop(text, [stop]) and stop in got
        else:
            assert got == text.replace("<|endoftext|>", "")
    assert any(stop not in t for t in texts) and out.shape[1] == free.shape[1]  # a row went on: so did decoding
    beam = beam_search(ours, ids[:1], max_new_tokens=12, num_beams=3, stop=[stop], tokenizer=tokenizer,
                       pad_token_id=50256)
    assert beam.sequences.shape[1] <= ids.shape[1] + 12


def test_cut_at_stop():
    assert cut_at_stop("one. two\nthree", [".", "\n"]) == "one"
    assert cut_at_stop("no stop here", ["\n"]) == "no stop here"
    assert cut_at_stop("a\n\nb", "\n\n") == "a"
    assert cut_at_stop("keep all", None) == "keep all"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=0, max_size=9), st.integers(0, 4),
       st.floats(0.25, 4.0), st.integers(0, 2 ** 16))
def test_penalize_is_the_definition(history, n, theta, seed):
    """Against the rules written as loops: CTRL's penalty once per distinct seen token, then a ban on every
    token that would complete an n-gram already in the row."""
    V = 6
    scores = torch.randn(1, V, generator=torch.Generator().manual_seed(seed))
    got = penalize(scores, torch.tensor([history], dtype=torch.long), repetition_penalty=theta,
                   no_repeat_ngram_size=n)
    want = scores[0].tolist()
    for t in set(history):
        want[t] = want[t] / theta if want[t] > 0 else want[t] * theta
    if n and len(history) >= n:
        tail = history[len(history) - n + 1:] if n > 1 else []
        for i in range(len(history) - n + 1):
            if history[i:i + n - 1] == tail:
                want[history[i + n - 1]] = float("-inf")
    assert got[0].tolist() == pytest.approx(want)


@pytest.mark.parametrize("kw, msg", [
    (dict(num_beams=0), "num_beams must be >= 1"),
    (dict(num_beams=2, early_stopping="sometimes"), "early_stopping must be"),
    (dict(num_beams=2, repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(num_beams=2, no_repeat_ngram_size=-1), "no_repeat_ngram_size must be >= 0"),
    (dict(num_beams=2, stop=["x"]), "stop strings need the tokenizer"),
])
def test_bad_beam_settings_are_named(peaky, kw, msg):
    _, ours = peaky
    with pytest.raises(ValueError, match=msg):
        beam_search(ours, torch.tensor([[1, 2]]), max_new_tokens=3, **kw)


def test_beams_refuse_sampling(peaky):
    _, ours = peaky
    with pytest.raises(ValueError, match="drop do_sample"):
        generate(ours, torch.tensor([[1, 2]]), max_new_tokens=3, num_beams=2, do_sample=True)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 0.1), (torch.float16, 0.02)])
def test_half_precision_stays_near_fp32_and_agrees_with_transformers(peaky, tokenizer, dtype, tol):
    """In bf16/fp16 neither side is exact, so the two are compared to fp32 and to each other: our logits stay
    within `tol` of fp32 (the softmax of attention is computed in fp32), and greedy tokens agree with
    transformers' in the same dtype on at least 90% of the positions (measured: 100%)."""
    from transformers import GPT2LMHeadModel
    hf32, ours32 = peaky
    folder = str(ours32.config.name_or_path)
    hf = GPT2LMHeadModel.from_pretrained(folder, torch_dtype=dtype).eval()
    ours = GPT.from_pretrained(folder, dtype=dtype)
    ids, mask = tokenizer.encode_batch(PROMPTS + ["A long way from home, the"])
    with torch.no_grad():
        ref, half = ours32(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits.float()
    real = mask.bool()
    assert (half - ref).abs()[real].max() < tol
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=50256)
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=20)
    assert got.dtype == torch.long and (got == want)[:, ids.shape[1]:].float().mean() >= 0.9


if __name__ == "__main__":  # the whole grid, 144 cases
    import sys
    import tempfile
    from pathlib import Path
    from minigpt import get_tokenizer

    model_pair, tok = peaky_pair(Path(tempfile.mkdtemp(prefix="peaky"))), get_tokenizer()
    for case in GRID:
        test_beam_search_equals_transformers_on_a_left_padded_batch(model_pair, tok, *case)
    print(f"{len(GRID)} combinations: tokens equal, scores within 1e-4")
    sys.exit(0)
