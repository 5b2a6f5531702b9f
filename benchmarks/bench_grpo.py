"""GRPO: one step of minigpt's GRPO against TRL's GRPOTrainer + peft LoRA, on the same random GPT-2 124M weights.

    python benchmarks/bench_grpo.py [--quick] [--device cpu] [--threads N] [--precisions fp32,bf16] [--profile]

Both sides get the same step: `--prompts` prompts (default 2), G = `--num-generations` completions each (default 4),
exactly `--completion-len` new tokens (default 32; a random model almost never samples eos), LoRA r=8, alpha=16 on
c_attn, β = 0.04, μ = 1, loss "dapo", AdamW lr 1e-4, temperature 1, no top-k/top-p, the same reward (the fraction
of letters in each completion's text).

- ours: the body of `techniques.grpo.grpo_train` called piece by piece with a timer around each: `sample_group`
  (minigpt.generate with the KV cache), then scoring (reward, advantages, the π_ref pass of `completion_logps`
  with the adapters off, and the π_old pass only where μ > 1: at μ = 1 π_old is the update pass, detached), then
  the update (`completion_logps` with grad, `grpo_loss`, backward, AdamW).
- TRL: `GRPOTrainer.train()` for `--steps` steps (report_to none, no vllm, save_strategy no, offline from the
  saved folder), in a subclass whose `_generate` and `_generate_and_score_completions` time themselves (calling
  super()); a TrainerCallback times the whole step (on_step_begin .. on_step_end, optimizer step included).
  generate = `_generate` (model.generate with the peft model); scoring = `_generate_and_score_completions` minus
  it (rewards, advantages, the ref pass with the adapter disabled); update = the step minus both. The first
  step of the run is the warm-up and is dropped.
- TRL's GRPOConfig turns gradient checkpointing on by default (and bf16); ours has none, so it is off here for the
  same work on both sides (`--trl-gradient-checkpointing` measures TRL's default instead).
- bf16: the forward passes under torch.autocast(bf16) on both sides: ours through the `precision` argument of
  sample_group / completion_logps, as `grpo_train(precision="bf16")` runs (`--ours-cast-frozen` also stores our
  frozen Linears in bf16 once, as `techniques.lora train --precision bf16` does and grpo_train does not); TRL
  through `bf16=True`, i.e. accelerate's autocast.
- The sides cannot alternate step by step (TRL's step lives inside its train loop), so they run in turns,
  ours, TRL, TRL, ours ... `--rounds` times, each turn `--steps` steps, and the medians are reported.
- Peak memory: each side alone in a subprocess, from the loaded model on: one whole step including AdamW's state
  coming into existence (ours: build the optimizer and run one step; TRL: `train()` for one step), after a
  warm-up step on another optimizer, measured by `timing.peak_memory`: the bytes torch's allocator holds (exact,
  from the profiler's memory events on CPU) and the resident set (sampled every ms: MKL's and the allocator's
  caches included, noisier). tracemalloc is not used: it sees Python objects only, not tensor storage.
Reported: seconds per step split into generate / scoring / update, and ratios ours / TRL (target <= 1: no slower,
at most TRL's memory).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from minigpt import GPT, PRECISIONS, cast_frozen_linears, get_tokenizer, resolve_device  # noqa: E402
from techniques.grpo import GRPOConfig, completion_logps, group_advantages, grpo_loss, sample_group  # noqa: E402
from techniques.grpo.grpo import check_rewards  # noqa: E402
from techniques.lora import apply_lora, lora_disabled, lora_parameters  # noqa: E402
from timing import peak_memory, print_profile_split, profile_split  # noqa: E402

PROMPTS = ["The movie was", "I think that the food", "Yesterday my friend said", "The weather today",
           "Once upon a time", "The best thing about", "My favourite book is", "After the game we"]
PARTS = ("generate", "scoring", "update")


def letter_rate(texts):
    """The shared reward: the fraction of characters that are letters (any cheap, deterministic score would do)."""
    return [sum(c.isalpha() for c in t) / max(1, len(t)) for t in texts]


def trl_reward(prompts, completions, **kw):
    return letter_rate(completions)


def grpo_config(args) -> GRPOConfig:
    return GRPOConfig(num_generations=args.num_generations, max_completion_length=args.completion_len,
                      beta=args.beta, num_iterations=args.mu, loss_type="dapo", lr=args.lr, seed=args.seed)


# ---- ours ------------------------------------------------------------------------------
def ours_side(args, device, precision):
    """A function running one GRPO step of ours and returning {part: seconds}; and the model's optimizer maker."""
    model = GPT.from_pretrained(args.weights, device=device)
    apply_lora(model, r=args.r, alpha=2 * args.r, targets=("c_attn",), verbose=False)
    if args.ours_cast_frozen:
        cast_frozen_linears(model, PRECISIONS[precision])
    tok, cfg = get_tokenizer(), grpo_config(args)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    state = {"opt": torch.optim.AdamW(lora_parameters(model), lr=cfg.lr, weight_decay=0.0), "i": 0}

    def step():
        i = state["i"]
        state["i"] += 1
        prompts = [PROMPTS[(i * args.prompts + k) % len(PROMPTS)] for k in range(args.prompts)]
        t0 = time.perf_counter()
        model.eval()
        seqs, attention, cmask, texts = sample_group(model, tok, prompts, cfg, gen, precision)
        t1 = time.perf_counter()
        T = seqs.size(1) - cmask.size(1)
        r = check_rewards(letter_rate(texts), len(texts)).to(seqs.device)
        A = group_advantages(r, cfg.num_generations, cfg.scale_rewards)
        with torch.no_grad():
            # μ = 1: π_old is the update pass's own log π_θ, detached (as grpo_train and TRL do): no pass here
            old = completion_logps(model, seqs, attention, T, precision) if cfg.num_iterations > 1 else None
            ref = None
            if cfg.beta != 0.0:
                with lora_disabled(model):
                    ref = completion_logps(model, seqs, attention, T, precision)
        t2 = time.perf_counter()
        model.train()
        for _ in range(cfg.num_iterations):
            logp = completion_logps(model, seqs, attention, T, precision)
            loss = grpo_loss(logp, old if old is not None else logp.detach(), ref, A, cmask, cfg)
            state["opt"].zero_grad(set_to_none=True)
            loss.backward()
            state["opt"].step()
        t3 = time.perf_counter()
        return {"generate": t1 - t0, "scoring": t2 - t1, "update": t3 - t2, "tokens": int(cmask.sum())}

    def fresh_optimizer():
        state["opt"] = torch.optim.AdamW(lora_parameters(model), lr=cfg.lr, weight_decay=0.0)
    return step, fresh_optimizer


