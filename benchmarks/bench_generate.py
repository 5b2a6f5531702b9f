"""minigpt against transformers on the same random GPT-2 124M weights, in one run.

    python benchmarks/bench_generate.py [--quick] [--threads N] [--device cpu] [--dtypes fp32,bf16] [--baseline DIR]

Measures load time from safetensors, prefill tokens/s (1 x 512), then greedy
decoding at batch 1 and batch 8 (left-padded: row i has i padding tokens) after
a context of 16 and of 900 tokens. A decode figure is steps/s over the steps
after the first: the context is read once beforehand by minigpt's forward pass
and both sides continue from a copy of that past (transformers' as a
DynamicCache), and each side's clock starts when its first new token comes
out, so no prefill is in the figure. The sides run in turns (a, b, b, a, ...)
so that a busy machine slows both alike, and each figure is the best of the
repeats (on a shared machine the best measures the code, not the neighbours);
the ratio is minigpt / transformers (> 1: minigpt is faster).

--dtypes runs the decode table once per dtype, both sides loaded in it (the weights themselves in bf16, no
autocast), and adds ours in each dtype against ours in fp32. bf16 halves the bytes a step reads, so its bound
is twice fp32's.

Share of the bound: a decode step must read every weight once, whatever the
batch, so steps/s is at most (read bandwidth) / (bytes of weights). The read
bandwidth is measured here, with these threads, as the faster of a sum and a
matrix-vector product over a 512 MiB tensor (the best of 5 each, and the best
of one such measurement per decode figure): the fastest read seen, so the
bound is as tight as this machine showed it. The weights count every parameter
once (the tied head once). At ctx 900 a step also reads the cache
(2·L·B·ctx·C floats), which the bound leaves out: a column says how much.

--baseline DIR adds a third side: another copy of the `minigpt` package (e.g.
DIR = /elsewhere/minigpt, from a checkout of an earlier commit), imported
beside this tree's and timed in the same turns: before/after in one process.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minigpt  # noqa: E402
from minigpt.cli import DTYPES  # noqa: E402
from timing import alternating, device_sync, timed, timed_alternating  # noqa: E402

CONTEXTS, BATCHES = (16, 900), (1, 8)


def read_bandwidth(device, sync) -> float:
    """Bytes/s for reading a 512 MiB tensor once: the faster of a sum and a matrix-vector
    product over it (on CPU the product streams faster than the sum, which alone would
    make the bound too loose), each the best of 5."""
    x = torch.ones(128 * 1024 * 1024, device=device)
    m, v = x.view(-1, 1024), torch.ones(1024, device=device)
    sec = min(timed(lambda: x.sum(), 5, sync, reduce=min), timed(lambda: m @ v, 5, sync, reduce=min))
    return x.numel() * x.element_size() / sec


def load_package(directory: str, name: str = "minigpt_baseline"):
    """Import the package in `directory` under another name, beside this tree's minigpt."""
    init = Path(directory) / "__init__.py"
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def context(batch: int, length: int, device, seed: int = 0):
    """Token ids [B, length] and a left-padding mask: row i starts with i padding tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50257, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(batch):
        mask[i, :i] = 0
    return ids.to(device), mask.to(device)


class StepClock:
    """A transformers streamer that only notes the time of each put (the prompt, then one per step)."""

    def __init__(self, sync):
        self.sync, self.times = sync, []

    def put(self, value):
        self.sync()
        self.times.append(time.perf_counter())

    def end(self):
        pass


def seconds_per_step(times: list[float]) -> float:
    """From the first new token's time to the last one's, per step."""
    return (times[-1] - times[0]) / (len(times) - 1)


def read_context(model, ids, mask):
    """The past of all but the last token: the context, read once by minigpt's forward."""
    with torch.inference_mode():
        return model(ids[:, :-1], attention_mask=mask[:, :-1]).past_key_values


def minigpt_decoder(pkg, model, past, ids, mask, n, sync, **kwargs):
    """A call that decodes n tokens after `past` and ids[:, -1], returning seconds per step after the first."""
    last, kw = ids[:, -1:], ({} if bool(mask.all()) else {"attention_mask": mask})

    def run() -> float:
        times = []
        with torch.inference_mode():
            for _ in pkg.stream(model, last, max_new_tokens=n, past_key_values=past, **kw, **kwargs):
                sync()
                times.append(time.perf_counter())
        return seconds_per_step(times)
    return run


def transformers_decoder(hf, past, ids, mask, n, sync):
    """The same for transformers' generate, continuing a DynamicCache that holds a copy of `past`
    (the same weights give the same keys and values, to float rounding; see tests/test_model.py)."""
    from transformers import DynamicCache

    def run() -> float:
        clock, cache = StepClock(sync), DynamicCache()
        for i, (k, v) in enumerate(past):
            cache.update(k.clone(), v.clone(), i)
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the argument's newer name differs by version
            hf.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=n, do_sample=False,
                        streamer=clock)
        return seconds_per_step(clock.times[1:])  # times[0] is the prompt
    return run


