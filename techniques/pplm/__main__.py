"""python -m techniques.pplm: PPLM from the command line.

    python -m techniques.pplm --bow positive_words --prompt "The lake" --num-samples 3 --sample
    python -m techniques.pplm --discrim sentiment --class-label very_positive --model gpt2-medium
    python -m techniques.pplm train-discriminator --data data/sst2/train.tsv --dev data/sst2/dev.tsv \\
        --class-names negative,positive --out runs/sst2-head

Generation prints, for every sample, the unperturbed continuation (stepsize 0, same seed) and
the PPLM one side by side, bag words highlighted when stdout is a terminal.

train-discriminator prints its plan (the real step count) and the head's trainable parameters
before training, and saves the head and its history (atomically) once training has finished.
Both commands fail the one way minigpt.cli.run_command sets: a user's mistake is one `error:`
line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import fields
from typing import Sequence

import torch

from minigpt import EOT_ID, cast_frozen_linears, get_tokenizer, save_history
from minigpt.cli import (add_dtype_arg, add_model_args, add_train_args, describe_plan, is_main_process, model_from_args,
                         positive_int, run_command, split_from_args, train_config_from_args)

from .attributes import (PAPER_HEADS, bag_names, check_classes_have_rows, load_bag, load_discriminator,
                         load_labelled_tsv, train_discriminator)
from .pplm import PPLMConfig, generate


def _segments(tokenizer, ids: Sequence[int], highlight: set) -> list[tuple[str, bool]]:
    return [(tokenizer.decode([t]), t in highlight) for t in ids]


def _wrap(segments, width: int) -> list[list[tuple[str, bool]]]:
    """Lines of (text, highlighted) pieces no wider than width (breaking before a piece that starts a word)."""
    lines, cur, n = [], [], 0
    for text, hl in segments:
        for k, part in enumerate(text.split("\n")):
            if k:
                lines.append(cur)
                cur, n = [], 0
            while part:
                if n + len(part) > width and cur:  # start a new line; a word's leading space is dropped
                    lines.append(cur)
                    cur, n, part = [], 0, part.lstrip(" ")
                    continue
                piece = part[:width - n]
                cur.append((piece, hl))
                n, part = n + len(piece), part[len(piece):]
    return lines + [cur]


def _render(line, width: int, color: bool) -> str:
    text = "".join(f"\033[1;31m{t}\033[0m" if (hl and color) else t for t, hl in line)
    return text + " " * (width - sum(len(t) for t, _ in line))


def print_side_by_side(left: str, right: str, left_seg, right_seg, *, color: bool, file=None):
    file = file or sys.stdout
    width = max(20, (shutil.get_terminal_size((120, 24)).columns - 3) // 2)
    a, b = _wrap(left_seg, width), _wrap(right_seg, width)
    print(f"{left:<{width}} | {right}", file=file)
    print("-" * width + "-+-" + "-" * width, file=file)
    for i in range(max(len(a), len(b))):
        la = a[i] if i < len(a) else []
        lb = b[i] if i < len(b) else []
        print(_render(la, width, color) + " | " + _render(lb, width, color).rstrip(), file=file)


def _knob_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("PPLM knobs (defaults: the reference's)")
    d = PPLMConfig()
    for f in fields(PPLMConfig):
        name = "--" + f.name.replace("_", "-")
        if f.name == "do_sample":
            g.add_argument("--sample", dest="do_sample", action="store_true", help="sample (default: greedy)")
        elif f.type in ("bool", bool):
            g.add_argument(name, action="store_true", help="(default: off)")
        elif f.name == "window_from":
            g.add_argument(name, choices=("oldest", "recent"), default=d.window_from,
                           help="which past positions a window moves (default: oldest, as the reference)")
        else:
            typ = int if f.type in ("int", int) else float
            g.add_argument(name, type=typ, default=getattr(d, f.name), help=f"(default: {getattr(d, f.name)})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m techniques.pplm",
        description="Steer GPT-2 with PPLM: prints unperturbed and perturbed continuations side by side. "
                    "`python -m techniques.pplm train-discriminator --help` trains a head.")
    p.add_argument("--prompt", default="The lake", help="text to continue (default: 'The lake'); "
                   "<|endoftext|> is put in front, as the reference does")
    p.add_argument("--uncond", action="store_true", help="start from <|endoftext|> alone")
    p.add_argument("--bow", action="append", default=[], metavar="NAME|FILE",
                   help=f"bag of words: one of {', '.join(bag_names())} or a word-list file; repeat or join with ';'")
    p.add_argument("--bow-words", metavar="W1,W2", help="a bag given inline, comma-separated")
    p.add_argument("--avoid-bow", action="append", default=[], metavar="NAME|FILE",
                   help="a bag to steer AWAY from, with the loss -log(1 - Σ p(bag)) (not in the paper); "
                        "repeat or join with ';'")
    p.add_argument("--multi-token", choices=("drop", "first"), default="drop",
                   help="words that are several tokens: drop them (reference) or score their first sub-token")
    p.add_argument("--discrim", metavar="NAME|DIR|PT",
                   help=f"discriminator head: {', '.join(PAPER_HEADS)} (the paper's, for gpt2-medium), "
                        "a folder from train-discriminator, or a .pt head")
    p.add_argument("--class-label", help="class to steer towards, by name or index")
    p.add_argument("--length", type=int, default=100, help="tokens to generate (default: 100)")
    p.add_argument("--num-samples", type=int, default=1, help="perturbed samples, generated as one batch")
    p.add_argument("--no-color", action="store_true", help="never highlight bag words")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    add_model_args(p)
    add_dtype_arg(p)
    _knob_args(p)
    return p


def build_train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m techniques.pplm train-discriminator",
                                description="Train a PPLM discriminator head on cached features of a frozen GPT-2.")
    p.add_argument("--data", required=True, help="TSV of label<TAB>text (header optional), e.g. data/sst2/train.tsv")
    p.add_argument("--dev", help="TSV for dev accuracy (default: hold out --eval-fraction of --data)")
    p.add_argument("--class-names", help="comma-separated class names in index order (e.g. negative,positive); "
                   "every one needs training rows")
    p.add_argument("--out", required=True, help="folder for discriminator.safetensors + .json + history.json")
    p.add_argument("--max-train", type=positive_int, help="use only the first N training rows")
    p.add_argument("--max-len", type=int, default=100, help="cut texts to this many tokens (default: 100)")
    add_model_args(p)
    add_train_args(p, lr=1e-4, epochs=10, batch_size=64)
    return p


def _training_rows(args) -> tuple[list, list, list[str]]:
    """(train rows, dev rows, class names): rows are (text, class index) pairs."""
    names = args.class_names.split(",") if args.class_names else None
    texts, ys, names = load_labelled_tsv(args.data, names)
    if args.max_train:
        texts, ys = texts[:args.max_train], ys[:args.max_train]
    if args.dev:
        dev_texts, dev_ys, _ = load_labelled_tsv(args.dev, names)
        train_rows, dev_rows = list(zip(texts, ys)), list(zip(dev_texts, dev_ys))
    else:
        train_rows, dev_rows = split_from_args(list(zip(texts, ys)), args)
    check_classes_have_rows([y for _, y in train_rows], names, f"the {len(train_rows)} training rows of {args.data}")
    return train_rows, dev_rows, names


def _columns(rows) -> tuple[list, list]:
    """(text, label) rows -> (texts, labels)."""
    return [t for t, _ in rows], [y for _, y in rows]


def train_command(args) -> None:
    train_rows, dev_rows, names = _training_rows(args)
    config = train_config_from_args(args, decay=False)
    model = model_from_args(args).requires_grad_(False)
    cast_frozen_linears(model, config.autocast_dtype)  # bf16/fp16: the frozen model stored as autocast would cast it
    n_head = (model.config.n_embd + 1) * len(names)
    n_model = sum(p.numel() for p in model.parameters())
    print(describe_plan(len(train_rows), len(dev_rows), config))
    print(f"discriminator head: {n_head:,} trainable parameters ({len(names)} classes x (n_embd "
          f"{model.config.n_embd} + a bias); the model's {n_model:,} stay frozen)", flush=True)
    (texts, ys), (dev_texts, dev_ys) = _columns(train_rows), _columns(dev_rows)
    head, report = train_discriminator(model, texts, ys, names, eval_texts=dev_texts, eval_labels=dev_ys,
                                       config=config, max_len=args.max_len, progress=config.progress,
                                       run_info=run_info(args, names))
    if not is_main_process():
        return  # under torchrun rank 0 saves; every process holds the same head
    head.save(args.out)
    save_history(report["history"], args.out)
    dev = (f"dev accuracy {report['dev_accuracy']:.3f} on {report['n_dev']} rows" if report["n_dev"]
           else "no dev rows")
    print(f"trained on {report['n_train']} rows; {dev}; saved to {args.out}")


def run_info(args, names) -> dict:
    """What a resumed run must share with its checkpoint, besides the training options."""
    return {"command": "techniques.pplm train-discriminator", "model": args.weights or args.model,
            "data": str(args.data), "dev": str(args.dev) if args.dev else None, "classes": list(names),
            "max_train": args.max_train, "max_len": args.max_len, "eval_fraction": args.eval_fraction}


def check_prompt_fits(n_prompt: int, length: int, horizon: int, n_positions: int) -> None:
    """Refuse, before anything is printed, a prompt (or --length) that does not fit in the context:
    PPLM needs n_prompt + length positions, plus the discriminator's horizon."""
    room = n_positions - horizon - 1            # the longest prompt that leaves room for one new token
    extra = f" and {horizon} horizon" if horizon else ""
    if n_prompt > room:
        raise ValueError(f"the prompt is too long: {n_prompt} tokens (with the leading <|endoftext|>) leave no room "
                         f"for a new token{extra} in the model's context of {n_positions} positions; it is "
                         f"{n_prompt - room} token(s) over the limit, shorten --prompt")
    if n_prompt + length + horizon > n_positions:
        raise ValueError(f"{n_prompt} prompt + {length} new{extra} tokens = {n_prompt + length + horizon} > the "
                         f"model's context of {n_positions}; lower --length to at most "
                         f"{n_positions - n_prompt - horizon}")


