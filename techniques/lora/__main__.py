"""python -m techniques.lora train | merge: LoRA fine-tuning of GPT-2 from the command line.

    train  LoRA on a .txt or prompt/completion .jsonl file; saves a peft-format adapter
           (adapter_config.json + adapter_model.safetensors) and history.json in --out,
           only once training has finished. --mtl --tasks a,b,c --data A --data B --data C trains
           one MTL-LoRA over three tasks (one file each; batches mix them), saved by save_mtl_lora.
           --quantize nf4 is QLoRA: the blocks' frozen
           Linears stored in 4-bit NF4 (double-quantised absmaxes unless --no-double-quant).
    merge  fold an adapter into the weights (W0 <- W0 + (alpha/r)·B·A) and save a plain checkpoint;
           --lora A --lora B --lora-weights wA,wB --combine linear|cat|svd combines several first (peft's
           add_weighted_adapter), --mtl-lora DIR --task T folds one MTL-LoRA task in: the options and the
           loaders are those of `minigpt generate` (minigpt.cli.add_adapter_args), so the saved model is
           the one generate runs. --quantize nf4 merges into the dequantised 4-bit W0' the adapter was
           trained on.

The options shared with the other commands (model, training) come from
`minigpt.cli`, and so does the error policy: a user's mistake is one line
`error: ...` and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse

from minigpt import cast_frozen_linears, get_tokenizer, lm_loss_fn, load_lm_data, resolve_device, save_history, train
from minigpt.cli import (add_adapter_args, add_model_args, add_train_args, check_adapter_args, describe_plan,
                         is_main_process, model_from_args, positive_int, run_command, split_from_args,
                         train_config_from_args)

from .lora import apply_lora, lora_parameters, lora_summary, merge_lora
from .mtl import apply_mtl_lora, collate_mtl, mtl_loss_fn, mtl_modules, mtl_parameters, task_examples
from .mtl_files import load_merged_mtl, save_mtl_lora
from .named import load_combined
from .nf4 import quantize_base
from .peft_files import save_adapter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m techniques.lora", description="LoRA fine-tuning of GPT-2.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a LoRA adapter on a text or prompt/completion file",
                       description="Train LoRA on --data and save a peft-format adapter in --out.")
    t.add_argument("--data", required=True, metavar="FILE", action="append",
                   help=".txt (cut into blocks) or .jsonl with 'prompt' and 'completion' fields; with --mtl, "
                        "repeat it: one file per task, in --tasks order")
    t.add_argument("--block-size", type=positive_int, default=128, help="tokens per training sequence (default: 128)")
    t.add_argument("--out", required=True, metavar="DIR", help="where adapter_config.json, "
                   "adapter_model.safetensors and history.json go (written only once training has finished)")
    add_model_args(t)
    lora = t.add_argument_group("LoRA")
    lora.add_argument("--r", "--rank", type=int, default=8,
                      help="rank of B·A (default: 8); under torchrun write --rank, since torchrun's own parser "
                           "reads --r as an abbreviation of its --rdzv-*/--role/... options and stops")
    lora.add_argument("--alpha", type=float, default=16, help="scaling numerator: s = alpha/r (default: 16)")
    lora.add_argument("--dropout", type=float, default=0.0, help="dropout on the LoRA branch's input (default: 0)")
    lora.add_argument("--targets", default="c_attn",
                      help="comma-separated: c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj, c_proj (default: c_attn)")
    lora.add_argument("--qkv", default=None,
                      help="adapt q/k/v of c_attn separately, e.g. qv (default: c_attn whole)")
    lora.add_argument("--rslora", action="store_true", help="rank-stabilised scaling alpha/sqrt(r)")
    lora.add_argument("--dora", action="store_true",
                      help="DoRA (Liu et al. 2024): also train a magnitude per output, W' = m·(W0 + s·B·A)/||·||; "
                           "saved with use_dora: true, as peft does")
    add_quantize_args(lora)
    mtl = t.add_argument_group("MTL-LoRA (multi-task, Yang et al. 2025; techniques/lora/mtl.py)")
    mtl.add_argument("--mtl", action="store_true",
                     help="train one MTL-LoRA over several tasks: shared A and B^i, a Λ_t and mixing weights w_t "
                          "per task; every example carries its task's id, and batches mix tasks")
    mtl.add_argument("--tasks", metavar="NAME,NAME,...",
                     help="with --mtl: the task names, comma-separated, one per --data file (ids 0, 1, ... in this "
                          "order; `minigpt generate --mtl-lora OUT --task NAME` picks one)")
    mtl.add_argument("--n-up", type=positive_int, default=3, help="with --mtl: up-projections B^i (default: 3)")
    mtl.add_argument("--tau", type=float, default=1.0,
                     help="with --mtl: temperature of softmax(w_t/τ) (default: 1.0, as the official code)")
    mtl.add_argument("--full-lambda", action="store_true",
                     help="with --mtl: a full r x r Λ_t per task (default: its diagonal, as the paper)")
    add_train_args(t, lr=2e-4, lr_help="2e-4")

    m = sub.add_parser("merge", help="fold adapters into the weights and save a plain checkpoint",
                       description="Load --model/--weights, apply the adapters (--lora DIR, repeated to combine "
                                   "several with --lora-weights and --combine, as `minigpt generate` does; or "
                                   "--mtl-lora DIR --task T), merge them into W0 and save_pretrained to --out: "
                                   "the model `minigpt generate` runs with the same options.")
    m.add_argument("--out", required=True, metavar="DIR", help="where the merged config.json + model.safetensors go")
    add_model_args(m)
    add_adapter_args(m, what="merge")
    add_quantize_args(m, merging=True)
    return p


def add_quantize_args(parser, merging: bool = False) -> None:
    """--quantize none|nf4 and --no-double-quant: QLoRA's 4-bit base (techniques/lora/nf4.py)."""
    parser.add_argument("--quantize", choices=("none", "nf4"), default="none",
                        help="merge into the base as the adapter saw it in training: the NF4-dequantised W0' "
                             "(default: none, the full-precision W0)" if merging else
                        "QLoRA: store the frozen Linears of the blocks in 4-bit NF4, dequantised on the fly "
                        "(about 1/7.75 of their fp32 bytes); LoRA trains on top in full precision (default: none)")
    parser.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                        help="with --quantize nf4: keep each block's absmax in fp32 (4.5 bits per weight) instead "
                             "of double-quantising them to 8 bits (4.127 bits per weight)")


