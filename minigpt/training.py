"""One small training loop shared by every technique.

It trains whatever `params` it is given (LoRA's A and B, a prefix table, a
discriminator head) with a loss function the caller supplies, so the loop knows
nothing about any one technique:

    history = train(params, loss_fn, train_examples, eval_examples=..., config=TrainConfig(...))

AdamW, linear warmup then linear decay to 0, gradient clipping, a periodic
eval loss, a tqdm progress bar and a loss history (list of dicts, saved as
JSON for the demos' plots). Batches are drawn with a seeded generator, so a
run is reproducible.

Data helpers for causal language modelling live here too: plain text cut into
blocks, prompt -> completion pairs with the loss on the completion only, and a
loader for .txt / .jsonl files that names the file and line of any problem.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed
from .io import atomic_save_dir, recover_dir, write_json
from .past import extend_mask
from .tokenizer import EOT_ID, Tokenizer
from .train_state import TrainState, load_train_state, read_meta, save_train_state

IGNORE = -100  # cross_entropy's ignore_index: positions that are not targets

__all__ = ["TrainConfig", "train", "plan_steps", "evaluate", "Example", "causal_lm_loss", "collate_lm",
           "examples_from_text", "examples_from_pairs", "load_lm_data", "split_examples", "save_history", "lm_loss_fn",
           "PRECISIONS", "resolve_precision", "autocast", "cast_frozen_linears", "count_terms", "TrainingInterrupted"]


# ---- the loss --------------------------------------------------------------------------
class _CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over the rows whose target is not IGNORE, with its gradient written out:

        loss = -(1/n) Σ_i log softmax(z_i)[t_i]        dloss/dz_i = (softmax(z_i) - onehot(t_i)) / n

    (rows with target IGNORE get a zero gradient). The same numbers as F.cross_entropy(..., ignore_index),
    computed with less memory traffic: the forward keeps only log softmax(z) [N, V], and the backward turns
    that tensor into the gradient in place (exp, scale, subtract at the targets), where autograd's generic
    path allocates and fills two more [N, V] tensors (the NLL gradient, then the log-softmax gradient).
    For GPT-2's vocabulary at 8 x 128 tokens each such tensor is 196 MiB.

    Logits in bf16/fp16 (autocast) take `_LowPrecisionCrossEntropy` instead: the same math in fp32, in chunks.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # logits [N, V] fp32, targets [N]
        logp = logits.log_softmax(-1)                                     # (N, V)
        counted = targets != IGNORE                                        # (N,)
        n = counted.sum()
        picked = logp.gather(-1, targets.clamp(min=0)[:, None])[:, 0]     # (N,) log p(t_i); IGNORE rows masked next
        loss = -(picked * counted).sum() / n
        ctx.save_for_backward(logp, targets, counted, n)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        logp, targets, counted, n = ctx.saved_tensors
        scale = (grad_loss / n) * counted.to(logp.dtype)                  # (N,): 0 on IGNORE rows
        grad = logp.exp_().mul_(scale[:, None])                           # softmax(z) * scale, in place
        rows = counted.nonzero()[:, 0]
        grad[rows, targets[rows]] -= scale[rows]                           # - onehot(t) * scale
        return grad, None


class _LowPrecisionCrossEntropy(torch.autograd.Function):
    """The same loss and gradient for bf16/fp16 logits, computed in fp32 a chunk of rows at a time:

        forward:   lse_i = m_i + log Σ_v exp(z_iv - m_i),  m_i = max_v z_iv   (fp32);
                   loss = (1/n) Σ_i (lse_i - z_i[t_i])
        backward:  dloss/dz_i = (exp(z_i - lse_i) - onehot(t_i)) · g/n,  in fp32, stored in z's dtype

    Why chunks, in one reused buffer: an fp32 copy of all the logits (196 MiB at 8 x 128 tokens) is a fresh
    allocation at every step, and on a CPU a fresh allocation that large costs page faults: converting the bf16
    logits into a new fp32 tensor took 62 ms, into an existing one 6 ms. So each chunk of rows is copied into
    one fp32 buffer of at most 8 MiB and worked on in place. Only the logits (which exist anyway) and lse [N]
    are kept for the backward; the one [N, V] tensor it makes is the gradient.
    """
    CHUNK = 2 ** 21  # fp32 elements in the buffer (8 MiB)

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # logits [N, V] bf16/fp16
        N, V = logits.shape
        rows = max(1, min(N, _LowPrecisionCrossEntropy.CHUNK // V))
        buf = torch.empty(rows, V, dtype=torch.float32, device=logits.device)
        lse = torch.empty(N, dtype=torch.float32, device=logits.device)
        for i in range(0, N, rows):
            j = min(N, i + rows)
            z = buf[:j - i].copy_(logits[i:j])                                # (rows, V) fp32
            m = z.amax(-1)
            lse[i:j] = m + z.sub_(m[:, None]).exp_().sum(-1).log()
        counted = targets != IGNORE                                           # (N,)
        n = counted.sum()
        picked = logits.gather(-1, targets.clamp(min=0)[:, None])[:, 0].float()  # (N,) z_i[t_i]
        loss = ((lse - picked) * counted).sum() / n
        ctx.save_for_backward(logits, lse, targets, counted, n)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        logits, lse, targets, counted, n = ctx.saved_tensors
        N, V = logits.shape
        rows = max(1, min(N, _LowPrecisionCrossEntropy.CHUNK // V))
        buf = torch.empty(rows, V, dtype=torch.float32, device=logits.device)
        scale = (grad_loss.float() / n) * counted.float()                     # (N,): 0 on IGNORE rows
        grad = torch.empty_like(logits)
        for i in range(0, N, rows):
            j = min(N, i + rows)
            g = buf[:j - i].copy_(logits[i:j]).sub_(lse[i:j, None]).exp_().mul_(scale[i:j, None])  # softmax(z)·scale
            g[torch.arange(j - i, device=g.device), targets[i:j].clamp(min=0)] -= scale[i:j]   # - onehot(t)·scale
            grad[i:j].copy_(g)
        return grad, None


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor,
                   loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from positions <= t.

    logits [B, T, V], input_ids [B, T]; loss_mask [B, T] marks the tokens that
    count as targets (1) — e.g. the completion of a prompt -> completion pair.
    Under autocast the logits arrive in bf16/fp16; the softmax, the loss and its
    gradient are computed in fp32 all the same (a 50257-way softmax in bf16 would
    round the probabilities to 3 significant digits).
    The targets are shifted left (the last position predicts nothing, -100),
    rather than the logits right, so the [B, T, V] logits are never copied.
    """
    targets = F.pad(input_ids[:, 1:], (0, 1), value=IGNORE)  # (B, T): token t+1 is position t's target
    if loss_mask is not None:
        counted = F.pad(loss_mask[:, 1:], (0, 1), value=0)
        targets = targets.masked_fill(counted == 0, IGNORE)
    if not bool((targets != IGNORE).any()):
        return logits.sum().float() * 0.0  # nothing to learn from in this batch: zero loss, zero gradient
    with torch.autocast(device_type=logits.device.type, enabled=False):  # bf16/fp16 logits: the loss in fp32
        if logits.dtype in (torch.bfloat16, torch.float16):
            return _LowPrecisionCrossEntropy.apply(logits.flatten(0, 1), targets.flatten())
        return _CrossEntropy.apply(logits.flatten(0, 1).float(), targets.flatten())


