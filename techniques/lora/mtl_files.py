"""MTL-LoRA adapter folders: our own format, in peft's two-file layout so that nothing mistakes it for LoRA.

    adapter_config.json         {"peft_type": "MTL_LORA", "task_type": "CAUSAL_LM", "r", "alpha", "n_up", "tau",
                                 "full_lambda", "tasks": [names, in task-id order], "target_modules": [full names]}
    adapter_model.safetensors   per adapted Linear NAME, with P = "base_model.model.":
                                  P+NAME.mtl_lora_A       (r, in)        shared down-projection A
                                  P+NAME.mtl_lora_Lambda  (T, r, r) or (T, r)   Λ_t (full, or its diagonal)
                                  P+NAME.mtl_lora_B       (n, out, r)    the up-projections B^i
                                  P+NAME.mtl_lora_w       (T, n)         the mixing logits w_t

peft has no MTL-LoRA, and `adapters` keeps it as one adapter per task with shared parameters (its own
folder per adapter), so there is no reference format to follow. `peft_type` is "MTL_LORA": the plain LoRA
loaders (`load_adapter`, `minigpt generate --lora`) refuse such a folder in `read_adapter_config`, naming
the right option, and `load_mtl_lora` refuses a plain LoRA folder the same way. Saves are atomic
(`minigpt.atomic_save_dir`); loads read safetensors only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import torch
import torch.nn as nn

from minigpt import atomic_save_dir, save_tensors, write_json

from ..peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_config, read_adapter_weights
from .mtl import MTLLoRALinear, apply_mtl_lora, merge_mtl_lora

__all__ = ["save_mtl_lora", "load_mtl_lora", "load_merged_mtl", "read_mtl_config", "task_index"]

PREFIX = "base_model.model."
PARAMS = ("A", "Lambda", "B", "w")
_KEYS = {"peft_type", "task_type", "r", "alpha", "n_up", "tau", "full_lambda", "tasks", "target_modules"}


def _layers(model: nn.Module) -> list[tuple[str, MTLLoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MTLLoRALinear)]


def save_mtl_lora(model: nn.Module, directory: Union[str, Path], tasks: Sequence[str]) -> Path:
    """Write `model`'s MTL-LoRA layers (and the task names, in id order) to `directory`, atomically."""
    layers = _layers(model)
    if not layers:
        raise ValueError("this model has no MTL-LoRA layers to save; call apply_mtl_lora(model, ...) first")
    first = layers[0][1]
    hyper = dict(r=first.r, alpha=first.alpha, n_up=first.n_up, tau=first.tau, full_lambda=first.full_lambda,
                 n_tasks=first.n_tasks)
    for name, m in layers:
        if dict(r=m.r, alpha=m.alpha, n_up=m.n_up, tau=m.tau, full_lambda=m.full_lambda, n_tasks=m.n_tasks) != hyper:
            raise ValueError(f"MTL-LoRA layer {name} has other hyperparameters than {layers[0][0]}; the file "
                             "format holds one set for all layers")
    tasks = [str(t) for t in tasks]
    if len(tasks) != first.n_tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"give {first.n_tasks} distinct task names, one per task id (got {tasks})")
    config = {"peft_type": "MTL_LORA", "task_type": "CAUSAL_LM", "r": first.r, "alpha": first.alpha,
              "n_up": first.n_up, "tau": first.tau, "full_lambda": first.full_lambda, "tasks": tasks,
              "target_modules": [name for name, _ in layers]}
    tensors = {f"{PREFIX}{name}.mtl_lora_{p}": getattr(m, p) for name, m in layers for p in PARAMS}
    with atomic_save_dir(directory) as tmp:
        write_json(config, tmp / ADAPTER_CONFIG)
        save_tensors(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    return Path(directory)


def read_mtl_config(directory: Union[str, Path]) -> dict:
    """adapter_config.json of an MTL-LoRA folder, checked (a plain LoRA or prefix folder is refused by name)."""
    path = Path(directory) / ADAPTER_CONFIG
    cfg = read_adapter_config(directory, "MTL_LORA")
    missing = sorted(_KEYS - set(cfg))
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}; it was not written by save_mtl_lora")
    unknown = sorted(set(cfg) - _KEYS)
    if unknown:
        raise ValueError(f"{path} sets {', '.join(unknown)}, unknown to this MTL-LoRA; refusing rather than guessing")
    if not isinstance(cfg["tasks"], list) or not cfg["tasks"] or len(set(cfg["tasks"])) != len(cfg["tasks"]):
        raise ValueError(f"{path}: 'tasks' must be a non-empty list of distinct task names")
    return cfg