def check_quantize_args(args) -> None:
    if args.quantize != "nf4" and not args.double_quant:
        raise ValueError("--no-double-quant applies to --quantize nf4 only")


def load_model(args):
    """model_from_args, and with --quantize nf4 the blocks' Linears in 4-bit NF4 (before any adapter goes on).
    The full-precision model is then loaded into host memory and quantised onto the device layer by layer,
    so the device never holds it whole (gpt2-xl: 6.2 GB in fp32, 1.1 GB with a 4-bit base)."""
    if args.quantize != "nf4":
        return model_from_args(args)
    device = resolve_device(args.device)
    model = model_from_args(argparse.Namespace(**{**vars(args), "device": "cpu"}))
    quantize_base(model, double_quant=args.double_quant, device=device)
    return model.to(device)


def mtl_task_names(args) -> list[str]:
    """--tasks, checked against --data (one file per task) and the options MTL-LoRA does not combine with."""
    if not args.mtl:
        if args.tasks is not None:
            raise ValueError("--tasks needs --mtl (multi-task LoRA)")
        if len(args.data) != 1:
            raise ValueError(f"{len(args.data)} --data files given: plain LoRA trains on one (several: --mtl)")
        return []
    if not args.tasks:
        raise ValueError("--mtl needs --tasks NAME,NAME,...: one task name per --data file")
    tasks = [t.strip() for t in args.tasks.split(",")]
    if not all(tasks) or len(set(tasks)) != len(tasks):
        raise ValueError(f"--tasks {args.tasks!r}: give distinct, non-empty names, comma-separated")
    if len(tasks) != len(args.data):
        raise ValueError(f"--tasks names {len(tasks)} task(s) but {len(args.data)} --data file(s) are given: "
                         "one file per task, in the same order")
    for flag, on in (("--qkv", args.qkv), ("--rslora", args.rslora), ("--dora", args.dora),
                     ("--dropout", args.dropout), ("--quantize nf4", args.quantize != "none")):
        if on:
            raise ValueError(f"{flag} is not implemented for --mtl; leave it out")
    if not args.tau > 0:
        raise ValueError(f"--tau must be > 0 (got {args.tau})")
    return tasks


def train_command(args) -> None:
    config = train_config_from_args(args)  # checks the training options before anything is loaded
    check_quantize_args(args)
    tasks = mtl_task_names(args)
    if args.mtl:
        return train_mtl(args, config, tasks)
    examples = load_lm_data(args.data[0], get_tokenizer(), args.block_size)
    model = load_model(args)  # QLoRA: 4-bit W0 first, so the adapter (and DoRA's m) starts from W0'
    if args.block_size > model.config.n_positions:
        raise ValueError(f"--block-size {args.block_size} exceeds the model's n_positions {model.config.n_positions}")
    apply_lora(model, r=args.r, alpha=args.alpha, dropout=args.dropout,
               targets=[t.strip() for t in args.targets.split(",") if t.strip()], qkv=args.qkv, rslora=args.rslora,
               use_dora=args.dora, verbose=False)
    cast_frozen_linears(model, config.autocast_dtype)  # bf16/fp16: the frozen W0 stored as autocast would cast it
    # (it casts nn.Linear only: NF4 layers stay 4-bit, and their W0' is dequantised in fp32, then cast by autocast)
    train_set, eval_set = split_from_args(examples, args)
    print(lora_summary(model))
    print(describe_plan(len(train_set), len(eval_set), config), flush=True)
    model.train()  # dropout on for the steps; `train` puts eval_modules in eval mode for the eval losses
    history = train(lora_parameters(model), lm_loss_fn(model), train_set, eval_examples=eval_set, config=config,
                    eval_modules=[model], run_info=run_info(args))
    model.eval()
    if not is_main_process():
        return  # under torchrun rank 0 saves; every process holds the same weights
    save_adapter(model, args.out)  # only now, after the last step: an interrupted run writes only checkpoints
    save_history(history, args.out)
    last = history[-1]
    print(f"saved LoRA adapter to {args.out} after {len(history)} steps; last loss {last['loss']:.4f}"
          + (f", eval loss {last['eval_loss']:.4f}" if "eval_loss" in last else ""))


