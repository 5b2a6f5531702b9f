"""LoRA: low-rank adaptation of GPT-2's projections, written by hand.

Hu et al. 2021 (arXiv:2106.09685), eq. (3): a frozen weight W0 [out, in] is
adapted by a trainable low-rank product,

    h = W0·x + b + (alpha/r)·B·A·x          A: [r, in], B: [out, r], r << min(in, out)

A starts kaiming-uniform (a = sqrt(5), as an nn.Linear weight would), B starts
at zero, so at step 0 the adapted model *is* the base model. rsLoRA (Kalajdzievic
2023) changes only the scaling to alpha/sqrt(r). Dropout, when asked for, acts on
the LoRA branch's input x only. Merging folds Δ = (alpha/r)·B·A into W0, after
which inference costs exactly what the base model costs.

Reading order: the layer (`LoRALinear`), its per-projection variant for the fused
q|k|v `c_attn` (`LoRAQKV`), injection (`apply_lora`, `merge_lora`), the adapter
files in peft's format (`save_adapter`, `load_adapter`), and the command line.

Where this differs from peft, and why:
- peft keeps GPT-2's projections as `Conv1D` (weight [in, out]) and so needs
  `fan_in_fan_out=True` to transpose Δ when merging. Our projections are
  `nn.Linear` ([out, in]), so Δ = s·B·A needs no transpose. A and B have the same
  shapes in both, so adapter files carry over unchanged; we write
  `fan_in_fan_out: true` because that is what peft needs for GPT-2.
- `LoRAQKV` gives q, k and v their own A and B (the paper's setting, and loralib's
  MergedLinear); peft can only adapt the fused c_attn as a whole. We save it by an
  exact conversion to the fused form (see `_fused_factors`).
- Only plain LoRA is implemented; a peft adapter that uses DoRA, rank_pattern,
  alpha_pattern, trainable biases, modules_to_save, ... is refused with an error
  that names the option, rather than loaded with the wrong math.
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn

from minigpt import (TrainConfig, atomic_save_dir, get_tokenizer, lm_loss_fn, load_lm_data, load_tensors, read_json,
                     save_history, save_tensors, split_examples, train, write_json)

__all__ = ["LoRALinear", "LoRAQKV", "apply_lora", "merge_lora", "lora_modules", "lora_parameters", "lora_summary",
           "save_adapter", "load_adapter"]

Targets = Union[Sequence[str], str]  # a list of module-name suffixes, or one regex over full names (as in peft)
QKV = "qkv"


# ---- the layer -------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """y = W0·x + b + s·B·A·dropout(x), with s = alpha/r (or alpha/sqrt(r) for rsLoRA).

    Wraps a frozen `nn.Linear` (kept as `self.base`, so W0 and b are untouched
    until `merge()`). A [r, in] and B [out, r] are the only trainable tensors.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        _check_hyper(r, alpha, dropout)
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.rslora = int(r), alpha, bool(rslora)
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._init_factors()

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        return y if self.merged else y + self.lora_branch(x)

    def delta_weight(self) -> torch.Tensor:
        """Δ = s·B·A, [out, in]: what `merge()` adds to W0."""
        return self.scaling * (self.B @ self.A)

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + Δ; the forward pass then runs the base layer alone."""
        if self.merged:
            raise RuntimeError("this LoRA layer is already merged; unmerge() first")
        self.base.weight.add_(self.delta_weight().to(self.base.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W0 - Δ, undoing `merge()` (exact up to one rounding per weight)."""
        if not self.merged:
            raise RuntimeError("this LoRA layer is not merged")
        self.base.weight.sub_(self.delta_weight().to(self.base.weight.dtype))
        self.merged = False

    def describe(self) -> str:
        return "whole"

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, rslora={self.rslora}, merged={self.merged}"


