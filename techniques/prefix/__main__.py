"""python -m techniques.prefix train: learn a prefix with the model frozen (--variant plus: Prefix-Tuning+).

Writes, once training has finished (each save atomic): a peft-format adapter
(adapter_config.json + adapter_model.safetensors) in OUT, the full prefix
(MLP included) in OUT/checkpoint for --init-from, and OUT/history.json. With
--save-every K it also checkpoints the whole training state into
OUT/train_state every K steps, which --resume continues exactly. Before
training it prints the plan (the real step count) and how many parameters are
trained.

--variant plus trains Prefix-Tuning+ (prefix_plus.py) instead, through the same data, options and training loop:
one M per layer and head (--phi elu|gelu|elu+1, --layers), saved as prefix_plus_config.json +
prefix_plus_model.safetensors in OUT (our own format: peft has no such adapter type), plus OUT/history.json.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from minigpt import GPT, cast_frozen_linears, get_tokenizer, load_lm_data, save_history
from minigpt.cli import (add_model_args, add_train_args, describe_plan, is_main_process, model_from_args, positive_int,
                         run_command, split_from_args, train_config_from_args)

from .prefix import PrefixTuning, init_from_text, load_checkpoint, save_adapter, save_checkpoint, train_prefix
from .prefix_plus import (FEATURE_MAPS, PLUS_CONFIG, PrefixTuningPlus, load_prefix_plus, parse_layers,
                          save_prefix_plus, train_prefix_plus)

# The default peak learning rates: the MLP's output moves the table much more per step than the table's own lr.
LR_DIRECT, LR_PROJECTION = 5e-3, 5e-4
LR_PLUS = 5e-3  # Prefix-Tuning+'s M, like the direct table: a plain parameter read at every position
VARIANTS = ("prefix", "plus")
PREFIX_ONLY = ("num_virtual_tokens", "init_text", "hidden", "dropout")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m techniques.prefix",
                                description="Prefix tuning (Li & Liang 2021) for minigpt's GPT-2.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="learn a prefix on a .txt or .jsonl (prompt/completion) file",
                       description="Train a prefix with the model frozen; writes a peft-format adapter "
                                   "(adapter_config.json, adapter_model.safetensors), the full prefix in "
                                   "OUT/checkpoint for --init-from, and OUT/history.json.")
    add_model_args(t)
    t.add_argument("--variant", default="prefix", metavar="NAME",
                   help="prefix: prefix tuning (Li & Liang 2021); plus: Prefix-Tuning+ (Wang et al. 2025), one "
                        "trainable M per layer and head added to the attention output (default: prefix)")
    t.add_argument("--phi", default=None, metavar="MAP",
                   help=f"--variant plus: the feature map φ, one of {', '.join(FEATURE_MAPS)} (default: elu, the "
                        "paper's φ(x) = elu(x); gelu is GELU(x); elu+1 is linear attention's elu(x) + 1)")
    t.add_argument("--layers", default=None, metavar="LIST",
                   help="--variant plus: the layers to wrap, \"all\" or indices/ranges like \"0,2,4-7\" "
                        "(default: all)")
    t.add_argument("--data", required=True, metavar="FILE",
                   help=".txt (cut into blocks) or .jsonl with {\"prompt\", \"completion\"} per line "
                        "(loss on the completion)")
    t.add_argument("--out", required=True, metavar="DIR", help="where to write the adapter")
    t.add_argument("--num-virtual-tokens", type=positive_int, default=None, help="P, the prefix length (default: 10)")
    t.add_argument("--init-text", metavar="TEXT",
                   help="start from the model's own keys/values for these words (P = their token count, "
                        "overriding --num-virtual-tokens)")
    t.add_argument("--projection", action="store_true", help="reparametrise through an MLP (the paper's choice)")
    t.add_argument("--hidden", type=positive_int, default=None,
                   help="the MLP's hidden width with --projection (default: 512)")
    t.add_argument("--dropout", type=float, default=None, help="dropout on the prefix while training (default: 0)")
    t.add_argument("--init-from", metavar="DIR",
                   help="start a new run from a trained prefix (OUT/checkpoint of an earlier run: its P, MLP and "
                        "weights; a fresh optimizer and schedule). To continue a run exactly, use --resume")
    t.add_argument("--block-size", type=int, default=128,
                   help="tokens per example; P + block size must fit in the model's n_positions (default: 128)")
    add_train_args(t, lr=None, lr_help="5e-3 direct, 5e-4 with --projection")
    return p


def check_options(args) -> None:
    """Refuse, before the model is loaded, options that cannot mean what they say."""
    if args.variant not in VARIANTS:
        raise ValueError(f"unknown --variant {args.variant!r}: choose prefix (prefix tuning) or plus "
                         "(Prefix-Tuning+)")
    if args.variant == "plus":
        return check_plus_options(args)
    given = [o for o, v in (("--phi", args.phi), ("--layers", args.layers)) if v is not None]
    if given:
        raise ValueError(f"{', '.join(given)} belong to Prefix-Tuning+: add --variant plus, or leave them out")
    if args.init_text is not None and not args.init_text.strip():
        raise ValueError("--init-text is empty: give the words the prefix starts from (e.g. --init-text "
                         "\"summarize\"), or leave the option out to start from random values")
    starts = [o for o, v in (("--init-text", args.init_text), ("--init-from", args.init_from)) if v is not None]
    if len(starts) > 1:
        raise ValueError("--init-text and --init-from both say where the prefix starts; give only one")
    if args.resume and (Path(args.resume) / "prefix_config.json").is_file() \
            and not (Path(args.resume) / "trainer_state.json").is_file():
        raise ValueError(f"--resume {args.resume} holds a trained prefix, not a training checkpoint; to start a new "
                         f"run from it use --init-from {args.resume}, to continue a run exactly give its "
                         "OUT/train_state (written with --save-every)")
    if args.init_from and args.resume:
        raise ValueError("--init-from starts a new run from a prefix, --resume continues a run exactly; give one")
    if args.init_from:
        given = [f"--{n.replace('_', '-')}" for n in ("num_virtual_tokens", "hidden", "dropout")
                 if getattr(args, n) is not None] + (["--projection"] if args.projection else [])
        if given:
            raise ValueError(f"--init-from starts from a prefix with its own shape and dropout; {', '.join(given)} "
                             "would be ignored, so leave them out (or start a new prefix without --init-from)")
    args.num_virtual_tokens = 10 if args.num_virtual_tokens is None else args.num_virtual_tokens
    args.hidden = 512 if args.hidden is None else args.hidden
    args.dropout = 0.0 if args.dropout is None else args.dropout
    if args.block_size < 2:
        raise ValueError(f"--block-size must be >= 2 (a token and the one it predicts), got {args.block_size}")


def check_plus_options(args) -> None:
    """--variant plus: the prefix-tuning options have no meaning there; --phi must name a feature map."""
    given = [f"--{n.replace('_', '-')}" for n in PREFIX_ONLY if getattr(args, n) is not None] \
        + (["--projection"] if args.projection else [])
    if given:
        raise ValueError(f"{', '.join(given)} belong to prefix tuning; Prefix-Tuning+ (--variant plus) has no "
                         "virtual tokens, only --phi and --layers: leave them out")
    if args.phi is not None and args.phi not in FEATURE_MAPS:
        raise ValueError(f"unknown --phi {args.phi!r}: choose one of {', '.join(FEATURE_MAPS)}")
    if args.init_from and (args.phi is not None or args.layers is not None):
        raise ValueError("--init-from starts from a Prefix-Tuning+ adapter with its own φ and layers; leave out "
                         "--phi and --layers")
    if args.init_from and args.resume:
        raise ValueError("--init-from starts a new run from an adapter, --resume continues a run exactly; give one")
    if args.resume and (Path(args.resume) / PLUS_CONFIG).is_file() \
            and not (Path(args.resume) / "trainer_state.json").is_file():
        raise ValueError(f"--resume {args.resume} holds a trained Prefix-Tuning+ adapter, not a training checkpoint; "
                         f"to start a new run from it use --init-from {args.resume}, to continue a run exactly give "
                         "its OUT/train_state (written with --save-every)")
    args.phi = "elu" if args.phi is None else args.phi
    if args.block_size < 2:
        raise ValueError(f"--block-size must be >= 2 (a token and the one it predicts), got {args.block_size}")


def new_plus(args, model: GPT) -> PrefixTuningPlus:
    """Prefix-Tuning+ on `model`: from a trained adapter (--init-from), or M = 0 on the chosen layers."""
    if args.init_from:
        return load_prefix_plus(model, args.init_from)
    layers = parse_layers(args.layers, model.config.n_layer) if args.layers is not None else None
    return PrefixTuningPlus(model, layers=layers, feature_map=args.phi)


def plus_command(args, model: GPT) -> None:
    """--variant plus: the same data, options and loop as prefix tuning; saves with save_prefix_plus."""
    pp = new_plus(args, model)
    if args.block_size > model.config.n_positions:
        raise ValueError(f"--block-size {args.block_size} > the model's n_positions {model.config.n_positions}; "
                         f"use --block-size {model.config.n_positions} or less")
    examples = load_lm_data(args.data, get_tokenizer(), args.block_size)
    train_ex, eval_ex = split_from_args(examples, args)
    config = train_config_from_args(args, lr=args.lr if args.lr is not None else LR_PLUS)
    print(describe_plan(len(train_ex), len(eval_ex), config))
    n_model = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in pp.trainable_parameters())
    print(f"Prefix-Tuning+ φ={pp.feature_map}, layers {pp.layers}: {n_train:,} trainable parameters (M per layer, "
          f"(n_head, d_φ, head_dim); the model's {n_model:,} stay frozen)", flush=True)
    cast_frozen_linears(model, config.autocast_dtype)  # the M's stay fp32: they require grad
    history = train_prefix_plus(pp, train_ex, eval_examples=eval_ex, config=config, run_info=plus_run_info(args))
    if not is_main_process():
        return
    save_prefix_plus(pp, args.out)
    save_history(history, args.out)
    last = history[-1]
    msg = (f"trained Prefix-Tuning+ for {len(history)} step{'s' if len(history) != 1 else ''}: "
           f"loss {history[0]['loss']:.3f} -> {last['loss']:.3f}")
    if "eval_loss" in last:
        msg += f", eval {last['eval_loss']:.3f}"
    print(f"{msg}; adapter in {args.out}")


def plus_run_info(args) -> dict:
    """What a resumed Prefix-Tuning+ run must share with its checkpoint, besides the training options."""
    return {"command": "techniques.prefix train --variant plus", "model": args.weights or args.model,
            "data": str(args.data), "block_size": args.block_size, "eval_fraction": args.eval_fraction,
            "phi": args.phi, "layers": args.layers, "init_from": str(args.init_from) if args.init_from else None}


def new_prefix(args, model: GPT) -> PrefixTuning:
    """The prefix to train: from a trained prefix, from words, or random (peft's init). With --resume the
    training loop then puts the checkpoint's values into it."""
    torch.manual_seed(args.seed)
    if args.init_from:
        return load_checkpoint(model, args.init_from)
    if args.init_text is not None:
        return init_from_text(model, args.init_text, projection=args.projection, hidden_size=args.hidden,
                              dropout=args.dropout, progress=not args.no_progress)
    prefix = PrefixTuning(model.config, args.num_virtual_tokens, projection=args.projection,
                          hidden_size=args.hidden, dropout=args.dropout)
    return prefix.to(model.transformer.wte.weight)  # the model's device and dtype


def check_block_fits(block_size: int, P: int, n_positions: int) -> None:
    """Real tokens take positions P, P+1, ...: refuse a block that would run past n_positions."""
    if P + block_size > n_positions:
        raise ValueError(f"--block-size {block_size} does not fit after the prefix: P={P} + block size "
                         f"{block_size} = {P + block_size} > n_positions {n_positions}; use --block-size "
                         f"{n_positions - P} or less (or a shorter prefix)")


def describe_parameters(prefix: PrefixTuning, model: GPT) -> str:
    """One line: what is trained, and (with the MLP) what the adapter keeps of it."""
    n_model = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in prefix.parameters())
    P, frozen = prefix.num_virtual_tokens, f"the model's {n_model:,} stay frozen"
    if not prefix.projection:
        return f"prefix P={P}, direct: {n_train:,} trainable parameters ({frozen})"
    n_mlp = sum(p.numel() for p in prefix.transform.parameters())
    n_table = P * 2 * prefix.config.n_layer * prefix.config.n_embd  # P_theta [P, 2·L·d]
    return (f"prefix P={P}, reparametrised: {n_train:,} trainable parameters (P'_theta "
            f"{prefix.embedding.weight.numel():,} + the MLP's {n_mlp:,}); the adapter keeps only the folded table "
            f"P_theta, {n_table:,} ({frozen})")


