"""python -m techniques.grpo train: LoRA trained by GRPO (grpo.py) on a file of prompts, from the command line.

    train  sample G completions of --batch-prompts prompts per step, score them with --reward (the SST-2 head,
           a bag of words, or any module:function), and take clipped policy-gradient steps on the LoRA
           parameters with β·KL_k3 to the base (the adapters switched off). The last ~20% of the prompts file
           (or --eval-prompts FILE) is held out: mean reward and KL to the base on it, before -> after, sampled
           from the same seed, and a few samples before/after from the same seeds.

It writes, only once training has finished and as one atomic save of OUT (minigpt.io):
    OUT/adapter/       the LoRA adapter in peft's format (adapter_config.json + adapter_model.safetensors), which
                       `python -m minigpt generate --lora OUT/adapter` loads;
    OUT/history.json   one record per step (reward mean/std, KL, clipped fraction, completion length, loss), the
                       held-out evaluation before/after and the run's options;
    OUT/samples.json   held-out prompts with their completions before and after, from the same seeds;
    OUT/curves.png     reward and KL per step.
The adapter has its own subfolder so that OUT stays one run: the adapter files are not mixed with the run's records.

The model options and the error policy (a user's mistake is one line `error: ...`, exit 2) come from `minigpt.cli`,
and so do the long-run options every training command shares: --precision (bf16 autocast of the policy's forward
passes), --grad-accum (micro-batches of whole groups), --save-every / --resume (OUT/train_state, an exact resume).
--dora and --quantize nf4 (QLoRA) are LoRA's own options (`techniques.lora`). Under torchrun the prompts' groups are
sharded over the processes (grpo.py's docstring); rank 0 alone evaluates, prints and saves:

    torchrun --standalone --nproc_per_node 2 -m techniques.grpo train --prompts FILE --reward bow --bag positive_words
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from minigpt import get_tokenizer
from minigpt import resolve_device, resolve_precision
from minigpt.cli import CHECKPOINT_DIR, add_model_args, add_scale_args, is_main_process, positive_int, run_command
from minigpt.io import atomic_save_dir, write_json
from techniques.lora import apply_lora, lora_disabled, lora_summary, save_adapter
from techniques.lora.__main__ import add_quantize_args, check_quantize_args, load_model, quantize_name

from .grpo import LOSS_TYPES, SCALES, GRPOConfig, check_rewards, completion_logps, grpo_train, kl_k3, sample_group
from .rewards import load_reward

ADAPTER_DIR = "adapter"
PRECISION_NOTE = ("GRPO on the bundled tiny model, 2-core CPU: bf16 sampled 1.1x faster than fp32 and updated 0.87x "
                  "as fast, so fp32 is the default here")
N_SAMPLES = 3          # held-out prompts whose completions go into samples.json (each before and after)
EVAL_SEED_OFFSET = 1   # the held-out sampling seed is --seed + this, the same before and after


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m techniques.grpo", description="GRPO on LoRA adapters of GPT-2.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a LoRA adapter by GRPO on a file of prompts",
                       description="Train LoRA by GRPO (DeepSeekMath sec. 4.1) on --prompts with --reward; save the "
                                   "adapter (peft format) in OUT/adapter, history.json, samples.json, curves.png.")
    t.add_argument("--prompts", required=True, metavar="FILE",
                   help="one prompt per line (blank lines skipped); the last ~20%% are held out for the "
                        "before/after evaluation unless --eval-prompts is given")
    t.add_argument("--eval-prompts", metavar="FILE", help="held-out prompts, one per line (default: the last ~20%% "
                   "of --prompts)")
    t.add_argument("--reward", required=True, help="sst2 (a PPLM attribute head: needs --discrim), bow (a bag-of-"
                   "words rate: needs --bag), or module:function (a callable texts -> floats)")
    t.add_argument("--discrim", metavar="DIR", help="with --reward sst2: a head folder saved by "
                   "`python -m techniques.pplm train-discriminator`")
    t.add_argument("--label", default="positive", help="with --reward sst2: the class whose probability is the "
                   "reward (default: positive)")
    t.add_argument("--bag", metavar="NAME|FILE", help="with --reward bow: a shipped word list (e.g. positive_words) "
                   "or a file of words")
    t.add_argument("--out", required=True, metavar="DIR", help="where adapter/, history.json, samples.json and "
                   "curves.png go (written only once training has finished)")
    add_model_args(t, default_model="tiny")
    lora = t.add_argument_group("LoRA")
    lora.add_argument("--r", type=positive_int, default=8, help="rank of B·A (default: 8)")
    lora.add_argument("--alpha", type=float, default=16, help="scaling numerator: s = alpha/r (default: 16)")
    lora.add_argument("--targets", default="c_attn",
                      help="comma-separated: c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj, c_proj (default: c_attn)")
    lora.add_argument("--dora", action="store_true", help="DoRA: a trained magnitude on top of LoRA's direction")
    add_quantize_args(lora)
    d = GRPOConfig()
    g = t.add_argument_group("GRPO")
    g.add_argument("--num-generations", "-G", type=int, default=d.num_generations,
                   help=f"G, completions per prompt; >= 2 (default: {d.num_generations})")
    g.add_argument("--max-completion-length", type=positive_int, default=d.max_completion_length,
                   help=f"L_max, tokens per completion (default: {d.max_completion_length})")
    g.add_argument("--beta", type=float, default=d.beta, help=f"β, the KL_k3 coefficient (default: {d.beta})")
    g.add_argument("--epsilon-low", type=float, default=d.epsilon_low, help=f"ε_low (default: {d.epsilon_low})")
    g.add_argument("--epsilon-high", type=float, default=d.epsilon_high, help=f"ε_high (default: {d.epsilon_high})")
    g.add_argument("--num-iterations", type=positive_int, default=d.num_iterations,
                   help=f"μ, update passes over each sampled batch (default: {d.num_iterations})")
    g.add_argument("--loss-type", choices=LOSS_TYPES, default=d.loss_type,
                   help=f"how the per-token losses are averaged (default: {d.loss_type}; see docs/rl.md)")
    g.add_argument("--scale-rewards", choices=SCALES, default=d.scale_rewards,
                   help=f"the std that divides Â: per group, per batch or none (default: {d.scale_rewards})")
    g.add_argument("--temperature", type=float, default=d.temperature,
                   help=f"sampling temperature (default: {d.temperature})")
    g.add_argument("--top-k", type=positive_int, default=None, help="sample among the k likeliest (default: all)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (default: off)")
    g.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate (default: {d.lr:g})")
    g.add_argument("--steps", type=positive_int, default=d.steps, help=f"GRPO steps (default: {d.steps})")
    g.add_argument("--batch-prompts", type=positive_int, default=2,
                   help="prompts per step, each sampled G times (default: 2)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_scale_args(t.add_argument_group("long runs"), precision="fp32", precision_note=PRECISION_NOTE)
    return p


def read_prompts(path, what: str) -> list[str]:
    """The non-blank lines of a prompts file, or a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file; give a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{what} {path} has no prompts (it is empty or blank); put one prompt per line")
    return prompts


