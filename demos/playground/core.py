"""What the playground's page calls, as plain functions (no UI library here, so the tests need no gradio).

Every function takes the shared model and its own arguments, and keeps no state: two browser sessions
calling them at once share only the weights. PPLM perturbs only its own past (techniques.pplm.generate),
so a steered request never leaves the model steered for another one.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from minigpt import EOT_ID, GPT, TrainConfig, beam_search, get_tokenizer, stream
from minigpt.generation import cut_at_stop
from minigpt.io import read_json
from techniques import pplm
from techniques.lora import lora_summary
from techniques.peft_format import ADAPTER_CONFIG, is_adapter_dir

from ..kits import load_lora, load_prefix, sample_continuations
from ..tour import attention as tour_attention
from ..tour import next_token as tour_next_token
from ..tour.context import _token_label

__all__ = ["PlaygroundError", "encode_prompt", "stream_text", "beam_text", "next_token_panel",
           "Steered",
           "steer_compare", "bag_from_text", "load_head", "sst2_head", "head_choices", "HeadSteered",
           "head_steer_compare", "JAMSteered", "jam_compare",
           "highlight_spans", "find_adapters", "Adapter", "load_adapter_dir",
           "with_and_without", "attention_map"]


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


def beam_text(model: GPT, prompt: str, *, max_new_tokens: int = 40, num_beams: int = 4, length_penalty: float = 1.0,
              repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0, stop_text: str = "") -> str:
    """The best beam's continuation (minigpt.beam_search), cut at the first stop string. Beam search has no
    tokens to stream: the best hypothesis is known only at the end."""
    if int(num_beams) < 1:
        raise PlaygroundError(f"The number of beams must be at least 1, got {num_beams}.")
    ids = encode_prompt(model, prompt, max_new_tokens)
    tok, stops = get_tokenizer(), _stops(stop_text)
    out = beam_search(model, ids, max_new_tokens=max_new_tokens, num_beams=int(num_beams),
                      length_penalty=length_penalty, eos_token_id=EOT_ID, pad_token_id=EOT_ID,
                      repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                      stop=stops, tokenizer=tok)
    new = [t for t in out.sequences[0, ids.size(1):].tolist() if t != EOT_ID]
    return cut_at_stop(tok.decode(new), stops)


def next_token_panel(model: GPT, prompt: str, *, temperature: float = 1.0, top_k: Optional[int] = None,
                     top_p: Optional[float] = None, bars: int = 10):
    """(rows, figure) for the Generate tab: the `bars` most likely next tokens after the prompt as
    (token, p before the filters, p after them), and the same distribution drawn by the tour's step 1
    (demos.tour.next_token_distribution and draw_next_token: one computation for both, no copy of either)."""
    d = tour_next_token.next_token_distribution(model, encode_prompt(model, prompt), temperature=temperature,
                                                top_k=top_k, top_p=top_p, bars=bars)
    tok = get_tokenizer()
    rows = [(tok.decode([i]), float(d.probs[i]), float(d.kept[i])) for i in d.top]
    return rows, tour_next_token.draw_next_token(d, title="Next token after the prompt: the model's softmax (left), "
                                                 "after the decoding filters (right)")


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


def load_head(model: GPT, spec: str, target: str, *, two_class: bool = True):
    """An attribute head (a folder saved by train-discriminator or sst2_head, a reference .pt, or a paper head
    name), checked against the model and the target class; JAM needs two classes (two_class), PPLM any number.
    Every problem raises PlaygroundError."""
    spec = (spec or "").strip()
    if not spec:
        raise PlaygroundError("No attribute head given: pick the SST-2 head trained at startup, or type a folder saved "
                              "by python -m techniques.pplm train-discriminator (or by the steering project), or a "
                              ".pt head.")
    try:
        head = pplm.load_discriminator(spec)
        head.check_model(model)
        if two_class:
            pplm.head_direction(head, target)          # two classes, and the target is one of them
        else:
            head.class_index(target)
    except FileNotFoundError as e:
        raise PlaygroundError(f"The head {spec!r} was not found ({e}).") from None
    except ValueError as e:
        raise PlaygroundError(f"The head {spec!r} cannot steer this model: {e}") from None
    return head


SST2 = Path(__file__).resolve().parents[2] / "data" / "sst2"     # the shipped SST-2 rows (data/sst2/*.tsv)
SST2_CLASSES = ["negative", "positive"]


def _sst2_rows(name: str, limit: int, seed: int) -> tuple[list[str], list[int]]:
    texts, labels, _ = pplm.load_labelled_tsv(SST2 / name, class_names=SST2_CLASSES)
    keep = sorted(random.Random(seed).sample(range(len(texts)), min(limit, len(texts))))
    return [texts[i] for i in keep], [labels[i] for i in keep]


def sst2_head(model: GPT, folder: str | Path, *, rows: int = 1000, dev_rows: int = 300, epochs: int = 30,
              lr: float = 1e-3, seed: int = 0, progress: bool = True) -> tuple[str, str]:
    """(folder, a line saying what it is): the SST-2 sentiment head for this model in `folder`, loaded when a head
    saved there fits the model, else trained now (pplm.train_discriminator on `rows` shipped SST-2 training rows,
    the dev accuracy on `dev_rows` of dev.tsv) and saved there, so the next start loads it.
    Differs from the steering project's head (6,000 rows, lr 1e-4, 10 epochs): fewer rows, so that the page
    starts in seconds, and a larger lr and more epochs on the cached features (cheap: the model runs once a row)."""
    folder = Path(folder)
    if (folder / "discriminator.safetensors").is_file():
        head = pplm.load_discriminator(folder)
        if head.n_embd == model.config.n_embd and head.base_model == model.config.name_or_path:
            return str(folder), f"SST-2 head: loaded from {folder} (delete it to train again)"
    texts, labels = _sst2_rows("train.tsv", rows, seed)
    dev_texts, dev_labels = _sst2_rows("dev.tsv", dev_rows, seed)
    print(f"SST-2 head: training a sentiment head on {len(texts):,} rows of {SST2 / 'train.tsv'} "
          "(once; saved for the next start)", flush=True)
    start = time.perf_counter()
    config = TrainConfig(epochs=epochs, batch_size=64, lr=lr, decay=False, seed=seed, progress=progress)
    head, report = pplm.train_discriminator(model, texts, labels, SST2_CLASSES, eval_texts=dev_texts,
                                            eval_labels=dev_labels, config=config, progress=progress)
    head.cpu().save(folder)
    return str(folder), (f"SST-2 head: {len(texts):,} rows, dev accuracy {100 * report['dev_accuracy']:.1f}% on "
                         f"{report['n_dev']} rows, trained in {time.perf_counter() - start:.1f} s, saved to {folder}")


def head_choices(model: GPT, trained: Optional[str] = None) -> list[tuple[str, str]]:
    """(label, spec) for the head menu: the SST-2 head trained at startup, then the paper's heads that read
    hidden states of this model's size (they are for gpt2-medium, n_embd 1024)."""
    out = [("SST-2 sentiment head", trained)] if trained else []      # its folder shows under the menu
    for name, (_, classes, base) in pplm.PAPER_HEADS.items():
        if pplm.Discriminator.from_paper(name).n_embd == model.config.n_embd:
            out.append((f"the paper's {name} head ({base})", name))
    return out


