"""LoRA (Hu et al. 2021), by hand: the layer math in `lora.py`, QLoRA's 4-bit NF4 base in `nf4.py`, peft's
adapter files in `peft_files.py`, several named adapters and weighted merging in `named.py`, and the command
`python -m techniques.lora train|merge` in `__main__.py`; MTL-LoRA (multi-task) in `mtl.py`, its files in
`mtl_files.py` and, both ways, AdapterHub's (`adapters`) in `mtl_adapterhub.py`."""
from .lora import LoRALinear, LoRAQKV, apply_lora, lora_modules, lora_parameters, lora_summary, merge_lora
from .lora import lora_disabled
from .named import (COMBINATIONS, active_adapter, add_adapter, add_weighted_adapter, adapter_names,
                    delete_adapter, disable_adapters, load_adapters, load_combined, load_named_adapter, save_adapters,
                    set_adapter)
from .mtl import (MTLLoRALinear, TaskExample, apply_mtl_lora, collate_mtl, merge_mtl_lora, mtl_loss_fn, mtl_modules,
                  mtl_parameters, set_task_ids, task_examples, task_ids)
from .mtl_adapterhub import load_adapterhub_mtl, save_adapterhub_mtl
from .mtl_files import load_merged_mtl, load_mtl_lora, read_mtl_config, save_mtl_lora, task_index
from .nf4 import NF4Linear, dequantize_base, nf4_memory, quantize_base
from .peft_files import load_adapter, save_adapter

__all__ = ["LoRALinear", "LoRAQKV", "apply_lora", "merge_lora", "lora_modules", "lora_parameters", "lora_summary",
           "NF4Linear", "quantize_base", "dequantize_base", "nf4_memory", "save_adapter", "load_adapter",
           "lora_disabled",
           "add_adapter", "load_named_adapter", "load_adapters", "save_adapters", "set_adapter", "disable_adapters",
           "delete_adapter", "adapter_names", "active_adapter", "add_weighted_adapter",
           "load_combined", "COMBINATIONS",
           "MTLLoRALinear", "apply_mtl_lora", "mtl_modules", "mtl_parameters", "set_task_ids", "task_ids",
           "merge_mtl_lora", "TaskExample", "task_examples", "collate_mtl", "mtl_loss_fn",
           "save_mtl_lora", "load_mtl_lora", "load_merged_mtl", "read_mtl_config", "task_index",
           "save_adapterhub_mtl", "load_adapterhub_mtl"]
