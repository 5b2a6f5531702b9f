"""One process of a multi-process GRPO run, for tests/test_grpo_infra.py (a plain script, not a test).

    python tests/grpo_worker.py OUT --grad-accum A                                    # one process, no group
    RANK=r WORLD_SIZE=n MASTER_ADDR=... MASTER_PORT=... python tests/grpo_worker.py OUT --grad-accum A

Every process builds the same random GPT with LoRA (B made non-zero, so π_θ ≠ π_ref from the start and the KL
term has a gradient) and runs `grpo_train` on the same prompts; rank 0 saves the trained LoRA tensors to OUT
(safetensors). The prompts differ in length, so the micro-batches hold different numbers of completion tokens and
dapo's normaliser must be the global count; scale "batch" needs the whole batch's rewards in every process.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt import GPT, GPTConfig, get_tokenizer, processes, save_tensors  # noqa: E402
from techniques.grpo import GRPOConfig, grpo_train  # noqa: E402
from techniques.lora import apply_lora  # noqa: E402

CFG = GPTConfig(vocab_size=50257, n_positions=48, n_embd=32, n_layer=2, n_head=4,
                embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
PROMPTS = ["Hello", "A long story about a", "The cat", "Once upon a time there"]


def reward(texts):
    """The share of completion tokens in the lower half of the vocabulary (a stand-in the tests can learn)."""
    tok = get_tokenizer()
    ids = [tok.encode(t) for t in texts]
    return [sum(i < 25128 for i in x) / max(1, len(x)) for x in ids]


def model() -> GPT:
    torch.manual_seed(0)
    m = GPT(CFG)
    apply_lora(m, r=4, alpha=8, targets=("c_attn", "mlp.c_fc"), verbose=False)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(".B"):
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(len(n)))
    return m


def config(grad_accum: int, steps: int = 3) -> GRPOConfig:
    return GRPOConfig(num_generations=3, max_completion_length=6, beta=0.04, lr=1e-2, steps=steps, top_k=50,
                      seed=3, loss_type="dapo", scale_rewards="batch", num_iterations=2, grad_accum=grad_accum)


def run(grad_accum: int, steps: int = 3) -> dict[str, torch.Tensor]:
    m = model()
    grpo_train(m, get_tokenizer(), PROMPTS, reward, config(grad_accum, steps), batch_prompts=4)
    return {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--grad-accum", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(1)
    tensors = run(args.grad_accum)
    if processes().is_main:
        save_tensors(tensors, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