@dataclass
class HeadSteered:
    plain: list[int]            # new token ids, unsteered (stepsize 0: the same sampler and seed)
    steered: list[int]          # new token ids, PPLM-steered towards the head's target class
    plain_rating: list[float]   # per token: the head's p(target) on the mean hidden state of the unsteered text so far
    steered_rating: list[float]  # the same for the steered text (the head is the steering signal, not a yardstick)


def head_steer_compare(model: GPT, prompt: str, head_spec: str, target: str = "positive", *, stepsize: float,
                       num_iterations: int = 10, max_new_tokens: int = 20, seed: int = 0) -> HeadSteered:
    """Unsteered and PPLM-steered continuations (techniques.pplm.generate with discriminator=, the steering
    project's knobs: gm_scale 0.95, kl_scale 0.01, horizon 1, γ 1) from the same seed, with the head's p(target)
    per token. Each call builds its own past; the model's weights and the head are never changed."""
    head = load_head(model, head_spec, target, two_class=False)
    body = encode_prompt(model, prompt, max_new_tokens + 2)          # + the horizon token PPLM looks ahead
    ids = torch.cat([torch.tensor([[EOT_ID]], device=model.device), body], dim=1)
    runs = []
    for step in (0.0, float(stepsize)):
        gen = torch.Generator(device=model.device).manual_seed(int(seed))
        runs.append(pplm.generate(model, ids, discriminator=head, class_label=target, max_new_tokens=max_new_tokens,
                                  generator=gen, stepsize=step, num_iterations=int(num_iterations), do_sample=True,
                                  gamma=1.0, gm_scale=0.95, kl_scale=0.01, horizon_length=1).sequences)
    T = ids.size(1)
    head = head.float()
    return HeadSteered(runs[0][0, T:].tolist(), runs[1][0, T:].tolist(),
                       _head_rating(model, head, target, runs[0], T), _head_rating(model, head, target, runs[1], T))