# ---- TRL -------------------------------------------------------------------------------
def hf_tokenizer():
    """transformers' GPT-2 tokenizer from the encoder.json / vocab.bpe minigpt ships (no download)."""
    from transformers import GPT2TokenizerFast
    data = ROOT / "minigpt" / "data"
    tok = GPT2TokenizerFast(vocab_file=str(data / "encoder.json"), merges_file=str(data / "vocab.bpe"))
    tok.pad_token = tok.eos_token
    return tok


def trl_trainer(args, device, precision, steps, out_dir):
    """(GRPOTrainer subclass instance timing its own parts, the list its step records go to)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import GPT2LMHeadModel, TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    records: list[dict] = []

    class Timed(GRPOTrainer):
        def _generate(self, prompts):
            t = time.perf_counter()
            out = super()._generate(prompts)
            records[-1]["generate"] += time.perf_counter() - t
            return out

        def _generate_and_score_completions(self, inputs):
            t = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            records[-1]["gen_and_score"] += time.perf_counter() - t
            records[-1]["tokens"] = int(out["completion_mask"].sum())
            return out

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            records.append({"generate": 0.0, "gen_and_score": 0.0, "t0": time.perf_counter()})

        def on_step_end(self, *a, **k):
            r = records[-1]
            r["step"] = time.perf_counter() - r.pop("t0")

    cfg = TRLConfig(output_dir=str(out_dir), per_device_train_batch_size=args.prompts * args.num_generations,
                    num_generations=args.num_generations, max_completion_length=args.completion_len,
                    beta=args.beta, num_iterations=args.mu, loss_type="dapo", learning_rate=args.lr,
                    weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0, temperature=1.0,
                    top_k=0, top_p=1.0, max_steps=steps, logging_steps=10 ** 6, save_strategy="no",
                    report_to="none", use_cpu=torch.device(device).type == "cpu", bf16=precision == "bf16",
                    seed=args.seed, data_seed=args.seed, disable_tqdm=True, use_vllm=False,
                    dataloader_num_workers=0, gradient_checkpointing=args.trl_gradient_checkpointing)
    model = GPT2LMHeadModel.from_pretrained(args.weights)
    lora = LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=["c_attn"], fan_in_fan_out=True,
                      lora_dropout=0.0, task_type="CAUSAL_LM")
    data = Dataset.from_dict({"prompt": PROMPTS * 64})
    trainer = Timed(model=model, reward_funcs=trl_reward, args=cfg, train_dataset=data, processing_class=hf_tokenizer(),
                    peft_config=lora, callbacks=[StepTimer()])
    return trainer, records


def trl_parts(records):
    """{part: seconds} per step from the trainer's records."""
    return [{"generate": r["generate"], "scoring": r["gen_and_score"] - r["generate"],
             "update": r["step"] - r["gen_and_score"], "tokens": r.get("tokens", 0)} for r in records]


