"""Pre-train the bundled GPT-2 from scratch, offline after one fetch, on a CPU: `python -m demos.pretrain`.

    python -m demos.pretrain_data                                  # fetch the corpus once (package registries)
    python -m demos.pretrain [--out runs/pretrain] [--bundle] [--steps N] [--device auto]
    python -m demos.pretrain --smoke --out /tmp/smoke              # a micro model on the repo's text (tests)
    python -m demos.pretrain --weights runs/pretrain ...           # go on from a checkpoint
    python -m demos.pretrain --save-every 100 ...                  # checkpoints into OUT/train_state
    python -m demos.pretrain --resume runs/pretrain/train_state    # continue one exactly (same options)
    torchrun --standalone --nproc_per_node 2 -m demos.pretrain ... # two processes

This is the one command that makes `minigpt/weights/tiny/`, the model behind `--model tiny` and
`GPT.from_pretrained("tiny")`. It uses the same GPT class and training loop as everything else: a GPT-2 of
8 layers, 8 heads, width 256 and 256 positions, with the real GPT-2 tokenizer (vocabulary 50,257), trained with
block size = n_positions so every position embedding learns.

The corpus is `demos.pretrain_data.SOURCES`: broad English with clear licences from the package registries
(speeches, the Brown corpus, novels, WordNet's glosses, the World Factbook, ACLSum's training papers) and the
text that ships here (Tiny Shakespeare, SST-2's training sentences without their fragments, the E2E references
table_to_text trains on). Each source is its own token stream cut into blocks; 2% of each source's blocks
(seeded, at most 40) are held out and their loss is reported per source, and a source's training blocks are
seen `weight` times per pass. SST-2's dev and test splits, E2E's test set, ACLSum's test papers, the poem
verses and every project's test data stay out: demos measure on them.

It prints the expected wall time before training (a few steps are timed on a throw-away copy of the model and
extrapolated), samples before and after training from the same seed, and the held-out losses. Into --out it
writes a Hugging Face-layout checkpoint in float32 (config.json, model.safetensors), history.json (loss per step,
held-out loss at each eval), summary.json (the run's numbers and samples) and loss.png. With --bundle it also
writes the model into minigpt/weights/tiny/ in float16 with those files and a README.md whose numbers all come
from this run. Every save is atomic and happens only after training finishes.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from demos.common import moving_average
from demos.pretrain_data import EVAL_CAP, EVAL_FRACTION, SOURCES, SourceBlocks, source_blocks, sst2_column, weighted
from minigpt import (GPT, GPTConfig, TrainConfig, atomic_save_dir, autocast, collate_lm, evaluate,
                     examples_from_text, generate, get_tokenizer, lm_loss_fn, processes, resolve_device,
                     resolve_precision, save_history, train, write_json)
from minigpt.cli import CHECKPOINT_DIR, add_scale_args, describe_plan, positive_int, run_command
from minigpt.pretrained import bundled_dir, write_checkpoint
from minigpt.train_state import read_meta

ROOT = Path(__file__).resolve().parents[1]
SST2_DEV = ROOT / "data" / "sst2" / "dev.tsv"  # never trained on: a stricter held-out loss

# The bundled model. On a 2-core CPU the 50257 x n_embd output head is most of a step's work, so depth is cheap:
# 8 layers cost 9% more than 6 at width 256. Width 256 with 8 layers is 19.2M parameters, 38 MB in float16,
# under the 40 MB budget; width 288 would not fit.
MODEL_CONFIG = dict(n_layer=8, n_head=8, n_embd=256, n_positions=256,
                    embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)  # about one pass over the corpus: no dropout
STEPS = 2400          # the bundled model's: about 1 h 50 min on the 2-core CPU in bf16 (2.6 s a step)
BATCH_SIZE = 16       # blocks of n_positions tokens per step
LR = 2e-3
N_EVALS = 8           # held-out losses during training (plus one before it)
PROMPTS = ("The fisherman pulled his boat onto the sand and", "When the letter finally arrived, she",
           "The city council met on Tuesday to", "Scientists have long wondered why",
           "My grandfather used to say that", "The old house at the end of the street",
           "After dinner, we walked down to the", "The report found that most", "The movie is",
           "In the morning the market")
SAMPLE_TOKENS = 40

# --smoke: a micro model on slices of the text in the repo, a few steps: seconds, for the tests.
SMOKE_CONFIG = dict(n_layer=1, n_head=2, n_embd=16, n_positions=32, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
SMOKE_STEPS, SMOKE_BATCH, SMOKE_CHARS, SMOKE_DEV = 4, 4, 20_000, 40
SIZE_BUDGET = 40_000_000  # bytes, for the bundled folder


# ---- the corpus -------------------------------------------------------------------------------
def corpus(tokenizer, block: int, seed: int, smoke: bool) -> list[SourceBlocks]:
    """Every source's blocks; --smoke reads only slices of the text that ships in the repo (no network)."""
    return [source_blocks(s, tokenizer, block, seed, limit=SMOKE_CHARS if smoke else None)
            for s in SOURCES if not (smoke and s.package)]


