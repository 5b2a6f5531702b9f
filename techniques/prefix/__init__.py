"""Prefix tuning (Li & Liang 2021): the library in prefix.py, the command in __main__.py.

    python -m techniques.prefix train --data pairs.jsonl --out runs/my-prefix
    python -m techniques.prefix train --variant plus --phi gelu --data pairs.jsonl --out runs/my-plus   # Prefix-Tuning+
"""
from ..peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .prefix import (PrefixTuning, init_from_text, load_adapter, load_checkpoint, past_to_table, save_adapter,
                     save_checkpoint, train_prefix)
from .prefix_plus import (FEATURE_MAPS, PLUS_CONFIG, PLUS_FORMAT, PLUS_WEIGHTS, PrefixPlusAttention, PrefixTuningPlus,
                          is_prefix_plus_dir, linear_prefix_output, load_prefix_plus, parse_layers, phi, prefix_memory,
                          save_prefix_plus, split_prefix_attention, train_prefix_plus)

__all__ = ["PrefixTuning", "init_from_text", "train_prefix", "save_adapter", "load_adapter", "save_checkpoint",
           "load_checkpoint", "past_to_table", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS",
           "PrefixTuningPlus", "PrefixPlusAttention", "phi", "split_prefix_attention", "prefix_memory",
           "linear_prefix_output", "FEATURE_MAPS",
           "save_prefix_plus", "load_prefix_plus", "train_prefix_plus", "is_prefix_plus_dir", "parse_layers",
           "PLUS_CONFIG", "PLUS_WEIGHTS", "PLUS_FORMAT"]
