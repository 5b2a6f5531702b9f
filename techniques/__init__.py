from .lora import LoRALinear, LoRAQKV, apply_lora, load_adapter as load_lora_adapter, lora_parameters, lora_summary, merge_lora, save_adapter as save_lora_adapter  # noqa: F401