def dev_blocks(tokenizer, block: int, smoke: bool) -> list:
    """SST-2 dev sentences, one per line, in blocks: text no pre-training step saw, in SST-2's own lower-cased,
    tokenized style (the bundled model's first yardstick)."""
    sentences = sst2_column(SST2_DEV)[:SMOKE_DEV if smoke else None]
    return examples_from_text(tokenizer.encode("\n".join(sentences) + "\n"), block, source=str(SST2_DEV))


# ---- timing and samples -----------------------------------------------------------------------
def seconds_per_step(model: GPT, examples: list, config: TrainConfig, n: int = 3) -> float:
    """Time optimizer steps on a throw-away copy of the model (the first one, warm-up, is not counted),
    in the run's precision, each with its grad_accum micro-batches."""
    probe = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(probe.parameters(), lr=config.lr)
    loss_fn = lm_loss_fn(probe)
    batch = {k: v.to(model.device) for k, v in collate_lm(examples[:config.batch_size]).items()}
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for _ in range(config.grad_accum):
            with autocast(model.device, config.precision):
                loss = loss_fn(batch)
            loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return sum(times[1:]) / (n - 1)


@torch.no_grad()
def seconds_per_eval_batch(model: GPT, examples: list, batch_size: int, precision: str) -> float:
    batch = {k: v.to(model.device) for k, v in collate_lm(examples[:batch_size]).items()}
    model.eval()
    t0 = time.perf_counter()
    with autocast(model.device, precision):
        lm_loss_fn(model)(batch)
    return time.perf_counter() - t0


def heldout_loss(model: GPT, examples: list, batch_size: int) -> float:
    """Mean next-token cross-entropy over the held-out blocks, in fp32 (train's eval loss, in fp32 runs)."""
    return evaluate(lm_loss_fn(model), examples, batch_size, collate_lm, model.device, [model])


def sample(model: GPT, tokenizer, prompt: str, seed: int) -> str:
    """One top-k sample; the same seed before and after training, so only the weights differ."""
    model.eval()
    ids = torch.tensor([tokenizer.encode(prompt)], device=model.device)
    n = min(SAMPLE_TOKENS, model.config.n_positions - ids.shape[1])
    g = torch.Generator(device=model.device).manual_seed(seed)
    out = generate(model, ids, max_new_tokens=n, do_sample=True, top_k=40, generator=g)
    return tokenizer.decode(out[0])


def samples(model: GPT, tokenizer, seed: int) -> dict[str, str]:
    return {p: sample(model, tokenizer, p, seed) for p in PROMPTS}


def show(label: str, texts: dict[str, str]) -> None:
    for text in texts.values():
        print(f"{label}: {text!r}")


