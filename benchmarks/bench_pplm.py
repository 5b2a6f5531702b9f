"""PPLM speed on the GPT-2 124M shape (random weights), all with the same settings, in one run.

    python benchmarks/bench_pplm.py [--new-tokens 10] [--prompt-len 16] [--threads N] [--device cpu]

1. PPLM tokens/s against plain decoding, and against the floor. Per token PPLM must at least
   run num_iterations forward+backward passes of one token through the past, plus one forward
   for the token itself: floor = t_plain_step + num_iterations · t_fwd+bwd, both measured here
   at the same context length (t_fwd+bwd is one call of perturbed_loss and its gradient w.r.t. Δ).
   The issue's target: PPLM time per token <= 1.3 x floor. (This implementation also runs the
   unperturbed forward, so its own overhead above the floor is about one forward pass.)
2. 10 samples as one batch against the same 10 one at a time (target >= 4x).
3. For scale: transformers' plain greedy decoding of the same weights, and the cost of the
   reference implementation's per-token recompute of the whole sequence (one full forward at
   the final length), which the KV cache here avoids.
The original PPLM script cannot run against transformers 5 (it uses the removed `past=` API), so
it is not timed; its algorithmic difference (the O(n²) recompute) is row 3.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minigpt  # noqa: E402
from minigpt import GPT, GPTConfig  # noqa: E402
from techniques import pplm  # noqa: E402
import timing  # noqa: E402
from timing import device_sync  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=10, help="tokens per run (default 10)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt length (default 16)")
    p.add_argument("--num-iterations", type=int, default=3, help="PPLM iterations per token (default 3)")
    p.add_argument("--samples", type=int, default=10, help="samples for the batching comparison (default 10)")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats, median reported (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--clock", choices=("auto", "process", "wall"), default="auto",
                   help="process CPU time (robust on a shared machine; auto = for 1 CPU thread) or wall time")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers row")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    use_process = args.clock == "process" or (args.clock == "auto" and device.type == "cpu" and args.threads == 1)
    clock = time.process_time if use_process else time.perf_counter
    sync = device_sync(device)

    def timed(fn, repeats, sync, warmup=True):
        return timing.timed(fn, repeats, sync, warmup=warmup, clock=clock)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("gpt2", embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)).to(device).eval()
    for q in model.parameters():
        q.requires_grad_(False)
    tok = minigpt.get_tokenizer()
    bag = pplm.load_bag("military", tok)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 50257, (1, args.prompt_len), generator=g).to(device)
    n, it = args.new_tokens, args.num_iterations
    knobs = dict(num_iterations=it, max_new_tokens=n, do_sample=True, top_k=10)
    run = lambda ids, k=1: pplm.generate(model, ids, bow=bag, generator=torch.Generator(device).manual_seed(0),
                                         num_samples=k, **knobs)

    # 1. one row: plain decoding, PPLM, and the floor measured at the middle context length
    with torch.no_grad():
        t_plain = timed(lambda: minigpt.generate(model, prompt, max_new_tokens=n, do_sample=True, top_k=10,
                                                 generator=torch.Generator(device).manual_seed(0)),
                        args.repeats, sync) / n
    t_pplm = timed(lambda: run(prompt), args.repeats, sync) / n
    mid = torch.randint(0, 50257, (1, args.prompt_len + n // 2), generator=g).to(device)
    with torch.no_grad():
        ctx = pplm.prompt_context(model, mid)
    M = torch.zeros(1, 50257, device=device)
    M[0, bag.token_ids] = 1
    obj = pplm.Objective(bags=M)

    def fwd_bwd():
        d = torch.zeros_like(ctx.past, requires_grad=True)
        torch.autograd.grad(pplm.perturbed_loss(model, ctx, d, obj)[0].sum(), d)

    t_fb = timed(fwd_bwd, max(3, args.repeats), sync)
    floor = t_plain + it * t_fb

    # 2. batching
    t_batch = timed(lambda: run(prompt, args.samples), args.repeats, sync)  # the prompt read once, then 10 rows
    t_loop = timed(lambda: [run(prompt) for _ in range(args.samples)], 1, sync, warmup=False)

    # 3. for scale: the reference's full recompute per token; transformers' plain decoding
    full = torch.randint(0, 50257, (1, args.prompt_len + n), generator=g).to(device)
    with torch.no_grad():
        t_full = timed(lambda: model(full), max(3, args.repeats), sync)
    t_hf = None
    if not args.no_transformers:
        from transformers import GPT2LMHeadModel
        folder = Path(tempfile.mkdtemp(prefix="bench-pplm-"))
        model.save_pretrained(str(folder))
        hf = GPT2LMHeadModel.from_pretrained(folder).to(device).eval()
        hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 50256
        with torch.no_grad():
            t_hf = timed(lambda: hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=True, top_k=10),
                         args.repeats, sync) / n

    print(f"\nGPT-2 124M shape, random weights, {device}, {args.threads} threads, "
          f"{'process CPU' if use_process else 'wall'} time; prompt {args.prompt_len}, "
          f"{n} new tokens, num_iterations {it}, bag 'military', top_k 10, sampling\n")
    rows = [
        ("plain decoding, minigpt (ms/token)", t_plain * 1e3, ""),
        ("one forward+backward through the past (ms)", t_fb * 1e3, f"{t_fb / t_plain:.2f} x plain step"),
        (f"floor = plain + {it} x fwd+bwd (ms/token)", floor * 1e3, f"{floor / t_plain:.2f} x plain step"),
        ("PPLM, 1 sample (ms/token)", t_pplm * 1e3, f"{t_pplm / floor:.2f} x floor (target <= 1.3); "
                                                    f"{t_pplm / t_plain:.1f} x plain"),
        (f"PPLM, {args.samples} samples one at a time (s)", t_loop, ""),
        (f"PPLM, {args.samples} samples as one batch (s)", t_batch, f"{t_loop / t_batch:.2f} x faster (target >= 4)"),
        (f"full forward of {full.size(1)} tokens (reference's recompute per token, ms)", t_full * 1e3,
         f"{t_full / t_plain:.2f} x a cached plain step"),
    ]
    if t_hf is not None:
        rows.insert(1, ("plain decoding, transformers (ms/token)", t_hf * 1e3,
                        f"minigpt {t_hf / t_plain:.2f} x faster"))
    w = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{w}}  {value:10.2f}  {note}")


if __name__ == "__main__":
    main()