# ---- measuring -------------------------------------------------------------------------
def step_times(args, device, precision) -> dict[str, list[dict]]:
    """Per-step part times of each side, in turns (ours, TRL, TRL, ours, ...), warm-up steps dropped."""
    ours_step, _ = ours_side(args, device, precision)
    ours_step()  # warm-up
    samples = {"ours": [], "trl": []}
    with tempfile.TemporaryDirectory() as out:
        for i in range(args.rounds):
            order = ("ours", "trl") if i % 2 == 0 else ("trl", "ours")
            for side in order:
                if side == "ours":
                    new = [ours_step() for _ in range(args.steps)]
                else:
                    trainer, records = trl_trainer(args, device, precision, args.steps + 1, out)
                    trainer.train()
                    new = trl_parts(records)[1:]   # its first step is the warm-up
                samples[side] += new
                for s in new:   # as they come, so a run cut short still shows what it measured
                    print(f"[{precision} {side}] " + ", ".join(f"{k} {s[k]:.3f}" for k in PARTS), flush=True)
    return samples


def memory_worker(side: str, args, device) -> dict:
    """Peak memory of one whole step, AdamW state included, this side alone ({"allocated", "rss"} bytes)."""
    _, precision = side.split(":")
    if side.startswith("ours"):
        step, fresh = ours_side(args, device, precision)
        step()                              # warm-up (caches, first-call allocations)
        fresh()

        def measured():
            step()
    else:
        tmp = tempfile.mkdtemp()
        warm, _ = trl_trainer(args, device, precision, 1, tmp)
        warm.train()                        # warm-up: the same first-call costs as ours
        trainer, _ = trl_trainer(args, device, precision, 1, tmp)

        def measured():
            trainer.train()
    return peak_memory(measured, device)


def run_memory_worker(side: str, args) -> dict:
    cmd = [sys.executable, __file__, "--memory-worker", side, "--weights", str(args.weights), "--device", args.device,
           "--threads", str(args.threads), "--prompts", str(args.prompts), "--num-generations",
           str(args.num_generations), "--completion-len", str(args.completion_len), "--r", str(args.r),
           "--beta", str(args.beta), "--mu", str(args.mu), "--seed", str(args.seed)]
    cmd += ["--trl-gradient-checkpointing"] if args.trl_gradient_checkpointing else []
    cmd += ["--ours-cast-frozen"] if args.ours_cast_frozen else []
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{side} memory worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def profiles(args, device, precision) -> dict:
    """torch.profiler's split of one step of each side (after a warm-up step): matrix multiplies against the rest."""
    ours_step, _ = ours_side(args, device, precision)
    trainer, _ = trl_trainer(args, device, precision, 1, tempfile.mkdtemp())
    return profile_split({"ours": ours_step, "trl": trainer.train}, top=8)


