"""MTL-LoRA: multi-task LoRA (Yang et al., AAAI 2025, arXiv:2410.09437), the layer math by hand.

One frozen weight W0 [out, in], one shared down-projection A [r, in], a task-specific transform
Λ_t [r, r] (or its diagonal, [r]) for each task t, n shared up-projections B^i [out, r], and per-task
mixing weights w_t [n] with a temperature τ:

    h = W0·x + b + s · Σ_i softmax(w_t / τ)_i · B^i · Λ_t · A · x          s = alpha / r

Initialisation, checked against the paper's official code (github.com/pUmpKin-Co/MTL-LoRA, commit 7848a70,
src/adapter/mlora.py, `mLoRALinear.reset_parameters`, lines 86-95) -- the paper (arXiv:2410.09437, its method section)
only says Λ_t and w are learnable and leaves their start open:
  - A      Kaiming-uniform, a = sqrt(5)                    (mlora.py:88, as `LoRALinear` and loralib)
  - Λ_t    identity: eye for a full Λ, ones for its diagonal (mlora.py:91 / :93)
  - B^i    zeros, so at step 0 the layer is exactly the base  (mlora.py:94)
  - w      Kaiming-uniform with a = sqrt(5) over the (T, n) matrix, i.e. U(-1/sqrt(n), 1/sqrt(n))
           (mlora.py:95; fan_in = n, gain = sqrt(2/(1+5)), bound = gain·sqrt(3/n))
  - τ      divides w inside the softmax (mlora.py:113, `B_scale`; the VL-T5 scripts use 0.8, default 1.0).
  Λ_t multiplies A·x as the paper writes it, Λ_t·A·x (mlora.py:124 computes (A·x)ᵀ·Λ_tᵀ).
What differs in AdapterHub `adapters` 1.3 (methods/lora.py): w starts at ones (line 200: a uniform mix), its
`weights_sharpness` τ defaults to 0.05 (configuration/adapter_config.py:677), a full ("linear") Λ starts at
ones(r, r), not I (lora.py:52), and is applied as (A·x)ᵀ·Λ, i.e. Λᵀ·A·x (lora.py:216-220); its diagonal
("singular_values", the default) is the same as ours. We follow the official code. Two more limits there,
found by tests/test_mtl_lora.py: its full Λ cannot be built at all (TaskSpecificLinear.__init__, lora.py:49, never
calls nn.Module.__init__), and on GPT-2 it cannot adapt attention (c_attn is its LoRAMergedLinear, which refuses a
MultiTask setup, lora.py:1285); on GPT-2's MLP layers our logits equal its MTL-LoRA's per task (max diff ~3e-7).

Task ids. Every example carries its own task id, so a batch may mix tasks. The ids reach the layers
without monkeypatching: each `MTLLoRALinear` has a documented attribute `task_ids` (a LongTensor (B,)),
set for all layers of a model by `set_task_ids(model, ids)` or, scoped, `with task_ids(model, ids): ...`,
once per batch before the forward pass. A forward with no ids set, or with an id out of range,
is refused with an error naming the fix.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from minigpt import Example, collate_lm, lm_loss_fn

__all__ = ["MTLLoRALinear", "apply_mtl_lora", "merge_mtl_lora", "mtl_modules", "mtl_parameters", "set_task_ids",
           "task_ids", "TaskExample", "task_examples", "collate_mtl", "mtl_loss_fn"]


class MTLLoRALinear(nn.Module):
    """h = W0·x + b + s·Σ_i softmax(w_t/τ)_i·B^i·Λ_t·A·x, t the task id of x's example (row of the batch)."""

    def __init__(self, base: nn.Linear, n_tasks: int, r: int = 8, alpha: float = 16, n_up: int = 1,
                 tau: float = 1.0, full_lambda: bool = False):
        super().__init__()
        if n_tasks < 1 or r < 1 or n_up < 1:
            raise ValueError(f"MTL-LoRA needs n_tasks, r and n_up >= 1 (got {n_tasks}, {r}, {n_up})")
        if not tau > 0:
            raise ValueError(f"MTL-LoRA's temperature tau must be > 0 (got {tau})")
        self.base = base.requires_grad_(False)
        self.n_tasks, self.r, self.alpha, self.n_up, self.tau = int(n_tasks), int(r), alpha, int(n_up), float(tau)
        self.full_lambda = bool(full_lambda)
        self.scaling = alpha / r
        w0 = base.weight
        kw = dict(device=w0.device, dtype=w0.dtype)
        A = torch.empty(self.r, base.in_features, **kw)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.A = nn.Parameter(A)                                                     # (r, in), shared
        if self.full_lambda:
            lam = torch.eye(self.r, **kw).expand(self.n_tasks, self.r, self.r).clone()  # (T, r, r) = I
        else:
            lam = torch.ones(self.n_tasks, self.r, **kw)                             # (T, r): diag(Λ_t) = 1
        self.Lambda = nn.Parameter(lam)
        self.B = nn.Parameter(torch.zeros(self.n_up, base.out_features, self.r, **kw))  # (n, out, r) = 0
        w = torch.empty(self.n_tasks, self.n_up, **kw)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))                                  # U(±1/sqrt(n)), official code
        self.w = nn.Parameter(w)                                                     # (T, n) mixing logits
        self.task_ids: torch.Tensor | None = None   # (batch,) long, set per batch by `set_task_ids`

    def lambda_matrix(self) -> torch.Tensor:
        """Λ as full matrices (T, r, r), whichever way it is stored."""
        return self.Lambda if self.full_lambda else torch.diag_embed(self.Lambda)

    def _ids(self, batch: int, device) -> torch.Tensor:
        t = self.task_ids
        if t is None:
            raise RuntimeError("MTL-LoRA layer has no task ids: call set_task_ids(model, ids) (one id per example) "
                               "or use `with task_ids(model, ids):` before the forward pass")
        t = torch.as_tensor(t, dtype=torch.long, device=device).reshape(-1)
        if t.numel() == 1 and batch != 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"MTL-LoRA got {t.numel()} task ids for a batch of {batch}: give one id per example")
        return t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, in) or (B, in) -> (B, T, out) or (B, out); row b uses task t = task_ids[b]."""
        squeeze = x.dim() == 2
        xb = x.unsqueeze(1) if squeeze else x                          # (B, T, in)
        t = self._ids(xb.shape[0], x.device)                           # (B,)
        h = xb @ self.A.T                                              # (B, T, r)   A·x
        lam = self.lambda_matrix()[t]                                  # (B, r, r)   Λ_t
        h = h @ lam.transpose(1, 2)                                    # (B, T, r)   Λ_t·A·x
        up = torch.einsum("btr,nor->btno", h, self.B)                  # (B, T, n, out)  B^i·Λ_t·A·x
        mix = torch.softmax(self.w[t] / self.tau, dim=-1)              # (B, n)      softmax(w_t/τ)
        delta = torch.einsum("btno,bn->bto", up, mix)                  # (B, T, out) Σ_i mix_i·B^i·Λ_t·A·x
        y = self.base(xb) + self.scaling * delta
        return y.squeeze(1) if squeeze else y


def _check_ids(model: nn.Module, ids: torch.Tensor) -> None:
    for m in mtl_modules(model):
        bad = (ids < 0) | (ids >= m.n_tasks)
        if bool(bad.any()):
            raise ValueError(f"task id {int(ids[bad][0])} is out of range: this MTL-LoRA has {m.n_tasks} tasks "
                             f"(ids 0..{m.n_tasks - 1})")
        return


def set_task_ids(model: nn.Module, ids) -> None:
    """Give every MTL-LoRA layer of `model` the task id of each example of the next batch (B,); None clears."""
    if ids is not None:
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        _check_ids(model, ids)
    for m in mtl_modules(model):
        m.task_ids = ids


@contextlib.contextmanager
def task_ids(model: nn.Module, ids) -> Iterator[None]:
    """`with task_ids(model, ids): model(x)`: the ids for the batch inside the block, cleared after."""
    set_task_ids(model, ids)
    try:
        yield
    finally:
        set_task_ids(model, None)


def apply_mtl_lora(model: nn.Module, n_tasks: int, targets: Sequence[str] = ("c_attn", "c_proj"), **kw) -> nn.Module:
    """Freeze `model` and wrap each nn.Linear whose name ends in one of `targets` with MTLLoRALinear (in place)."""
    model.requires_grad_(False)
    found = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear) and any(name.endswith(s) for s in targets)]
    if not found:
        raise ValueError(f"no nn.Linear module ends in any of {list(targets)}: check the target names")
    for name, mod in found:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, MTLLoRALinear(mod, n_tasks, **kw))
    return model


def mtl_modules(model: nn.Module) -> list[MTLLoRALinear]:
    return [m for m in model.modules() if isinstance(m, MTLLoRALinear)]


def mtl_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in mtl_modules(model) for p in (m.A, m.Lambda, m.B, m.w)]


def merge_mtl_lora(model: nn.Module, task: int) -> nn.Module:
    """Fold task `task`'s update into each frozen weight and drop the MTL-LoRA layers (in place):
    W0 <- W0 + s·Σ_i softmax(w_t/τ)_i·B^i·Λ_t·A, so one task then decodes at the base model's cost."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MTLLoRALinear)]
    if not layers:
        raise ValueError("this model has no MTL-LoRA layers to merge")
    n = layers[0][1].n_tasks
    if not 0 <= int(task) < n:
        raise ValueError(f"task id {task} is out of range: this MTL-LoRA has {n} tasks (ids 0..{n - 1})")
    with torch.no_grad():
        for name, m in layers:
            mix = torch.softmax(m.w[task] / m.tau, dim=-1)                     # (n,)
            B_t = torch.einsum("n,nor->or", mix, m.B)                           # (out, r)  Σ_i mix_i·B^i
            m.base.weight += m.scaling * (B_t @ m.lambda_matrix()[task] @ m.A)  # (out, in)
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf, m.base)
    return model


