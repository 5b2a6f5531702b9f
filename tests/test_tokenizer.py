"""Our tiktoken-based tokenizer against transformers' GPT2Tokenizer on the same files."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

from minigpt.tokenizer import data_file


@pytest.fixture(scope="module")
def hf_tok():
    from transformers import GPT2Tokenizer
    # positional: transformers 4.x and 5.x name these two arguments differently
    return GPT2Tokenizer(data_file("encoder.json"), data_file("vocab.bpe"))


@given(text=st.text(max_size=200))
def test_same_ids_as_transformers_on_any_text(tokenizer, hf_tok, text):
    ids = tokenizer.encode(text)
    assert ids == hf_tok.encode(text)
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("text", ["Hello world", "  two  spaces\n\nand\ttabs", "naïve café 東京 🙂",
                                  "don't we'll I'm", "<|endoftext|>next", "1234567 + 89"])
def test_fixed_examples(tokenizer, hf_tok, text):
    assert tokenizer.encode(text) == hf_tok.encode(text)


def test_known_ids(tokenizer):
    assert tokenizer.encode("The dog") == [464, 3290]
    assert tokenizer.encode("<|endoftext|>") == [50256]
    assert tokenizer.vocab_size == 50257


def test_batch_left_pads_with_mask(tokenizer):
    ids, mask = tokenizer.encode_batch(["The dog", "Hello there my friend"])
    assert ids.shape == mask.shape == (2, 4)
    assert ids[0].tolist() == [50256, 50256, 464, 3290]
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    with pytest.raises(ValueError, match="empty string"):
        tokenizer.encode_batch(["ok", ""])
    with pytest.raises(ValueError, match="non-empty list"):
        tokenizer.encode_batch("not a list")


def test_decode_errors(tokenizer):
    with pytest.raises(ValueError, match="50257 is outside"):
        tokenizer.decode([50257])
    assert tokenizer.decode(torch.tensor([464, 3290])) == "The dog"
    with pytest.raises(TypeError, match="takes a str"):
        tokenizer.encode(123)


def test_files_are_checked(monkeypatch, tmp_path):
    from minigpt import tokenizer as tk
    bad = tmp_path / "encoder.json"
    bad.write_text("{}")
    monkeypatch.setattr(tk, "data_file", lambda name: str(bad) if name == "encoder.json" else data_file(name))
    tk.get_tokenizer.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="corrupted"):
            tk.get_tokenizer()
    finally:
        tk.get_tokenizer.cache_clear()
