"""GPT-2's byte-pair encoding through tiktoken, from files shipped in the package.

`minigpt/data/encoder.json` and `vocab.bpe` are the files OpenAI published with
GPT-2 (see minigpt/data/README.md). Their SHA-256 sums are checked at load, and
they are exactly what tiktoken's own `gpt2` encoding downloads, so the ids are
tiktoken's and transformers' `GPT2Tokenizer`'s, with no network access.
"""
from __future__ import annotations

import functools
import hashlib
from importlib import resources
from typing import Iterable, Sequence

import tiktoken
import torch
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from .past import left_pad

__all__ = ["Tokenizer", "get_tokenizer", "EOT_ID"]

EOT = "<|endoftext|>"
EOT_ID = 50256
SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
# GPT-2's pre-tokenizer: contractions, letters, numbers, other symbols, spaces.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class Tokenizer:
    """encode/decode plus batch encoding with left padding."""

    eot_id = EOT_ID

    def __init__(self, encoding: tiktoken.Encoding):
        self.enc = encoding

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def encode(self, text: str) -> list[int]:
        """Text -> ids. A literal "<|endoftext|>" becomes id 50256, as in transformers."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return self.enc.encode(text, allowed_special={EOT})

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return self.enc.decode(ids)

    def token_str(self, i: int) -> str:
        return self.enc.decode_single_token_bytes(i).decode("utf-8", errors="replace")

    def encode_batch(self, texts: Sequence[str], *, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids [B, T] and attention mask [B, T] (1 = real token).

        Left padding keeps every prompt's last token in the last column, which is
        what batched generation needs. Padding uses <|endoftext|>, masked out.
        """
        if isinstance(texts, str) or not len(texts):
            raise ValueError("encode_batch takes a non-empty list of strings")
        rows = [self.encode(t) for t in texts]
        if any(len(r) == 0 for r in rows):
            raise ValueError("encode_batch: every text must give at least one token (got an empty string)")
        return left_pad(rows, EOT_ID, device)


def data_file(name: str) -> str:
    return str(resources.files("minigpt") / "data" / name)


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    """The GPT-2 tokenizer, built offline from the package's own BPE files."""
    for name, want in SHA256.items():
        with open(data_file(name), "rb") as f:
            got = hashlib.sha256(f.read()).hexdigest()
        if got != want:
            raise RuntimeError(f"{data_file(name)} is corrupted (sha256 {got}, expected {want}); reinstall minigpt")
    ranks = data_gym_to_mergeable_bpe_ranks(data_file("vocab.bpe"), data_file("encoder.json"))
    enc = tiktoken.Encoding(name="gpt2-minigpt", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                            special_tokens={EOT: EOT_ID}, explicit_n_vocab=50257)
    return Tokenizer(enc)