def lm_loss_fn(model, past_fn: Optional[Callable] = None) -> Callable[[dict], torch.Tensor]:
    """loss_fn for `train` over batches from `collate_lm`. `past_fn(batch_size)`
    may return (past_key_values, n_past) to prepend, as prefix tuning does."""
    def loss_fn(batch):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        past = None
        if past_fn is not None:
            past, n_past = past_fn(ids.size(0))
            mask = extend_mask(mask, before=n_past)
        out = model(ids, attention_mask=mask, past_key_values=past)
        return causal_lm_loss(out.logits, ids, batch["loss_mask"])
    return loss_fn


# ---- data ------------------------------------------------------------------------------
@dataclass
class Example:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is a training target


def examples_from_text(ids: Sequence[int], block_size: int, source: str = "text") -> list[Example]:
    """Cut one long token stream into non-overlapping blocks of block_size tokens."""
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    if len(ids) < block_size:
        raise ValueError(f"{source}: {len(ids)} tokens is shorter than one block of {block_size}; "
                         "give more text or a smaller --block-size")
    return [Example(list(ids[i:i + block_size]), [1] * block_size)
            for i in range(0, len(ids) - block_size + 1, block_size)]


def examples_from_pairs(tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]], max_len: int) -> list[Example]:
    """prompt -> completion pairs as `prompt completion<|endoftext|>`, loss on the completion only."""
    out = []
    for prompt, completion in pairs:
        p, c = tokenizer.encode(prompt), tokenizer.encode(completion) + [EOT_ID]
        if len(p) >= max_len:
            raise ValueError(f"pair {len(out) + 1}: the prompt alone is {len(p)} tokens, which fills the block of "
                             f"{max_len}, leaving no completion token to learn; shorten it or raise the block size")
        ids = (p + c)[:max_len]
        out.append(Example(ids, ([0] * len(p) + [1] * len(c))[:max_len]))
    return out