def split_prompts(args) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): --eval-prompts, or the last ~20% of --prompts (at least one)."""
    prompts = read_prompts(args.prompts, "--prompts")
    if args.eval_prompts:
        return prompts, read_prompts(args.eval_prompts, "--eval-prompts")
    if len(prompts) < 2:
        raise ValueError(f"--prompts {args.prompts} has 1 prompt: too few to hold some out for the evaluation; add "
                         "prompts or give --eval-prompts FILE")
    n_eval = max(1, round(0.2 * len(prompts)))
    return prompts[:-n_eval], prompts[-n_eval:]


def check_prompt_lengths(tokenizer, prompts, L: int, n_ctx: int, what: str) -> None:
    for i, p in enumerate(prompts, 1):
        n = len(tokenizer.encode(p))
        if n + L > n_ctx:
            raise ValueError(f"{what}: prompt {i} ({p[:40]!r}) has {n} tokens, and with --max-completion-length {L} "
                             f"that exceeds the model's context of {n_ctx}; shorten it or lower "
                             "--max-completion-length")


def config_from_args(args) -> GRPOConfig:
    cfg = GRPOConfig(num_generations=args.num_generations, max_completion_length=args.max_completion_length,
                     beta=args.beta, epsilon_low=args.epsilon_low, epsilon_high=args.epsilon_high,
                     num_iterations=args.num_iterations, loss_type=args.loss_type, scale_rewards=args.scale_rewards,
                     lr=args.lr, steps=args.steps, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                     seed=args.seed, precision=resolve_precision(args.precision, resolve_device(args.device)),
                     grad_accum=args.grad_accum, save_every=args.save_every, resume_from=args.resume,
                     checkpoint_dir=str(Path(args.out) / CHECKPOINT_DIR))
    if args.resume and not Path(args.resume).is_dir():
        raise FileNotFoundError(f"--resume {args.resume}: no such folder; give OUT/{CHECKPOINT_DIR} of the run "
                                "to continue")
    cfg.check()
    for name in ("beta", "epsilon_low", "epsilon_high"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if not cfg.lr > 0:
        raise ValueError(f"--lr must be > 0, got {cfg.lr}")
    if not cfg.temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {cfg.temperature}")
    if cfg.top_p is not None and not 0 < cfg.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {cfg.top_p}")
    return cfg


def check_reward_name(spec: str) -> None:
    """An unknown --reward fails before the model is loaded."""
    if spec not in ("sst2", "bow") and ":" not in spec:
        raise ValueError(f"unknown --reward {spec!r}: use one of sst2, bow, or module:function")


@torch.no_grad()
def evaluate(model, tokenizer, prompts, reward, cfg: GRPOConfig, seed: int, chunk: int = 8) -> dict:
    """Mean reward and mean per-token KL_k3(π_θ ‖ π_ref) over G samples of each held-out prompt, from `seed`;
    and the first completion of the first N_SAMPLES prompts."""
    model.eval()
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    rewards, kl_sum, n_tok, samples = [], 0.0, 0.0, []
    for i in range(0, len(prompts), chunk):
        part = prompts[i:i + chunk]
        seqs, attention, cmask, texts = sample_group(model, tokenizer, part, cfg, gen)
        T = seqs.size(1) - cmask.size(1)
        logp = completion_logps(model, seqs, attention, T)
        with lora_disabled(model):
            ref = completion_logps(model, seqs, attention, T)
        m = cmask.float()
        kl_sum += float((kl_k3(logp, ref) * m).sum())
        n_tok += float(m.sum())
        rewards += check_rewards(reward(texts), len(texts)).tolist()
        for j, p in enumerate(part):
            if len(samples) < N_SAMPLES:
                samples.append({"prompt": p, "completion": texts[j * cfg.num_generations]})
    return {"reward": sum(rewards) / len(rewards), "kl": kl_sum / max(n_tok, 1.0), "samples": samples,
            "n_prompts": len(prompts), "n_completions": len(rewards), "seed": seed}


def draw_curves(history: list[dict], path: Path, title: str) -> None:
    """Reward mean (± std band) and KL_k3 per step, two panels, on matplotlib's Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    fig = Figure(figsize=(9, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax_r, ax_k = fig.subplots(1, 2)
    steps = [h["step"] for h in history]
    mean = [h["reward_mean"] for h in history]
    std = [h["reward_std"] for h in history]
    ax_r.plot(steps, mean, color="tab:blue", lw=1.6, label="mean over the step's completions")
    ax_r.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                      color="tab:blue", alpha=0.2, label="± std")
    ax_r.set(title="reward per step (training prompts)", xlabel="GRPO step", ylabel="reward (reward's own units)")
    ax_r.legend(fontsize=8)
    kl = [(h["step"], h["kl"]) for h in history if h.get("kl") is not None]
    if kl:
        ax_k.plot([s for s, _ in kl], [v for _, v in kl], color="tab:red", lw=1.6)
    else:
        ax_k.text(0.5, 0.5, "β = 0: KL to the base not computed in training", ha="center", va="center",
                  transform=ax_k.transAxes, fontsize=9)
    ax_k.set(title="KL_k3 to the base (adapters off), per step", xlabel="GRPO step",
             ylabel="mean KL per completion token (nats)")
    for ax in (ax_r, ax_k):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110, facecolor="white")