def make_weights(folder: Path, tiny: bool = False):
    """Random GPT-2 124M weights saved by transformers (no download needed); `tiny`: 2 layers x 64 for tests."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    extra = dict(n_layer=2, n_head=2, n_embd=64, n_positions=128) if tiny else {}
    GPT2LMHeadModel(GPT2Config(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, **extra)).save_pretrained(folder)


def medians(samples: list[dict]) -> dict[str, float]:
    out = {k: statistics.median(s[k] for s in samples) for k in PARTS}
    out["total"] = statistics.median(sum(s[k] for k in PARTS) for s in samples)
    out["tokens"] = statistics.median(s["tokens"] for s in samples)
    return out


def table(precisions, results: dict, peaks: dict) -> str:
    mb = 2 ** 20
    lines = ["| precision | measure | ours | TRL + peft | ours / TRL |", "|---|---|---:|---:|---:|"]
    for p in precisions:
        if p in results:
            o, t = medians(results[p]["ours"]), medians(results[p]["trl"])
            for k in (*PARTS, "total"):
                lines.append(f"| {p} | s / step: {k} | {o[k]:.3f} | {t[k]:.3f} | {o[k] / t[k]:.2f} |")
            lines.append(f"| {p} | completion tokens / step | {o['tokens']:.0f} | {t['tokens']:.0f} | |")
        for key, label in (("allocated", "peak allocated (MiB)"), ("rss", "peak RSS (MiB)")):
            if f"ours:{p}" in peaks and key in peaks[f"ours:{p}"]:
                a, b = peaks[f"ours:{p}"][key], peaks[f"trl:{p}"][key]
                lines.append(f"| {p} | {label} | {a / mb:.0f} | {b / mb:.0f} | {a / max(b, 1):.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 round of 2 steps, 16 completion tokens, no memory")
    p.add_argument("--tiny", action="store_true", help="a 2-layer x 64 model instead of 124M (for the tests)")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default: auto)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    p.add_argument("--rounds", type=int, default=2, help="turns per side (default: 2)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per turn (default: 2)")
    p.add_argument("--prompts", type=int, default=2, help="prompts per step (default: 2)")
    p.add_argument("--num-generations", type=int, default=4, help="G (default: 4)")
    p.add_argument("--completion-len", type=int, default=32, help="new tokens per completion (default: 32)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--mu", type=int, default=1, help="num_iterations μ (default: 1)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (default: both)")
    p.add_argument("--profile", action="store_true", help="also profile one step per side (torch.profiler, CPU)")
    p.add_argument("--trl-gradient-checkpointing", action="store_true",
                   help="TRL's own default (recompute the forward in backward); off by default: ours does not")
    p.add_argument("--ours-cast-frozen", action="store_true",
                   help="store our frozen Linears in bf16 once (cast_frozen_linears), as techniques.lora train does; "
                        "grpo_train does not, so off by default")
    p.add_argument("--memory-only", action="store_true", help="only the peak-memory subprocesses, no step timing")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
    bad = [x for x in args.precisions if x not in ("fp32", "bf16")]
    if bad:
        p.error(f"unknown precision {bad}; choose fp32 and/or bf16")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args, device)))
        return
    if args.quick:
        args.rounds, args.steps, args.completion_len, args.no_memory = 1, 2, 16, True
    args.device = str(device)
    with tempfile.TemporaryDirectory() as tmp:
        args.weights = tmp
        make_weights(Path(tmp), tiny=args.tiny)
        print(f"GPT-2 {'tiny' if args.tiny else '124M'} shape, random weights; LoRA r={args.r} alpha={2 * args.r} on "
              f"c_attn; {args.prompts} prompts x G={args.num_generations}, {args.completion_len} new tokens; "
              f"β={args.beta}, μ={args.mu}, loss dapo; TRL gradient checkpointing "
              f"{'on' if args.trl_gradient_checkpointing else 'off'}; device {device}, {args.threads} threads; "
              f"{args.rounds} turns x {args.steps} steps per side")
        results = {} if args.memory_only else {prec: step_times(args, device, prec) for prec in args.precisions}
        peaks = {} if args.no_memory else {f"{s}:{prec}": run_memory_worker(f"{s}:{prec}", args)
                                           for prec in args.precisions for s in ("ours", "trl")}
        split = {prec: profiles(args, device, prec) for prec in args.precisions} if args.profile else {}
    print()
    print(table(args.precisions, results, peaks))
    print("\n(generate: sampling the group; scoring: reward, advantages, the π_old/π_ref passes; update: the "
          "forward with grad, loss, backward, AdamW. allocated: torch's allocator, exact; RSS: sampled every ms)")
    for prec, sp in split.items():
        print(f"\n{prec}:", end="")
        print_profile_split(sp, target=1.0)
        for side, s in sp.items():
            print(f"  {side} rest: " + ", ".join(f"{k.replace('aten::', '')} {v:.2f}" for k, v in s["top_rest"]))
    return results, peaks


if __name__ == "__main__":
    main()