def collate_lm(examples: Sequence[Example], pad_id: int = EOT_ID) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask and loss_mask, all [B, T]."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), T), dtype=torch.long)
    loss = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        attn[i, :n] = 1
        loss[i, :n] = torch.tensor(e.loss_mask)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def load_lm_data(path: str | os.PathLike, tokenizer: Tokenizer, block_size: int,
                 prompt_field: str = "prompt", completion_field: str = "completion") -> list[Example]:
    """A .txt file (cut into blocks) or a .jsonl file of {"prompt": ..., "completion": ...}.

    Errors name the file and, for JSONL, the line: a missing or empty file,
    bytes that are not UTF-8, text shorter than one block, a line that is not
    JSON or lacks a field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise ValueError(f"{path} is empty")
    if path.suffix == ".jsonl":
        pairs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
            for f in (prompt_field, completion_field):
                if not isinstance(row, dict) or not isinstance(row.get(f), str):
                    raise ValueError(f"{path}, line {n}: needs a string field {f!r}")
            pairs.append((row[prompt_field], row[completion_field]))
        return examples_from_pairs(tokenizer, pairs, block_size)
    return examples_from_text(tokenizer.encode(text), block_size, source=str(path))


def split_examples(examples: list, eval_fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """Seeded shuffle, then hold out eval_fraction (at least one example when there are two or more)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=g).tolist()
    n_eval = min(len(examples) - 1, max(1, round(len(examples) * eval_fraction))) if len(examples) > 1 else 0
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


