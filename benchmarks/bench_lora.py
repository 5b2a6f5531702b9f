"""LoRA: minigpt against peft + transformers on the same random GPT-2 124M weights, in one run.

    python benchmarks/bench_lora.py [--quick] [--device cpu] [--threads N] [--profile] [--precisions fp32,bf16]

1. One training step (forward, backward, AdamW on A and B only; r=8 on c_attn,
   batch 8 x 128 by default), each side's natural path: minigpt's `lm_loss_fn`
   on our model with `apply_lora`, and `PeftModel(input_ids, attention_mask,
   labels)` on transformers' GPT2LMHeadModel, in each precision asked for: fp32,
   or the forward pass under the same torch.autocast (bf16/fp16) on both sides,
   with fp32 trained weights and AdamW state. minigpt's side runs as
   `techniques.lora train --precision bf16` does: its frozen Linears stored in
   bf16 once (`cast_frozen_linears`, bit-identical under autocast); peft's as a
   peft user with autocast would, casting them at every step.
   All sides live in this process and their steps alternate, so a busy machine
   slows them alike. Reported: median seconds per step, steps/s, the ratio
   (peft's time / ours in the same precision; target >= 1.2x), ours in bf16 /
   ours in fp32 (target >= 2x), and the peak memory one step adds above the
   loaded model (target: ours <= peft, the ratio ours / peft <= 1), measured for
   each side alone in a subprocess after a warm-up step: the bytes torch's
   allocator holds (exact; on CUDA max_memory_allocated) and, on CPU, the
   resident set sampled every millisecond (allocator caches and MKL's buffers
   included; noisier).
2. Greedy decoding with minigpt: the base model, the model with LoRA unmerged,
   and after `merge_lora` (target: merged runs at base-model speed, ratio ~1.0).
Before timing, both sides are checked to compute the same loss on these weights.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from minigpt import GPT, PRECISIONS, autocast, cast_frozen_linears, generate, lm_loss_fn, resolve_device  # noqa: E402
from techniques.lora import apply_lora, lora_parameters, merge_lora  # noqa: E402
from timing import device_sync, peak_memory, print_profile_split, profile_split, timed, timed_alternating  # noqa: E402


# ---- measuring -------------------------------------------------------------------------
def sync(device):
    device_sync(device)()


def batch(args, device):
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, 50257, (args.batch_size, args.seq_len), generator=g).to(device)
    return ids, torch.ones_like(ids)


def minigpt_side(args, device, precision="fp32"):
    """(training step, loss at the start) for our model with apply_lora, through minigpt's lm_loss_fn."""
    model = GPT.from_pretrained(args.weights, device=device)
    apply_lora(model, r=args.r, alpha=2 * args.r, targets=("c_attn",), verbose=False)
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-4)
    ids, mask = batch(args, device)
    loss_fn = lm_loss_fn(model)
    data = {"input_ids": ids, "attention_mask": mask, "loss_mask": mask}
    with torch.no_grad():
        first_loss = loss_fn(data).item()
    cast_frozen_linears(model, PRECISIONS[precision])  # what `techniques.lora train --precision bf16` does
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = loss_fn(data)
        loss.backward()
        opt.step()
    return step, first_loss


def peft_side(args, device, precision="fp32"):
    """(training step, loss at the start) for transformers' GPT2LMHeadModel with peft's LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(args.weights).to(device)
    pm = get_peft_model(hf, LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=["c_attn"],
                                       fan_in_fan_out=True, lora_dropout=0.0, task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    ids, mask = batch(args, device)
    pm.eval()
    with torch.no_grad():
        first_loss = pm(input_ids=ids, attention_mask=mask, labels=ids).loss.item()
    pm.train()

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = pm(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        opt.step()
    return step, first_loss


SIDES = {"minigpt": minigpt_side, "peft": peft_side}


def memory_worker(side: str, args, device) -> dict:
    """Peak memory one training step adds ({"allocated": bytes, "rss": bytes on CPU}), this side alone."""
    name, precision = side.split(":")
    step, _ = SIDES[name](args, device, precision)
    step()  # warm-up: AdamW state and allocator caches exist from here on
    sync(device)
    return peak_memory(step, device)


def step_times(args, device) -> tuple[dict, dict]:
    """Median seconds per step for every side and precision ("minigpt:bf16", ...), alternating steps so that
    a busy machine slows them alike."""
    steps, losses = {}, {}
    for precision in args.precisions:
        for side, make in SIDES.items():
            steps[f"{side}:{precision}"], losses[f"{side}:{precision}"] = make(args, device, precision)
    return timed_alternating(steps, args.steps, device_sync(device)), losses


def decode_speeds(args, device) -> dict:
    """Greedy tokens/s: base, LoRA unmerged (B random so it is not a no-op), LoRA merged."""
    torch.manual_seed(args.seed)
    model = GPT.from_pretrained(args.weights, device=device).eval()
    prompt = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(1)).to(device)

    def tok_per_s():
        def run():
            with torch.no_grad():
                generate(model, prompt, max_new_tokens=args.new_tokens)
        return args.new_tokens / timed(run, args.decode_repeats, device_sync(device))

    base = tok_per_s()
    apply_lora(model, r=args.r, alpha=2 * args.r, targets=("c_attn",), verbose=False)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(std=0.02)
    unmerged = tok_per_s()
    merge_lora(model)
    merged = tok_per_s()
    return {"decode_base": base, "decode_unmerged": unmerged, "decode_merged": merged}


# ---- driver ----------------------------------------------------------------------------
def make_weights(folder: Path):
    """Random GPT-2 124M weights saved by transformers (no download needed)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)).save_pretrained(folder)


