"""Decoding with the KV cache: greedy, temperature, top-k, top-p, beam search; batched with left padding.

Each step feeds only the newest token and the cached keys/values, so a step
costs one token's forward, not the whole sequence's. A batch of prompts of
different lengths is left-padded (see Tokenizer.encode_batch); the attention
mask hides the padding and sets each row's positions, so every row gets the
tokens it would get alone. A row that emits `eos_token_id` is finished and
padded from then on; decoding stops when every row is finished.

The past lives in a preallocated `KVBuffer` (past.py) that each step writes
in place, so a step does not copy the whole past as `torch.cat` would; an
initial past (a learned prefix) is copied into it once. `preallocate=False`
grows the plain tuple instead: the same tokens, kept as the reference the
tests compare against. Likewise the attention mask lives in one [B, T_max]
tensor whose later columns are ones; each step reads a view of it.

Two rules look at the tokens so far (the prompt, its left padding included,
and what was generated), applied to the next-token scores s before a token
is chosen (to the logits for greedy and sampling, to the log-probabilities in
beam search, as transformers does):
- repetition penalty θ (Keskar et al. 2019, CTRL, section 4.1): every token
  already in the row gets s / θ if s > 0, s · θ if s <= 0 (θ > 1 discourages
  repeating it, θ < 1 encourages it);
- no-repeat n-gram (Paulus et al. 2018): a token that would complete an
  n-gram already in the row gets s = -inf.

Stop strings end a row once its generated text contains one of them; the
tokens that follow are padding, and `cut_at_stop` cuts the decoded text at the
first stop. Beam search is in `beam_search` below, with its equations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import torch

from .model import GPT
from .past import KVBuffer, PastKeyValues, mask_with_past, past_length

__all__ = ["generate", "stream", "sample_next_token", "check_sampling", "beam_search", "BeamOutput", "penalize",
           "StopStrings", "cut_at_stop"]

# (N, n generated tokens) -> (N,) bool: has the row reached a stop?
StopFn = Callable[[torch.Tensor], torch.Tensor]


def check_sampling(*, temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None for no limit), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def check_history_rules(repetition_penalty: float, no_repeat_ngram_size: int) -> None:
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1.0 = none, > 1 discourages repeats), "
                         f"got {repetition_penalty}")
    if no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size must be >= 0 (0 = off), got {no_repeat_ngram_size}")


def penalize(scores: torch.Tensor, history: torch.Tensor, *, repetition_penalty: float = 1.0,
             no_repeat_ngram_size: int = 0) -> torch.Tensor:
    """Next-token scores [N, V] after the two history rules (module docstring), given the tokens so far [N, L]."""
    if repetition_penalty != 1.0 and history.size(1):
        seen = scores.gather(1, history)                                        # (N, L): s of each seen token
        seen = torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty)
        scores = scores.scatter(1, history, seen)                               # a repeated token: the same value
    n = no_repeat_ngram_size
    if n and history.size(1) >= n:
        windows = history.unfold(1, n, 1)                                       # (N, L - n + 1, n): every n-gram
        tail = history[:, history.size(1) - n + 1:]                             # (N, n - 1): what the next extends
        hit = (windows[..., :-1] == tail[:, None, :]).all(dim=-1)               # (N, L - n + 1)
        rows, starts = hit.nonzero(as_tuple=True)
        banned = torch.zeros_like(scores, dtype=torch.bool)
        banned[rows, windows[rows, starts, -1]] = True
        scores = scores.masked_fill(banned, float("-inf"))
    return scores


class StopStrings:
    """A stop rule for `generate(..., stop=...)`: a row stops once its generated text contains any of `stops`."""

    def __init__(self, tokenizer, stops: Sequence[str]):
        stops = [stops] if isinstance(stops, str) else list(stops)
        if not stops or not all(isinstance(x, str) and x for x in stops):
            raise ValueError(f"stop must be one or more non-empty strings, got {stops!r}")
        self.tokenizer, self.stops = tokenizer, stops

    def __call__(self, generated: torch.Tensor) -> torch.Tensor:
        texts = [self.tokenizer.decode(row) for row in generated.tolist()]
        return torch.tensor([any(x in t for x in self.stops) for t in texts], device=generated.device)


def cut_at_stop(text: str, stops: Optional[Sequence[str]]) -> str:
    """The text up to (not including) the first occurrence of any stop string."""
    if not stops:
        return text
    stops = [stops] if isinstance(stops, str) else stops
    cut = min((i for i in (text.find(x) for x in stops) if i >= 0), default=len(text))
    return text[:cut]


def stop_rule(stop, tokenizer) -> Optional[StopFn]:
    """stop= as given to generate: None, a StopStrings/callable, or strings (which need the tokenizer)."""
    if stop is None or callable(stop):
        return stop
    if tokenizer is None:
        raise ValueError("stop strings need the tokenizer to read the generated text: generate(..., stop=[...], "
                         "tokenizer=get_tokenizer())")
    return StopStrings(tokenizer, stop)


def sample_next_token(logits: torch.Tensor, *, do_sample: bool = False, temperature: float = 1.0,
                      top_k: Optional[int] = None, top_p: Optional[float] = None,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. Greedy takes the argmax; sampling applies
    temperature, then top-k, then top-p (nucleus), then draws from the rest."""
    if not do_sample or temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the ones before it already hold top_p of the mass (the first always stays)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def stream(model: GPT, input_ids: torch.Tensor, *, max_new_tokens: int,
           attention_mask: Optional[torch.Tensor] = None, past_key_values: Optional[PastKeyValues] = None,
           do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None, eos_token_id: Optional[int] = None,
           pad_token_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
           repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
           stop: Union[None, Sequence[str], StopFn] = None, tokenizer=None,
           preallocate: bool = True) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, [B], one step at a time (for streaming).

    repetition_penalty, no_repeat_ngram_size: the history rules (module docstring).
    stop: strings (with tokenizer=) or a StopFn; a row that reaches one is finished, like one that emits eos.
    preallocate: keep the past in a KVBuffer written in place (default), or
    grow the plain (k, v) tuple by concatenation at every step (the reference)."""
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    check_history_rules(repetition_penalty, no_repeat_ngram_size)
    stop_fn = stop_rule(stop, tokenizer)
    B, T, T_past = check_lengths(model, input_ids, max_new_tokens, past_key_values)
    mask = mask_with_past(attention_mask, B, T, T_past, input_ids.device)
    if max_new_tokens == 0:
        return
    pad = eos_token_id if pad_token_id is None else pad_token_id
    if stop_fn is not None and pad is None:
        raise ValueError("stop= needs a token to pad finished rows with: give eos_token_id or pad_token_id")
    total = T_past + T + max_new_tokens - 1  # the last token is yielded, never fed back
    full_mask = None if mask is None else _mask_buffer(mask, total)
    buf = _kv_buffer(model, B, total) if preallocate else None
    rules = repetition_penalty != 1.0 or no_repeat_ngram_size > 0
    history = None  # (B, T + steps): the prompt, then each chosen token, for the history rules and stop
    if rules or stop_fn is not None:
        history = input_ids.new_empty(B, T + max_new_tokens)
        history[:, :T] = input_ids
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    ids, past, n = input_ids, past_key_values, T_past + T
    for step in range(max_new_tokens):
        mask = None if full_mask is None else full_mask[:, :n]  # (B, T_past + T + steps so far)
        out = model(ids, attention_mask=mask, past_key_values=past, kv_buffer=buf)
        past = None if buf is not None else out.past_key_values  # a buffer holds its past itself
        scores = out.logits[:, -1, :].float()                                   # (B, V)
        if rules:
            scores = penalize(scores, history[:, :T + step], repetition_penalty=repetition_penalty,
                              no_repeat_ngram_size=no_repeat_ngram_size)
        tok = sample_next_token(scores, do_sample=do_sample, temperature=temperature,
                                top_k=top_k, top_p=top_p, generator=generator)
        if pad is not None:
            tok = tok.masked_fill(finished, pad)
        if history is not None:
            history[:, T + step] = tok
        if eos_token_id is not None:
            finished |= tok == eos_token_id
        if stop_fn is not None:
            finished |= stop_fn(history[:, T:T + step + 1])
        yield tok
        if (eos_token_id is not None or stop_fn is not None) and bool(finished.all()):
            return
        ids, n = tok[:, None], n + 1


def check_lengths(model: GPT, input_ids: torch.Tensor, max_new_tokens: int,
                  past_key_values: Optional[PastKeyValues]) -> tuple[int, int, int]:
    """(B, T, T_past), after checking that the prompt and max_new_tokens fit n_positions."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a LongTensor [batch, seq]; wrap a single prompt as [[ids...]]")
    B, T = input_ids.shape
    T_past = past_length(past_key_values)
    n_pos = model.config.n_positions
    if T_past + T > n_pos:
        raise ValueError(f"the prompt is too long: {T_past} past + {T} prompt tokens = {T_past + T} > n_positions "
                         f"{n_pos}, {T_past + T - n_pos} over the limit; shorten the prompt")
    if T_past + T + max_new_tokens > n_pos:
        raise ValueError(f"{T_past} past + {T} prompt + {max_new_tokens} new tokens = "
                         f"{T_past + T + max_new_tokens} > n_positions {n_pos}; lower max_new_tokens to at most "
                         f"{n_pos - T_past - T}")
    return B, T, T_past