def train_command(args) -> None:
    check_options(args)
    model = model_from_args(args)
    if args.variant == "plus":
        return plus_command(args, model)
    prefix = new_prefix(args, model)
    check_block_fits(args.block_size, prefix.num_virtual_tokens, model.config.n_positions)
    examples = load_lm_data(args.data, get_tokenizer(), args.block_size)
    train_ex, eval_ex = split_from_args(examples, args)
    default_lr = LR_PROJECTION if prefix.projection else LR_DIRECT
    config = train_config_from_args(args, lr=args.lr if args.lr is not None else default_lr)
    print(describe_plan(len(train_ex), len(eval_ex), config))
    print(describe_parameters(prefix, model), flush=True)
    model.requires_grad_(False)  # frozen (train_prefix says so again), so that its Linears can be stored in bf16
    cast_frozen_linears(model, config.autocast_dtype)  # bf16/fp16: the frozen model stored as autocast would cast it
    history = train_prefix(model, prefix, train_ex, eval_examples=eval_ex, config=config, run_info=run_info(args))
    if not is_main_process():
        return  # under torchrun rank 0 saves; every process holds the same prefix

    save_adapter(prefix, args.out, base_model_name_or_path=args.weights or args.model)
    save_checkpoint(prefix, f"{args.out}/checkpoint")
    save_history(history, args.out)
    last = history[-1]
    msg = (f"trained P={prefix.num_virtual_tokens} for {len(history)} step{'s' if len(history) != 1 else ''}: "
           f"loss {history[0]['loss']:.3f} -> {last['loss']:.3f}")
    if "eval_loss" in last:
        msg += f", eval {last['eval_loss']:.3f}"
    print(f"{msg}; adapter in {args.out}")


def run_info(args) -> dict:
    """What a resumed run must share with its checkpoint, besides the training options."""
    return {"command": "techniques.prefix train", "model": args.weights or args.model, "data": str(args.data),
            "block_size": args.block_size, "eval_fraction": args.eval_fraction,
            "num_virtual_tokens": args.num_virtual_tokens, "projection": args.projection, "hidden": args.hidden,
            "dropout": args.dropout, "init_text": args.init_text,
            "init_from": str(args.init_from) if args.init_from else None}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)  # the one command, "train" (argparse requires it)
    return run_command(lambda: train_command(args), out=args.out)


if __name__ == "__main__":
    raise SystemExit(main())
