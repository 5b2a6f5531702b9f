"""Data-parallel scaling: a LoRA run on GPT-2 124M in one process against the same run in several.

    python benchmarks/bench_ddp.py [--quick] [--nproc 2] [--precision bf16] [--batch-size 4]

The same training (LoRA r=8 on c_attn, sequences of 128 random tokens, AdamW, `minigpt.train`) at the same
effective batch, started three ways:

  1 process,  1 thread,  batch b x nproc     the plain baseline
  1 process,  N threads, batch b x nproc     one process using every core through torch's threads
  N processes (torchrun's environment, gloo/nccl), 1 thread each, batch b each: minigpt's DDP path

Each run reports the median seconds of its optimizer steps after the first (timed in rank 0, from one loss
call of each step to the next), and the ratios print as speed-ups over the baseline. On N cores, N processes
of one thread each do the same arithmetic as one process of N threads; what they add is the gradient
all-reduce, what they save is the threads' synchronisation inside every operation.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(args) -> None:
    """One process of a run: train, then (rank 0) print the step times as JSON."""
    from minigpt import GPT, Example, TrainConfig, lm_loss_fn, processes, resolve_device, train
    from techniques.lora import apply_lora, lora_parameters
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model = GPT.from_pretrained(args.weights, device=device)
    apply_lora(model, r=8, alpha=16, targets=("c_attn",), verbose=False)
    model.train()
    g = torch.Generator().manual_seed(0)
    data = [Example(torch.randint(0, 50257, (args.seq_len,), generator=g).tolist(), [1] * args.seq_len)
            for _ in range(args.batch_size * processes().world_size * (args.steps + 1))]
    inner, starts = lm_loss_fn(model), []

    def loss_fn(batch):
        starts.append(time.perf_counter())  # one call per step (no accumulation): the step boundaries
        return inner(batch)
    config = TrainConfig(max_steps=args.steps + 1, batch_size=args.batch_size, lr=1e-4, precision=args.precision,
                         progress=False)
    train(lora_parameters(model), loss_fn, data, config=config)
    if processes().is_main:
        starts.append(time.perf_counter())
        print(json.dumps({"seconds": [b - a for a, b in zip(starts[1:], starts[2:])]}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, weights: str, nproc: int, threads: int, batch: int) -> float:
    """Median step seconds of one configuration, each process started as torchrun would start it."""
    cmd = [sys.executable, __file__, "--worker", "--weights", weights, "--threads", str(threads),
           "--batch-size", str(batch), "--steps", str(args.steps), "--precision", args.precision,
           "--seq-len", str(args.seq_len), "--device", args.device]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS=str(threads), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(nproc))
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(nproc)]
    outs = [p.communicate() for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("a worker failed:\n" + "\n".join(e[-2000:] for _, e in outs))
    return statistics.median(json.loads(outs[0][0].strip().splitlines()[-1])["seconds"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 timed steps of batch 2 x 64 per process")
    p.add_argument("--nproc", type=int, default=2, help="processes (and threads of the one-process run); default 2")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per process and step (default: 4)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps after the first (default: 5)")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per process)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.steps, args.batch_size, args.seq_len = 3, 2, 64
    from transformers import GPT2Config, GPT2LMHeadModel
    n, b = args.nproc, args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)).save_pretrained(tmp)
        print(f"GPT-2 124M shape, random weights; LoRA r=8 on c_attn; {args.precision}; effective batch {n * b} x "
              f"{args.seq_len} tokens; {args.steps} timed steps; {os.cpu_count()} CPU cores", flush=True)
        rows = [(f"1 process, 1 thread, batch {n * b}", run(args, tmp, 1, 1, n * b)),
                (f"1 process, {n} threads, batch {n * b}", run(args, tmp, 1, n, n * b)),
                (f"{n} processes x 1 thread, batch {b} each (DDP)", run(args, tmp, n, 1, b))]
    base = rows[0][1]
    tokens = n * b * args.seq_len
    print("\n| run | s / step | tokens / s | speed-up |\n|---|---:|---:|---:|")
    for name, sec in rows:
        print(f"| {name} | {sec:.3f} | {tokens / sec:.0f} | {base / sec:.2f}x |")


if __name__ == "__main__":
    main()