def prefill_seconds(hf, ours, device, repeats, sync) -> dict:
    long = torch.randint(0, 50257, (1, 512), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.inference_mode():
        return timed_alternating({"hf": lambda: hf(long, use_cache=False), "ours": lambda: ours(long)},
                                 repeats, sync, reduce=min)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="16 new tokens, 2 repeats, no load/prefill rows (minutes)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for both")
    p.add_argument("--new-tokens", type=int, help="tokens to decode per measurement (default 32; --quick 16)")
    p.add_argument("--repeats", type=int, help="timed repeats per side; the best is reported (default 3; --quick 2)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--baseline", metavar="DIR", help="also time the minigpt package in DIR (before/after)")
    p.add_argument("--dtypes", default="fp32", help="comma-separated: fp32, bf16, fp16 (default fp32)")
    args = p.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        p.error(f"--dtypes takes a comma-separated subset of {', '.join(DTYPES)}, got {args.dtypes!r}")
    args.new_tokens = args.new_tokens or (16 if args.quick else 32)
    args.repeats = args.repeats or (2 if args.quick else 3)
    if args.new_tokens < 2 or args.repeats < 1:
        p.error("--new-tokens must be at least 2 (a rate needs two steps) and --repeats at least 1")

    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = device_sync(device)
    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="bench-gpt2-"))
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)  # random weights, the 124M shape
    baseline = load_package(args.baseline) if args.baseline else None

    rows = []
    if not args.quick:
        t = timed_alternating({"hf": lambda: GPT2LMHeadModel.from_pretrained(folder),
                               "ours": lambda: minigpt.GPT.from_pretrained(str(folder))}, args.repeats, sync,
                              reduce=min)
        rows.append(("load from safetensors (s)", t["ours"], t["hf"], t["hf"] / t["ours"]))

    if not args.quick:
        t = prefill_seconds(GPT2LMHeadModel.from_pretrained(folder).to(device).eval(),
                            minigpt.GPT.from_pretrained(str(folder), device=device).eval(), device, args.repeats, sync)
        rows.append(("prefill 1x512 (tokens/s)", 512 / t["ours"], 512 / t["hf"], t["hf"] / t["ours"]))

    n, tables, bws = args.new_tokens, {}, []
    for name in dtypes:
        dtype = DTYPES[name]
        hf = GPT2LMHeadModel.from_pretrained(folder, torch_dtype=dtype).to(device).eval()
        hf.generation_config.eos_token_id = None  # decode exactly --new-tokens in both
        hf.generation_config.pad_token_id = 50256
        ours = minigpt.GPT.from_pretrained(str(folder), device=device, dtype=dtype).eval()
        base = baseline.GPT.from_pretrained(str(folder), device=device, dtype=dtype).eval() if baseline else None
        decode = []
        for batch in BATCHES:
            for ctx in CONTEXTS:
                ids, mask = context(batch, ctx + 1, device)
                past = read_context(ours, ids, mask)
                sides = {"minigpt": minigpt_decoder(minigpt, ours, past, ids, mask, n, sync),
                         "transformers": transformers_decoder(hf, past, ids, mask, n, sync)}
                if base is not None:
                    sides["baseline"] = minigpt_decoder(baseline, base, past, ids, mask, n, sync)
                sec = alternating(sides, args.repeats, reduce=min)
                decode.append((batch, ctx, {side: 1 / s for side, s in sec.items()}))
                bws.append(read_bandwidth(device, sync))
                del sides, past
        weight_bytes = sum(t.numel() * t.element_size() for t in ours.parameters())  # tied head counted once
        tables[name] = (decode, weight_bytes, ours.config)
        del hf, ours, base

    bw = max(bws)
    print(f"\nGPT-2 124M shape, random weights, device {device}, {args.threads} threads, torch {torch.__version__}")
    if rows:
        print(f"{'measure (fp32)':<34}{'minigpt':>12}{'transformers':>14}{'ratio':>8}")
        for name, a, b, r in rows:
            print(f"{name:<34}{a:>12.2f}{b:>14.2f}{r:>7.2f}x")
        print(f"(best of {args.repeats}; load: the ratio is transformers' time / ours)")
    for name, (decode, weight_bytes, cfg) in tables.items():
        bound = bw / weight_bytes
        size = DTYPES[name].itemsize
        extra = f"{'baseline':>10}{'ours/base':>11}" if baseline is not None else ""
        vs32 = f"{'vs fp32':>9}" if name != "fp32" and "fp32" in tables else ""
        print(f"\n{name}: greedy decode, steps/s after the first ({n} new tokens, best of {args.repeats}); "
              f"bound {bw / 1e9:.1f} GB/s / {weight_bytes / 1e6:.0f} MB = {bound:.1f} steps/s")
        print(f"{'batch':>6}{'ctx':>6}{'minigpt':>10}{'transformers':>14}{'ratio':>8}{'share of bound':>16}"
              f"{'cache MB/step':>15}{vs32}{extra}")
        for i, (batch, ctx, sps) in enumerate(decode):
            cache_mb = 2 * cfg.n_layer * batch * ctx * cfg.n_embd * size / 1e6
            ratio, share = sps["minigpt"] / sps["transformers"], sps["minigpt"] / bound
            line = (f"{batch:>6}{ctx:>6}{sps['minigpt']:>10.2f}{sps['transformers']:>14.2f}"
                    f"{ratio:>7.2f}x{share:>16.0%}{cache_mb:>15.0f}")
            if vs32:
                line += f"{sps['minigpt'] / tables['fp32'][0][i][2]['minigpt']:>8.2f}x"
            if baseline is not None:
                line += f"{sps['baseline']:>10.2f}{sps['minigpt'] / sps['baseline']:>10.2f}x"
            print(line)
    print(f"\nbound = read bandwidth / bytes of weights read per step (bf16: half the bytes, twice the bound)\n"
          f"  read bandwidth {bw / 1e9:.1f} GB/s: the faster of a sum and a matrix-vector product over a 512 MiB\n"
          f"    tensor, the best of {len(bws)} measurements (one after each decode figure), {args.threads} threads\n"
          "  weights: every parameter once (the tied head once), read once per step whatever the batch;\n"
          "    the cache a step also reads ('cache MB/step') is not in the bound")
    print("ratio = minigpt / transformers steps/s (> 1: minigpt is faster); vs fp32 = minigpt in this dtype / "
          "minigpt in fp32")


if __name__ == "__main__":
    main()