# ---- the plot ----------------------------------------------------------------------------------
def plot(history: list[dict], before: float, tokens_per_step: int, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [h["step"] + 1 for h in history]
    losses = [h["loss"] for h in history]
    ev = [(0, before)] + [(h["step"] + 1, h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(steps, losses, lw=0.6, alpha=0.35, color="tab:blue", label="train (each step)")
    ax.plot(steps, moving_average(losses, max(1, len(losses) // 50)), lw=1.8, color="tab:blue",
            label="train (moving average)")
    ax.plot([s for s, _ in ev], [v for _, v in ev], "o-", color="tab:orange",
            label="held-out (2% of each source's blocks)")
    ax.annotate(f"held-out {ev[-1][1]:.2f}", ev[-1], textcoords="offset points", xytext=(-10, 12), ha="right",
                fontsize=11, color="tab:orange")
    ax.set_title(title, fontsize=12)
    ax.set_xlabel("optimizer step", fontsize=11)
    ax.set_ylabel("cross-entropy (nats per token)", fontsize=11)
    top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step / 1e6,
                                               lambda t: t * 1e6 / tokens_per_step))
    top.set_xlabel("training tokens seen (millions)", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the bundled folder ----------------------------------------------------------------------
def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min ({seconds:.0f} s)" if seconds >= 60 else f"{seconds:.0f} s"


def wall_time(s: dict) -> str:
    """This command's wall time and its training's; for a resumed run, also the time of the steps before the
    checkpoint, as the checkpoint recorded it."""
    t = s["training"]
    here = (f"{minutes(s['seconds'])} for the whole command; training {minutes(t['seconds'])}, "
            f"{t['seconds_per_step']:.2f} s/step, {t['tokens_per_second']:.0f} tokens/s")
    at, before = t.get("resumed_at_step", 0), t.get("seconds_before_resume")
    if not at:
        return here
    if before is None:
        return (f"{here}, from step {at} on: the command resumed there, from a checkpoint that does not record "
                "how long the steps before took")
    return (f"{here}, from step {at} on: the command resumed there, and the {at} steps before took "
            f"{minutes(before)} by the checkpoint's record, so {minutes(before + t['seconds'])} of training in all")


def bundle_readme(s: dict, size: int) -> str:
    """The bundled model's README, every number from this run's summary `s`."""
    c, t, d = s["config"], s["training"], s["data"]
    threads, load = t["torch_threads"], t["load_average"]
    share = t["cpu_seconds"] / (t["seconds"] * threads)
    others = max(load["start"], load["end"]) > threads + 0.5  # the load average counts this run's threads too
    shared = (f"Training used {t['cpu_seconds']:.0f} CPU-seconds in {t['seconds']:.0f} s of wall time on {threads} "
              f"thread{'s' if threads != 1 else ''} ({100 * share:.0f}% of "
              f"{'those cores' if threads != 1 else 'one core'}"
              f"). The 1-minute load average was {load['start']:.1f} at the start of training and {load['end']:.1f} "
              f"at the end, on {t['cpu_count']} CPU cores"
              + ((": the machine was shared with other programs"
                  + (", so this wall time is longer than on an idle machine." if share < 0.75 else "."))
                 if others else "."))
    accum, procs = t.get("grad_accum", 1), t.get("processes", 1)
    effective = str(t["batch_size"]) if accum * procs == 1 else \
        f"{t['batch_size'] * accum * procs} blocks ({t['batch_size']} x {accum} accumulated x {procs} processes)"
    precision = {"fp32": "fp32", "bf16": "bf16 autocast (weights and AdamW state fp32)",
                 "fp16": "fp16 autocast with loss scaling"}[t.get("precision", "fp32")]
    sources = "\n".join(
        f"| {x['title']} | {x['licence']} | {x['tokens']:,} | {x['weight']:g} | {x['heldout_blocks']} | "
        f"{x['heldout_loss_before']:.2f} | **{x['heldout_loss']:.3f}** |" for x in s["sources"])
    fetched = "\n".join(
        f"| `{x['name']}` | {x['package']['registry']} | `{x['package']['name']}` {x['package']['version']} | "
        f"`{x['package']['sha256'][:16]}...` |" for x in s["sources"] if x["package"])
    notes = "\n".join(f"- `{x['name']}`: {x['note']}." for x in s["sources"] if x["note"])
    before = "\n".join(f"    {v!r}" for v in s["samples_before"].values())
    after = "\n\n".join(f"> {v}".replace("\n", "\n> ") for v in s["samples_after"].values())
    total = sum(x["tokens"] for x in s["sources"])
    return f"""# tiny: the GPT-2 bundled with minigpt

A small GPT-2, pre-trained from scratch by this project, so that every command and demo runs offline:
`--model tiny` on the command line, `GPT.from_pretrained("tiny")` in Python. It is a real GPT-2 in Hugging Face's
layout (`config.json` + `model.safetensors`, loadable by transformers' `GPT2LMHeadModel`) with the real GPT-2
tokenizer, stored in float16 to stay small and loaded as float32.

| | |
| --- | --- |
| config | n_layer {c['n_layer']}, n_head {c['n_head']}, n_embd {c['n_embd']}, n_positions {c['n_positions']}, \
vocab_size {c['vocab_size']}, dropout {c['resid_pdrop']:g} |
| parameters | {s['parameters']:,} (the tied 50257 x {c['n_embd']} token embedding is \
{c['vocab_size'] * c['n_embd']:,} of them) |
| `model.safetensors` | {size:,} bytes ({size / 1e6:.1f} MB), float16 |
| held-out loss | **{s['heldout_loss']:.3f}** nats/token (perplexity {s['heldout_perplexity']:.1f}) on the \
{d['heldout_blocks']} held-out blocks of all sources; {s['heldout_loss_before']:.3f} before training |
| SST-2 dev loss | **{s['sst2_dev_loss']:.3f}** nats/token (perplexity {math.exp(s['sst2_dev_loss']):.1f}) on the \
{d['sst2_dev_blocks']} blocks of SST-2's dev sentences, never trained on; {s['sst2_dev_loss_before']:.3f} before \
training |
| steps | {t['steps']} of {effective} x {c['n_positions']} tokens ({t['tokens']:,} tokens, \
{t['epochs']:.2f} weighted passes), {precision} |
| wall time | {wall_time(s)} |
| machine | {t['device']}, {t['torch_threads']} torch thread{'s' if t['torch_threads'] != 1 else ''}, \
{t['cpu_count']} CPU cores, torch {t['torch']}, Python {t['python']} |

{shared}

## How it was made

```
python -m demos.pretrain_data
{s['command']}
```
The first command fetches the corpus from the package registries (each file checked by SHA-256); the second
trains: seed {s['seed']}, {t['steps']} steps, AdamW (lr {t['lr']:g}, betas {tuple(t['betas'])}, \
weight decay {t['weight_decay']:g}), linear
warm-up over {t['warmup_steps']} steps then linear decay to 0, gradient clipping at 1.0, block size = n_positions
so that every position embedding is trained. The command printed its expected wall time up front:
{minutes(s['expected_seconds'])}. Re-running it regenerates this folder, this README included; `--save-every N`
and `--resume` make it resumable.

## Data

{total:,} tokens from {len(s['sources'])} sources. Each source is its own token stream, cut into blocks of
{c['n_positions']} tokens; {100 * d['eval_fraction']:g}% of each source's blocks (at most {d['eval_cap']}, \
chosen with the seed) are held out and
never trained on, and a source's training blocks are seen `weight` times per pass (a fraction: a seeded subset).
The held-out losses (nats/token) are before and after training:

| source | licence | tokens | weight | held-out blocks | loss before | loss after |
| --- | --- | ---: | ---: | ---: | ---: | ---: |
{sources}

Fetched by `python -m demos.pretrain_data` (`demos/pretrain_data.py` holds the full URLs and SHA-256s):

| source | registry | package | SHA-256 |
| --- | --- | --- | --- |
{fetched}

{notes}

Kept out, because demos fine-tune or measure on them: SST-2's dev and test splits (the SST-2 dev loss above is on
text no step saw), E2E's test set, ACLSum's validation and test papers, the poem verses, and every project's own
test data. Two training splits are in, where a demo's story is a task rather than a domain: the E2E references
(`table_to_text` learns the table -> text mapping with a prefix; no other source has restaurant descriptions)
and ACLSum's training papers (`summarizer` learns abstract -> outcome on them).

## Samples

Ten neutral openings, top-k (k = 40) samples of {SAMPLE_TOKENS} tokens, seed {s['seed']}, unedited. After training:

{after}

The same prompts and seed before training:

{before}

## Files

- `config.json`, `model.safetensors`: the model (Hugging Face layout, float16).
- `history.json`: the training loss at every step and the held-out loss at each evaluation.
- `summary.json`: this run's numbers and samples, from which this README was written.
- `loss.png`: the loss curves.

![loss curves](loss.png)
"""


def write_bundle(model: GPT, history: list[dict], summary: dict, directory: Path) -> int:
    """config.json, float16 model.safetensors, history.json, summary.json, loss.png and README.md, atomically."""
    with atomic_save_dir(directory) as tmp:
        half = {k: v.detach().to("cpu", torch.float16) for k, v in model.state_dict().items()}
        write_checkpoint(model.config, half, tmp)
        size = (tmp / "model.safetensors").stat().st_size
        if size > SIZE_BUDGET:
            raise ValueError(f"the float16 model is {size:,} bytes, over the {SIZE_BUDGET:,}-byte budget of the "
                             "bundled model; nothing was bundled")
        save_history(history, tmp)
        write_json(summary, tmp / "summary.json")
        plot(history, summary["heldout_loss_before"], summary["training"]["tokens"] // len(history),
             "Pre-training the bundled GPT-2 (tiny) from scratch", tmp / "loss.png")
        (tmp / "README.md").write_text(bundle_readme(summary, size), encoding="utf-8")
    return size


def write_run(model: GPT, history: list[dict], summary: dict, out: Path) -> None:
    """The float32 checkpoint, history, summary and plot into --out, atomically."""
    with atomic_save_dir(out) as tmp:
        write_checkpoint(model.config, model.state_dict(), tmp)
        save_history(history, tmp)
        write_json(summary, tmp / "summary.json")
        plot(history, summary["heldout_loss_before"], summary["training"]["tokens"] // len(history),
             f"Pre-training a GPT-2 from scratch ({model.config.n_layer} layers, width {model.config.n_embd})",
             tmp / "loss.png")


# ---- the command -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m demos.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/pretrain",
                   help="folder for the float32 checkpoint, history.json, summary.json and loss.png "
                        "(default: runs/pretrain)")
    p.add_argument("--bundle", action="store_true",
                   help="also write the model into minigpt/weights/tiny/ (float16, with README.md): the model "
                        "that --model tiny loads")
    p.add_argument("--smoke", action="store_true",
                   help=f"a micro model on slices of the text in the repo (no fetch) for {SMOKE_STEPS} steps: "
                        "seconds, for tests")
    p.add_argument("--weights", metavar="DIR",
                   help="go on training this checkpoint (Hugging Face layout; its n_positions is the block size) "
                        "instead of a fresh model")
    p.add_argument("--steps", type=positive_int, default=None,
                   help=f"optimizer steps (default: {STEPS}; {SMOKE_STEPS} with --smoke)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"blocks per step (default: {BATCH_SIZE}; {SMOKE_BATCH} with --smoke)")
    p.add_argument("--lr", type=float, default=LR, help=f"AdamW peak learning rate (default: {LR:g})")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default: auto = cuda, then mps, then cpu)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for the initial weights, the held-out split, the batches and the samples (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_scale_args(p, precision="auto", precision_note=(
        "auto by default: bf16 where the device has it natively, as the bundled model was trained (8 blocks "
        "of 256 tokens at width 256: 1.12 s a step in bf16, 2.49 s in fp32, on the 2-core development CPU)"))
    return p


def check_args(args) -> None:
    if args.smoke and args.bundle:
        raise ValueError("--smoke trains a micro model for tests; it cannot replace the bundled model, "
                         "drop --bundle or --smoke")
    if args.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.resume and not Path(args.resume).is_dir():
        raise FileNotFoundError(f"--resume {args.resume}: no such folder; give OUT/{CHECKPOINT_DIR} of the run "
                                "to continue")


def initial_model(args, device: torch.device) -> GPT:
    if args.weights:
        return GPT.from_pretrained(args.weights, device=device)
    torch.manual_seed(args.seed)
    return GPT(GPTConfig(**(SMOKE_CONFIG if args.smoke else MODEL_CONFIG))).to(device)


def body(args) -> None:
    t_start = time.perf_counter()
    check_args(args)
    device = resolve_device(args.device)
    steps = args.steps or (SMOKE_STEPS if args.smoke else STEPS)
    batch_size = args.batch_size or (SMOKE_BATCH if args.smoke else BATCH_SIZE)

    tokenizer = get_tokenizer()
    model = initial_model(args, device)
    block = model.config.n_positions
    parts = corpus(tokenizer, block, args.seed, args.smoke)
    train_ex = weighted(parts, args.seed)
    eval_ex = [b for part in parts for b in part.heldout]
    dev_ex = dev_blocks(tokenizer, block, args.smoke)
    config = TrainConfig(max_steps=steps, batch_size=batch_size, lr=args.lr, warmup_steps=max(1, steps // 20),
                         weight_decay=0.01, betas=(0.9, 0.99), eval_every=max(1, steps // N_EVALS),
                         seed=args.seed, progress=not args.no_progress,
                         precision=resolve_precision(args.precision, device), grad_accum=args.grad_accum,
                         save_every=args.save_every, checkpoint_dir=str(Path(args.out) / CHECKPOINT_DIR),
                         resume_from=args.resume)
    procs = processes()

    print(f"corpus: {len(parts)} sources, {sum(p.tokens for p in parts):,} tokens; {len(train_ex):,} training "
          f"blocks of {block} a pass (weighted); {len(eval_ex)} held out; {len(dev_ex)} blocks of SST-2 dev "
          "sentences kept out")
    for part in parts:
        print(f"  {part.source.name:16s} {part.tokens:>10,} tokens  weight {part.source.weight:g}  "
              f"{len(part.heldout)} blocks held out")
    print(f"model: {model.num_parameters():,} parameters (n_layer {model.config.n_layer}, n_head "
          f"{model.config.n_head}, n_embd {model.config.n_embd}, n_positions {block}) on {device}"
          + (f", from {args.weights}" if args.weights else ", fresh init"))
    print(describe_plan(len(train_ex), len(eval_ex), config))

    per_step = seconds_per_step(model, train_ex, config)
    n_evals = len(range(config.eval_every, steps + 1, config.eval_every)) + (steps % config.eval_every != 0) + 1
    eval_batches = (n_evals + 2) * math.ceil(len(eval_ex) / batch_size) + 2 * math.ceil(len(dev_ex) / batch_size)
    expected = per_step * steps + eval_batches * seconds_per_eval_batch(model, eval_ex, batch_size,
                                                                        config.precision)
    print(f"expected wall time: about {minutes(expected)} ({per_step:.2f} s/step measured on this machine now, "
          f"x {steps} steps, plus {n_evals} held-out evaluations and the per-source ones); longer if other "
          "programs share the CPU" + ("; a resumed run skips the steps already done" if args.resume else ""))

    before = per_source_losses(model, parts, batch_size)
    dev_before = heldout_loss(model, dev_ex, batch_size)
    loss_before = heldout_loss(model, eval_ex, batch_size)
    samples_before = samples(model, tokenizer, args.seed)
    print(f"held-out loss before training: {loss_before:.3f} (SST-2 dev sentences: {dev_before:.3f})")
    show("before", samples_before)

    resumed = read_meta(args.resume) if args.resume else {"step": 0, "seconds": 0.0}  # read before saves replace it
    load_start = os.getloadavg()[0]
    cpu0, t0 = time.process_time(), time.perf_counter()
    model.train()
    history = train(model.parameters(), lm_loss_fn(model), train_ex, eval_examples=eval_ex, eval_modules=[model],
                    config=config, run_info=run_info(args, steps, batch_size))
    train_seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    load_end = os.getloadavg()[0]
    model.eval()
    if not procs.is_main:
        return  # under torchrun rank 0 measures and saves; every process holds the same weights

    loss = history[-1]["eval_loss"] if config.precision == "fp32" else heldout_loss(model, eval_ex, batch_size)
    after = per_source_losses(model, parts, batch_size)
    dev_loss = heldout_loss(model, dev_ex, batch_size)
    samples_after = samples(model, tokenizer, args.seed)
    show("after", samples_after)
    tokens = steps * batch_size * config.grad_accum * procs.world_size * block
    tokens_here = (steps - resumed["step"]) * batch_size * config.grad_accum * procs.world_size * block
    for part in parts:
        print(f"  held-out {part.source.name:16s} {before[part.source.name]:.3f} -> {after[part.source.name]:.3f}")
    print(f"held-out loss after {steps} steps: {loss:.3f} (perplexity {math.exp(loss):.1f}; SST-2 dev sentences: "
          f"{dev_loss:.3f}); training took {minutes(train_seconds)}, {tokens_here / train_seconds:.0f} tokens/s")

    summary = {
        "command": shlex.join(["python", "-m", "demos.pretrain", *args.argv]),
        "seed": args.seed, "parameters": model.num_parameters(),
        "config": dataclasses.asdict(model.config) | {"name_or_path": ""},
        "heldout_loss_before": loss_before, "heldout_loss": loss, "heldout_perplexity": math.exp(loss),
        "sst2_dev_loss_before": dev_before, "sst2_dev_loss": dev_loss,
        "samples_before": samples_before, "samples_after": samples_after,
        "expected_seconds": expected,
        "sources": [source_summary(part, before, after) for part in parts],
        "data": {"blocks_per_pass": len(train_ex), "heldout_blocks": len(eval_ex),
                 "eval_fraction": EVAL_FRACTION, "eval_cap": EVAL_CAP, "sst2_dev_blocks": len(dev_ex)},
        "training": {"steps": steps, "batch_size": batch_size, "grad_accum": config.grad_accum,
                     "processes": procs.world_size, "precision": config.precision, "tokens": tokens,
                     "resumed_from": args.resume, "resumed_at_step": resumed["step"],
                     "seconds_before_resume": resumed.get("seconds"),
                     "epochs": tokens / block / len(train_ex), "lr": config.lr, "betas": list(config.betas),
                     "weight_decay": config.weight_decay, "warmup_steps": config.warmup_steps,
                     "seconds": train_seconds, "cpu_seconds": cpu_seconds,
                     "seconds_per_step": train_seconds / max(1, steps - resumed["step"]),
                     "tokens_per_second": tokens_here / train_seconds, "device": str(device),
                     "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                     "load_average": {"start": load_start, "end": load_end},
                     "torch": torch.__version__, "python": platform.python_version()},
    }
    summary["seconds"] = time.perf_counter() - t_start
    write_run(model, history, summary, Path(args.out))
    print(f"saved to {args.out}/ (config.json, model.safetensors, history.json, summary.json, loss.png)")
    if args.bundle:
        target = bundled_dir("tiny")
        size = write_bundle(model, history, summary, target)
        print(f"bundled into {target}/ (model.safetensors {size / 1e6:.1f} MB float16, README.md)")


def per_source_losses(model: GPT, parts: list[SourceBlocks], batch_size: int) -> dict[str, float]:
    return {part.source.name: heldout_loss(model, part.heldout, batch_size) for part in parts}


def source_summary(part: SourceBlocks, before: dict, after: dict) -> dict:
    s, pkg = part.source, part.source.package
    return {"name": s.name, "title": s.title, "licence": s.licence, "weight": s.weight, "note": s.note,
            "package": dataclasses.asdict(pkg) if pkg else None, "tokens": part.tokens,
            "train_blocks": len(part.train), "heldout_blocks": len(part.heldout),
            "heldout_loss_before": before[s.name], "heldout_loss": after[s.name]}


def run_info(args, steps: int, batch_size: int) -> dict:
    """What a resumed run must share with its checkpoint, besides the training settings."""
    return {"command": "demos.pretrain", "smoke": args.smoke, "weights": args.weights,
            "steps": steps, "batch_size": batch_size}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return run_command(lambda: body(args), out=args.out)


if __name__ == "__main__":
    raise SystemExit(main())
