"""MTL-LoRA in AdapterHub's own files (`adapters` 1.3, `save_adapter(dir, name, use_safetensors=True)`), both ways.

`adapters` keeps an MTL-LoRA as one adapter per task whose A and B^i are shared (`share_parameters`), and
`save_adapter` writes one folder per task:

    TASK/adapter_config.json    {"config": {"architecture": "mtl_lora", "r", "alpha", "n_up_projection",
                                 "weights_sharpness" (τ), "task_specific_matrix_type", "selfattn_lora",
                                 "intermediate_lora", "output_lora", ...}, "name": TASK, "model_type": "gpt2", ...}
    TASK/adapter.safetensors    per adapted layer NAME (GPT-2's names, the same as ours):
                                  NAME.loras.TASK.lora_A                 (r, in)     A, shared
                                  NAME.loras.TASK.lora_B                 (n, out, r) B^i, shared
                                  NAME.loras.TASK.task_specific.values   (r,)        diag(Λ_t)
                                  NAME.loras.TASK.weights                (n,)        w_t

So one of our MTL-LoRAs is T such folders, in task-id order, each holding a copy of the shared A and B^i;
no folder records the task list or its order, so `load_adapterhub_mtl` takes the folders in the order that
gives the ids. What the format (or `adapters` on GPT-2) does not allow, refused by name:
- a full Λ_t ("linear"): `adapters` cannot build it (TaskSpecificLinear.__init__, methods/lora.py:49) and
  would compute Λᵀ·A·x; only the diagonal ("singular_values", the paper's default) goes either way;
- attention: GPT-2's c_attn is `adapters`' LoRAMergedLinear, which refuses MultiTask (lora.py:1285), and
  attn.c_proj is no LoRA target there; the MLP's c_fc (`intermediate_lora`) and c_proj (`output_lora`) are;
- pickled `pytorch_adapter.bin` (its default): never unpickled here; save with use_safetensors=True.
The scaling is the same, s = alpha/r. Dropout does not exist at inference and is not read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import torch
import torch.nn as nn

from minigpt import atomic_save_dir, load_tensors, read_json, save_tensors, write_json

from .mtl import MTLLoRALinear, apply_mtl_lora

__all__ = ["save_adapterhub_mtl", "load_adapterhub_mtl"]

CONFIG, WEIGHTS, PICKLED = "adapter_config.json", "adapter.safetensors", "pytorch_adapter.bin"
SLOTS = {"mlp.c_fc": "intermediate_lora", "mlp.c_proj": "output_lora"}   # our target -> adapters' switch
VERSION = "adapters.1.3.0"  # the version whose files these are (tests/test_mtl_adapterhub.py loads them there)


def _keys(name: str, task: str) -> dict[str, str]:
    """Our parameter -> adapters' key in adapter.safetensors, for layer `name` and task `task`."""
    p = f"{name}.loras.{task}."
    return {"A": p + "lora_A", "B": p + "lora_B", "Lambda": p + "task_specific.values", "w": p + "weights"}


def _mlp_slots(model: nn.Module, names: Sequence[str]) -> dict[str, bool]:
    """Which of adapters' switches the adapted layers are: every block's c_fc and/or every block's c_proj."""
    n_layer = model.config.n_layer
    slots = {}
    for target, slot in SLOTS.items():
        have = {n for n in names if n.endswith("." + target)}
        if have and len(have) != n_layer:
            raise ValueError(f"adapters' MTL-LoRA adapts {target} in every block ({slot}), but this one adapts it "
                             f"in {len(have)} of {n_layer}")
        slots[slot] = bool(have)
    other = [n for n in names if not any(n.endswith("." + t) for t in SLOTS)]
    if other:
        raise ValueError(f"adapters' MTL-LoRA on GPT-2 can adapt only mlp.c_fc and mlp.c_proj, not {other[0]} "
                         "(its c_attn is a LoRAMergedLinear, which refuses MultiTask); train with "
                         "--targets mlp.c_fc,mlp.c_proj to move it there")
    return slots


