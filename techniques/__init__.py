"""The three techniques, each one file: lora.py, prefix.py, pplm.py.

Public names are listed here and imported on first use (PEP 562 module
`__getattr__`), not eagerly: `python -m techniques.lora` then runs lora.py as
`__main__` without a second, already-imported copy of it (runpy's warning).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "lora": {"LoRALinear": "LoRALinear", "LoRAQKV": "LoRAQKV", "apply_lora": "apply_lora",
             "merge_lora": "merge_lora", "lora_parameters": "lora_parameters", "lora_summary": "lora_summary",
             "load_lora_adapter": "load_adapter", "save_lora_adapter": "save_adapter"},
    "prefix": {"PrefixTuning": "PrefixTuning", "init_from_text": "init_from_text", "train_prefix": "train_prefix",
               "load_prefix_adapter": "load_adapter", "save_prefix_adapter": "save_adapter"},
    "pplm": {"BagOfWords": "BagOfWords", "Discriminator": "Discriminator", "PPLMConfig": "PPLMConfig",
             "PPLMOutput": "PPLMOutput", "load_bag": "load_bag", "load_discriminator": "load_discriminator",
             "train_discriminator": "train_discriminator", "pplm_generate": "generate"},
}
_WHERE = {public: (module, name) for module, names in _EXPORTS.items() for public, name in names.items()}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'techniques' has no attribute {name!r}")
    module, attr = _WHERE[name]
    return getattr(importlib.import_module(f".{module}", __name__), attr)


def __dir__():
    return __all__