@dataclass
class JAMSteered:
    plain: list[int]            # new token ids, unsteered (the same sampler and seed, no move)
    steered: list[int]          # new token ids, JAM-moved
    plain_rating: list[float]   # per token: the head's p(target) on the mean hidden state of the unsteered text so far
    steered_rating: list[float]  # the same for the steered text (the head is the steering signal, not a yardstick)


@torch.no_grad()
def _head_rating(model: GPT, head, target: str, seq: torch.Tensor, T: int) -> list[float]:
    """p(target) of the head on the running mean of the last hidden states of the continuation, token by token
    (the head's own input is such a mean: attributes.mean_hidden)."""
    if seq.size(1) <= T:
        return []
    h = model(seq, output_hidden_states=True).hidden_states[-1][0, T:].float()       # (N, C)
    running = h.cumsum(0) / torch.arange(1, h.size(0) + 1, device=h.device)[:, None]  # (N, C)
    return head.to(h.device)(running).softmax(-1)[:, head.class_index(target)].tolist()


def jam_compare(model: GPT, prompt: str, head_spec: str, target: str = "positive", *, margin: float = 2.0,
                max_new_tokens: int = 20, seed: int = 0, top_k: Optional[int] = 10) -> JAMSteered:
    """Unsteered and JAM-steered continuations (techniques.pplm.jam_adjust: each sampled position's last hidden
    state moved to margin μ across the head's boundary) from the same seed, with the head's rating per token.
    The move changes only this request's logits; the model's weights are never touched."""
    head = load_head(model, head_spec, target)
    try:
        config = pplm.JAMConfig(margin=float(margin))
    except ValueError as e:
        raise PlaygroundError(str(e)) from None
    body = encode_prompt(model, prompt, max_new_tokens + 1)
    ids = torch.cat([torch.tensor([[EOT_ID]], device=model.device), body], dim=1)
    runs = []
    for adjust in (None, pplm.jam_adjust(model, head, target, config)):
        gen = torch.Generator(device=model.device).manual_seed(int(seed))
        runs.append(pplm.steered_generate(model, ids, max_new_tokens=int(max_new_tokens), adjust=adjust,
                                          top_k=top_k, generator=gen))
    T = ids.size(1)
    return JAMSteered(runs[0][0, T:].tolist(), runs[1][0, T:].tolist(),
                      _head_rating(model, head, target, runs[0], T), _head_rating(model, head, target, runs[1], T))


def highlight_spans(ids: Sequence[int], bag_ids: set) -> list[tuple[str, Optional[str]]]:
    """(text, "bag" or None) per token, for a highlighted-text view of a sample."""
    tok = get_tokenizer()
    return [(tok.decode([i]), "bag" if i in bag_ids else None) for i in ids]


