"""Prefix-Tuning+ against prefix tuning and LoRA: one training step's time and peak memory, same model, same batch.

    python benchmarks/bench_prefix_plus.py [--quick] [--tiny] [--threads N] [--device cpu|cuda] [--precision fp32|bf16]

On a random model of GPT-2 124M's shape (transformers' GPT2Config() saved and loaded through minigpt's loader),
one AdamW step (forward, loss, backward, update of the adapter only, the model frozen) of each, all ours:

- prefix tuning, P virtual tokens, direct (P_theta) and MLP-reparametrised (width 512);
- Prefix-Tuning+ on every layer (M per layer and head, [hs, hs]);
- LoRA on q and v of every c_attn, rank r.

By default the counts are matched to Prefix-Tuning+'s L·d·hs = 589,824 (r = hs/4 = 16, P = hs/2 = 32), as in
demos/projects/prefix_compare.py. Time: the minimum over rounds taken in turns (the order flips every round);
memory: the peak bytes one step adds above the loaded model and the optimizer state (torch's allocator:
CUDA's counters, or on CPU every allocation the profiler records), each method alone in a subprocess after a
warm-up step. Ratios are each method / Prefix-Tuning+. Before timing, it checks that each adapter at its
initialisation leaves the frozen model's logits unchanged (LoRA's B = 0, M = 0; a prefix changes them by design).
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minigpt import GPT, PRECISIONS, autocast, causal_lm_loss  # noqa: E402
from techniques.lora import apply_lora, lora_parameters  # noqa: E402
from techniques.prefix import PrefixTuning, PrefixTuningPlus  # noqa: E402
from timing import device_sync, peak_memory, timed_alternating  # noqa: E402

METHODS = ("prefix (direct)", "prefix (MLP)", "Prefix-Tuning+", "LoRA")


def make_batch(B: int, T: int, device, seed: int = 0):
    """Right-padded rows of lengths T, T-4, ...: ids, attention mask, loss mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50257, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        mask[b, max(2, T - 4 * b):] = 0
    return ids.masked_fill(mask == 0, 50256).to(device), mask.to(device), mask.clone().to(device)


def build(base: GPT, method: str, r: int, P: int):
    """(model to run, trainable parameters, prefix or None) for one method, on a copy where it wraps modules."""
    torch.manual_seed(0)
    if method == "LoRA":
        m = apply_lora(copy.deepcopy(base), r=r, alpha=2 * r, targets=["c_attn"], qkv="qv", verbose=False).eval()
        return m, lora_parameters(m), None
    if method == "Prefix-Tuning+":
        m = copy.deepcopy(base)
        return m.eval(), PrefixTuningPlus(m).trainable_parameters(), None
    prefix = PrefixTuning(base.config, P, projection=method == "prefix (MLP)", hidden_size=512).to(base.device)
    return base, list(prefix.parameters()), prefix