def _kv_buffer(model: GPT, B: int, max_length: int) -> KVBuffer:
    cfg, w = model.config, model.transformer.wte.weight
    return KVBuffer(cfg.n_layer, B, cfg.n_head, max_length, cfg.head_dim, device=w.device, dtype=w.dtype)


def _mask_buffer(mask: torch.Tensor, max_length: int) -> torch.Tensor:
    """mask [B, T0] -> [B, max_length]: the mask, then ones for every token decoding will feed."""
    full = mask.new_ones(mask.size(0), max_length)
    full[:, :mask.size(1)] = mask
    return full


# ---- beam search -----------------------------------------------------------------------------------------------
@dataclass
class BeamOutput:
    sequences: torch.Tensor  # (B, T + n): the prompt and the best finished hypothesis of each row, padded
    scores: torch.Tensor     # (B,): its score, log p(y | x) / |y| ** length_penalty


NEG = -1.0e9  # "not a candidate": added to a score, as transformers does, so that the arithmetic stays finite


@torch.no_grad()
def beam_search(model: GPT, input_ids: torch.Tensor, *, max_new_tokens: int, num_beams: int,
                attention_mask: Optional[torch.Tensor] = None, past_key_values: Optional[PastKeyValues] = None,
                length_penalty: float = 1.0, early_stopping: Union[bool, str] = False,
                eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
                repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                stop: Union[None, Sequence[str], StopFn] = None, tokenizer=None) -> BeamOutput:
    """Beam search: keep the K = num_beams best partial continuations of each prompt.

    A hypothesis y = y_1..y_t has the running score log p(y | x) = sum_i log p(y_i | x, y_<i), the history
    rules applied to each step's log-probabilities. At every step each of the K beams proposes every token;
    of the K x V candidates the 2K best by running score are looked at (so that K survive even when some end):
    - a candidate that ends (emits eos, reaches a stop string, or reaches max_new_tokens) and is among the top
      K joins the row's finished set with the score log p(y | x) / |y| ** length_penalty, |y| counting the
      generated tokens (length_penalty > 0 favours longer outputs, < 0 shorter ones); the set keeps its K best;
    - the K best candidates that did not end are the next step's beams.
    A row is done when its best running beam can no longer beat its worst finished one: with early_stopping
    False that bound is the running score / (its length so far) ** length_penalty, a heuristic; "never" with
    length_penalty > 0 uses max_new_tokens as the length (the exact bound); early_stopping True stops as soon as
    K hypotheses have finished. The output is each row's best finished hypothesis.

    This follows transformers' beam search (4.50+) decision for decision, so the same model gives the same tokens
    and scores (the tests check it). Different from theirs: the prompt is prefilled once per row and its past
    copied to the K beams (theirs prefills K copies), and the past lives in a KVBuffer reordered in place.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    check_history_rules(repetition_penalty, no_repeat_ngram_size)
    stop_fn = stop_rule(stop, tokenizer)
    B, T, T_past = check_lengths(model, input_ids, max_new_tokens, past_key_values)
    if max_new_tokens == 0:
        return BeamOutput(input_ids, input_ids.new_zeros(B, dtype=torch.float))
    fill = pad_token_id if pad_token_id is not None else eos_token_id
    if fill is None:
        if stop_fn is not None:
            raise ValueError("stop= needs a token to pad finished hypotheses with: give eos_token_id or pad_token_id")
        fill = 0  # every hypothesis runs to max_new_tokens: nothing is padded
    K, dev = num_beams, input_ids.device
    L = T + max_new_tokens                                                       # the longest a row can get
    mask = mask_with_past(attention_mask, B, T, T_past, dev)
    full_mask = None if mask is None else _mask_buffer(mask, T_past + L).repeat_interleave(K, dim=0)

    # The prompt, once per row; its past and last logits copied to the K beams of the row.
    buf = _kv_buffer(model, B * K, T_past + L - 1)
    out = model(input_ids, attention_mask=mask, past_key_values=past_key_values)
    buf.fill(tuple((k.repeat_interleave(K, dim=0), v.repeat_interleave(K, dim=0)) for k, v in out.past_key_values))
    logits = out.logits[:, -1, :].float().repeat_interleave(K, dim=0)          # (B*K, V)

    seqs = input_ids.new_full((B, K, L), fill)                                  # the running beams
    seqs[:, :, :T] = input_ids[:, None, :]
    run_scores = torch.full((B, K), NEG, device=dev)
    run_scores[:, 0] = 0.0                                                      # K copies of one start: keep one
    done_seqs = seqs.clone()                                                    # the finished set
    done_scores = torch.full((B, K), NEG, device=dev)
    done_len = torch.zeros(B, K, dtype=torch.long, device=dev)
    is_done = torch.zeros(B, K, dtype=torch.bool, device=dev)
    can_improve = torch.ones(B, dtype=torch.bool, device=dev)
    top_k_mask = torch.arange(2 * K, device=dev) < K                            # the first K of the 2K
    rows = torch.arange(B, device=dev)[:, None]

    for step in range(max_new_tokens):
        cur = T + step                                                          # tokens in each beam so far
        logp = torch.log_softmax(logits, dim=-1)                                # (B*K, V)
        logp = penalize(logp, seqs.view(B * K, L)[:, :cur], repetition_penalty=repetition_penalty,
                        no_repeat_ngram_size=no_repeat_ngram_size)
        V = logp.size(-1)
        total = (logp.view(B, K, V) + run_scores[:, :, None]).view(B, K * V)    # log p(y_<=t | x) per candidate
        cand_scores, flat = total.topk(2 * K, dim=-1)                           # (B, 2K), best first
        parent, token = flat // V, flat % V
        cand = seqs[rows, parent]                                               # (B, 2K, L)
        cand[:, :, cur] = token
        ends = torch.full_like(token, cur + 1 == L, dtype=torch.bool)           # the length limit
        if eos_token_id is not None:
            ends |= token == eos_token_id
        if stop_fn is not None:
            ends |= stop_fn(cand[:, :, T:cur + 1].reshape(B * 2 * K, -1)).view(B, 2 * K)

        # The next beams: the K best candidates that did not end.
        open_scores = cand_scores + ends.float() * NEG
        keep = open_scores.topk(K, dim=-1).indices                              # (B, K)
        seqs, run_scores = cand[rows, keep], open_scores[rows, keep]
        beam_rows = (parent[rows, keep] + rows * K).view(-1)                    # which past each new beam extends

        # The finished set: add the candidates that ended among the top K, length-normalised; keep the K best.
        new_scores = cand_scores / float(cur + 1 - T) ** length_penalty
        closed = ~can_improve[:, None] | (is_done.all(dim=-1, keepdim=True) & (early_stopping is True))
        new_scores = new_scores + (closed | ~(ends & top_k_mask)).float() * NEG
        merged_scores = torch.cat([done_scores, new_scores], dim=1)             # (B, 3K)
        best = merged_scores.topk(K, dim=-1).indices
        done_scores = merged_scores[rows, best]
        done_seqs = torch.cat([done_seqs, cand], dim=1)[rows, best]
        done_len = torch.cat([done_len, torch.full_like(token, cur + 1 - T)], dim=1)[rows, best]
        is_done = torch.cat([is_done, ends & top_k_mask], dim=1)[rows, best]

        # Can a running beam still beat the worst finished one?
        n = max_new_tokens if (early_stopping == "never" and length_penalty > 0) else cur + 1 - T
        best_possible = run_scores[:, :1] / float(n) ** length_penalty          # (B, 1)
        worst_done = torch.where(is_done, done_scores.min(dim=-1, keepdim=True).values, NEG)
        can_improve &= (best_possible > worst_done).any(dim=-1)
        finished_all = bool(is_done.all()) and early_stopping is True
        if not bool(can_improve.any()) or finished_all or bool(ends.all()):
            break

        buf.reorder(beam_rows)
        ids = seqs[:, :, cur].reshape(B * K, 1)
        step_mask = None if full_mask is None else full_mask[:, :T_past + cur + 1]
        logits = model(ids, attention_mask=step_mask, kv_buffer=buf).logits[:, -1, :].float()

    length = T + int(done_len[:, 0].max())
    return BeamOutput(done_seqs[:, 0, :length], done_scores[:, 0])


def generate(model: GPT, input_ids: torch.Tensor, *, max_new_tokens: int, num_beams: int = 1,
             length_penalty: float = 1.0, early_stopping: Union[bool, str] = False, **kwargs) -> torch.Tensor:
    """Prompt [B, T] -> prompt plus continuation [B, T + new] (new <= max_new_tokens
    when every row stops at eos or a stop string). num_beams > 1 decodes by `beam_search`
    (length_penalty, early_stopping are its); otherwise the keyword arguments are those of
    `stream`. `past_key_values` is an initial past, e.g. a learned prefix."""
    if num_beams > 1:
        if kwargs.pop("do_sample", False):
            raise ValueError("beam search here is deterministic: drop do_sample, or use num_beams=1 to sample")
        for unused in ("temperature", "top_k", "top_p", "generator", "preallocate"):
            kwargs.pop(unused, None)
        return beam_search(model, input_ids, max_new_tokens=max_new_tokens, num_beams=num_beams,
                           length_penalty=length_penalty, early_stopping=early_stopping, **kwargs).sequences
    new = list(stream(model, input_ids, max_new_tokens=max_new_tokens, **kwargs))
    if not new:
        return input_ids
    return torch.cat([input_ids, torch.stack(new, dim=1).to(input_ids.dtype)], dim=1)
