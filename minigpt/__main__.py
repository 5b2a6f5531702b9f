"""python -m minigpt generate "prompt" [options]: stream a continuation from GPT-2.
python -m minigpt check [--model NAME | --weights DIR] [--lora DIR] [--prefix DIR]: compare with transformers/peft
(see check.py).

The command line is where the pieces compose, so it (here and in check.py) is the one place in
`minigpt/` that reaches into `techniques/` (lazily, and only for --lora and
--prefix); the library modules never do.
"""
from __future__ import annotations

import argparse
import sys

import torch

from .cli import (DTYPES, add_adapter_args, add_dtype_arg, add_model_args, check_adapter_args, model_from_args,
                  run_command)
from .generation import beam_search, check_sampling, check_history_rules, cut_at_stop, stream
from .tokenizer import EOT_ID, get_tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minigpt", description="GPT-2 from scratch in plain PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="continue a prompt, streaming tokens as they come",
                       description="Continue a prompt with GPT-2, printing text as it is generated.")
    g.add_argument("prompt", help="the text to continue")
    add_model_args(g)
    add_dtype_arg(g)
    g.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate (default: 50)")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature; 0 means greedy (default: 1.0)")
    g.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set with this much mass")
    g.add_argument("--greedy", action="store_true", help="always take the most likely token (no sampling)")
    g.add_argument("--stop-at-eos", action="store_true", help="stop at <|endoftext|>")
    g.add_argument("--stop", action="append", metavar="TEXT", default=None,
                   help="stop when the generated text contains TEXT, and print it only up to there (repeat for "
                        "several; escapes like \\n are read)")
    g.add_argument("--num-beams", type=int, default=1,
                   help="beam search with this many beams (prints the result when done; default: 1, no beams)")
    g.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam search: a finished beam scores log p / length ** this (> 0 favours longer; default 1.0)")
    g.add_argument("--early-stopping", choices=("false", "true", "never"), default="false",
                   help="beam search: stop when num_beams hypotheses have finished (true), when the best running "
                        "beam can no longer win by the heuristic (false, default), or by the exact bound (never)")
    g.add_argument("--no-repeat-ngram-size", type=int, default=0, metavar="N",
                   help="never repeat an n-gram of this size in the text (default: 0, off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide a positive score (multiply a negative one) of every token already in the text by "
                        "this (CTRL's rule; 1.2 is the paper's choice; default 1.0, off)")
    add_adapter_args(g, what="apply first")
    g.add_argument("--prefix", metavar="DIR", help="a prefix-tuning adapter folder (peft format), or a "
                   "Prefix-Tuning+ one (prefix_plus_config.json), to run with")
    c = sub.add_parser("check", help="compare this GPT-2 (and adapters) with transformers and peft, number for number",
                       description="Load the same files here and in transformers/peft and print a table of the "
                                   "differences: logits, hidden states, greedy tokens, tokenizer, and with "
                                   "--lora/--prefix the adapters. Exits 0 when every row is within its tolerance, "
                                   "1 otherwise. Needs the test extra: pip install -e \".[test]\".")
    add_model_args(c, default_model="tiny")
    c.add_argument("--lora", metavar="DIR", help="also check this LoRA adapter folder (peft format) against peft")
    c.add_argument("--prefix", metavar="DIR", help="also check this prefix-tuning adapter folder (peft format) "
                                                   "against peft")
    return p


