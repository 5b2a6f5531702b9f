"""What every command line shares: model options, training options, and one error policy.

The commands (`python -m minigpt`, `python -m techniques.lora|prefix|pplm`,
the demos) are thin: they parse arguments with the helpers here, call the
library, and print. They all fail the same way, through `run_command`:

- a user's mistake (a bad option, a missing or damaged file, a prompt that does
  not fit, a loss that diverges) is one line on stderr, `error: ...`, naming
  the file or option and the fix, and exit code 2, never a traceback;
- Ctrl-C is one line and exit code 130; every save replaces its folder as a
  whole (minigpt/io.py), so even a kill leaves the old folder or the new one;
- anything else is a bug in the project and keeps its traceback.

Library functions signal a user's mistake with ValueError (bad values),
OSError (FileNotFoundError, PermissionError, ...: files) or FloatingPointError
(a diverging loss), with a message that already names the problem and the fix.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from . import distributed
from .device import resolve_device
from .model import GPT
from .training import TrainConfig, TrainingInterrupted, plan_steps, resolve_precision, split_examples

__all__ = ["add_model_args", "model_from_args", "add_dtype_arg", "DTYPES", "add_train_args", "add_precision_arg",
           "add_scale_args", "train_config_from_args",
           "split_from_args", "describe_plan", "run_command", "fail", "USER_ERRORS", "positive_int", "is_main_process",
           "CHECKPOINT_DIR", "add_adapter_args", "check_adapter_args", "COMBINE_CHOICES", "float_list"]

CHECKPOINT_DIR = "train_state"  # --save-every writes OUT/train_state/
PRECISION_NOTE = ("a LoRA step on GPT-2 124M measured 1.7x faster in bf16 than in fp32 on a 2-core AVX512-BF16 CPU, "
                  "and 1.1x on the bundled tiny model")

# What a user's mistake raises (see the module docstring); everything else is a bug.
USER_ERRORS = (ValueError, OSError, FloatingPointError)


# ---- the error policy -----------------------------------------------------------------------
def fail(message: str, code: int = 2):
    """Print a one-line error (no traceback) and exit: for user mistakes."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_command(command: Callable[[], object], *, out: Optional[str] = None) -> int:
    """Run a command's body under the error policy; returns the exit code.

    `out` is the folder the command writes, if any: the messages then say
    that nothing was saved there (saves happen last, and atomically).
    Under torchrun every process runs the command; rank 0 alone prints (the
    others' standard output is dropped), and an error names the process it
    happened in.
    """
    nothing = f"; nothing was saved to {out}" if out else ""
    who = ""
    try:
        procs = distributed.processes()
        who = f"[rank {procs.rank}] " if procs.several else ""
        with contextlib.redirect_stdout(io.StringIO()) if not procs.is_main else contextlib.nullcontext():
            command()
    except USER_ERRORS as e:
        message = str(e) or type(e).__name__
        print(f"{who}error: {message}{nothing}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"{who}{e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"{who}interrupted{nothing}", file=sys.stderr)
        return 130
    finally:
        distributed.teardown()
    return 0


def is_main_process() -> bool:
    """True in a plain run, and in rank 0 of a torchrun: the process that saves."""
    return distributed.processes().is_main


def positive_int(text: str) -> int:
    """argparse type for counts that must be >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


# ---- the model ------------------------------------------------------------------------------
def add_model_args(parser: argparse.ArgumentParser, default_model: str = "gpt2") -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=default_model,
                   help="tiny (the small model bundled with the package, offline), or a GPT-2 size from the "
                        "Hugging Face cache: gpt2, gpt2-medium, gpt2-large, gpt2-xl, downloaded once if online "
                        f"(default: {default_model})")
    g.add_argument("--weights", metavar="DIR",
                   help="a local folder with config.json + model.safetensors (Hugging Face layout); overrides --model")
    g.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default: auto = cuda, then mps, then cpu)")
    g.add_argument("--seed", type=int, default=0,
                   help="random seed, for reproducible sampling and training (default: 0)")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_dtype_arg(parser: argparse.ArgumentParser) -> None:
    """--dtype, for commands that only run the model (generation): the weights' own dtype, no autocast."""
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                        help="the weights' dtype for generation: fp32 (default, exact), bf16 or fp16 (half the "
                             "memory and of the bytes each decoding step reads; fp16 is for GPUs: CPUs compute it "
                             "slowly)")


def model_from_args(args, dtype: str = "fp32") -> GPT:
    """Load the model the arguments name in `dtype` (a DTYPES key), put it on the chosen device, seed torch."""
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    model = GPT.from_pretrained(args.weights or args.model, device=device, dtype=DTYPES[dtype])
    return model.eval()