# ---- adapters ---------------------------------------------------------------------------------------------
def find_adapters(runs_dir: str | Path) -> list[str]:
    """Every folder under runs_dir holding a peft adapter (adapter_config.json), sorted; [] when there is none."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    return sorted(str(p.parent) for p in root.rglob(ADAPTER_CONFIG))


@dataclass
class Adapter:
    """One adapter loaded for the shared model: a LoRA copy of the model (the shared one is never touched)
    or a prefix (its own past, in front of the prompt)."""
    path: str
    kind: str                          # "LORA" or "PREFIX_TUNING"
    parameters: int                    # the adapter's own parameter count
    config: dict                       # adapter_config.json as read
    summary: str
    lora_model: Optional[GPT] = None
    prefix: object = field(default=None, repr=False)


def load_adapter_dir(model: GPT, path: str) -> Adapter:
    """The adapter in `path` (LoRA or prefix tuning, peft's layout), checked against the model. A folder that is
    not an adapter, another peft type or an adapter for another model size raises PlaygroundError."""
    d = Path((path or "").strip()).expanduser()
    if not str(path or "").strip():
        raise PlaygroundError("No adapter folder given: pick one from the list or type a folder path.")
    if not d.is_dir() or not is_adapter_dir(d):
        raise PlaygroundError(f"{d} is not an adapter folder (it has no {ADAPTER_CONFIG}): pick a folder saved by "
                              "peft or by minigpt (e.g. a run of python -m techniques.lora train).")
    config = read_json(d / ADAPTER_CONFIG)
    kind = config.get("peft_type") if isinstance(config, dict) else None
    try:
        if kind == "LORA":
            lora = load_lora(model, d)
            n = sum(p.numel() for p in lora.parameters() if p.requires_grad)
            return Adapter(str(d), kind, n, config, lora_summary(lora), lora_model=lora)
        if kind == "PREFIX_TUNING":
            prefix = load_prefix(model, d).prefix
            n = prefix.table().numel()
            return Adapter(str(d), kind, n, config, f"prefix tuning, P={prefix.num_virtual_tokens} virtual "
                           f"tokens: {n:,} parameters (the folded table)", prefix=prefix)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise PlaygroundError(f"The adapter in {d} does not fit this model: {e}") from None
    raise PlaygroundError(f"{d / ADAPTER_CONFIG} has peft_type {kind!r}; the playground loads LORA and "
                          "PREFIX_TUNING adapters.")


def with_and_without(model: GPT, prompt: str, adapters: Sequence[Adapter], *, seed: int = 0,
                     max_new_tokens: int = 30, top_k: Optional[int] = 40) -> tuple[str, str]:
    """(the base model's continuation, the continuation with the adapters switched on), both sampled from the
    same seed (demos.kits.sample_continuations). At most one LoRA and one prefix at a time: with none on, the
    two texts are the same by construction."""
    loras = [a for a in adapters if a.kind == "LORA"]
    prefixes = [a for a in adapters if a.kind == "PREFIX_TUNING"]
    if len(loras) > 1 or len(prefixes) > 1:
        raise PlaygroundError("Switch on at most one LoRA and one prefix at a time (stacking two LoRAs on the same "
                              "layers is not supported here).")
    P = prefixes[0].prefix.num_virtual_tokens if prefixes else 0
    encode_prompt(model, prompt, max_new_tokens + P)
    knobs = dict(seed=int(seed), max_new_tokens=int(max_new_tokens), do_sample=True, top_k=top_k)
    base = sample_continuations(model, [prompt], **knobs)[0]
    on_model = loras[0].lora_model if loras else model
    adapted = sample_continuations(on_model, [prompt], prefix=prefixes[0].prefix if prefixes else None, **knobs)[0]
    return base, adapted


# ---- attention ---------------------------------------------------------------------------------------------
def attention_map(model: GPT, prompt: str, layer: int, head: int) -> tuple[list[str], np.ndarray, object]:
    """(token labels, the (T, T) attention of `head` in `layer` over the prompt, its heatmap): row i is token i's
    softmax over tokens 0..i, from the tour's step 2 (demos.tour.attention_weights and draw_attention)."""
    cfg = model.config
    if not 0 <= int(layer) < cfg.n_layer or not 0 <= int(head) < cfg.n_head:
        raise PlaygroundError(f"Layer {layer}, head {head} does not exist: the model has layers 0..{cfg.n_layer - 1} "
                              f"and heads 0..{cfg.n_head - 1}.")
    ids = encode_prompt(model, prompt)
    att = tour_attention.attention_weights(model, ids, int(layer))                       # (nh, T, T)
    tok = get_tokenizer()
    labels = [_token_label(tok, i) for i in ids[0].tolist()]
    fig = tour_attention.draw_attention(att, labels, [int(head)])
    fig.suptitle(f"Layer {int(layer)}: each row is one token's attention over the tokens so far", fontsize=11)
    return labels, att[int(head)].numpy(), fig
