"""PPLM as the PPLM projects use it: prompts in, continuations out, one seeded generator per sample.

PPLM (Dathathri et al. 2020) steers generation by nudging the model's past keys and values along the
gradient of an attribute model (a bag of words, or a discriminator head) at every step. Comparing steered
and unsteered text is fair only on the same random numbers, so sample k always draws from its own
torch.Generator seeded seed + k, whatever the knobs (stepsize 0 = plain sampling with the same sampler).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from minigpt import EOT_ID, GPT, get_tokenizer
from techniques import pplm

__all__ = ["prompt_ids", "Samples", "continuations"]


def prompt_ids(prompt: str, device) -> torch.Tensor:
    """(1, T): "<|endoftext|>" + prompt, as the reference implementation conditions its samples."""
    return torch.tensor([[EOT_ID] + get_tokenizer().encode(prompt)], device=device)


@dataclass
class Samples:
    """Continuations (new token ids), and per continuation the attribute model's own signal averaged over its
    steps under the distribution drawn from (bag mass under p̃, or the head's p(class)): a diagnostic of the
    steering, never the yardstick."""
    tokens: list[list[int]]
    attribute: list[float]


def continuations(model: GPT, prompts: Sequence[str], *, samples: int, seed: int, max_new_tokens: int,
                  desc: str = "pplm", progress: bool = True, **pplm_args) -> Samples:
    """`samples` continuations of each prompt, prompt-major: entry k is drawn with its own torch.Generator
    seeded seed + k, so runs with other knobs (stepsize 0 = unperturbed) see the same seeds.
    pplm_args go to techniques.pplm.generate (bow=, avoid_bow=, discriminator=, the knobs)."""
    jobs = [(p, k) for k, p in enumerate(p for p in prompts for _ in range(samples))]
    out = Samples([], [])
    for prompt, k in tqdm(jobs, desc=desc, unit="sample", disable=not progress):
        ids = prompt_ids(prompt, model.device)
        gen = torch.Generator(device=model.device).manual_seed(seed + k)
        res = pplm.generate(model, ids, max_new_tokens=max_new_tokens, generator=gen, **pplm_args)
        out.tokens.append(res.sequences[0, ids.size(1):].tolist())
        out.attribute.append(res.stacked("attribute_after").mean().item() if res.steps else float("nan"))
    return out
