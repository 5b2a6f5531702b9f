"""LoRA: low-rank adaptation of GPT-2's projections, written by hand (the layer math).

Hu et al. 2021 (arXiv:2106.09685), eq. (3): a frozen weight W0 [out, in] is
adapted by a trainable low-rank product,

    h = W0·x + b + (alpha/r)·B·A·x          A: [r, in], B: [out, r], r << min(in, out)

A starts kaiming-uniform (a = sqrt(5), as an nn.Linear weight would), B starts
at zero, so at step 0 the adapted model *is* the base model. rsLoRA (Kalajdzievic
2023) changes only the scaling to alpha/sqrt(r). Dropout, when asked for, acts on
the LoRA branch's input x only. Merging folds Δ = (alpha/r)·B·A into W0, after
which inference costs exactly what the base model costs.

DoRA (Liu et al. 2024, arXiv:2402.09353), eq. (5), splits the adapted weight into
a direction and a trained magnitude m (one number per output, started at W0's
row norms):

    W' = m · (W0 + s·B·A) / ||W0 + s·B·A||          the norm taken per output row

with the norm treated as a constant in the backward pass (their section 4.3:
"detached", which saves memory and changes little). `use_dora=True` on a layer
or on `apply_lora` turns it on; at step 0 (B = 0) W' = W0 exactly.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) is this same layer on a base stored in
4-bit NF4: `quantize_base(model)` (in `nf4.py`) before `apply_lora`, and W0 above is
then the dequantised W0' = dequant(W_NF4), made again at each forward pass (their
eq. 5). A and B (and DoRA's m) train in full precision as before. Merging needs W0
in full precision: `merge_lora` dequantises the base to a plain nn.Linear first;
`LoRALinear.merge()` alone on a 4-bit base is refused (it would add Δ to a copy).

Reading order: the layer (`LoRALinear`), its per-projection variant for the fused
q|k|v `c_attn` (`LoRAQKV`), where it goes (`apply_lora`, `lora_parameters`,
`lora_summary`) and how it leaves (`merge_lora`). The adapter files in peft's
format are in `peft_files.py`; the command line is `python -m techniques.lora`
(`__main__.py`). In each layer, `forward_reference` is eq. (3) as written above;
`forward`, the fast path the model runs, gives the same numbers with less memory
(tests/test_lora.py holds the two equal, outputs and gradients).

Where this differs from peft, and why:
- peft keeps GPT-2's projections as `Conv1D` (weight [in, out]) and so needs
  `fan_in_fan_out=True` to transpose Δ when merging. Our projections are
  `nn.Linear` ([out, in]), so Δ = s·B·A needs no transpose. A and B have the same
  shapes in both, so adapter files carry over unchanged.
- `LoRAQKV` gives q, k and v their own A and B (the paper's setting, and loralib's
  MergedLinear); peft can only adapt the fused c_attn as a whole. `peft_files.py`
  saves it by an exact conversion to the fused form.
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nf4 import NF4Linear, dequantize_base, nf4_memory

__all__ = ["LoRALinear", "LoRAQKV", "apply_lora", "merge_lora", "lora_modules", "lora_parameters", "lora_summary"]

Targets = Union[Sequence[str], str]  # a list of module-name suffixes, or one regex over full names (as in peft)
QKV = "qkv"


# ---- the layer -------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """y = W0·x + b + s·B·A·dropout(x), with s = alpha/r (or alpha/sqrt(r) for rsLoRA).

    Wraps a frozen `nn.Linear` (kept as `self.base`, so W0 and b are untouched
    until `merge()`). A [r, in] and B [out, r] are the only trainable tensors.
    Read `forward_reference` for the math; `forward` is its fast path.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0, rslora: bool = False,
                 use_dora: bool = False):
        super().__init__()
        _check_hyper(r, alpha, dropout)
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.rslora = int(r), alpha, bool(rslora)
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._init_factors()
        # DoRA's magnitude m (out,), started at ||W0 + s·B·A|| per row (= ||W0|| while B = 0); None: plain LoRA
        self.magnitude = nn.Parameter(self.weight_norm().detach().clone()) if use_dora else None
        self._merged_norm: Optional[torch.Tensor] = None  # DoRA: the norm W0 was scaled by at merge(), for unmerge()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def _new_A(self) -> nn.Parameter:
        w = self.base.weight
        A = torch.empty(self.r, self.in_features, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # what nn.Linear(in, r) would start with
        return nn.Parameter(A)

    def _new_B(self, rows: int) -> nn.Parameter:
        w = self.base.weight
        return nn.Parameter(torch.zeros(rows, self.r, device=w.device, dtype=w.dtype))

    def _init_factors(self) -> None:
        self.A = self._new_A()                      # (r, in)
        self.B = self._new_B(self.out_features)     # (out, r)

    def lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        """s·B·A·dropout(x) for x (..., in) -> (..., out)."""
        return (self.dropout(x) @ self.A.T) @ self.B.T * self.scaling

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The math: h = W0·x + b + s·B·A·dropout(x) (Hu et al. 2021, eq. 3), written as it reads.

        `forward` is the fast path and gives the same numbers (to float rounding); this one is
        kept to be read, and for the tests to hold `forward` to. Merged, the layer is the base
        layer alone; with DoRA it is `dora_forward`, which has no separate fast form."""
        if self.merged:
            return self.base(x)
        if self.magnitude is not None:
            return self.dora_forward(x)
        return self.base(x) + self.lora_branch(x)

    def _low_rank_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as one pair, [r, in] and [out, r]: what the fast `forward` multiplies by."""
        return self.A, self.B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fast path of `forward_reference`: the same W0·x + b + s·B·A·dropout(x), in less memory.

        W0·x + b, then + s·B·A·dropout(x) added in place: y.addmm_(h, Bᵀ, alpha=s) with
        h = dropout(x)·Aᵀ [N, r]. The sum of `base(x) + lora_branch(x)` (to float rounding:
        the scaling is applied inside the multiply-add), but no [N, out] tensor besides y is
        made, where the branch, its scaled copy and the sum were three, each as large as the
        layer's output. y is the base layer's own fresh output on 2-D input, not a view, so
        autograd needs no copy of its gradient for the in-place add. Under autocast y and h
        come out in bf16/fp16 while B is an fp32 parameter; an in-place op is not autocast,
        so B is cast here (a no-op in fp32)."""
        if self.merged:
            return self.base(x)
        if self.magnitude is not None:
            return self.dora_forward(x)
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        y = self.base(x2)                     # (N, out)
        A, B = self._low_rank_pair()
        h = self.dropout(x2) @ A.T            # (N, r)
        y.addmm_(h, B.T.to(y.dtype), alpha=self.scaling)
        return y.view(*x.shape[:-1], self.out_features)

    def dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """DoRA: y = W'·x + b with W' = m · (W0 + s·B·A) / n, n = ||W0 + s·B·A|| per row, detached.

        Written as peft writes it, so that dropout acts the same: with g = m / n and x_d = dropout(x),
            y = (W0·x + b) + (g - 1)·W0·x_d + g·s·B·A·x_d,
        which without dropout (or in eval mode) is exactly g·(W0 + s·B·A)·x + b."""
        g = self.magnitude / self.weight_norm().detach()       # (out,)
        y = self.base(x)                                        # W0·x + b, (..., out)
        x_d = self.dropout(x)
        base_d = F.linear(x_d, self.base.weight) if x_d is not x else y - (
            self.base.bias if self.base.bias is not None else 0)
        A, B = self._low_rank_pair()
        lora = (x_d @ A.T) @ B.T * self.scaling                 # s·B·A·x_d, (..., out)
        return y + (g - 1) * base_d + g * lora

    def weight_norm(self) -> torch.Tensor:
        """||W0 + s·B·A|| of each output row, (out,): DoRA's column norm ||·||_c (their W is [in, out])."""
        return torch.linalg.vector_norm(self.base.weight + self.delta_weight(), dim=1)

    def delta_weight(self) -> torch.Tensor:
        """Δ = s·B·A, [out, in]: what `merge()` adds to W0."""
        return self.scaling * (self.B @ self.A)

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + Δ (DoRA: W0 <- m · (W0 + Δ) / n, row by row); the forward pass then runs the base layer
        alone."""
        if self.merged:
            raise RuntimeError("this LoRA layer is already merged; unmerge() first")
        self._check_not_4bit("merge")
        w = self.base.weight
        if self.magnitude is None:
            w.add_(self.delta_weight().to(w.dtype))
        else:
            self._merged_norm = self.weight_norm()
            w.copy_(((w + self.delta_weight()) * (self.magnitude / self._merged_norm)[:, None]).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W0 - Δ (DoRA: W0 <- W' · n / m - Δ), undoing `merge()` up to float rounding."""
        if not self.merged:
            raise RuntimeError("this LoRA layer is not merged")
        self._check_not_4bit("unmerge")
        w = self.base.weight
        if self.magnitude is None:
            w.sub_(self.delta_weight().to(w.dtype))
        else:
            w.copy_((w * (self._merged_norm / self.magnitude)[:, None] - self.delta_weight()).to(w.dtype))
            self._merged_norm = None
        self.merged = False

    def _check_not_4bit(self, what: str) -> None:
        if isinstance(self.base, NF4Linear):
            raise RuntimeError(f"cannot {what} into a 4-bit NF4 base (its weight is dequantised on the fly, so Δ "
                               "would be added to a copy); merge_lora(model) dequantises it to a plain nn.Linear "
                               "first, or set layer.base = layer.base.to_linear() yourself")

    def describe(self) -> str:
        return "whole"

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, rslora={self.rslora}, "
                f"dora={self.magnitude is not None}, merged={self.merged}")


