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

from .cli import add_model_args, model_from_args, run_command
from .generation import check_sampling, stream
from .tokenizer import EOT_ID, get_tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minigpt", description="GPT-2 from scratch in plain PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="continue a prompt, streaming tokens as they come",
                       description="Continue a prompt with GPT-2, printing text as it is generated.")
    g.add_argument("prompt", help="the text to continue")
    add_model_args(g)
    g.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate (default: 50)")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature; 0 means greedy (default: 1.0)")
    g.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set with this much mass")
    g.add_argument("--greedy", action="store_true", help="always take the most likely token (no sampling)")
    g.add_argument("--stop-at-eos", action="store_true", help="stop at <|endoftext|>")
    g.add_argument("--lora", metavar="DIR", help="a LoRA adapter folder (peft format) to apply first")
    g.add_argument("--prefix", metavar="DIR", help="a prefix-tuning adapter folder (peft format) to run with")
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
    """The model (with --lora merged in) and the prefix's past, if any."""
    model = model_from_args(args)
    past = None
    if args.lora:
        from techniques.lora import load_adapter as load_lora, merge_lora
        model = merge_lora(load_lora(model, args.lora))  # merged: decoding costs what the base model costs
    if args.prefix:
        from techniques.prefix import load_adapter as load_prefix
        prefix = load_prefix(model, args.prefix).to(model.device)
        with torch.no_grad():
            past = prefix.past_key_values(1)
    return model, past


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
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    tok = get_tokenizer()
    ids = tok.encode(args.prompt)
    if not ids:
        raise ValueError("the prompt is empty; give some text to continue")
    model, past = _load(args)
    n_past = 0 if past is None else past[0][0].size(2)
    _check_fits(len(ids), n_past, args.max_new_tokens, model.config.n_positions)
    generator = torch.Generator(device=model.device).manual_seed(args.seed)
    input_ids = torch.tensor([ids], device=model.device)
    tokens = stream(model, input_ids, max_new_tokens=args.max_new_tokens, past_key_values=past,
                    do_sample=not args.greedy and args.temperature > 0, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, generator=generator,
                    eos_token_id=EOT_ID if args.stop_at_eos else None)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    new, shown = [], ""
    for tok_id in tokens:
        new.append(int(tok_id[0]))
        text = tok.decode(new)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    sys.stdout.write(tok.decode(new)[len(shown):] + "\n")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        from .check import run_check  # transformers/peft are imported there, only when it runs
        return run_check(args)
    return run_command(lambda: generate_command(args))


if __name__ == "__main__":
    raise SystemExit(main())