# ---- adapters to merge (minigpt generate, techniques.lora merge) -----------------------------
COMBINE_CHOICES = ("linear", "cat", "svd")  # techniques.lora.COMBINATIONS (tests/test_merge_cli.py checks they agree)


def float_list(text: str) -> list[float]:
    """argparse type for comma-separated numbers such as 0.5,0.5."""
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.5,0.5, got {text!r}") from None


def add_adapter_args(parser: argparse.ArgumentParser, *, what: str = "apply") -> None:
    """The adapter options that `minigpt generate` and `techniques.lora merge` share, defined once:
    --lora (repeat it), --lora-weights, --combine, and --mtl-lora with --task. The commands hand them to
    `techniques.lora.load_combined` and `techniques.lora.load_merged_mtl` (checked by `check_adapter_args`)."""
    g = parser.add_argument_group("adapters")
    g.add_argument("--lora", metavar="DIR", action="append",
                   help=f"a LoRA adapter folder (peft format) to {what}; repeat it to combine several adapters "
                        "into one (see --lora-weights, --combine)")
    g.add_argument("--lora-weights", metavar="W1,W2,...", type=float_list, default=None,
                   help="one weight per --lora folder, comma-separated; negative ones subtract (default: 1 each)")
    g.add_argument("--combine", choices=COMBINE_CHOICES, default="linear",
                   help="how several --lora adapters become one, as peft's add_weighted_adapter: linear (same rank: "
                        "A, B summed with sqrt(w s) each), cat (exact sum of w_i s_i B_i A_i at rank sum r_i), svd "
                        "(best rank-max r_i approximation of that sum); default linear")
    g.add_argument("--mtl-lora", metavar="DIR", help="an MTL-LoRA folder (techniques.lora train --mtl); its --task "
                   "is merged into the weights")
    g.add_argument("--task", metavar="NAME", help="with --mtl-lora: the task to merge (a name from its task list, "
                   "or an id)")


def check_adapter_args(args) -> None:
    """The checks on add_adapter_args' options that need no file: each one with what it goes with."""
    if args.lora_weights is not None and not args.lora:
        raise ValueError("--lora-weights needs --lora folders to weigh")
    if (args.mtl_lora is None) != (args.task is None):
        raise ValueError("--mtl-lora and --task go together: give the MTL-LoRA folder and the task to use")


# ---- training -------------------------------------------------------------------------------
def add_train_args(parser: argparse.ArgumentParser, *, lr: Optional[float], lr_help: str = "",
                   epochs: int = 1, batch_size: int = 8, eval_every: int = 50, eval_fraction: float = 0.1,
                   weight_decay: float = 0.0) -> None:
    """The training options every training command shares, with the same names and help."""
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=positive_int, default=epochs,
                   help=f"passes over the training examples (default: {epochs}); ignored when --max-steps is given")
    g.add_argument("--max-steps", type=positive_int, default=None,
                   help="train exactly this many optimizer steps, going over the data as many times as that "
                        "takes (overrides --epochs)")
    g.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help=f"examples per optimizer step (default: {batch_size})")
    g.add_argument("--lr", type=float, default=lr,
                   help=f"AdamW peak learning rate (default: {lr_help or lr})")
    g.add_argument("--warmup-steps", type=int, default=0,
                   help="steps of linear warmup to the peak learning rate, then linear decay to 0 (default: 0)")
    g.add_argument("--weight-decay", type=float, default=weight_decay,
                   help=f"AdamW weight decay (default: {weight_decay:g})")
    g.add_argument("--eval-fraction", type=float, default=eval_fraction,
                   help=f"share of the examples held out for the eval loss, in [0, 1); 0 = none "
                        f"(default: {eval_fraction:g})")
    g.add_argument("--eval-every", type=positive_int, default=eval_every,
                   help=f"steps between eval losses; one is also taken at the end (default: {eval_every})")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_scale_args(g)


def add_scale_args(parser, precision: str = "auto", precision_note: str = PRECISION_NOTE) -> None:
    """--precision, --grad-accum, --save-every and --resume: what every training command shares for long runs."""
    g = parser
    add_precision_arg(g, precision, precision_note)
    g.add_argument("--grad-accum", type=positive_int, default=1, metavar="N",
                   help="micro-batches of --batch-size summed into each optimizer step: the effective batch is "
                        "batch size x N x processes, the memory that of one micro-batch (default: 1)")
    g.add_argument("--save-every", type=positive_int, default=None, metavar="K",
                   help="every K steps, checkpoint the whole training state (weights, optimizer, schedule, random "
                        f"generators, data position) into OUT/{CHECKPOINT_DIR}, atomically; Ctrl-C keeps the last "
                        "one (default: no checkpoints)")
    g.add_argument("--resume", metavar="DIR",
                   help=f"continue the run checkpointed in DIR (OUT/{CHECKPOINT_DIR} of an earlier run) exactly where "
                        "it stopped; give the same command and options")


