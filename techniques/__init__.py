from .prefix import PrefixTuning, init_from_text, load_adapter as load_prefix_adapter, save_adapter as save_prefix_adapter  # noqa: F401
from .lora import LoRALinear, LoRAQKV, apply_lora, load_adapter as load_lora_adapter, lora_parameters, lora_summary, merge_lora, save_adapter as save_lora_adapter  # noqa: F401
from .pplm import BagOfWords, Discriminator, PPLMConfig, PPLMOutput, load_bag, load_discriminator, train_discriminator, generate as pplm_generate  # noqa: F401