class LoRAQKV(LoRALinear):
    """Per-projection LoRA on the fused q|k|v `c_attn` (out = 3C rows: q, then k, then v).

    Each chosen projection p in `parts` (e.g. "qv", the paper's choice) gets its
    own A_p [r, C] and B_p [C, r]; the rows of the others stay exactly W0's:

        q|k|v = W0·x + b + s·[B_q·A_q·x ; 0 ; B_v·A_v·x]

    One dropout mask is shared by the parts, as in loralib's MergedLinear, which
    is also what makes the fused form saved for peft equal in training too.
    """

    def __init__(self, base: nn.Linear, parts: str = "qv", r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 rslora: bool = False):
        self.parts = _check_qkv(parts)
        if base.out_features % 3:
            raise ValueError(f"per-projection LoRA needs a fused q|k|v layer (3·C outputs); got {base.out_features}")
        super().__init__(base, r, alpha, dropout, rslora)

    def _init_factors(self) -> None:
        C = self.out_features // 3
        self.A = nn.ParameterDict({p: self._new_A() for p in self.parts})       # each (r, C)
        self.B = nn.ParameterDict({p: self._new_B(C) for p in self.parts})      # each (C, r)

    def lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        """s·[B_q·A_q·h ; 0 ; B_v·A_v·h] for h = dropout(x): (..., in) -> (..., 3C)."""
        h, C = self.dropout(x), self.out_features // 3
        pieces = [(h @ self.A[p].T) @ self.B[p].T * self.scaling if p in self.parts  # (..., C)
                  else x.new_zeros(*x.shape[:-1], C)                                 # q, k or v left as W0's
                  for p in QKV]
        return torch.cat(pieces, dim=-1)

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
        if not isinstance(module, nn.Linear) or not n.startswith("transformer.h."):
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
               verbose: bool = True) -> nn.Module:
    """Freeze every parameter of `model`, then wrap each target projection in LoRA.

    targets: suffixes of module names, matched as peft matches them (so "c_proj"
    means attn.c_proj and mlp.c_proj), or one regex string over full names.
    qkv: None adapts the fused c_attn as a whole (one A, B; what peft does);
    a subset of "qkv" such as "qv" gives each chosen projection its own A and B.
    Prints a one-line summary when verbose. Returns the same model, changed in place.
    """
    _check_hyper(r, alpha, dropout)
    names = _find_targets(model, targets)
    if qkv is not None:
        _check_qkv(qkv)
        if not any(n.endswith("attn.c_attn") for n in names):
            raise ValueError(f"qkv={qkv!r} adapts q/k/v inside c_attn, but the targets {targets!r} do not include c_attn")
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        base = model.get_submodule(name)
        if qkv is not None and name.endswith("attn.c_attn"):
            layer = LoRAQKV(base, qkv, r=r, alpha=alpha, dropout=dropout, rslora=rslora)
        else:
            layer = LoRALinear(base, r=r, alpha=alpha, dropout=dropout, rslora=rslora)
        setattr(model.get_submodule(parent_name), child, layer)
    model.lora_targets = sorted(targets) if not isinstance(targets, str) else targets  # written to adapter_config.json
    if verbose:
        print(lora_summary(model))
    return model


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear))


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every A and B in the model: what the optimiser trains."""
    return [p for _, m in lora_modules(model) for n, p in m.named_parameters() if not n.startswith("base.")]


def lora_summary(model: nn.Module) -> str:
    """e.g. 'LoRA r=8 on c_attn: 294,912 trainable of 124,734,720 parameters (0.24%)'."""
    layers = [m for _, m in lora_modules(model)]
    if not layers:
        return "no LoRA layers in this model"
    targets = getattr(model, "lora_targets", None) or sorted({n.rsplit(".", 1)[-1] for n, _ in lora_modules(model)})
    targets = targets if isinstance(targets, str) else ", ".join(targets)
    qkv = {m.describe() for m in layers if isinstance(m, LoRAQKV)}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return (f"LoRA r={layers[0].r}{' (rsLoRA)' if layers[0].rslora else ''} on {targets}"
            f"{' (c_attn per projection: ' + '/'.join(qkv) + ')' if qkv else ''}: "
            f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W0 <- W0 + Δ) and put the plain nn.Linear back.

    Afterwards the model is an ordinary GPT again: same modules, same cost, and
    `save_pretrained` writes a normal checkpoint. All parameters stay frozen.
    """
    for name, layer in list(lora_modules(model)):
        if not layer.merged:
            layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base)
    if hasattr(model, "lora_targets"):
        del model.lora_targets
    return model


# ---- adapter files in peft's format ----------------------------------------------------
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # peft's PeftModelForCausalLM -> LoraModel -> our module names