def _load_bags(args, tok, items=None) -> list:
    specs = [s for item in (args.bow if items is None else items) for s in item.split(";") if s.strip()]
    bags = [load_bag(s.strip(), tok, multi_token=args.multi_token) for s in specs]
    if items is None and args.bow_words:
        bags.append(load_bag(args.bow_words.split(","), tok, multi_token=args.multi_token, name="words"))
    return bags


def generate_command(args) -> None:
    tok = get_tokenizer()
    knobs = {f.name: getattr(args, f.name) for f in fields(PPLMConfig)}
    if args.num_samples < 1 or args.length < 1:
        raise ValueError("--num-samples and --length must be >= 1")
    bags, avoid = _load_bags(args, tok), _load_bags(args, tok, args.avoid_bow)
    head = load_discriminator(args.discrim) if args.discrim else None
    if not bags and not avoid and head is None:
        raise ValueError("give a bag of words (--bow / --bow-words / --avoid-bow) and/or a discriminator (--discrim)")
    cfg = PPLMConfig(**knobs)
    model = model_from_args(args, dtype=args.dtype)
    if head is not None:
        head.check_model(model)
        if args.class_label is None:
            raise ValueError("--discrim needs --class-label: one of "
                             + ", ".join(f"{i}={c}" for i, c in enumerate(head.class_names)))
        head.class_index(args.class_label)
    prompt = [EOT_ID] + ([] if args.uncond else tok.encode(args.prompt))
    check_prompt_fits(len(prompt), args.length, cfg.horizon_length if head is not None else 0,
                      model.config.n_positions)
    for b in bags + avoid:
        print(b.summary(), file=sys.stderr)
    if args.num_samples > 1 and not args.do_sample:
        print("note: greedy decoding makes every sample the same; add --sample for different ones", file=sys.stderr)
    ids = torch.tensor([prompt], device=model.device)
    run = dict(bow=bags or None, avoid_bow=avoid or None, discriminator=head, class_label=args.class_label,
               max_new_tokens=args.length, progress=args.progress, num_samples=args.num_samples)
    plain = generate(model, ids, **run, generator=torch.Generator(model.device).manual_seed(args.seed),
                     **{**knobs, "stepsize": 0.0})
    pert = generate(model, ids, **run, generator=torch.Generator(model.device).manual_seed(args.seed), **knobs)
    color = sys.stdout.isatty() and not args.no_color
    hl = set().union(*(b.token_ids for b in bags + avoid)) if bags or avoid else set()
    print("prompt:", tok.decode(prompt[1:]) if not args.uncond else "<|endoftext|>")
    for r in range(args.num_samples):
        a, b = plain.sequences[r, len(prompt):].tolist(), pert.sequences[r, len(prompt):].tolist()
        share = lambda s: sum(t in hl for t in s) / max(1, len(s))
        if bags or avoid:
            label = f" ({'avoided ' if avoid and not bags else ''}bag tokens {share(a):.0%} | {share(b):.0%})"
        else:
            label = (f" (p({args.class_label}) at the end: {plain.steps[-1].attribute_before[r]:.3f} | "
                     f"{pert.steps[-1].attribute_after[r]:.3f})")
        print(f"\n== sample {r + 1}{label}")
        print_side_by_side("unperturbed", "perturbed (PPLM)", _segments(tok, a, hl), _segments(tok, b, hl), color=color)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train-discriminator"]:
        args = build_train_parser().parse_args(argv[1:])
        return run_command(lambda: train_command(args), out=args.out)
    args = build_parser().parse_args(argv)
    return run_command(lambda: generate_command(args))


if __name__ == "__main__":
    raise SystemExit(main())
