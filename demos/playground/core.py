"""What the playground's page calls, as plain functions (no UI library here, so the tests need no gradio).

Every function takes the shared model and its own arguments, and keeps no state: two browser sessions
calling them at once share only the weights. PPLM perturbs only its own past (techniques.pplm.generate),
so a steered request never leaves the model steered for another one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from minigpt import EOT_ID, GPT, get_tokenizer, stream
from minigpt.generation import cut_at_stop
from techniques import pplm

from ..tour.next_token import filtered_probs

__all__ = ["PlaygroundError", "encode_prompt", "stream_text", "next_token_table", "Steered", "steer_compare",
           "bag_from_text"]


class PlaygroundError(ValueError):
    """Bad input, shown as a message on the page (the server keeps serving)."""


def encode_prompt(model: GPT, prompt: str, max_new_tokens: int = 0) -> torch.Tensor:
    """(1, T) token ids of the prompt, after checking it is not empty and fits the context with the new tokens."""
    if not prompt or not prompt.strip():
        raise PlaygroundError("The prompt is empty: type a few words first.")
    ids = get_tokenizer().encode(prompt)
    n_pos = model.config.n_positions
    if len(ids) + max_new_tokens > n_pos:
        raise PlaygroundError(f"The prompt is {len(ids)} tokens and {max_new_tokens} new ones are asked for, but the "
                              f"model's context is {n_pos} tokens: shorten the prompt or ask for fewer tokens.")
    return torch.tensor([ids], device=model.device)


def _stops(stop_text: str) -> Optional[list[str]]:
    stops = [s for s in (stop_text or "").split("|") if s]
    return stops or None


def stream_text(model: GPT, prompt: str, *, max_new_tokens: int = 40, do_sample: bool = True,
                temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                seed: int = 0, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                stop_text: str = "") -> Iterator[str]:
    """The continuation so far, after each new token (minigpt.stream), cut at the first stop string
    ("|"-separated). The same seed gives the same text."""
    ids = encode_prompt(model, prompt, max_new_tokens)
    tok = get_tokenizer()
    stops = _stops(stop_text)
    gen = torch.Generator(device=model.device).manual_seed(int(seed))
    new: list[int] = []
    for t in stream(model, ids, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                    top_k=top_k, top_p=top_p, generator=gen, repetition_penalty=repetition_penalty,
                    no_repeat_ngram_size=no_repeat_ngram_size, eos_token_id=EOT_ID, stop=stops, tokenizer=tok):
        if int(t[0]) == EOT_ID:
            break
        new.append(int(t[0]))
        yield cut_at_stop(tok.decode(new), stops)


@torch.no_grad()
def next_token_table(model: GPT, prompt: str, *, temperature: float = 1.0, top_k: Optional[int] = None,
                     top_p: Optional[float] = None, n: int = 10) -> list[tuple[str, float, float]]:
    """The n most likely next tokens after the prompt: (token, p before the filters, p after them),
    the "after" from the tour's filtered_probs (minigpt.sample_next_token's distribution)."""
    ids = encode_prompt(model, prompt)
    logits = model(ids).logits[0, -1].float()                      # (V,)
    before = logits.softmax(-1)
    after = filtered_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    top = before.topk(n).indices.tolist()
    tok = get_tokenizer()
    return [(tok.decode([i]), float(before[i]), float(after[i])) for i in top]


def bag_from_text(spec: str):
    """A bag: a shipped name ("space"), or comma-separated words. Raises PlaygroundError when no word
    is a single token (PPLM's bag loss would have nothing to score)."""
    spec = (spec or "").strip()
    if not spec:
        raise PlaygroundError("The bag is empty: pick a shipped bag or type some words, separated by commas.")
    tok = get_tokenizer()
    words = [w.strip() for w in spec.split(",") if w.strip()]
    src = words[0] if len(words) == 1 and words[0] in pplm.bag_names() else words
    bag = pplm.load_bag(src, tok, name=None if isinstance(src, str) else "typed")
    if not bag.token_ids:
        raise PlaygroundError(f"No word of the bag {words!r} is a single token, so PPLM has nothing to steer "
                              "towards: use common words (e.g. 'space, planet, moon').")
    return bag


@dataclass
class Steered:
    plain: list[int]            # new token ids, unsteered (stepsize 0: the same sampler and seed)
    steered: list[int]          # new token ids, steered
    bag_ids: set                # the bag's token ids (for highlighting)
    attribute: list[float]      # per steered token: the bag's mass under the steered distribution (the signal)


def steer_compare(model: GPT, prompt: str, bag_spec: str, *, stepsize: float, num_iterations: int = 3,
                  max_new_tokens: int = 20, seed: int = 0) -> Steered:
    """Unsteered and PPLM-steered continuations of the prompt from the same seed, and the steering signal
    per token. Each call builds its own past; the model's weights are never touched."""
    bag = bag_from_text(bag_spec)
    body = encode_prompt(model, prompt, max_new_tokens + 1)
    ids = torch.cat([torch.tensor([[EOT_ID]], device=model.device), body], dim=1)
    runs = []
    for step in (0.0, float(stepsize)):
        gen = torch.Generator(device=model.device).manual_seed(int(seed))
        runs.append(pplm.generate(model, ids, bow=[bag], max_new_tokens=max_new_tokens, generator=gen,
                                  stepsize=step, num_iterations=int(num_iterations), do_sample=True))
    T = ids.size(1)
    attr = runs[1].stacked("attribute_after")[:, 0].tolist() if runs[1].steps else []
    return Steered(runs[0].sequences[0, T:].tolist(), runs[1].sequences[0, T:].tolist(), set(bag.token_ids), attr)


def highlight_spans(ids: Sequence[int], bag_ids: set) -> list[tuple[str, Optional[str]]]:
    """(text, "bag" or None) per token, for a highlighted-text view of a sample."""
    tok = get_tokenizer()
    return [(tok.decode([i]), "bag" if i in bag_ids else None) for i in ids]