def save_adapterhub_mtl(model: nn.Module, directory: Union[str, Path], tasks: Sequence[str]) -> list[Path]:
    """Write the model's MTL-LoRA as `adapters`' save_adapter folders, DIRECTORY/TASK for each task (in id
    order), atomically as a whole; load them there with `model.load_adapter(DIRECTORY/TASK, use_safetensors=True)`
    for each task, then `share_parameters(adapter_names=tasks)` and `active_adapters = MultiTask(*tasks)`."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MTLLoRALinear)]
    if not layers:
        raise ValueError("this model has no MTL-LoRA layers to save; call apply_mtl_lora(model, ...) first")
    first = layers[0][1]
    tasks = [str(t) for t in tasks]
    if len(tasks) != first.n_tasks or len(set(tasks)) != len(tasks) or not all(tasks):
        raise ValueError(f"give {first.n_tasks} distinct task names, one per task id (got {tasks})")
    if any(m.full_lambda for _, m in layers):
        raise ValueError("adapters' MTL-LoRA cannot hold a full Λ_t (its 'linear' task matrix cannot be built, and "
                         "would compute Λᵀ·A·x); only the diagonal Λ goes to its format")
    for n, m in layers:
        if (m.r, m.alpha, m.n_up, m.tau) != (first.r, first.alpha, first.n_up, first.tau):
            raise ValueError(f"MTL-LoRA layer {n} has other hyperparameters than {layers[0][0]}; adapters' config "
                             "holds one set for all layers")
    slots = _mlp_slots(model, [n for n, _ in layers])
    config = {"alpha": first.alpha, "architecture": "mtl_lora", "attn_matrices": ["q", "v"], "composition_mode": "add",
              "dropout": 0.0, "dtype": None, "init_weights": "lora", "init_weights_seed": None, "leave_out": [],
              "n_up_projection": first.n_up, "r": first.r, "selfattn_lora": False,
              "task_specific_matrix_type": "singular_values", "use_dora": False, "use_gating": False,
              "vera_b": None, "vera_d": None, "weights_sharpness": first.tau, **slots}
    directory = Path(directory)
    with atomic_save_dir(directory) as tmp:
        for t, task in enumerate(tasks):
            (tmp / task).mkdir()
            write_json({"config": config, "hidden_size": model.config.n_embd, "model_class": "GPT2LMHeadModel",
                        "model_name": getattr(model.config, "name_or_path", None) or "gpt2", "model_type": "gpt2",
                        "name": task, "version": VERSION}, tmp / task / CONFIG)
            tensors = {}
            for n, m in layers:
                keys = _keys(n, task)
                tensors.update({keys["A"]: m.A, keys["B"]: m.B, keys["Lambda"]: m.Lambda[t], keys["w"]: m.w[t]})
            save_tensors(tensors, tmp / task / WEIGHTS, metadata={"format": "pt"})
    return [directory / task for task in tasks]


def _read_folder(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapters' config of an MTL-LoRA task folder, its tensors), each refusal naming the file and the fix."""
    if not (folder / CONFIG).is_file():
        raise FileNotFoundError(f"{folder / CONFIG} not found; give the folders adapters' save_adapter wrote, one "
                                "per task")
    if not (folder / WEIGHTS).is_file():
        hint = (f" it holds a pickled {PICKLED}, which is never unpickled here: save it with "
                "model.save_adapter(..., use_safetensors=True)") if (folder / PICKLED).is_file() else ""
        raise FileNotFoundError(f"{folder / WEIGHTS} not found;{hint or ' save it with use_safetensors=True'}")
    meta = read_json(folder / CONFIG)
    cfg = meta.get("config") if isinstance(meta, dict) else None
    if not isinstance(cfg, dict) or cfg.get("architecture") != "mtl_lora":
        found = cfg.get("architecture") if isinstance(cfg, dict) else None
        raise ValueError(f"{folder / CONFIG} is not an adapters MTL-LoRA (architecture {found!r}, not 'mtl_lora')")
    for key, want in (("task_specific_matrix_type", "singular_values"), ("composition_mode", "add"),
                      ("use_gating", False), ("use_dora", False), ("vera_b", None), ("vera_d", None),
                      ("leave_out", []), ("selfattn_lora", False)):
        if cfg.get(key, want) != want:
            raise ValueError(f"{folder / CONFIG} sets {key}={cfg[key]!r}; this MTL-LoRA reads only {key}={want!r} "
                             "(see techniques/lora/mtl_adapterhub.py)")
    return meta, load_tensors(folder / WEIGHTS)


