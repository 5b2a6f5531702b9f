"""LoRA: minigpt against peft + transformers on the same random GPT-2 124M weights, in one run.

    python benchmarks/bench_lora.py [--quick] [--device cpu] [--threads N]

1. One training step (forward, backward, AdamW on A and B only; r=8 on c_attn,
   batch 8 x 128 by default), each side's natural path: minigpt's `lm_loss_fn`
   on our model with `apply_lora`, and `PeftModel(input_ids, attention_mask,
   labels)` on transformers' GPT2LMHeadModel. Reported: median seconds per step,
   steps/s, the ratio ours / peft (target >= 1.2x) and the peak memory a step
   adds above the loaded model (target: ours <= peft). Each side runs in its own
   subprocess so one side's allocations cannot count against the other; on CPU
   the peak is the resident set sampled every millisecond during the steps, on
   CUDA it is torch's max_memory_allocated.
2. Greedy decoding with minigpt: the base model, the model with LoRA unmerged,
   and after `merge_lora` (target: merged runs at base-model speed, ratio ~1.0).
Before timing, both sides are checked to compute the same loss on these weights.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from minigpt import GPT, generate, lm_loss_fn, resolve_device  # noqa: E402
from techniques.lora import apply_lora, lora_parameters, merge_lora  # noqa: E402


# ---- measuring -------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakMemory:
    """Peak bytes above the level at entry: torch's counter on CUDA, the sampled RSS on CPU."""

    def __init__(self, device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start, self.running = rss_bytes(), True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes() - self.start)
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.running = False
            self.thread.join()


def time_steps(step, n: int, device) -> tuple[float, int]:
    """(median seconds per step, peak extra bytes) over n steps, after one warm-up step."""
    step()
    sync(device)
    times = []
    with PeakMemory(device) as mem:
        for _ in range(n):
            t = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - t)
    return statistics.median(times), mem.peak


# ---- the two sides (each runs in its own process) --------------------------------------
def batch(args, device):
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, 50257, (args.batch_size, args.seq_len), generator=g).to(device)
    return ids, torch.ones_like(ids)


def worker_minigpt(args, device) -> dict:
    model = GPT.from_pretrained(args.weights, device=device)
    apply_lora(model, r=args.r, alpha=2 * args.r, targets=("c_attn",), verbose=False)
    model.train()
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-4)
    ids, mask = batch(args, device)
    loss_fn = lm_loss_fn(model)
    data = {"input_ids": ids, "attention_mask": mask, "loss_mask": mask}

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(data)
        loss.backward()
        opt.step()
        return loss

    model.eval()
    with torch.no_grad():
        first_loss = loss_fn(data).item()
    model.train()
    sec, peak = time_steps(step, args.steps, device)
    return {"sec": sec, "peak": peak, "loss": first_loss, **decode_speeds(args, device)}


def worker_peft(args, device) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(args.weights).to(device)
    pm = get_peft_model(hf, LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=["c_attn"],
                                       fan_in_fan_out=True, lora_dropout=0.0, task_type="CAUSAL_LM"))
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    ids, mask = batch(args, device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = pm(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        opt.step()
        return loss

    pm.eval()
    with torch.no_grad():
        first_loss = pm(input_ids=ids, attention_mask=mask, labels=ids).loss.item()
    pm.train()
    sec, peak = time_steps(step, args.steps, device)
    return {"sec": sec, "peak": peak, "loss": first_loss}


def decode_speeds(args, device) -> dict:
    """Greedy tokens/s: base, LoRA unmerged (B random so it is not a no-op), LoRA merged."""
    torch.manual_seed(args.seed)
    model = GPT.from_pretrained(args.weights, device=device).eval()
    prompt = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(1)).to(device)

    def tok_per_s():
        def run():
            with torch.no_grad():
                generate(model, prompt, max_new_tokens=args.new_tokens)
        sec, _ = time_steps(run, args.decode_repeats, device)
        return args.new_tokens / sec

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


def run_worker(side: str, args, weights: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--weights", str(weights), "--device", args.device,
           "--threads", str(args.threads), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len), "--r", str(args.r), "--new-tokens", str(args.new_tokens),
           "--decode-repeats", str(args.decode_repeats), "--seed", str(args.seed)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{side} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 timed steps and 16 decoded tokens (a few minutes on CPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default: auto)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads for both sides")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per side (default: 5)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32, help="tokens per decode measurement (default: 32)")
    p.add_argument("--decode-repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=["minigpt", "peft"], help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    if args.worker:
        result = (worker_minigpt if args.worker == "minigpt" else worker_peft)(args, device)
        print(json.dumps(result))
        return
    if args.quick:
        args.steps, args.new_tokens, args.decode_repeats = 2, 16, 2
    args.device = str(device)
    with tempfile.TemporaryDirectory() as tmp:
        make_weights(Path(tmp))
        print(f"GPT-2 124M shape, random weights; LoRA r={args.r} on c_attn; batch {args.batch_size} x "
              f"{args.seq_len}; AdamW; device {device}, {args.threads} threads; {args.steps} timed steps per side")
        ours = run_worker("minigpt", args, Path(tmp))
        theirs = run_worker("peft", args, Path(tmp))

    print(f"\nsame loss before training: minigpt {ours['loss']:.6f}, peft {theirs['loss']:.6f} "
          f"(|diff| {abs(ours['loss'] - theirs['loss']):.2e})")
    mb = 2 ** 20
    rows = [("s / training step", f"{ours['sec']:.3f}", f"{theirs['sec']:.3f}", f"{theirs['sec'] / ours['sec']:.2f}x"),
            ("steps / s", f"{1 / ours['sec']:.3f}", f"{1 / theirs['sec']:.3f}", f"{theirs['sec'] / ours['sec']:.2f}x"),
            ("peak extra memory (MiB)", f"{ours['peak'] / mb:.0f}", f"{theirs['peak'] / mb:.0f}",
             f"{ours['peak'] / max(theirs['peak'], 1):.2f} (ours/peft)")]
    print(f"\n{'':26s}{'minigpt':>12s}{'peft':>12s}{'ratio':>22s}")
    for name, a, b, r in rows:
        print(f"{name:26s}{a:>12s}{b:>12s}{r:>22s}")
    base = ours["decode_base"]
    print(f"\ngreedy decode, batch 1, {args.new_tokens} tokens (minigpt):")
    for name in ("base", "unmerged", "merged"):
        v = ours[f"decode_{name}"]
        print(f"  {name:10s}{v:8.1f} tok/s   {v / base:.2f}x base")


if __name__ == "__main__":
    main()
