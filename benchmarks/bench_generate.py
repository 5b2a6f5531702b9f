"""minigpt against transformers on the same random GPT-2 124M weights, in one run.

    python benchmarks/bench_generate.py [--threads N] [--new-tokens 64] [--device cpu]

Measures load time from safetensors, prefill tokens/s (1 x 512), and greedy
decode tokens/s at batch 1 and batch 8 (left-padded prompts), then prints each
figure with the ratio minigpt / transformers, and decode speed as a fraction
of the memory-bandwidth bound: every decode step must read all the weights
once, so tokens/s can be at most (read bandwidth) / (bytes of weights) per row.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minigpt import GPT, generate  # noqa: E402
from timing import device_sync, timed  # noqa: E402


def read_bandwidth(device, sync) -> float:
    """Bytes/s for reading a 512 MiB tensor (a sum touches every byte once)."""
    x = torch.ones(128 * 1024 * 1024, device=device)
    sec = timed(lambda: x.sum(), 5, sync)
    return x.numel() * x.element_size() / sec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for both")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens to decode per measurement (default 64)")
    p.add_argument("--prompt-len", type=int, default=16, help="decode prompt length (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported (default 3)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = p.parse_args(argv)

    from transformers import GPT2Config, GPT2LMHeadModel
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = device_sync(device)
    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="bench-gpt2-"))
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)  # random weights, the 124M shape

    rows = []
    t_hf = timed(lambda: GPT2LMHeadModel.from_pretrained(folder), args.repeats, sync)
    t_ours = timed(lambda: GPT.from_pretrained(str(folder)), args.repeats, sync)
    rows.append(("load from safetensors (s)", t_ours, t_hf, t_hf / t_ours))

    hf = GPT2LMHeadModel.from_pretrained(folder).to(device).eval()
    hf.generation_config.eos_token_id = None  # decode exactly --new-tokens in both
    hf.generation_config.pad_token_id = 50256
    ours = GPT.from_pretrained(str(folder), device=device).eval()

    g = torch.Generator().manual_seed(0)
    long = torch.randint(0, 50257, (1, 512), generator=g).to(device)
    with torch.inference_mode():
        s_hf = timed(lambda: hf(long, use_cache=False), args.repeats, sync)
        s_ours = timed(lambda: ours(long), args.repeats, sync)
    rows.append(("prefill 1x512 (tokens/s)", 512 / s_ours, 512 / s_hf, s_hf / s_ours))

    n = args.new_tokens
    decode = {}
    for batch in (1, 8):
        ids = torch.randint(0, 50257, (batch, args.prompt_len), generator=g).to(device)
        mask = torch.ones_like(ids)
        for i in range(batch):  # left padding: row i loses i tokens
            mask[i, :i] = 0
        kw = {} if batch == 1 else {"attention_mask": mask}
        with torch.inference_mode():
            s_hf = timed(lambda: hf.generate(ids, max_new_tokens=n, do_sample=False, **kw), args.repeats, sync)
            s_ours = timed(lambda: generate(ours, ids, max_new_tokens=n, **kw), args.repeats, sync)
        decode[batch] = n / s_ours
        rows.append((f"greedy decode batch {batch} (steps/s)", n / s_ours, n / s_hf, s_hf / s_ours))

    bw = read_bandwidth(device, sync)
    weight_bytes = sum(t.numel() * t.element_size() for t in ours.parameters())  # tied head counted once
    bound = bw / weight_bytes
    print(f"\nGPT-2 124M shape, random weights, device {device}, {args.threads} threads, torch {torch.__version__}")
    print(f"{'measure':<34}{'minigpt':>12}{'transformers':>14}{'ratio':>8}")
    for name, a, b, r in rows:
        print(f"{name:<34}{a:>12.2f}{b:>14.2f}{r:>7.2f}x")
    print(f"\nmeasured read bandwidth {bw / 1e9:.1f} GB/s; weights {weight_bytes / 1e6:.0f} MB "
          f"-> bound {bound:.1f} steps/s")
    for batch, tps in decode.items():
        print(f"decode batch {batch}: {tps:.1f} steps/s = {tps / bound:.0%} of the bandwidth bound")
    print("(ratio > 1 means minigpt is faster; for load time it is transformers' time / ours)")


if __name__ == "__main__":
    main()