# ---- training: every example carries its task id ---------------------------------------------------------
@dataclass
class TaskExample(Example):
    """A language-model example (input_ids, loss_mask) with the id of its task."""
    task: int = 0


def task_examples(per_task: Sequence[Sequence[Example]]) -> list[TaskExample]:
    """One list of examples per task (in task-id order) -> one mixed list, each example tagged with its id."""
    return [TaskExample(e.input_ids, e.loss_mask, t) for t, examples in enumerate(per_task) for e in examples]


def collate_mtl(examples: Sequence[TaskExample]) -> dict[str, torch.Tensor]:
    """`collate_lm`'s batch plus "task_ids" (B,): the batch may mix tasks."""
    missing = [i for i, e in enumerate(examples) if not hasattr(e, "task")]
    if missing:
        raise ValueError(f"example {missing[0]} of the batch has no task id: build MTL-LoRA data with task_examples")
    batch = collate_lm(examples)
    batch["task_ids"] = torch.tensor([e.task for e in examples], dtype=torch.long)
    return batch


def mtl_loss_fn(model: nn.Module):
    """loss_fn for `minigpt.train` over `collate_mtl` batches: set the batch's task ids, then the LM loss.
    An id out of range is refused by `set_task_ids`."""
    lm = lm_loss_fn(model)

    def loss_fn(batch):
        set_task_ids(model, batch["task_ids"])
        try:
            return lm(batch)
        finally:
            set_task_ids(model, None)
    return loss_fn