def add_precision_arg(parser, default: str = "auto", note: str = PRECISION_NOTE) -> None:
    """--precision, with the same help everywhere (and what was measured, for the default)."""
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=default,
                        help="the forward pass's arithmetic: fp32, or bf16/fp16 autocast (the trained weights and "
                             "AdamW's state stay fp32; fp16 adds loss scaling). auto = bf16 on a CUDA GPU that "
                             "supports it and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32"
                             + (f"; {note}" if note else "") + f" (default: {default})")


def train_config_from_args(args, **overrides) -> TrainConfig:
    """A TrainConfig from add_train_args' options (and --seed); `overrides` win (e.g. a default lr)."""
    if not 0.0 <= args.eval_fraction < 1.0:
        raise ValueError(f"--eval-fraction must be in [0, 1), got {args.eval_fraction}")
    if args.warmup_steps < 0:
        raise ValueError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if args.weight_decay < 0:
        raise ValueError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    out = getattr(args, "out", None)
    if args.save_every and not out:
        raise ValueError("--save-every needs --out: the checkpoints go into OUT/" + CHECKPOINT_DIR)
    if args.resume and not Path(args.resume).is_dir():
        raise FileNotFoundError(f"--resume {args.resume}: no such folder; give OUT/{CHECKPOINT_DIR} of the run "
                                "to continue")
    values = dict(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                  weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, eval_every=args.eval_every,
                  seed=args.seed, progress=not args.no_progress,
                  precision=resolve_precision(args.precision, resolve_device(getattr(args, "device", "auto"))),
                  grad_accum=args.grad_accum, save_every=args.save_every, resume_from=args.resume,
                  checkpoint_dir=str(Path(out) / CHECKPOINT_DIR) if out else None)
    values.update(overrides)
    if values["lr"] is None or values["lr"] <= 0:
        raise ValueError(f"--lr must be > 0, got {values['lr']}")
    return TrainConfig(**values)


def split_from_args(examples: Sequence, args) -> tuple[list, list]:
    """Training and eval examples as --eval-fraction says (0: all of them train, no eval loss)."""
    if not args.eval_fraction:
        return list(examples), []
    if len(examples) < 2:
        raise ValueError(f"only {len(examples)} example: too few to hold out an eval share; add data "
                         "or pass --eval-fraction 0")
    return split_examples(list(examples), args.eval_fraction, args.seed)


def describe_plan(n_train: int, n_eval: int, config: TrainConfig, world_size: Optional[int] = None) -> str:
    """One line, printed before training starts: the real number of steps and what it means, the effective
    batch (batch x accumulation x processes), the precision, and the checkpoints."""
    world = distributed.processes().world_size if world_size is None else world_size
    steps, epochs = plan_steps(n_train, config, world)
    per_step = config.batch_size * config.grad_accum * world
    per_epoch = -(-n_train // per_step)
    shown = f"{epochs:.2f}".rstrip("0").rstrip(".") if epochs >= 0.01 else f"{epochs:.1g}"  # 3, 1.5, 1.33, 0.003
    batch = f"batch {config.batch_size}"
    if per_step != config.batch_size:
        batch += (f" x {config.grad_accum} accumulated" if config.grad_accum > 1 else "") + \
                 (f" x {world} processes" if world > 1 else "") + f" = {per_step} examples per step"
    precision = {"fp32": "fp32", "bf16": "bf16 autocast (trainable weights and AdamW state fp32)",
                 "fp16": "fp16 autocast with loss scaling (trainable weights and AdamW state fp32)"}[config.precision]
    line = (f"training {steps} step{'s' if steps != 1 else ''} ({shown} epoch{'s' if epochs != 1 else ''} of "
            f"{per_epoch} step{'s' if per_epoch != 1 else ''}, {batch}) on {n_train} examples"
            + (f"; eval loss on {n_eval} held-out examples" if n_eval else "; no eval split") + f"; {precision}")
    if config.save_every:
        line += f"; a checkpoint every {config.save_every} steps in {config.checkpoint_dir}"
    if config.resume_from:
        line += f"; resuming from {config.resume_from}"
    return line
