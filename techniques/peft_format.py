"""What LoRA and prefix adapters share of peft's on-disk format.

peft saves every adapter as a folder with two files: `adapter_config.json`
(the hyperparameters, `peft_type` saying which technique) and
`adapter_model.safetensors` (the trained tensors). Both techniques read and
write that layout, so adapters move between this project and peft.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from minigpt import load_tensors, read_json, recover_dir

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "read_adapter_config", "read_adapter_weights", "is_adapter_dir"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_FLAGS = {"LORA": "--lora", "PREFIX_TUNING": "--prefix", "MTL_LORA": "--mtl-lora and --task"}


def is_adapter_dir(directory: Union[str, Path]) -> bool:
    """True for a folder holding a peft adapter (adapter_config.json) rather than a model."""
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def read_adapter_config(directory: Union[str, Path], peft_type: str) -> dict:
    """adapter_config.json of `directory`, checked to be a causal-LM adapter of `peft_type`.

    Errors name the file and say which loader fits instead.
    """
    d = Path(directory)
    if not d.is_dir():
        whole = recover_dir(d, tidy=False)
        if whole != d:
            raise FileNotFoundError(f"adapter folder {d} does not exist: a save into it was interrupted, and its "
                                    f"complete copy is {whole}; load that, or save the adapter again")
        raise FileNotFoundError(f"adapter folder {d} does not exist")
    if not (d / ADAPTER_WEIGHTS).is_file() and (d / "adapter_model.bin").is_file():
        raise ValueError(f"{d} holds a pickled adapter_model.bin, which is never unpickled here; "
                         "re-save it in peft with save_pretrained(..., safe_serialization=True)")
    path = d / ADAPTER_CONFIG
    if not path.is_file():
        if (d / "config.json").is_file():
            raise ValueError(f"{d} holds a model (config.json), not an adapter: give it as --weights, and as the "
                             f"adapter a folder with {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
        raise FileNotFoundError(f"{path} not found; an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is not a JSON object")
    found = cfg.get("peft_type")
    if found != peft_type:
        hint = f" (load it with {_FLAGS[found]})" if found in _FLAGS else ""
        raise ValueError(f"{path}: this is a {found!r} adapter, not {peft_type!r}{hint}")
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        raise ValueError(f"{path}: task_type {cfg['task_type']!r} is not CAUSAL_LM; only causal-LM adapters "
                         "fit GPT-2's language-model head")
    return cfg


def read_adapter_weights(directory: Union[str, Path]) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors of `directory`; a missing or damaged file is a ValueError/FileNotFoundError
    that names it."""
    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    return load_tensors(path)