# LoraConfig fields (peft 0.21) and the value meaning "off"; a file that turns any of them on
# asks for math this module does not do, so loading refuses it.
_MUST_BE_OFF = {
    "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "bias": "none", "lora_bias": False,
    "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "layer_replication": None,
    "exclude_modules": None, "target_parameters": None, "trainable_token_indices": None, "use_qalora": False,
    "use_bdlora": None, "alora_invocation_tokens": None, "arrow_config": None, "kasa_config": None,
    "velora_config": None, "monteclora_config": None, "megatron_config": None,
}
# Fields that do not change the math of a trained adapter.
_HARMLESS = {"peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "fan_in_fan_out",
             "use_rslora", "init_lora_weights", "base_model_name_or_path", "revision", "inference_mode",
             "auto_mapping", "peft_version", "megatron_core", "loftq_config", "eva_config", "corda_config",
             "lora_ga_config", "qalora_group_size", "ensure_weight_tying", "runtime_config"}
# init_lora_weights values that leave W0 alone (pissa, olora, corda, loftq, lora_ga rewrite it).
_PLAIN_INITS = (True, False, "gaussian", "eva")


def _uniform(layers: list[LoRALinear]) -> LoRALinear:
    first = layers[0]
    for layer in layers[1:]:
        if (layer.r, layer.scaling, layer.rslora, repr(layer.dropout)) != \
                (first.r, first.scaling, first.rslora, repr(first.dropout)):
            raise ValueError("peft's adapter_config.json holds one r/alpha/dropout for all layers, but these LoRA "
                             "layers differ; build them with one apply_lora call")
    return first


def _fused_factors(layer: LoRALinear, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) as peft's one-adapter-per-layer form of rank `rank`, with the same B·A.

    Per projection (parts p1..pm, each rank r) becomes one rank m·r adapter:
        A = [A_p1; ...; A_pm]                 (m·r, in)
        B = block matrix, B_pj in p_j's rows and columns j·r..(j+1)·r, zero elsewhere   (3C, m·r)
    so B·A = [B_q·A_q ; 0 ; B_v·A_v] exactly. A whole layer of smaller rank is
    padded with zero rows of A and zero columns of B, which adds exact zeros.
    """
    if isinstance(layer, LoRAQKV):
        C, r = layer.out_features // 3, layer.r
        A = torch.cat([layer.A[p] for p in layer.parts], dim=0)
        B = layer.A[layer.parts[0]].new_zeros(layer.out_features, len(layer.parts) * r)
        for j, p in enumerate(layer.parts):
            i = QKV.index(p)
            B[i * C:(i + 1) * C, j * r:(j + 1) * r] = layer.B[p]
    else:
        A, B = layer.A, layer.B
    pad = rank - A.shape[0]
    return (torch.cat([A, A.new_zeros(pad, A.shape[1])], dim=0),
            torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1))


def _adapter_files(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """The adapter_config.json dict and the safetensors tensors, in peft's layout."""
    layers = dict(lora_modules(model))
    if not layers:
        raise ValueError("this model has no LoRA layers to save; call apply_lora(model, ...) first")
    first = _uniform(list(layers.values()))
    m = max(len(l.parts) if isinstance(l, LoRAQKV) else 1 for l in layers.values())
    rank = m * first.r
    # keep s = alpha/r (or alpha/sqrt(r)) when the rank grows m-fold
    alpha = first.alpha * (math.sqrt(m) if first.rslora else m)
    tensors = {}
    for name, layer in layers.items():
        A, B = _fused_factors(layer, rank)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A  # (rank, in)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B  # (out, rank)
    targets = getattr(model, "lora_targets", None) or sorted({n.rsplit(".", 1)[-1] for n in layers})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "lora_dropout": float(getattr(first.dropout, "p", 0.0)), "target_modules": targets,
        "fan_in_fan_out": True, "use_rslora": first.rslora, "bias": "none", "init_lora_weights": True,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "name_or_path", None) or None,
        "inference_mode": True, "revision": None, "auto_mapping": None, "megatron_core": "megatron.core",
        "loftq_config": {}, "eva_config": None, "corda_config": None, "lora_ga_config": None,
        "qalora_group_size": 16, "ensure_weight_tying": False, **_MUST_BE_OFF,
    }
    return config, tensors


