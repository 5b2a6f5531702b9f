"""Prefix tuning: minigpt against peft on the same random GPT-2 124M weights, in one run.

    python benchmarks/bench_prefix.py [--quick] [--threads N] [--device cpu] [--profile] [--precisions fp32,bf16]

1. A training step (forward + backward + AdamW on the prefix only, the model
   frozen) for a batch of right-padded examples, ours and peft's, for both
   parameterisations, in each precision asked for (bf16/fp16: the forward pass
   under the same torch.autocast on both sides, fp32 trained weights and AdamW
   state; minigpt stores its frozen Linears in bf16 once, as its command does);
   the ratio is peft's time / ours (target >= 1.2x), and ours in bf16 against
   ours in fp32 (target >= 2x).
2. The peak memory one such step adds above the loaded model, each side alone
   in a subprocess after a warm-up step: the bytes torch's allocator holds
   (exact) and, on CPU, the resident set sampled every millisecond; the ratio
   is ours / peft (target <= 1).
3. Greedy generation with minigpt, with a prefix and without one (target:
   the prefix costs <= 5% more time).
Before timing, it checks that both sides compute the same thing on these
weights and prints the largest logit and gradient differences.
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
from minigpt import GPT, PRECISIONS, autocast, cast_frozen_linears, causal_lm_loss, generate  # noqa: E402
from techniques.prefix import PrefixTuning  # noqa: E402
from timing import device_sync, peak_memory, print_profile_split, profile_split, timed_alternating  # noqa: E402


def timed_pair(fa, fb, repeats: int, sync) -> tuple[float, float]:
    """Best-of-`repeats` seconds of fa and of fb, measured in turns after a warm-up of each.
    On a shared machine the minimum measures the code, not the neighbours."""
    t = timed_alternating({"a": fa, "b": fb}, repeats, sync, reduce=min)
    return t["a"], t["b"]


def make_batch(B: int, T: int, device, seed: int = 0):
    """Right-padded rows of lengths T, T-4, ...: ids, attention mask, loss mask (the way collate_lm pads)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50257, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        mask[b, max(2, T - 4 * b):] = 0
    ids = ids.masked_fill(mask == 0, 50256)
    return ids.to(device), mask.to(device), mask.clone().to(device)


def twins(folder, ours, P, projection, hidden, device):
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(folder).to(device).eval()
    torch.manual_seed(0)
    pm = get_peft_model(hf, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                               prefix_projection=projection, encoder_hidden_size=hidden))
    prefix = PrefixTuning(ours.config, P, projection=projection, hidden_size=hidden).to(device)
    prefix.load_state_dict(pm.prompt_encoder["default"].state_dict())
    return pm, prefix


def ours_step(ours, prefix, ids, mask, loss_mask, precision="fp32"):
    """One training step of our prefix (the model frozen): forward, loss, backward, AdamW. In bf16/fp16 the
    frozen model's Linears are stored in that dtype, as `techniques.prefix train` does (on a copy, so that the
    fp32 side keeps its weights)."""
    opt = torch.optim.AdamW(prefix.parameters(), lr=1e-5)
    if PRECISIONS[precision] is not None:
        ours = copy.deepcopy(ours)
        cast_frozen_linears(ours, PRECISIONS[precision])

    def step():
        with autocast(ids.device, precision):
            past, m = prefix.inputs_for(ids, mask)
            loss = causal_lm_loss(ours(ids, past_key_values=past, attention_mask=m).logits, ids, loss_mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def peft_step(pm, ids, mask, loss_mask, precision="fp32"):
    """The same for peft's PrefixTuning on transformers' GPT-2, with the same positions and loss."""
    opt = torch.optim.AdamW([q for q in pm.parameters() if q.requires_grad], lr=1e-5)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)

    def step():
        with autocast(ids.device, precision):
            loss = causal_lm_loss(pm(input_ids=ids, attention_mask=mask, position_ids=pos).logits, ids, loss_mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def memory_worker(args) -> dict:
    """Peak memory one training step adds for one side and parameterisation, built alone."""
    side, projection, precision = args.memory_worker.split(":")
    projection = projection == "projection"
    device = torch.device(args.device)
    B, T = shape(args)
    ids, mask, loss_mask = make_batch(B, T, device, args.seed)
    if side == "minigpt":
        ours = GPT.from_pretrained(args.weights, device=device).eval().requires_grad_(False)
        prefix = PrefixTuning(ours.config, args.num_virtual_tokens, projection=projection,
                              hidden_size=args.hidden).to(device)
        step = ours_step(ours, prefix, ids, mask, loss_mask, precision)
    else:
        from peft import PrefixTuningConfig, get_peft_model
        from transformers import GPT2LMHeadModel
        hf = GPT2LMHeadModel.from_pretrained(args.weights).to(device).eval()
        pm = get_peft_model(hf, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.num_virtual_tokens,
                                                   prefix_projection=projection, encoder_hidden_size=args.hidden))
        step = peft_step(pm, ids, mask, loss_mask, precision)
    step()  # warm-up: AdamW state and allocator caches exist from here on
    device_sync(device)()
    return peak_memory(step, device)


