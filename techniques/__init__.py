"""The three techniques, each a package: lora/, prefix/, pplm/.

Each package holds the library (no command line) and a `__main__.py` for its
command (`python -m techniques.lora`, ...). They import only minigpt's public
names; the adapter file layout they share with peft is in peft_format.py.
"""
from .lora import (LoRALinear, LoRAQKV, apply_lora, load_adapter as load_lora_adapter, lora_parameters, lora_summary,
                   merge_lora, save_adapter as save_lora_adapter)
from .pplm import (BagOfWords, Discriminator, PPLMConfig, PPLMOutput, generate as pplm_generate, load_bag,
                   load_discriminator, train_discriminator)
from .prefix import (PrefixTuning, init_from_text, load_adapter as load_prefix_adapter,
                     save_adapter as save_prefix_adapter, train_prefix)

__all__ = ["LoRALinear", "LoRAQKV", "apply_lora", "merge_lora", "lora_parameters", "lora_summary",
           "load_lora_adapter", "save_lora_adapter", "PrefixTuning", "init_from_text", "train_prefix",
           "load_prefix_adapter", "save_prefix_adapter", "BagOfWords", "Discriminator", "PPLMConfig", "PPLMOutput",
           "load_bag", "load_discriminator", "train_discriminator", "pplm_generate"]