def make_step(model, params, prefix, ids, mask, loss_mask, precision):
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step():
        with autocast(ids.device, precision):
            if prefix is not None:
                past, m = prefix.inputs_for(ids, mask)
                logits = model(ids, past_key_values=past, attention_mask=m).logits
            else:
                logits = model(ids, attention_mask=mask).logits
            loss = causal_lm_loss(logits, ids, loss_mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def load_base(folder, device) -> GPT:
    return GPT.from_pretrained(str(folder), device=device).eval().requires_grad_(False)


def memory_worker(args) -> dict:
    device = torch.device(args.device)
    base = load_base(args.weights, device)
    ids, mask, loss_mask = make_batch(*shape(args), device, args.seed)
    step = make_step(*build(base, args.memory_worker, args.r, args.P), ids, mask, loss_mask, args.precision)
    step()   # warm-up: AdamW state and allocator caches exist from here on
    device_sync(device)()
    return peak_memory(step, device)


def run_memory_worker(method: str, args, folder) -> dict:
    if args.tiny:   # a smoke run: the same worker, in this process (a subprocess per method costs seconds of imports)
        return memory_worker(argparse.Namespace(**{**vars(args), "memory_worker": method, "weights": str(folder)}))
    cmd = [sys.executable, __file__, "--memory-worker", method, "--weights", str(folder), "--device", args.device,
           "--threads", str(args.threads), "--r", str(args.r), "--P", str(args.P), "--seed", str(args.seed),
           "--precision", args.precision] + (["--quick"] if args.quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{method} memory worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def shape(args) -> tuple[int, int]:
    return (2, 32) if args.quick else (4, 128)


TINY = dict(n_positions=128, n_embd=64, n_layer=2, n_head=4)   # --tiny: seconds, for the test; not a measurement


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 2 x 32, 3 rounds (about a minute on 2 busy cores)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model instead of 124M's shape (a smoke "
                   "run in seconds; its numbers measure nothing), with --r and --P matched to its count and "
                   "the memory workers run in this process")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS), help="autocast precision (fp32)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (default 16 = hs/4: Prefix-Tuning+'s count)")
    p.add_argument("--P", type=int, default=32, help="prefix length (default 32 = hs/2: Prefix-Tuning+'s count)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(args)))
        return
    from transformers import GPT2Config, GPT2LMHeadModel
    device = torch.device(args.device)
    sync = device_sync(device)
    torch.manual_seed(args.seed)
    folder = Path(tempfile.mkdtemp(prefix="bench-prefix-plus-"))
    GPT2LMHeadModel(GPT2Config(**(TINY if args.tiny else {}))).save_pretrained(folder)   # random weights
    base = load_base(folder, device)
    if args.tiny:   # the matched counts for hs = 16: r = hs/4, P = hs/2
        hs = base.config.n_embd // base.config.n_head
        args.r, args.P = hs // 4, hs // 2
    B, T = shape(args)
    ids, mask, loss_mask = make_batch(B, T, device, args.seed)
    repeats = 3 if args.quick else 5
    print(f"{'tiny (2 x 64)' if args.tiny else 'GPT-2 124M'} shape, random weights, {device}, {args.threads} threads, "
          f"{args.precision}; batch {B} x {T} (right-padded); LoRA r={args.r} on q, v; prefix P={args.P}")

    built = {m: build(base, m, args.r, args.P) for m in METHODS}
    with torch.no_grad():
        ref = base(ids, attention_mask=mask).logits
        for m in ("Prefix-Tuning+", "LoRA"):
            d = ((built[m][0](ids, attention_mask=mask).logits - ref).abs() * mask[..., None]).max().item()
            print(f"  {m} at init: max |logits - frozen logits| = {d:.2e}")
    counts = {m: sum(q.numel() for q in built[m][1]) for m in METHODS}
    steps = {m: make_step(*built[m], ids, mask, loss_mask, args.precision) for m in METHODS}
    t = timed_alternating(steps, repeats, sync, reduce=min)
    del steps, built
    mem = {m: run_memory_worker(m, args, folder) for m in METHODS}

    mib, ref_m = 2 ** 20, "Prefix-Tuning+"
    keys = ["allocated"] + (["rss"] if "rss" in mem[ref_m] else [])
    head = "| method | trainable params | train step (ms) | vs Prefix-Tuning+ | " + " | ".join(
        f"peak {k} (MiB) | vs Prefix-Tuning+" for k in keys) + " |"
    print("\n" + head + "\n|" + "---|" * (4 + 2 * len(keys)))
    for m in METHODS:
        cells = [f"{mem[m][k] / mib:.1f} | {mem[m][k] / max(1, mem[ref_m][k]):.2f}" for k in keys]
        print(f"| {m} | {counts[m]:,} | {1e3 * t[m]:.1f} | {t[m] / t[ref_m]:.2f} | " + " | ".join(cells) + " |")
    print("(time: min over rounds in turns; allocated: torch's allocator, exact; rss: resident set sampled every ms)")
    return {"counts": counts, "seconds": t, "memory": mem}


if __name__ == "__main__":
    main()
