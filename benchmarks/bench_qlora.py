"""QLoRA: one LoRA training step on a 4-bit NF4 base against the fp32 and bf16 bases, on random GPT-2 weights.

    python benchmarks/bench_qlora.py [--layers 12] [--batch-size 2] [--seq-len 64] [--steps 3] [--device cpu]
                                     [--threads N] [--no-double-quant] [--no-memory]

Sides, each with LoRA r=8 on c_attn and AdamW on A and B only (as `techniques.lora train`):
  fp32       the blocks' Linears in fp32, fp32 compute
  bf16       the same under bf16 autocast, the frozen Linears stored in bf16 once (`cast_frozen_linears`)
  nf4        the blocks' Linears in 4-bit NF4 (`quantize_base`), dequantised to fp32 at each use, fp32 compute
  nf4+bf16   the NF4 base under bf16 autocast (the dequantised W0' cast to bf16 by autocast)
The model is GPT-2 124M-shaped (n_embd 768, 12 layers, 50257-token vocabulary; --layers for fewer), with
random weights: only shapes matter here. Reported: the bytes of the blocks' Linear weights as stored (the
embeddings, LayerNorms and tied head are the same on every side), the median seconds per training step (the
sides' steps alternate, so a busy machine slows them alike) and, unless --no-memory, the peak bytes one step
adds above the loaded model (torch's allocator, exact), each side measured after a warm-up step.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from minigpt import GPT, GPTConfig, autocast, cast_frozen_linears, lm_loss_fn, resolve_device  # noqa: E402
from techniques.lora import apply_lora, lora_parameters, nf4_memory, quantize_base  # noqa: E402
from timing import device_sync, peak_memory, timed_alternating  # noqa: E402

SIDES = {"fp32": (False, "fp32"), "bf16": (False, "bf16"), "nf4": (True, "fp32"), "nf4+bf16": (True, "bf16")}
MiB = 2 ** 20


def base_linear_bytes(model) -> int:
    """Bytes of the weights of the blocks' projections as stored: fp32/bf16 tensors, or NF4 codes + absmaxes."""
    nf4_bytes, _, _ = nf4_memory(model)
    plain = sum(m.weight.numel() * m.weight.element_size() for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and n.startswith("transformer.h."))
    return nf4_bytes + plain


def make_side(args, device, quantize: bool, precision: str):
    """(training step, bytes of the blocks' Linear weights) for one side; the same random weights on every side."""
    torch.manual_seed(args.seed)
    config = GPTConfig(n_layer=args.layers, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    model = GPT(config).to(device)
    if quantize:
        quantize_base(model, double_quant=args.double_quant)
    apply_lora(model, r=args.r, alpha=2 * args.r, targets=("c_attn",), verbose=False)
    cast_frozen_linears(model, {"fp32": None, "bf16": torch.bfloat16}[precision])
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-4)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}
    loss_fn = lm_loss_fn(model)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = loss_fn(data)
        loss.backward()
        opt.step()
    return step, base_linear_bytes(model)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12, help="transformer blocks (default: 12, GPT-2 124M)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed training steps per side (default: 3)")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default: auto)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                   help="NF4 with fp32 absmaxes (4.5 bits per weight) instead of 8-bit ones (4.127)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory measurement")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"device {device}, {args.threads} thread(s); GPT-2 124M-shaped, {args.layers} layer(s), random weights; "
          f"LoRA r={args.r} on c_attn; batch {args.batch_size} x {args.seq_len}; "
          f"NF4 {'with' if args.double_quant else 'without'} double quantisation", flush=True)
    steps, sizes = {}, {}
    for name, (quantize, precision) in SIDES.items():
        steps[name], sizes[name] = make_side(args, device, quantize, precision)
    times = timed_alternating(steps, args.steps, device_sync(device))
    peaks = {name: peak_memory(step, device)["allocated"] for name, step in steps.items()} if args.memory else {}
    print(f"\n{'side':<10} {'base Linears':>13} {'vs fp32':>8} {'s/step':>8} {'vs fp32':>8}"
          + (f" {'peak step MiB':>14}" if peaks else ""))
    for name in SIDES:
        print(f"{name:<10} {sizes[name] / MiB:>9.1f} MiB {sizes[name] / sizes['fp32']:>8.3f} {times[name]:>8.3f} "
              f"{times[name] / times['fp32']:>7.2f}x" + (f" {peaks[name] / MiB:>14.1f}" if peaks else ""))


if __name__ == "__main__":
    main()