def task_index(cfg: dict, task: Union[str, int]) -> int:
    """The id of `task` (a name from the folder's task list, or an id as text/int), with a clear error."""
    tasks = cfg["tasks"]
    if isinstance(task, str) and task in tasks:
        return tasks.index(task)
    try:
        t = int(task)
    except (TypeError, ValueError):
        raise ValueError(f"unknown task {task!r}: this MTL-LoRA knows {', '.join(tasks)} "
                         f"(or an id 0..{len(tasks) - 1})") from None
    if not 0 <= t < len(tasks):
        raise ValueError(f"task id {t} is out of range: this MTL-LoRA has {len(tasks)} tasks (ids 0..{len(tasks) - 1})")
    return t


def load_mtl_lora(model: nn.Module, directory: Union[str, Path]) -> tuple[nn.Module, list[str]]:
    """Wrap the folder's target Linears of `model` with MTL-LoRA and load its tensors; returns (model, tasks).
    Every name and shape is checked before the model is touched."""
    directory = Path(directory)
    cfg = read_mtl_config(directory)
    tensors = read_adapter_weights(directory)
    n_tasks, r, n_up = len(cfg["tasks"]), int(cfg["r"]), int(cfg["n_up"])
    modules = dict(model.named_modules())
    left = set(tensors)
    for name in cfg["target_modules"]:
        base = modules.get(name)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"{directory / ADAPTER_CONFIG} targets {name}, which is not a Linear of this model")
        lam = (n_tasks, r, r) if cfg["full_lambda"] else (n_tasks, r)
        for p, shape in zip(PARAMS, [(r, base.in_features), lam, (n_up, base.out_features, r), (n_tasks, n_up)]):
            key = f"{PREFIX}{name}.mtl_lora_{p}"
            if key not in tensors:
                raise ValueError(f"{directory / ADAPTER_WEIGHTS} has no tensor {key}")
            if tuple(tensors[key].shape) != shape:
                raise ValueError(f"{key} in {directory / ADAPTER_WEIGHTS} has shape {list(tensors[key].shape)}, "
                                 f"but this model needs {list(shape)} (an adapter for another GPT-2 size?)")
            left.discard(key)
    if left:
        raise ValueError(f"{directory / ADAPTER_WEIGHTS} has {len(left)} tensor(s) no MTL-LoRA layer takes, "
                         f"e.g. {sorted(left)[0]}")
    apply_mtl_lora(model, n_tasks, targets=cfg["target_modules"], r=r, alpha=cfg["alpha"], n_up=n_up,
                   tau=cfg["tau"], full_lambda=bool(cfg["full_lambda"]))
    with torch.no_grad():
        for name, m in _layers(model):
            if name not in cfg["target_modules"]:
                continue
            for p in PARAMS:
                getattr(m, p).copy_(tensors[f"{PREFIX}{name}.mtl_lora_{p}"])
    return model, list(cfg["tasks"])


def load_merged_mtl(model: nn.Module, directory: Union[str, Path], task: Union[str, int]) -> nn.Module:
    """The command line's `--mtl-lora DIR --task T` (generate and merge): the folder's MTL-LoRA loaded and task T
    folded into each W0 (W0 <- W0 + s·Σ_i softmax(w_T/τ)_i·B^i·Λ_T·A, `merge_mtl_lora`), so the model decodes
    task T at the base model's cost. The task is checked before the model is touched."""
    index = task_index(read_mtl_config(directory), task)
    model, _ = load_mtl_lora(model, directory)
    return merge_mtl_lora(model, index)