def save_adapter(model: nn.Module, directory) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (peft's layout), atomically.

    Per-projection adapters are converted exactly to peft's fused form (see
    `_fused_factors`): rank and alpha grow so that the scaling, and the logits, stay the same.
    """
    config, tensors = _adapter_files(model)
    with atomic_save_dir(directory) as tmp:
        write_json(config, tmp / CONFIG_FILE)
        save_tensors(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
    return Path(directory)


def _is_off(value, off) -> bool:
    return value is None or value is False or value == off or (isinstance(value, (dict, list)) and not value)


def _check_peft_config(cfg: dict, path: Path) -> None:
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path} is a {cfg.get('peft_type')!r} adapter, not LoRA; load it with the matching technique")
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        raise ValueError(f"{path} has task_type {cfg['task_type']!r}; only CAUSAL_LM adapters fit GPT-2's LM head")
    for key, off in _MUST_BE_OFF.items():
        if not _is_off(cfg.get(key), off):
            raise ValueError(f"{path} sets {key}={cfg[key]!r}, a peft option this LoRA does not implement; "
                             f"retrain without it (or merge it in peft: merge_and_unload()) and load the result")
    if cfg.get("init_lora_weights", True) not in _PLAIN_INITS:
        raise ValueError(f"{path} sets init_lora_weights={cfg['init_lora_weights']!r}, which rewrites the base "
                         "weights in peft; this LoRA assumes the original W0. Save it from peft with the "
                         "conversion to plain LoRA (path_initial_model_for_weight_conversion)")
    unknown = sorted(k for k, v in cfg.items() if k not in _HARMLESS and k not in _MUST_BE_OFF and not _is_off(v, None))
    if unknown:
        raise ValueError(f"{path} sets {', '.join(unknown)}, unknown to this LoRA (written by a newer peft?); "
                         "refusing rather than guessing the math")
    if not cfg.get("target_modules"):
        raise ValueError(f"{path} names no target_modules")
    try:
        _check_hyper(cfg.get("r"), cfg.get("lora_alpha"), cfg.get("lora_dropout") or 0.0)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; a LoRA adapter folder needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        return load_tensors(path)
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None


def _check_tensors(model: nn.Module, names: list[str], tensors: dict, r: int, path: Path) -> None:
    """Before touching the model: each target has its A [r, in] and B [out, r], and nothing is left over."""
    left = set(tensors)
    for name in names:
        base = model.get_submodule(name)
        for key, shape in ((f"{PEFT_PREFIX}{name}.lora_A.weight", (r, base.in_features)),
                           (f"{PEFT_PREFIX}{name}.lora_B.weight", (base.out_features, r))):
            if key not in tensors:
                raise ValueError(f"{path} has no tensor {key}, which its config's target_modules ask for")
            if tuple(tensors[key].shape) != shape:
                raise ValueError(f"{key} in {path} has shape {list(tensors[key].shape)}, but r={r} and this model "
                                 f"need {list(shape)} (an adapter for another GPT-2 size?)")
            left.discard(key)
    if left:
        raise ValueError(f"{path} has {len(left)} tensor(s) no LoRA layer takes, e.g. {sorted(left)[0]} "
                         "(lora_embedding_*, biases and modules_to_save are not supported)")


def load_adapter(model: nn.Module, directory) -> nn.Module:
    """Inject LoRA as adapter_config.json says and load the A, B tensors; returns the model.

    Reads adapters saved by peft (`PeftModel.save_pretrained`) or by `save_adapter`.
    Every tensor must find its layer and every layer its two tensors, with the right shapes.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"LoRA adapter folder {directory} does not exist")
    if not (directory / WEIGHTS_FILE).is_file() and (directory / "adapter_model.bin").is_file():
        raise ValueError(f"{directory} holds a pickled adapter_model.bin, which is never unpickled here; "
                         "re-save it in peft with save_pretrained(..., safe_serialization=True)")
    cfg = read_json(directory / CONFIG_FILE)
    _check_peft_config(cfg, directory / CONFIG_FILE)
    tensors = _read_weights(directory / WEIGHTS_FILE)
    targets = cfg["target_modules"] if isinstance(cfg["target_modules"], str) else sorted(cfg["target_modules"])
    _check_tensors(model, _find_targets(model, targets), tensors, cfg["r"], directory / WEIGHTS_FILE)
    apply_lora(model, r=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout", 0.0),
               targets=targets, rslora=bool(cfg.get("use_rslora", False)), verbose=False)
    with torch.no_grad():
        for name, layer in lora_modules(model):
            layer.A.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"])
            layer.B.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"])
    return model