def train_mtl(args, config, tasks: list[str]) -> None:
    """--mtl: one MTL-LoRA on the tasks' files, mixed; saved by save_mtl_lora (adapter_config.json MTL_LORA)."""
    tok = get_tokenizer()
    per_task = [load_lm_data(path, tok, args.block_size) for path in args.data]
    model = load_model(args)
    if args.block_size > model.config.n_positions:
        raise ValueError(f"--block-size {args.block_size} exceeds the model's n_positions {model.config.n_positions}")
    apply_mtl_lora(model, len(tasks), targets=[t.strip() for t in args.targets.split(",") if t.strip()], r=args.r,
                   alpha=args.alpha, n_up=args.n_up, tau=args.tau, full_lambda=args.full_lambda)
    cast_frozen_linears(model, config.autocast_dtype)
    train_set, eval_set = split_from_args(task_examples(per_task), args)
    n = sum(p.numel() for p in mtl_parameters(model))
    print(f"MTL-LoRA: {len(mtl_modules(model))} layers, {len(tasks)} tasks ({', '.join(tasks)}), r={args.r}, "
          f"n_up={args.n_up}, tau={args.tau}; {n:,} trainable parameters; "
          + ", ".join(f"{name}: {len(ex)} examples" for name, ex in zip(tasks, per_task)))
    print(describe_plan(len(train_set), len(eval_set), config), flush=True)
    model.train()
    history = train(mtl_parameters(model), mtl_loss_fn(model), train_set, eval_examples=eval_set, config=config,
                    collate_fn=collate_mtl, eval_modules=[model], run_info=run_info(args))
    model.eval()
    if not is_main_process():
        return
    save_mtl_lora(model, args.out, tasks)
    save_history(history, args.out)
    last = history[-1]
    print(f"saved MTL-LoRA ({', '.join(tasks)}) to {args.out} after {len(history)} steps; last loss "
          f"{last['loss']:.4f}" + (f", eval loss {last['eval_loss']:.4f}" if "eval_loss" in last else ""))


def run_info(args) -> dict:
    """What a resumed run must share with the checkpoint, besides the training options: the model, the data,
    LoRA's shape."""
    data = args.data if isinstance(args.data, str) else ",".join(map(str, args.data))  # one file: as before
    info = {"command": "techniques.lora train", "model": args.weights or args.model, "data": data,
            "block_size": args.block_size, "eval_fraction": args.eval_fraction, "r": args.r, "alpha": args.alpha,
            "dropout": args.dropout, "targets": args.targets, "qkv": args.qkv, "rslora": args.rslora,
            "dora": args.dora, "quantize": quantize_name(args)}
    if getattr(args, "mtl", False):  # only MTL runs carry these, so plain LoRA checkpoints resume as before
        info.update(mtl=True, tasks=args.tasks, n_up=args.n_up, tau=args.tau, full_lambda=args.full_lambda)
    return info


def quantize_name(args):
    """None (no quantisation: what checkpoints from before --quantize hold), 'nf4' or 'nf4+double-quant'."""
    return None if args.quantize == "none" else "nf4" + ("+double-quant" if args.double_quant else "")


def merge_command(args) -> None:
    """The model `minigpt generate` builds from the same adapter options (the same two loaders), saved."""
    check_quantize_args(args)
    check_adapter_args(args)
    if not args.lora and not args.mtl_lora:
        raise ValueError("nothing to merge: give --lora DIR (repeat it to combine several) or --mtl-lora DIR --task T")
    if args.mtl_lora and args.quantize != "none":
        raise ValueError("--quantize nf4 is for LoRA adapters trained on a 4-bit base (QLoRA); MTL-LoRA trains on "
                         "the full-precision W0, so leave --quantize out")
    model = load_model(args)
    done = []
    if args.lora:
        model = merge_lora(load_combined(model, args.lora, args.lora_weights, args.combine))
        done.append(args.lora[0] if len(args.lora) == 1 else
                    f"{len(args.lora)} LoRA adapters ({args.combine}, weights "
                    f"{','.join(f'{w:g}' for w in args.lora_weights or [1.0] * len(args.lora))})")
    if args.mtl_lora:
        model = load_merged_mtl(model, args.mtl_lora, args.task)
        done.append(f"task {args.task!r} of {args.mtl_lora}")
    model.save_pretrained(args.out)
    print(f"merged {' and '.join(done)} into the weights; saved to {args.out}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    body = train_command if args.command == "train" else merge_command
    return run_command(lambda: body(args), out=args.out)


if __name__ == "__main__":
    raise SystemExit(main())