def _load(args):
    """The model (with --lora merged in) and the prefix's past, if any, in --dtype.

    The adapters are applied in fp32 and the result cast once: W0 + s B A is rounded to bf16 as a whole."""
    model = model_from_args(args)
    past = None
    check_adapter_args(args)
    if args.lora:  # merged: decoding costs what the base model costs (techniques.lora merge saves the same model)
        from techniques.lora import load_combined, merge_lora
        model = merge_lora(load_combined(model, args.lora, args.lora_weights, args.combine))
    if args.mtl_lora:
        from techniques.lora import load_merged_mtl
        model = load_merged_mtl(model, args.mtl_lora, args.task)
    if args.prefix:
        from techniques.prefix import is_prefix_plus_dir, load_adapter as load_prefix, load_prefix_plus
        if is_prefix_plus_dir(args.prefix):  # Prefix-Tuning+: no past; the model's attentions are wrapped in place
            load_prefix_plus(model, args.prefix)
            return model.to(DTYPES[args.dtype]), None
        prefix = load_prefix(model, args.prefix).to(model.device)
        with torch.no_grad():
            past = prefix.past_key_values(1)
    dtype = DTYPES[args.dtype]
    if past is not None:
        past = tuple((k.to(dtype), v.to(dtype)) for k, v in past)
    return model.to(dtype), past


def _check_fits(n_prompt: int, n_past: int, max_new: int, n_positions: int) -> None:
    """Refuse, before anything is printed, a prompt (plus prefix) that does not fit with the new tokens."""
    used = n_past + n_prompt
    what = f"{n_prompt} prompt tokens" + (f" after a prefix of {n_past}" if n_past else "")
    if used >= n_positions:
        raise ValueError(f"the prompt is too long: {what} leave no room in the model's context of {n_positions} "
                         f"positions; it is {used - n_positions + 1} token(s) over the limit, shorten it")
    if used + max_new > n_positions:
        raise ValueError(f"{what} + {max_new} new tokens = {used + max_new} > the model's context of "
                         f"{n_positions}; lower --max-new-tokens to at most {n_positions - used}")


def generate_command(args) -> None:
    check_sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    check_history_rules(args.repetition_penalty, args.no_repeat_ngram_size)
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    if args.num_beams < 1:
        raise ValueError("--num-beams must be >= 1")
    stops = [s.encode().decode("unicode_escape") for s in args.stop] if args.stop else None
    if stops and not all(stops):
        raise ValueError("--stop needs a non-empty text")
    tok = get_tokenizer()
    ids = tok.encode(args.prompt)
    if not ids:
        raise ValueError("the prompt is empty; give some text to continue")
    model, past = _load(args)
    n_past = 0 if past is None else past[0][0].size(2)
    _check_fits(len(ids), n_past, args.max_new_tokens, model.config.n_positions)
    input_ids = torch.tensor([ids], device=model.device)
    rules = dict(repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                 stop=stops, tokenizer=tok, eos_token_id=EOT_ID if args.stop_at_eos else None, pad_token_id=EOT_ID)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    if args.num_beams > 1:
        early = {"false": False, "true": True, "never": "never"}[args.early_stopping]
        out = beam_search(model, input_ids, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                          past_key_values=past, length_penalty=args.length_penalty, early_stopping=early, **rules)
        new = out.sequences[0, len(ids):].tolist()
        if args.stop_at_eos and EOT_ID in new:
            new = new[:new.index(EOT_ID)]
        sys.stdout.write(cut_at_stop(tok.decode(new), stops) + "\n")
        return
    generator = torch.Generator(device=model.device).manual_seed(args.seed)
    tokens = stream(model, input_ids, max_new_tokens=args.max_new_tokens, past_key_values=past,
                    do_sample=not args.greedy and args.temperature > 0, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, generator=generator, **rules)
    hold = max(map(len, stops)) - 1 if stops else 0  # text that may be the start of a stop string waits
    new, shown = [], ""
    for tok_id in tokens:
        new.append(int(tok_id[0]))
        text = cut_at_stop(tok.decode(new), stops)
        ready = text[:len(text) - hold] if hold else text
        if len(ready) > len(shown) and not ready.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(ready[len(shown):])
            sys.stdout.flush()
            shown = ready
    sys.stdout.write(cut_at_stop(tok.decode(new), stops)[len(shown):] + "\n")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        from .check import run_check  # transformers/peft are imported there, only when it runs
        return run_check(args)
    return run_command(lambda: generate_command(args))


if __name__ == "__main__":
    raise SystemExit(main())