# ---- command line: python -m techniques.lora train ... ---------------------------------
def build_parser() -> argparse.ArgumentParser:
    from minigpt.cli import add_model_args
    p = argparse.ArgumentParser(prog="python -m techniques.lora", description="LoRA fine-tuning of GPT-2.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a LoRA adapter on a text or prompt/completion file",
                       description="Train LoRA on --data and save a peft-format adapter in --out.")
    t.add_argument("--data", required=True, metavar="FILE",
                   help=".txt (cut into blocks) or .jsonl with 'prompt' and 'completion' fields")
    t.add_argument("--out", required=True, metavar="DIR", help="where adapter_config.json, "
                   "adapter_model.safetensors and history.json go (written only once training has finished)")
    add_model_args(t)
    t.add_argument("--r", type=int, default=8, help="rank of B·A (default: 8)")
    t.add_argument("--alpha", type=float, default=16, help="scaling numerator: s = alpha/r (default: 16)")
    t.add_argument("--dropout", type=float, default=0.0, help="dropout on the LoRA branch's input (default: 0)")
    t.add_argument("--targets", default="c_attn",
                   help="comma-separated: c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj, c_proj (default: c_attn)")
    t.add_argument("--qkv", default=None, help="adapt q/k/v of c_attn separately, e.g. qv (default: c_attn whole)")
    t.add_argument("--rslora", action="store_true", help="rank-stabilised scaling alpha/sqrt(r)")
    t.add_argument("--epochs", type=int, default=1, help="passes over the training data (default: 1)")
    t.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    t.add_argument("--block-size", type=int, default=128, help="tokens per training sequence (default: 128)")
    t.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: 8)")
    t.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default: 2e-4)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    t.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps (default: 0)")
    t.add_argument("--eval-fraction", type=float, default=0.1, help="share of examples held out (default: 0.1)")
    t.add_argument("--eval-every", type=int, default=50, help="steps between eval losses (default: 50)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    m = sub.add_parser("merge", help="fold an adapter into the weights and save a plain checkpoint",
                       description="Load --model/--weights, apply --lora DIR, merge it and save_pretrained to --out.")
    m.add_argument("--lora", required=True, metavar="DIR", help="the adapter folder (peft format)")
    m.add_argument("--out", required=True, metavar="DIR", help="where the merged config.json + model.safetensors go")
    add_model_args(m)
    return p


def _train_command(args) -> None:
    from minigpt.cli import model_from_args
    if not 0.0 <= args.eval_fraction < 1.0:
        raise ValueError(f"--eval-fraction must be in [0, 1), got {args.eval_fraction}")
    if args.eval_every < 1 or (args.max_steps is not None and args.max_steps < 1):
        raise ValueError("--eval-every and --max-steps must be >= 1")
    examples = load_lm_data(args.data, get_tokenizer(), args.block_size)
    model = model_from_args(args)
    if args.block_size > model.config.n_positions:
        raise ValueError(f"--block-size {args.block_size} exceeds the model's n_positions {model.config.n_positions}")
    apply_lora(model, r=args.r, alpha=args.alpha, dropout=args.dropout,
               targets=[t.strip() for t in args.targets.split(",") if t.strip()], qkv=args.qkv, rslora=args.rslora)
    # split_examples holds out at least one example; --eval-fraction 0 means none
    train_set, eval_set = split_examples(examples, args.eval_fraction, args.seed) if args.eval_fraction else (examples, [])
    lm_loss = lm_loss_fn(model)

    def loss_fn(batch):
        model.train(torch.is_grad_enabled())  # `train` evaluates under no_grad: no dropout there
        return lm_loss(batch)

    config = TrainConfig(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                         weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, eval_every=args.eval_every,
                         seed=args.seed, progress=not args.no_progress)
    history = train(lora_parameters(model), loss_fn, train_set, eval_examples=eval_set, config=config)
    model.eval()
    save_adapter(model, args.out)  # only now, after the last step: an interrupted run writes nothing
    save_history(history, args.out)
    last = history[-1]
    print(f"saved LoRA adapter to {args.out} after {len(history)} steps; last loss {last['loss']:.4f}"
          + (f", eval loss {last['eval_loss']:.4f}" if "eval_loss" in last else ""))


def _merge_command(args) -> None:
    from minigpt.cli import model_from_args
    model = merge_lora(load_adapter(model_from_args(args), args.lora))
    model.save_pretrained(args.out)
    print(f"merged {args.lora} into the weights; saved to {args.out}")


def main(argv=None) -> int:
    from minigpt.cli import fail
    args = build_parser().parse_args(argv)
    try:
        (_train_command if args.command == "train" else _merge_command)(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        fail(f"{e} (nothing was saved)" if args.command == "train" else str(e))
    except KeyboardInterrupt:
        fail(f"interrupted; nothing was saved to {args.out}", code=130)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