# ---- the loop --------------------------------------------------------------------------
# The autocast dtype of each precision; fp32 runs without autocast.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# The settings a checkpoint is resumed under: any other value would make a different run.
RUN_SETTINGS = ("epochs", "max_steps", "batch_size", "grad_accum", "lr", "weight_decay", "betas", "warmup_steps",
                "decay", "grad_clip", "eval_every", "seed", "precision")


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: Optional[int] = None   # exactly this many optimizer steps (overrides epochs; the data is cycled)
    batch_size: int = 8               # examples per micro-batch, per process
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    decay: bool = True                # linear decay to 0 after warmup
    grad_clip: Optional[float] = 1.0
    eval_every: int = 50              # steps between eval losses (and one at the end)
    seed: int = 0
    progress: bool = True
    device: Optional[str] = None      # where batches go; None = where the params are
    precision: str = "fp32"           # fp32 | bf16 | fp16: the forward pass under autocast; weights and AdamW stay fp32
    grad_accum: int = 1               # micro-batches summed into each optimizer step
    save_every: Optional[int] = None  # steps between checkpoints of the whole training state (None: no checkpoints)
    checkpoint_dir: Optional[str] = None  # where they go (overwritten each time, atomically)
    resume_from: Optional[str] = None     # a checkpoint to continue exactly

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1 step, got {self.eval_every}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 (or None for whole epochs), got {self.max_steps}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1 micro-batch per step, got {self.grad_accum}")
        if self.save_every is not None and (self.save_every < 1 or not self.checkpoint_dir):
            raise ValueError("save_every needs a checkpoint_dir and must be >= 1 step")

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        return PRECISIONS[self.precision]

    def settings(self) -> dict:
        """The values that define the run's steps (what a resumed run must share), JSON-ready."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in
                ((k, getattr(self, k)) for k in RUN_SETTINGS)}


def resolve_precision(name: str, device: torch.device | str) -> str:
    """fp32 / bf16 / fp16 as given; 'auto' = bf16 where the device computes it natively, else fp32.

    Natively means a CUDA GPU that supports bf16 (Ampere and later), or a CPU with
    AVX512-BF16 or AMX instructions (oneDNN's own check), where bf16 matrix multiplies
    run several times faster than fp32 (3.6x measured on the 2-core development CPU).
    Elsewhere (older CPUs, MPS) bf16 is emulated or unmeasured, so auto stays fp32."""
    if name != "auto":
        if name not in PRECISIONS:
            raise ValueError(f"precision must be auto or one of {', '.join(PRECISIONS)}, got {name!r}")
        return name
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        try:
            native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            native = False
        return "bf16" if native else "fp32"
    return "fp32"


def cast_frozen_linears(model: torch.nn.Module, dtype: Optional[torch.dtype]) -> int:
    """Store the frozen nn.Linear layers of `model` in `dtype` (bf16/fp16) once, instead of at every step.

    Under autocast every Linear's weight and bias are cast to the low precision before the
    multiply, at every forward pass; for a frozen layer that cast gives the same values each
    time, so doing it once gives bit-identical results under autocast, halves the frozen
    model's memory and saves the cast's time (124M weights per GPT-2 step; 1.5B for gpt2-xl).
    Layers with any trainable parameter stay fp32, and so does a Linear that shares its weight
    with an Embedding (GPT-2's tied head), which also feeds the fp32 residual stream.
    Only for a model used under autocast from then on (outside it, those layers run in
    `dtype`). Returns how many layers were cast; None or fp32 casts nothing.
    """
    if dtype is None or dtype == torch.float32:
        return 0
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and id(m.weight) not in embedded \
                and not any(p.requires_grad for p in m.parameters()):
            m.to(dtype)
            n += 1
    return n


def plan_steps(n_examples: int, config: TrainConfig, world_size: int = 1) -> tuple[int, float]:
    """(optimizer steps, epochs they make) for n_examples: max_steps when given, else whole epochs.

    One step takes batch_size x grad_accum x world_size examples (the effective batch)."""
    per_epoch = math.ceil(n_examples / (config.batch_size * config.grad_accum * world_size))
    total = config.max_steps if config.max_steps is not None else per_epoch * config.epochs
    return total, total / per_epoch


def _lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if not cfg.decay:
        return 1.0
    return max(0.0, (total - step) / max(1, total - cfg.warmup_steps))


def _to(batch, device):
    if isinstance(batch, dict):
        return {k: v.to(device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(v.to(device) for v in batch)
    return batch.to(device)


def autocast(device: torch.device, precision: str):
    """The forward pass's context: autocast to bf16/fp16, or nothing for fp32."""
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def count_terms(batch, n_examples: int) -> int:
    """How many terms a batch's mean loss averages: the target tokens of a `collate_lm` batch
    (the positions whose next token counts, as in causal_lm_loss), else the examples."""
    if isinstance(batch, dict) and "loss_mask" in batch:
        return int(batch["loss_mask"][:, 1:].sum())
    return n_examples


@torch.no_grad()
def evaluate(loss_fn, examples, batch_size, collate_fn, device, eval_modules=(), *, precision: str = "fp32",
             procs: Optional[distributed.Processes] = None) -> float:
    """Mean loss over `examples`, with `eval_modules` in eval mode (no dropout) meanwhile.

    The mean of the batches' losses, each weighted by its number of examples. With
    several processes each takes every world_size-th batch and the sums are added up,
    so every process returns the same number, that of one process."""
    procs = procs or distributed.Processes()
    modes = [m.training for m in eval_modules]
    for m in eval_modules:
        m.eval()
    sums = torch.zeros(2, dtype=torch.float64)  # (sum of loss x examples, examples)
    try:
        for b, i in enumerate(range(0, len(examples), batch_size)):
            if b % procs.world_size != procs.rank:
                continue
            chunk = examples[i:i + batch_size]
            with autocast(torch.device(device), precision):
                loss = float(loss_fn(_to(collate_fn(chunk), device)))
            sums += torch.tensor([loss * len(chunk), len(chunk)], dtype=torch.float64)
    finally:
        for m, mode in zip(eval_modules, modes):
            m.train(mode)
    total, n = distributed.all_reduce_sum(sums.to(distributed.comm_device(torch.device(device))), procs).tolist()
    return total / max(1, n)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, after a checkpoint was saved: the message says where it is."""


def _split(items: list, parts: int) -> list[list]:
    """`items` in `parts` consecutive pieces whose sizes differ by at most one (some empty if too few)."""
    q, r = divmod(len(items), parts)
    cuts = [0]
    for k in range(parts):
        cuts.append(cuts[-1] + q + (k < r))
    return [items[cuts[k]:cuts[k + 1]] for k in range(parts)]


def _step_examples(n: int, per_step: int, g: torch.Generator, state: TrainState):
    """(epoch, offset, example indices of one optimizer step, the data generator's state at the epoch's start),
    step after step: each epoch is a fresh shuffle drawn from `g`, cut into steps of `per_step` examples (the last
    step of an epoch takes what is left). Starts at state.epoch / state.offset, so a resumed run goes on where
    the checkpoint was."""
    epoch, offset = state.epoch, state.offset
    while True:
        at_start = g.get_state()
        order = torch.randperm(n, generator=g).tolist()
        for i in range(offset, n, per_step):
            yield epoch, i, order[i:i + per_step], at_start
        epoch, offset = epoch + 1, 0


def train(params, loss_fn: Callable, train_examples: Sequence, *, eval_examples: Sequence = (),
          config: TrainConfig = TrainConfig(), collate_fn: Callable = collate_lm,
          eval_modules: Sequence[torch.nn.Module] = (), count_fn: Optional[Callable] = None,
          run_info: Optional[dict] = None) -> list[dict]:
    """Optimise `params` (only those that require grad) to lower loss_fn(batch).

    One optimizer step:
      1. its examples (batch_size x grad_accum x processes of them, from a seeded
         shuffle) are cut into micro-batches; this process takes grad_accum of them;
      2. each micro-batch's mean loss, computed under autocast for bf16/fp16, is
         weighted by its share of the step's terms, n_micro / n_step (count_fn:
         target tokens of LM batches, else examples; n_step summed over processes),
         and backpropagated; gradients add up, and with several processes DDP
         averages them after the last micro-batch (x world_size undoes its mean);
      3. clip, then AdamW at lr x the schedule's factor for this step.
    So the update is the one a single step on all the step's examples would make,
    whatever the accumulation and the number of processes (in fp32, to rounding).

    `eval_modules` (e.g. the model) are switched to eval mode for the eval loss,
    so dropout does not blur it, and back afterwards. With `config.save_every`,
    the whole state is checkpointed into `config.checkpoint_dir` (train_state.py);
    `config.resume_from` continues such a checkpoint exactly, and `run_info` (a
    JSON-able description of the caller's set-up) must then equal the saved one.
    A checkpoint also records the wall time its steps took, summed over resumes
    (`read_meta(dir)["seconds"]`), so a resumed run can report the whole run's time.

    Returns the history: one dict per step {step, epoch, loss, lr, grad_norm},
    with eval_loss added every `eval_every` steps and at the end.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad (did you apply the technique first?)")
    if not len(train_examples):
        raise ValueError("no training examples")
    device = torch.device(config.device) if config.device else params[0].device
    procs = distributed.setup(device)
    count_fn = count_fn or count_terms
    opt = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None
    total, _ = plan_steps(len(train_examples), config, procs.world_size)
    per_step = config.batch_size * config.grad_accum * procs.world_size
    settings = {**config.settings(), "processes": procs.world_size, "examples": len(train_examples)}
    saving = dict(params=params, optimizer=opt, scaler=scaler, settings=settings, run=run_info or {}, device=device,
                  procs=procs)

    torch.manual_seed(config.seed + procs.rank)  # dropout: each process its own masks; rank 0 = one process's
    g = torch.Generator().manual_seed(config.seed)  # the data order: the same in every process
    state = TrainState(data_rng=g.get_state())
    if config.resume_from:
        state = load_train_state(config.resume_from, **saving)
        g.set_state(state.data_rng)
    clock, seconds_before = time.perf_counter(), state.seconds  # the checkpoint's time, carried into the next one
    stepper = distributed.wrap(distributed.LossModule(params, loss_fn), device, procs)
    comm = distributed.comm_device(device)
    saved, saving_step = None, None

    bar = tqdm(total=total, initial=state.step, disable=not (config.progress and procs.is_main), desc="train",
               unit="step")
    try:
        for epoch, offset, idx, at_start in _step_examples(len(train_examples), per_step, g, state):
            if state.step >= total:
                break
            parts = _split(idx, config.grad_accum * procs.world_size)
            mine = [parts[m * procs.world_size + procs.rank] for m in range(config.grad_accum)]
            batches = [_to(collate_fn([train_examples[j] for j in (ids or idx[:1])]), device) for ids in mine]
            counts = [count_fn(b, len(ids)) if ids else 0 for b, ids in zip(batches, mine)]  # a stand-in weighs 0
            n_step = float(distributed.all_reduce_sum(torch.tensor(float(sum(counts)), device=comm), procs))
            opt.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=device)
            for m, (batch, n) in enumerate(zip(batches, counts)):
                share = n * procs.world_size / n_step if n_step else 0.0
                last = m == len(batches) - 1
                with (contextlib.nullcontext() if last or not procs.several else stepper.no_sync()):
                    with autocast(device, config.precision):
                        loss = stepper(batch)
                    with distributed.collective("backward (DDP's gradient all-reduce)"):
                        (scaler.scale(loss * share) if scaler else loss * share).backward()
                loss_sum += loss.detach().float() * share
            step_loss = float(distributed.all_reduce_sum(loss_sum.to(comm), procs)) / procs.world_size
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"loss became {step_loss} at step {state.step}; lower the learning rate"
                                         + (" or train in bf16 instead of fp16" if scaler else ""))
            lr = config.lr * _lr_factor(state.step, total, config)
            for group in opt.param_groups:
                group["lr"] = lr
            if scaler:
                scaler.unscale_(opt)
            gn = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip else float("inf"))
            if scaler:
                scaler.step(opt)  # skipped when the fp16 gradients overflowed; the scale then shrinks
                scaler.update()
            else:
                opt.step()
            record = {"step": state.step, "epoch": epoch, "loss": step_loss, "lr": lr, "grad_norm": float(gn)}
            state.step += 1
            if eval_examples and (state.step % config.eval_every == 0 or state.step == total):
                record["eval_loss"] = evaluate(loss_fn, eval_examples, config.batch_size, collate_fn,
                                               device, eval_modules, precision=config.precision, procs=procs)
            state.history.append(record)
            state.epoch, state.offset, state.data_rng = epoch, offset + per_step, at_start
            if config.save_every and (state.step % config.save_every == 0):
                state.seconds = None if seconds_before is None else seconds_before + time.perf_counter() - clock
                saving_step = state.step
                saved = (_save_checkpoint(config, state, saving, saved), state.step)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}",
                            **({"eval": f"{record['eval_loss']:.3f}"} if "eval_loss" in record else {}))
    except KeyboardInterrupt:
        on_disk = _checkpoint_on_disk(config.checkpoint_dir) if saving_step is not None else None
        if on_disk is not None and on_disk[1] == saving_step:
            saved = on_disk   # the save of this step committed before Ctrl-C reached the line that records it
        if saved is None:
            raise
        raise TrainingInterrupted(
            f"interrupted after step {state.step} of {total}; the last checkpoint (step {saved[1]}) is in "
            f"{saved[0]}: resume with --resume {saved[0]} (the same command and options)") from None
    finally:
        bar.close()
    return state.history