def load_adapterhub_mtl(model: nn.Module, folders: Sequence[Union[str, Path]]) -> tuple[nn.Module, list[str]]:
    """Wrap `model` with the MTL-LoRA that `adapters`' task folders hold (folder k = task id k) and load it;
    returns (model, task names). The folders must agree on the hyperparameters and hold the same shared A and
    B^i; every check runs before the model is touched."""
    folders = [Path(f) for f in folders]
    if not folders:
        raise ValueError("give the task folders of an adapters MTL-LoRA, one per task, in task-id order")
    read = [_read_folder(f) for f in folders]
    tasks = [meta.get("name") or f.name for (meta, _), f in zip(read, folders)]
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"the folders name the tasks {tasks}: give each task once")
    cfg = read[0][0]["config"]
    hyper = ("r", "alpha", "n_up_projection", "weights_sharpness", "intermediate_lora", "output_lora")
    for (meta, _), f in zip(read[1:], folders[1:]):
        if any(meta["config"].get(k) != cfg.get(k) for k in hyper):
            raise ValueError(f"{f / CONFIG} has other hyperparameters than {folders[0] / CONFIG} ({', '.join(hyper)}): "
                             "these are not the tasks of one MTL-LoRA")
    r, n_up = int(cfg["r"]), int(cfg["n_up_projection"])
    targets = [t for t, slot in SLOTS.items() if cfg.get(slot)]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(n.endswith("." + t)
                                                                                    for t in targets)]
    if not names:
        raise ValueError(f"{folders[0] / CONFIG} adapts no layer this MTL-LoRA can take (intermediate_lora and "
                         "output_lora are both off)")
    modules = dict(model.named_modules())
    for (meta, tensors), f, task in zip(read, folders, tasks):
        left = set(tensors)
        for n in names:
            base = modules[n]
            shapes = {"A": (r, base.in_features), "B": (n_up, base.out_features, r), "Lambda": (r,), "w": (n_up,)}
            for p, key in _keys(n, task).items():
                if key not in tensors:
                    raise ValueError(f"{f / WEIGHTS} has no tensor {key}")
                if tuple(tensors[key].shape) != shapes[p]:
                    raise ValueError(f"{key} in {f / WEIGHTS} has shape {list(tensors[key].shape)}, but this model "
                                     f"needs {list(shapes[p])} (an adapter for another GPT-2 size?)")
                left.discard(key)
                if p in ("A", "B") and f is not folders[0]:
                    ref = read[0][1][_keys(n, tasks[0])[p]]
                    if not torch.equal(tensors[key], ref):
                        raise ValueError(f"{key} in {f / WEIGHTS} differs from task {tasks[0]!r}'s: A and B^i are "
                                         "shared by the tasks of one MTL-LoRA, so these folders are not one")
        if left:
            raise ValueError(f"{f / WEIGHTS} has {len(left)} tensor(s) no MTL-LoRA layer takes, e.g. {sorted(left)[0]}")
    apply_mtl_lora(model, len(tasks), targets=targets, r=r, alpha=cfg["alpha"], n_up=n_up,
                   tau=cfg["weights_sharpness"], full_lambda=False)
    with torch.no_grad():
        for n, m in model.named_modules():
            if not isinstance(m, MTLLoRALinear):
                continue
            first = read[0][1]
            m.A.copy_(first[_keys(n, tasks[0])["A"]])
            m.B.copy_(first[_keys(n, tasks[0])["B"]])
            for t, ((_, tensors), task) in enumerate(zip(read, tasks)):
                m.Lambda[t].copy_(tensors[_keys(n, task)["Lambda"]])
                m.w[t].copy_(tensors[_keys(n, task)["w"]])
    return model, tasks
