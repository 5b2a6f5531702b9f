"""Rewards for GRPO: a reward is any callable texts -> floats, one float per text (the `Reward` type in grpo.py).

Three ready ones, and `load_reward(spec, ...)`, the factory the command uses:
- `AttributeReward`: r(x) = p(a | x) = softmax(W · mean_t h_t + b)_a, a PPLM attribute head (e.g. the SST-2 head
  saved by `python -m techniques.pplm train-discriminator`) read on hidden states h_t of "<|endoftext|>" + x.
  Choice (the issue leaves it open): h_t come from the FROZEN BASE model the head was trained on, i.e. the policy with
  its LoRA adapters switched off (`lora_disabled`). A head trained on the base's features is only calibrated on those
  features; scoring with the adapted policy's own hidden states would let GRPO raise the reward by moving the
  features rather than the text. The head is checked against the model (n_embd) when the reward is built.
- `BagOfWordsReward`: r(x) = (number of x's words in the bag) / (number of x's words), a rate in [0, 1]. Words are
  matched case-insensitively on [a-z'] runs, so multi-token bag words count too (unlike PPLM's token-level bag loss).
- `module:function`: any user callable, imported by name (`load_callable`).
"""
from __future__ import annotations

import importlib
from contextlib import nullcontext
import re
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from minigpt import EOT_ID, get_tokenizer, left_pad
from techniques.lora import lora_disabled, lora_modules
from techniques.pplm.attributes import bag_names, clean_word_lines, load_discriminator, mean_hidden

__all__ = ["AttributeReward", "BagOfWordsReward", "load_callable", "load_reward", "REWARD_NAMES"]

REWARD_NAMES = ("sst2", "bow", "module:function")
_WORD = re.compile(r"[a-z']+")


class AttributeReward:
    """p(class | text) from a PPLM attribute head on the frozen base model's mean last hidden state."""

    def __init__(self, model, discrim: Union[str, Path], label: Union[int, str] = "positive", *,
                 max_len: int = 100, batch_size: int = 32):
        self.head = load_discriminator(discrim)
        self.head.check_model(model)
        self.model, self.index = model, self.head.class_index(label)
        self.max_len, self.batch_size, self.tok = max_len, batch_size, get_tokenizer()
        self.head.to(model.device)

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> list[float]:
        seqs = [[EOT_ID] + self.tok.encode(t)[:self.max_len - 1] for t in texts]
        out = []
        was_training = self.model.training
        self.model.eval()
        base = lora_disabled(self.model) if lora_modules(self.model) else nullcontext(self.model)
        try:
            with base:
                for i in range(0, len(seqs), self.batch_size):
                    ids, mask = left_pad(seqs[i:i + self.batch_size], EOT_ID, self.model.device)  # (b, T)
                    h = mean_hidden(self.model, ids, mask).float()                              # (b, C)
                    p = torch.softmax(self.head(h), dim=-1)[:, self.index]                      # (b,)
                    out += p.cpu().tolist()
        finally:
            self.model.train(was_training)
        return out


class BagOfWordsReward:
    """The rate of a text's words that are in the bag: a shipped list name ("positive_words"), a file, or words."""

    def __init__(self, bag: Union[str, Path, Sequence[str]]):
        if isinstance(bag, (str, Path)):
            shipped = Path(__file__).resolve().parents[1] / "data" / "pplm" / "wordlists" / f"{bag}.txt"
            path = shipped if shipped.is_file() else Path(bag)
            if not path.is_file():
                raise ValueError(f"unknown bag of words {str(bag)!r}: not one of the shipped lists "
                                 f"({', '.join(bag_names())}) and not a file")
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        else:
            lines = list(bag)
        words, _ = clean_word_lines(lines)
        self.words = {w.lower() for w in words}
        if not self.words:
            raise ValueError("the bag of words is empty: give at least one word")

    def __call__(self, texts: Sequence[str]) -> list[float]:
        out = []
        for t in texts:
            ws = _WORD.findall(t.lower())
            out.append(sum(w in self.words for w in ws) / len(ws) if ws else 0.0)
        return out


def load_callable(spec: str) -> Callable:
    """`package.module:function` -> that callable, or a clear error."""
    mod, sep, name = spec.partition(":")
    if not sep or not mod or not name:
        raise ValueError(f"a reward given by name must read module:function, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load the reward {spec!r}: {e}") from e
    if not callable(fn):
        raise ValueError(f"the reward {spec!r} is not callable")
    return fn


def load_reward(spec: str, model=None, *, discrim: Optional[Union[str, Path]] = None,
                label: Union[int, str] = "positive",
                bag: Optional[Union[str, Path, Sequence[str]]] = None) -> Callable[[Sequence[str]], list]:
    """A reward from the command line: "sst2" (needs model and discrim, the head folder), "bow" (needs bag),
    or "module:function"."""
    if spec == "sst2":
        if discrim is None or model is None:
            raise ValueError("--reward sst2 needs --discrim DIR (a head saved by "
                             "`python -m techniques.pplm train-discriminator`) and the model")
        return AttributeReward(model, discrim, label)
    if spec == "bow":
        if bag is None:
            raise ValueError("--reward bow needs --bag NAME|FILE|word,word,... "
                             f"(shipped: {', '.join(bag_names())})")
        return BagOfWordsReward(bag)
    if ":" in spec:
        return load_callable(spec)
    raise ValueError(f"unknown --reward {spec!r}: use one of sst2, bow, or module:function")
