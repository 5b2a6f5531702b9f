"""LoRA adapters as peft's files, both ways: `save_adapter` and `load_adapter`.

A peft LoRA adapter is a folder with `adapter_config.json` (r, lora_alpha,
target_modules, ...) and `adapter_model.safetensors`, which holds for every
adapted layer `base_model.model.<name>.lora_A.weight` (A, [r, in]) and
`...lora_B.weight` (B, [out, r]): the same A and B as eq. (3) of Hu et al. 2021,
in the same orientation as ours; with `use_dora: true`, also DoRA's magnitude
`...lora_magnitude_vector` ([out], one per output row, as ours). The file names and the peft_type/task_type
checks are shared with prefix tuning (`techniques/peft_format.py`).

Reading order: the fields this LoRA refuses (`_MUST_BE_OFF`, `_PLAIN_INITS`),
saving (`_fused_factors`, `_adapter_files`, `save_adapter`), then loading
(`_check_peft_config`, `_check_tensors`, `load_adapter`).

Where this differs from peft, and why:
- We write `fan_in_fan_out: true`, because peft keeps GPT-2's projections as
  `Conv1D` ([in, out]) and needs it to transpose Δ; our `nn.Linear`s need no
  transpose, and the A, B tensors are the same in both.
- peft has one adapter per layer, so a per-projection `LoRAQKV` is saved by an
  exact conversion to that fused form (`_fused_factors`); rank and alpha grow
  so that the scaling, and the logits, stay the same.
- LoRA and DoRA are implemented: an adapter that uses rank_pattern,
  alpha_pattern, trainable biases, modules_to_save, ... is refused with an
  error that names the option, rather than loaded with the wrong math.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn

from minigpt import atomic_save_dir, save_tensors, write_json

from ..peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_config, read_adapter_weights
from .lora import QKV, LoRALinear, LoRAQKV, _check_hyper, _find_targets, apply_lora, lora_modules

__all__ = ["save_adapter", "load_adapter"]

PEFT_PREFIX = "base_model.model."  # peft's PeftModelForCausalLM -> LoraModel -> our module names
MAGNITUDE = "lora_magnitude_vector"  # DoRA's m, as peft names it in adapter_model.safetensors

# LoraConfig fields (peft 0.21) and the value meaning "off"; a file that turns any of them on
# asks for math this module does not do, so loading refuses it.
_MUST_BE_OFF = {
    "rank_pattern": {}, "alpha_pattern": {}, "bias": "none", "lora_bias": False,
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
# Fields that change the math and that this LoRA implements.
_HANDLED = {"use_dora"}
# init_lora_weights values that leave W0 alone (pissa, olora, corda, loftq, lora_ga rewrite it).
_PLAIN_INITS = (True, False, "gaussian", "eva")


# ---- saving ----------------------------------------------------------------------------
def _uniform(layers: list[LoRALinear]) -> LoRALinear:
    first = layers[0]
    for layer in layers[1:]:
        if (layer.r, layer.scaling, layer.rslora, repr(layer.dropout), layer.magnitude is None) != \
                (first.r, first.scaling, first.rslora, repr(first.dropout), first.magnitude is None):
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
        if layer.magnitude is not None:
            tensors[f"{PEFT_PREFIX}{name}.{MAGNITUDE}"] = layer.magnitude  # (out,)
    targets = getattr(model, "lora_targets", None) or sorted({n.rsplit(".", 1)[-1] for n in layers})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "lora_dropout": float(getattr(first.dropout, "p", 0.0)), "target_modules": targets,
        "fan_in_fan_out": True, "use_rslora": first.rslora, "bias": "none", "init_lora_weights": True,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "name_or_path", None) or None,
        "inference_mode": True, "revision": None, "auto_mapping": None, "megatron_core": "megatron.core",
        "loftq_config": {}, "eva_config": None, "corda_config": None, "lora_ga_config": None,
        "qalora_group_size": 16, "ensure_weight_tying": False, **_MUST_BE_OFF,
        "use_dora": first.magnitude is not None,
    }
    return config, tensors


def save_adapter(model: nn.Module, directory: Union[str, Path]) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (peft's layout), atomically.

    Per-projection adapters are converted exactly to peft's fused form (see
    `_fused_factors`): rank and alpha grow so that the scaling, and the logits, stay the same.
    """
    config, tensors = _adapter_files(model)
    with atomic_save_dir(directory) as tmp:
        write_json(config, tmp / ADAPTER_CONFIG)
        save_tensors(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    return Path(directory)


# ---- loading ---------------------------------------------------------------------------
def _is_off(value, off) -> bool:
    return value is None or value is False or value == off or (isinstance(value, (dict, list)) and not value)


def _check_peft_config(cfg: dict, path: Path) -> None:
    """Refuse a LoRA config that asks for math this LoRA does not do (peft_type and task_type are
    already checked by `read_adapter_config`)."""
    for key, off in _MUST_BE_OFF.items():
        if not _is_off(cfg.get(key), off):
            raise ValueError(f"{path} sets {key}={cfg[key]!r}, a peft option this LoRA does not implement; "
                             f"retrain without it (or merge it in peft: merge_and_unload()) and load the result")
    if cfg.get("init_lora_weights", True) not in _PLAIN_INITS:
        raise ValueError(f"{path} sets init_lora_weights={cfg['init_lora_weights']!r}, which rewrites the base "
                         "weights in peft; this LoRA assumes the original W0. Save it from peft with the "
                         "conversion to plain LoRA (path_initial_model_for_weight_conversion)")
    unknown = sorted(k for k, v in cfg.items()
                     if k not in _HARMLESS | _HANDLED and k not in _MUST_BE_OFF and not _is_off(v, None))
    if unknown:
        raise ValueError(f"{path} sets {', '.join(unknown)}, unknown to this LoRA (written by a newer peft?); "
                         "refusing rather than guessing the math")
    if not cfg.get("target_modules"):
        raise ValueError(f"{path} names no target_modules")
    try:
        _check_hyper(cfg.get("r"), cfg.get("lora_alpha"), cfg.get("lora_dropout") or 0.0)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _check_tensors(model: nn.Module, names: list[str], tensors: dict, r: int, dora: bool, path: Path) -> None:
    """Before touching the model: each target has its A [r, in] and B [out, r] (and DoRA's magnitude [out]),
    and nothing is left over."""
    left = set(tensors)
    for name in names:
        base = model.get_submodule(name)
        wanted = [(f"{PEFT_PREFIX}{name}.lora_A.weight", (r, base.in_features)),
                  (f"{PEFT_PREFIX}{name}.lora_B.weight", (base.out_features, r))]
        if dora:
            wanted.append((f"{PEFT_PREFIX}{name}.{MAGNITUDE}", (base.out_features,)))
        for key, shape in wanted:
            if key not in tensors:
                raise ValueError(f"{path} has no tensor {key}, which its config's target_modules ask for")
            if tuple(tensors[key].shape) != shape:
                raise ValueError(f"{key} in {path} has shape {list(tensors[key].shape)}, but r={r} and this model "
                                 f"need {list(shape)} (an adapter for another GPT-2 size?)")
            left.discard(key)
    if left:
        raise ValueError(f"{path} has {len(left)} tensor(s) no LoRA layer takes, e.g. {sorted(left)[0]} "
                         "(lora_embedding_*, biases and modules_to_save are not supported)")


def load_adapter(model: nn.Module, directory: Union[str, Path]) -> nn.Module:
    """Inject LoRA as adapter_config.json says and load the A, B tensors; returns the model.

    Reads adapters saved by peft (`PeftModel.save_pretrained`) or by `save_adapter`.
    Every tensor must find its layer and every layer its two tensors, with the right shapes;
    every check runs before the model is touched.
    """
    directory = Path(directory)
    cfg = read_adapter_config(directory, "LORA")
    _check_peft_config(cfg, directory / ADAPTER_CONFIG)
    tensors = read_adapter_weights(directory)
    targets = cfg["target_modules"] if isinstance(cfg["target_modules"], str) else sorted(cfg["target_modules"])
    dora = bool(cfg.get("use_dora", False))
    _check_tensors(model, _find_targets(model, targets), tensors, cfg["r"], dora, directory / ADAPTER_WEIGHTS)
    apply_lora(model, r=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout") or 0.0,
               targets=targets, rslora=bool(cfg.get("use_rslora", False)), use_dora=dora, verbose=False)
    with torch.no_grad():
        for name, layer in lora_modules(model):
            layer.A.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"])
            layer.B.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"])
            if dora:
                layer.magnitude.copy_(tensors[f"{PEFT_PREFIX}{name}.{MAGNITUDE}"])
    return model
