"""Pre-train a tiny GPT-2 on Tiny Shakespeare from scratch, offline, on a CPU (about 3 s a step on 2 cores).

    python demos/shakespeare_from_scratch.py --out runs/shakespeare [--steps 400] [--device auto]

The same GPT class and training loop as everything else, with a small config
(4 layers, 4 heads, width 128, 128 positions) and the real GPT-2 tokenizer.
It writes a Hugging Face-layout checkpoint (so `python -m minigpt generate
--weights runs/shakespeare` and `transformers` both load it), the loss history
as JSON, a loss plot as PNG, and prints a sample before and after training.

This is what the other demos can use where the public GPT-2 weights cannot be
downloaded: a real trained model, not a faked one.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minigpt import (GPT, GPTConfig, TrainConfig, examples_from_text, generate, get_tokenizer,  # noqa: E402
                     lm_loss_fn, resolve_device, save_history, split_examples, train)

DATA = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare" / "input.txt"


def sample(model, tok, prompt: str, n: int, seed: int) -> str:
    model.eval()
    ids = torch.tensor([tok.encode(prompt)], device=model.device)
    out = generate(model, ids, max_new_tokens=n, do_sample=True, top_k=40,
                   generator=torch.Generator(device=model.device).manual_seed(seed))
    return tok.decode(out[0])


def plot(history: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train", lw=1)
    ev = [h for h in history if "eval_loss" in h]
    ax.plot([h["step"] for h in ev], [h["eval_loss"] for h in ev], "o-", label="eval")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="Tiny GPT-2 on Tiny Shakespeare")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/shakespeare", help="folder for the checkpoint, history and plot")
    p.add_argument("--data", default=str(DATA), help="a UTF-8 text file (default: the bundled Tiny Shakespeare)")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps (default 400)")
    p.add_argument("--block-size", type=int, default=128, help="tokens per training sequence (default 128)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    tok = get_tokenizer()
    text = Path(args.data).read_text(encoding="utf-8")
    examples = examples_from_text(tok.encode(text), args.block_size, source=args.data)
    train_ex, eval_ex = split_examples(examples, eval_fraction=0.05, seed=args.seed)
    config = GPTConfig(n_layer=4, n_head=4, n_embd=128, n_positions=args.block_size,
                       embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1)
    model = GPT(config).to(resolve_device(args.device))
    print(f"{len(examples)} blocks of {args.block_size} tokens; model {model.num_parameters():,} parameters")
    print("before:", sample(model, tok, "ROMEO:", 40, args.seed).replace("\n", " | "))

    model.train()
    epochs = -(-args.steps * args.batch_size // len(train_ex))
    history = train(model.parameters(), lm_loss_fn(model), train_ex, eval_examples=eval_ex[:64],
                    eval_modules=[model],
                    config=TrainConfig(epochs=epochs, max_steps=args.steps, batch_size=args.batch_size,
                                       lr=args.lr, warmup_steps=args.steps // 20, weight_decay=0.01,
                                       eval_every=max(1, args.steps // 10), seed=args.seed))
    out = Path(args.out)
    model.eval().save_pretrained(out)
    save_history(history, out)
    plot(history, out / "loss.png")
    print("after: ", sample(model, tok, "ROMEO:", 60, args.seed))
    print(f"eval loss {history[-1].get('eval_loss', float('nan')):.3f}; saved to {out}/ "
          f"(config.json, model.safetensors, history.json, loss.png)")


if __name__ == "__main__":
    main()