def run_memory_worker(side: str, projection: bool, precision: str, args, folder) -> dict:
    cmd = [sys.executable, __file__, "--memory-worker",
           f"{side}:{'projection' if projection else 'direct'}:{precision}",
           "--weights", str(folder), "--device", args.device, "--threads", str(args.threads),
           "--num-virtual-tokens", str(args.num_virtual_tokens), "--hidden", str(args.hidden),
           "--seed", str(args.seed)] + (["--quick"] if args.quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{side} memory worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def shape(args) -> tuple[int, int]:
    return (2, 32) if args.quick else (8, 128)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 2 x 32, 16 new tokens (a few minutes on 2 busy cores)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for both")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--num-virtual-tokens", type=int, default=10)
    p.add_argument("--hidden", type=int, default=512, help="MLP width for the projection rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="also profile one step per side: matrix multiplies against the rest (CPU)")
    p.add_argument("--precisions", default="fp32,bf16",
                   help="comma-separated: fp32, bf16, fp16 (default: fp32,bf16; bf16/fp16 = autocast on both sides)")
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
    B, T = shape(args)
    repeats, new = (5, 16) if args.quick else (7, 64)

    from transformers import GPT2Config, GPT2LMHeadModel
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(args)))
        return
    device = torch.device(args.device)
    sync = device_sync(device)
    torch.manual_seed(args.seed)
    folder = Path(tempfile.mkdtemp(prefix="bench-prefix-"))
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)  # random weights, the 124M shape
    ours = GPT.from_pretrained(str(folder), device=device).eval().requires_grad_(False)
    P = args.num_virtual_tokens
    ids, mask, loss_mask = make_batch(B, T, device, args.seed)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    mib = 2 ** 20

    print(f"GPT-2 124M shape, random weights, {device}, {args.threads} threads; P={P}, batch {B} x {T} (right-padded)")
    rows = []
    for projection in (False, True):
        pm, prefix = twins(folder, ours, P, projection, args.hidden, device)
        name = "projection" if projection else "direct"

        steps = {f"{side}:{p}": make(p) for p in precisions for side, make in (
            ("minigpt", lambda p: ours_step(ours, prefix, ids, mask, loss_mask, p)),
            ("peft", lambda p, pm=pm: peft_step(pm, ids, mask, loss_mask, p)))}

        # same numbers first (one step's gradients, before any update)
        prefix.zero_grad(), pm.zero_grad()
        past, m = prefix.inputs_for(ids, mask)
        lo = ours(ids, past_key_values=past, attention_mask=m).logits
        lp = pm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        d_logits = ((lo - lp).abs() * mask[..., None]).max().item()
        causal_lm_loss(lo, ids, loss_mask).backward()
        causal_lm_loss(lp, ids, loss_mask).backward()
        theirs = dict(pm.prompt_encoder["default"].named_parameters())
        d_grad = max((q.grad - theirs[n].grad).abs().max().item() for n, q in prefix.named_parameters())
        print(f"  {name}: max |logits ours - peft| = {d_logits:.2e}, max |grad ours - peft| = {d_grad:.2e}")

        t = timed_alternating(steps, repeats, sync, reduce=min)
        for p in precisions:
            rows.append((f"{p} train step, {name} (ms)", 1e3 * t[f"minigpt:{p}"], 1e3 * t[f"peft:{p}"],
                         t[f"peft:{p}"] / t[f"minigpt:{p}"], "peft / ours, >= 1.2"))
            if p != "fp32" and "fp32" in precisions:
                rows.append((f"{p} vs fp32 train step, {name}, minigpt | peft", t["minigpt:fp32"] / t[f"minigpt:{p}"],
                             t["peft:fp32"] / t[f"peft:{p}"], t["minigpt:fp32"] / t[f"minigpt:{p}"],
                             "speed-up, ours >= 2"))
            if args.profile:
                print(f"  {name}, {p}:", end="")
                print_profile_split(profile_split({"minigpt": steps[f"minigpt:{p}"], "peft": steps[f"peft:{p}"]}))
        del pm, steps
        for p in precisions:
            peak = {side: run_memory_worker(side, projection, p, args, folder) for side in ("minigpt", "peft")}
            for key, what in (("allocated", "allocated"), ("rss", "RSS")):
                if key in peak["minigpt"]:
                    a, b = peak["minigpt"][key] / mib, peak["peft"][key] / mib
                    rows.append((f"{p} train step peak extra, {what}, {name} (MiB)", a, b, a / b,
                                 "ours / peft, <= 1"))

    prefix = PrefixTuning(ours.config, P).to(device).eval()
    prompt = ids[:1, :16]
    with torch.inference_mode():
        t_pref, t_plain = timed_pair(
            lambda: generate(ours, prompt, max_new_tokens=new, past_key_values=prefix.past_key_values(1)),
            lambda: generate(ours, prompt, max_new_tokens=new), repeats, sync)
    rows.append((f"generate 1 x (16+{new}), with prefix vs without (ms)", 1e3 * t_pref, 1e3 * t_plain,
                 t_pref / t_plain, "with / without, <= 1.05"))

    w = max(len(r[0]) for r in rows)
    print(f"\n| {'measure'.ljust(w)} | ours / with | peft / without | ratio | target |")
    print(f"|{'-' * (w + 2)}|------------:|---------------:|------:|--------|")
    for label, a, b, ratio, target in rows:
        print(f"| {label.ljust(w)} | {a:11.2f} | {b:14.2f} | {ratio:5.2f} | {target} |")
    print("(allocated: torch's allocator, exact; RSS: the resident set sampled every ms, noisier)")


if __name__ == "__main__":
    main()