def run_info(args) -> dict:
    """What a resumed run must share with its checkpoint besides GRPOConfig: the model, the prompts, the reward,
    the adapter's shape."""
    return {"command": "techniques.grpo train", "model": args.weights or args.model, "prompts": str(args.prompts),
            "eval_prompts": args.eval_prompts, "reward": args.reward, "discrim": args.discrim, "label": args.label,
            "bag": args.bag, "r": args.r, "alpha": args.alpha, "targets": args.targets, "dora": args.dora,
            "quantize": quantize_name(args)}


def train_command(args) -> None:
    cfg = config_from_args(args)            # every option is checked before anything is loaded
    check_quantize_args(args)
    check_reward_name(args.reward)
    train_prompts, eval_prompts = split_prompts(args)
    tokenizer = get_tokenizer()
    model = load_model(args)                # QLoRA: the 4-bit W0' first, so the adapter (and DoRA's m) starts from it
    n_ctx = model.config.n_positions
    check_prompt_lengths(tokenizer, train_prompts, cfg.max_completion_length, n_ctx, f"--prompts {args.prompts}")
    check_prompt_lengths(tokenizer, eval_prompts, cfg.max_completion_length, n_ctx,
                         f"--eval-prompts {args.eval_prompts}" if args.eval_prompts else f"--prompts {args.prompts}")
    apply_lora(model, r=args.r, alpha=args.alpha, targets=[t.strip() for t in args.targets.split(",") if t.strip()],
               use_dora=args.dora, verbose=False)
    reward = load_reward(args.reward, model, discrim=args.discrim, label=args.label, bag=args.bag)
    print(lora_summary(model))
    print(f"GRPO: {cfg.steps} steps of {args.batch_prompts} prompts x G = {cfg.num_generations} completions "
          f"(<= {cfg.max_completion_length} tokens) on {len(train_prompts)} training prompts; β = {cfg.beta}, "
          f"loss {cfg.loss_type}; {len(eval_prompts)} held-out prompts", flush=True)
    eval_seed = args.seed + EVAL_SEED_OFFSET
    main_process = is_main_process()        # under torchrun rank 0 alone evaluates and saves
    before = evaluate(model, tokenizer, eval_prompts, reward, cfg, eval_seed) if main_process else None
    history = grpo_train(model, tokenizer, train_prompts, reward, cfg, batch_prompts=args.batch_prompts,
                         progress=not args.no_progress, run_info=run_info(args))
    if not main_process:
        return
    after = evaluate(model, tokenizer, eval_prompts, reward, cfg, eval_seed)
    if not all(math.isfinite(h["loss"]) for h in history):
        raise FloatingPointError("the GRPO loss became NaN or inf; lower --lr")
    samples = [{"prompt": b["prompt"], "before": b["completion"], "after": a["completion"]}
               for b, a in zip(before["samples"], after["samples"])]
    evaluation = {k: {"reward": e["reward"], "kl": e["kl"]} for k, e in (("before", before), ("after", after))}
    evaluation.update(n_prompts=before["n_prompts"], n_completions=before["n_completions"], seed=eval_seed)
    record = {"history": history, "eval": evaluation,
              "options": {k: v for k, v in vars(args).items() if k != "command"}}
    with atomic_save_dir(args.out) as tmp:   # one save: the whole OUT appears at once, or nothing
        save_adapter(model, tmp / ADAPTER_DIR)
        write_json(record, tmp / "history.json")
        write_json({"seed": eval_seed, "samples": samples}, tmp / "samples.json")
        draw_curves(history, tmp / "curves.png", f"GRPO on LoRA: reward {args.reward}, β = {cfg.beta}, "
                    f"G = {cfg.num_generations}, lr {cfg.lr:g}")
    print(f"held-out reward {before['reward']:.4f} -> {after['reward']:.4f}, KL to the base "
          f"{before['kl']:.4f} -> {after['kl']:.4f} nats/token ({before['n_completions']} completions, seed "
          f"{eval_seed})")
    for s in samples:
        print(f"  {s['prompt']!r}\n    before: {s['before']!r}\n    after:  {s['after']!r}")
    print(f"saved the adapter to {Path(args.out) / ADAPTER_DIR} (python -m minigpt generate --lora "
          f"{Path(args.out) / ADAPTER_DIR}), history.json, samples.json and curves.png to {args.out}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: train_command(args), out=args.out)


if __name__ == "__main__":
    raise SystemExit(main())
