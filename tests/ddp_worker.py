"""One process of a multi-process training run, for tests/test_scale.py (a plain script, not a test).

    python tests/ddp_worker.py CASE OUT --batch-size B --grad-accum A --steps K   # one process, no group
    RANK=r WORLD_SIZE=n MASTER_ADDR=... MASTER_PORT=... python tests/ddp_worker.py CASE OUT ...

CASE is lora or prefix: train that technique on a small random GPT with `minigpt.train` (through
`train_prefix` for the prefix) and, in rank 0, save the trained tensors to OUT (safetensors).
Every process builds the same model and data from the same seeds, as the commands do. The
examples are prompt -> completion pairs of different lengths, so the micro-batches hold
different numbers of target tokens and the loss must be normalised by the global count.

CASE fail trains LoRA, but rank 1's loss raises at its second step: rank 0 must stop with
minigpt.PeerFailed (it prints the exception's class name and exits 3), not wait forever.

CASE mtl trains an MTL-LoRA on three tasks whose examples are mixed in every batch (task t's tokens are
t·1000 .. t·1000+999, so a token says which task it belongs to); every rank also writes what its
micro-batches held, [(task ids, first tokens)] per step, to OUT.rankR.json (R its rank).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt import GPT, Example, GPTConfig, PeerFailed, TrainConfig, lm_loss_fn, processes, save_tensors, train  # noqa: E402
from techniques.lora import (apply_lora, apply_mtl_lora, collate_mtl, lora_parameters, mtl_loss_fn,  # noqa: E402
                             mtl_modules, mtl_parameters, task_examples)
from techniques.prefix import PrefixTuning, train_prefix  # noqa: E402

CFG = GPTConfig(vocab_size=50257, n_positions=48, n_embd=32, n_layer=2, n_head=4,
                embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)


def examples(n: int = 23) -> list[Example]:
    """Prompt -> completion pairs: 3-9 prompt tokens (no loss), 2-12 completion tokens (loss)."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        p, c = int(torch.randint(3, 10, (1,), generator=g)), int(torch.randint(2, 13, (1,), generator=g))
        ids = torch.randint(0, CFG.vocab_size, (p + c,), generator=g).tolist()
        out.append(Example(ids, [0] * p + [1] * c))
    return out


SEEN: list[tuple[list[int], list[int]]] = []  # mtl: (task ids, first tokens) of each micro-batch this process ran


def task_data(n_per_task: int = 8) -> list:
    """Three tasks' prompt -> completion examples, tagged with their task ids; task t's tokens lie in
    [t·1000, t·1000 + 1000)."""
    return task_examples([[Example([t * 1000 + i % 1000 for i in e.input_ids], e.loss_mask)
                           for e in examples(n_per_task + t)] for t in range(3)])


def run_mtl(model: GPT, config: TrainConfig) -> dict[str, torch.Tensor]:
    apply_mtl_lora(model, 3, targets=("c_attn", "mlp.c_fc"), r=4, alpha=8, n_up=2, tau=0.7)
    with torch.no_grad():  # B^i start at 0; non-zero so that A's and Λ's gradients are too from the first step
        for m in mtl_modules(model):
            m.B.normal_(std=0.05, generator=torch.Generator().manual_seed(m.B.numel()))
    inner = mtl_loss_fn(model)
    SEEN.clear()

    def loss_fn(batch):
        SEEN.append((batch["task_ids"].tolist(), batch["input_ids"][:, 0].tolist()))
        return inner(batch)
    train(mtl_parameters(model), loss_fn, task_data(), config=config, collate_fn=collate_mtl)
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def run(case: str, batch_size: int, grad_accum: int, steps: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(CFG)
    config = TrainConfig(max_steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=1e-3, progress=False,
                         eval_every=1000)
    if case == "mtl":
        return run_mtl(model, config)
    data = examples()
    if case == "prefix":
        prefix = PrefixTuning(CFG, 4, projection=True, hidden_size=16)
        train_prefix(model, prefix, data, config=config)
        return {k: v.detach() for k, v in prefix.state_dict().items()}
    apply_lora(model, r=4, alpha=8, targets=("c_attn", "mlp.c_fc"), verbose=False)
    with torch.no_grad():  # B starts at 0; make it non-zero so that A's gradient is too from the first step
        for n, p in model.named_parameters():
            if n.endswith(".B"):
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(len(n)))
    loss_fn = lm_loss_fn(model)
    if case == "fail":
        calls = [0]

        def loss_fn(batch, inner=loss_fn):
            calls[0] += 1
            if processes().rank == 1 and calls[0] == 2:
                raise ValueError("rank 1 fails on purpose")
            return inner(batch)
    train(lora_parameters(model), loss_fn, data, config=config)
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("case", choices=("lora", "prefix", "fail", "mtl"))
    p.add_argument("out")
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    try:
        tensors = run(args.case, args.batch_size, args.grad_accum, args.steps)
    except PeerFailed as e:
        print(f"PeerFailed: {e}", flush=True)
        return 3
    if processes().is_main:
        save_tensors(tensors, args.out)
    if args.case == "mtl":
        Path(f"{args.out}.rank{processes().rank}.json").write_text(json.dumps(SEEN))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