def run_memory_worker(side: str, args) -> dict:
    cmd = [sys.executable, __file__, "--memory-worker", side, "--weights", str(args.weights), "--device", args.device,
           "--threads", str(args.threads), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--r", str(args.r), "--seed", str(args.seed)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{side} memory worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 timed steps per side, 16 decoded tokens (minutes on CPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default: auto)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    p.add_argument("--steps", type=int, default=6, help="timed training steps per side (default: 6)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32, help="tokens per decode measurement (default: 32)")
    p.add_argument("--decode-repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="also profile one step per side: matrix multiplies against the rest (CPU)")
    p.add_argument("--precisions", default="fp32,bf16",
                   help="comma-separated: fp32, bf16, fp16 (default: fp32,bf16; bf16/fp16 = autocast on both sides)")
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args, device)))
        return
    if args.quick:
        args.steps, args.new_tokens, args.decode_repeats = 3, 16, 2
    args.device = str(device)
    with tempfile.TemporaryDirectory() as tmp:
        args.weights = tmp
        make_weights(Path(tmp))
        print(f"GPT-2 124M shape, random weights; LoRA r={args.r} on c_attn; batch {args.batch_size} x "
              f"{args.seq_len}; AdamW; device {device}, {args.threads} threads; {args.steps} timed steps per side")
        sec, losses = step_times(args, device)
        split = None
        if args.profile:
            split = {p: profile_split({side: make(args, device, p)[0] for side, make in SIDES.items()})
                     for p in args.precisions}
        peak = {key: run_memory_worker(key, args) for key in sec}
        decode = decode_speeds(args, device)

    ours, theirs = "minigpt", "peft"
    print("\nsame loss before training: " + ", ".join(f"{k} {v:.6f}" for k, v in losses.items()))
    mb = 2 ** 20
    print(f"\n{'':34s}{'minigpt':>10s}{'peft':>10s}{'ratio':>22s}")
    for p in args.precisions:
        o, t = sec[f"{ours}:{p}"], sec[f"{theirs}:{p}"]
        rows = [(f"{p}: s / training step", f"{o:.3f}", f"{t:.3f}", f"{t / o:.2f}x (peft/ours)")]
        for key, label in (("allocated", "peak extra, allocated (MiB)"), ("rss", "peak extra, RSS (MiB)")):
            if key in peak[f"{ours}:{p}"]:
                a, b = peak[f"{ours}:{p}"][key], peak[f"{theirs}:{p}"][key]
                rows.append((f"{p}: {label}", f"{a / mb:.0f}", f"{b / mb:.0f}", f"{a / max(b, 1):.2f} (ours/peft)"))
        for name, a, b, r in rows:
            print(f"{name:34s}{a:>10s}{b:>10s}{r:>22s}")
    for p in args.precisions:
        if p != "fp32" and "fp32" in args.precisions:
            print(f"{p} step vs fp32 step: minigpt {sec[f'{ours}:fp32'] / sec[f'{ours}:{p}']:.2f}x, "
                  f"peft {sec[f'{theirs}:fp32'] / sec[f'{theirs}:{p}']:.2f}x (target for minigpt: >= 2x)")
    print("(allocated: torch's allocator, exact; RSS: the resident set sampled every ms, noisier)")
    for p, sp in (split or {}).items():
        print(f"\n{p}:", end="")
        print_profile_split(sp)
    base = decode["decode_base"]
    print(f"\ngreedy decode, batch 1, {args.new_tokens} tokens (minigpt):")
    for name in ("base", "unmerged", "merged"):
        v = decode[f"decode_{name}"]
        print(f"  {name:10s}{v:8.1f} tok/s   {v / base:.2f}x base")


if __name__ == "__main__":
    main()