class LoRAQKV(LoRALinear):
    """Per-projection LoRA on the fused q|k|v `c_attn` (out = 3C rows: q, then k, then v).

    Each chosen projection p in `parts` (e.g. "qv", the paper's choice) gets its
    own A_p [r, C] and B_p [C, r]; the rows of the others stay exactly W0's:

        q|k|v = W0·x + b + s·[B_q·A_q·x ; 0 ; B_v·A_v·x]

    One dropout mask is shared by the parts, as in loralib's MergedLinear, which
    is also what makes the fused form saved for peft equal in training too.
    `lora_branch` below is the plain form, part by part (what `forward_reference`
    adds to W0·x + b); the fast `forward` packs the parts into one block-diagonal
    pair (`_low_rank_pair`) instead.
    """

    def __init__(self, base: nn.Linear, parts: str = "qv", r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 rslora: bool = False, use_dora: bool = False):
        self.parts = _check_qkv(parts)
        if base.out_features % 3:
            raise ValueError(f"per-projection LoRA needs a fused q|k|v layer (3·C outputs); got {base.out_features}")
        super().__init__(base, r, alpha, dropout, rslora, use_dora)

    def _init_factors(self) -> None:
        C = self.out_features // 3
        self.A = nn.ParameterDict({p: self._new_A() for p in self.parts})       # each (r, C)
        self.B = nn.ParameterDict({p: self._new_B(C) for p in self.parts})      # each (C, r)

    def lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        """s·[B_q·A_q·h ; 0 ; B_v·A_v·h] for h = dropout(x): (..., in) -> (..., 3C)."""
        h = self.dropout(x)
        adapted = {p: (h @ self.A[p].T) @ self.B[p].T * self.scaling for p in self.parts}  # each (..., C)
        zero = torch.zeros_like(adapted[self.parts[0]])  # q, k or v left as W0's (in the matmuls' dtype: autocast)
        return torch.cat([adapted.get(p, zero) for p in QKV], dim=-1)

    def _low_rank_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For the fast `forward`, the parts as one low-rank pair: A = [A_q; A_v] [k·r, C] stacked,
        and B [3C, k·r] block-diagonal in the parts' rows (k = number of parts),

            B = [[B_q, 0], [0, 0], [0, B_v]]   so   B·A·h = [B_q·A_q·h ; 0 ; B_v·A_v·h].

        The zero blocks are [C, r] (weights-sized, tiny), not activation-sized: the forward
        pass adds s·B·A·h into q|k|v in one in-place multiply-add, and rows of a part left
        out receive exactly 0 (W0's output unchanged, bit for bit)."""
        zeros = self.B[self.parts[0]].new_zeros(self.out_features // 3, self.r)  # (C, r)
        A = torch.cat([self.A[q] for q in self.parts], dim=0)                           # (k·r, C)
        B = torch.cat([torch.cat([self.B[q] if q == p else zeros for q in self.parts], dim=1)  # row block p: (C, k·r)
                       for p in QKV], dim=0)                                                   # (3C, k·r)
        return A, B

    def delta_weight(self) -> torch.Tensor:
        C = self.out_features // 3
        w = self.base.weight
        rows = [self.scaling * (self.B[p] @ self.A[p]) if p in self.parts else w.new_zeros(C, self.in_features)
                for p in QKV]
        return torch.cat(rows, dim=0)  # (3C, in)

    def describe(self) -> str:
        return ",".join(self.parts)


def _check_hyper(r, alpha, dropout) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


def _check_qkv(parts: str) -> str:
    if not isinstance(parts, str) or not parts or set(parts) - set(QKV) or len(set(parts)) != len(parts):
        raise ValueError(f"qkv must be a non-empty subset of 'qkv' such as 'qv', got {parts!r}")
    return "".join(p for p in QKV if p in parts)  # canonical order q, k, v


# ---- where it goes ---------------------------------------------------------------------
def _matches(name: str, targets: Targets) -> bool:
    """peft's rule: a regex string must match the whole name; a list entry must equal the name or end it."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _find_targets(model: nn.Module, targets: Targets) -> list[str]:
    if not isinstance(targets, str):
        targets = list(targets)
        if not targets:
            raise ValueError("targets is empty; name at least one of c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj")
    names = [n for n, _ in model.named_modules() if n and _matches(n, targets)]
    for n in names:
        module = model.get_submodule(n)
        if isinstance(module, LoRALinear):
            raise ValueError(f"{n} already carries LoRA; merge_lora(model) first, or apply once with all targets")
        if not isinstance(module, (nn.Linear, NF4Linear)) or not n.startswith("transformer.h."):
            raise ValueError(f"target {n} is a {type(module).__name__}; LoRA here wraps the blocks' nn.Linear "
                             "projections: c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj (c_proj means both)")
    if isinstance(targets, str):
        unmatched = [] if names else [targets]
        hint = " (a string is a regular expression over full module names, as in peft; pass a list for suffixes)"
    else:
        unmatched = [t for t in targets if not any(_matches(n, [t]) for n in names)]
        hint = ""
    if unmatched:
        raise ValueError(f"LoRA target(s) {', '.join(map(repr, unmatched))} match no module{hint}; "
                         "choose from c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj, c_proj, c_fc")
    return names


def apply_lora(model: nn.Module, *, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               targets: Targets = ("c_attn",), qkv: Optional[str] = None, rslora: bool = False,
               use_dora: bool = False, verbose: bool = True) -> nn.Module:
    """Freeze every parameter of `model`, then wrap each target projection in LoRA.

    targets: suffixes of module names, matched as peft matches them (so "c_proj"
    means attn.c_proj and mlp.c_proj), or one regex string over full names.
    qkv: None adapts the fused c_attn as a whole (one A, B; what peft does);
    a subset of "qkv" such as "qv" gives each chosen projection its own A and B.
    use_dora: DoRA's trained magnitude on top (module docstring); with qkv it spans all 3C rows of c_attn.
    Prints a one-line summary when verbose. Returns the same model, changed in place.
    """
    _check_hyper(r, alpha, dropout)
    names = _find_targets(model, targets)
    if qkv is not None:
        _check_qkv(qkv)
        if not any(n.endswith("attn.c_attn") for n in names):
            raise ValueError(f"qkv={qkv!r} adapts q/k/v inside c_attn, but the targets {targets!r} do not include "
                             "c_attn")
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        base = model.get_submodule(name)
        if qkv is not None and name.endswith("attn.c_attn"):
            layer = LoRAQKV(base, qkv, r=r, alpha=alpha, dropout=dropout, rslora=rslora, use_dora=use_dora)
        else:
            layer = LoRALinear(base, r=r, alpha=alpha, dropout=dropout, rslora=rslora, use_dora=use_dora)
        setattr(model.get_submodule(parent_name), child, layer)
    model.lora_targets = sorted(targets) if not isinstance(targets, str) else targets  # written to adapter_config.json
    if verbose:
        print(lora_summary(model))
    return model


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(name, layer) for every LoRA layer of `model`, in module order."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear))


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every A and B in the model: what the optimiser trains."""
    return [p for _, m in lora_modules(model) for n, p in m.named_parameters() if not n.startswith("base.")]


def lora_summary(model: nn.Module) -> str:
    """e.g. 'LoRA r=8 on c_attn: 294,912 trainable of 124,734,720 parameters (0.24%)', and for a 4-bit
    base (`quantize_base`) '; base Linears 4-bit NF4: 41.8 MiB (fp32 would be 324 MiB, 1/7.75)'.
    The NF4 weights are buffers, not parameters, but are counted as the parameters they stand for."""
    layers = [m for _, m in lora_modules(model)]
    if not layers:
        return "no LoRA layers in this model"
    targets = getattr(model, "lora_targets", None) or sorted({n.rsplit(".", 1)[-1] for n, _ in lora_modules(model)})
    targets = targets if isinstance(targets, str) else ", ".join(targets)
    qkv = {m.describe() for m in layers if isinstance(m, LoRAQKV)}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    nf4_bytes, fp32_bytes, n_nf4 = nf4_memory(model)
    total = sum(p.numel() for p in model.parameters()) + fp32_bytes // 4
    kind = "DoRA" if layers[0].magnitude is not None else "LoRA"
    memory = (f"; base Linears 4-bit NF4: {nf4_bytes / 2**20:.3g} MiB (fp32 would be {fp32_bytes / 2**20:.3g} MiB, "
              f"1/{fp32_bytes / nf4_bytes:.2f})" if n_nf4 else "")
    return (f"{kind} r={layers[0].r}{' (rsLoRA)' if layers[0].rslora else ''} on {targets}"
            f"{' (c_attn per projection: ' + '/'.join(qkv) + ')' if qkv else ''}: "
            f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%){memory}")


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W0 <- W0 + Δ) and put the plain nn.Linear back.

    Afterwards the model is an ordinary GPT again: same modules, same cost, and
    `save_pretrained` writes a normal checkpoint. All parameters stay frozen.
    A 4-bit NF4 base (QLoRA) is dequantised first: the merged weight is W0' + Δ with
    W0' = dequant(W_NF4), the weight the adapter was trained on, stored in full precision;
    the NF4 layers without an adapter become plain nn.Linears holding their W0' too.
    With named adapters (`named.py`) the active one is merged and the others are forgotten (their shared
    base weights have just changed under them).
    """
    for attr in ("lora_adapters", "lora_adapter_targets", "lora_active"):
        model.__dict__.pop(attr, None)
    for name, layer in list(lora_modules(model)):
        if isinstance(layer.base, NF4Linear):
            layer.base = layer.base.to_linear()
        if not layer.merged:
            layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base)
    dequantize_base(model)
    if hasattr(model, "lora_targets"):
        del model.lora_targets
    return model


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as its frozen base W0 (every LoRA/DoRA branch switched off), then switch them back on.

    GRPO's reference policy π_ref is the base model: with LoRA it costs no second copy in memory.
    A merged layer cannot be switched off (its W0 already holds the update): that is an error."""
    layers = [layer for _, layer in lora_modules(model)]
    if any(layer.merged for layer in layers):
        raise ValueError("lora_disabled: the model has merged LoRA layers; unmerge them (or keep them unmerged)")
    for layer in layers:
        layer.merged = True  # a merged layer's forward is base(x) alone
    try:
        yield model
    finally:
        for layer in layers:
            layer.merged = False