def _checkpoint_on_disk(directory) -> Optional[tuple[Path, int]]:
    """(directory, step) of the whole checkpoint in `directory`, read from disk, or None. Ctrl-C can land after a
    save's commit but before the loop records it: then the disk, not the loop's record, has the last checkpoint."""
    if not directory:
        return None
    try:
        return Path(directory), int(read_meta(recover_dir(directory, tidy=False))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _save_checkpoint(config: TrainConfig, state: TrainState, saving: dict, saved) -> Path:
    """save_train_state, with an error that says which checkpoint is still whole when the save fails."""
    try:
        return save_train_state(config.checkpoint_dir, state, **saving)
    except OSError as e:
        if saved is not None:
            intact = (f"the checkpoint of step {saved[1]} in {saved[0]} is intact: once fixed, --resume {saved[0]} "
                      "continues from it")
        elif config.resume_from:
            intact = f"the checkpoint this run resumed from ({config.resume_from}) is intact"
        else:
            intact = "no checkpoint of this run was written before"
        raise OSError(e.errno, f"the checkpoint of step {state.step} could not be saved ({e.strerror or e}); "
                               f"{intact}") from None


def save_history(history: list[dict], directory: str | os.PathLike, name: str = "history.json") -> Path:
    """Write the loss history as JSON (atomically) for plots."""
    with atomic_save_dir(directory) as tmp:
        write_json({"history": history}, tmp / name)
    return Path(directory) / name
