"""minigpt: GPT-2 from scratch in plain PyTorch, with one seam (past_key_values) for techniques."""
from .generate import check_sampling, generate, sample_next_token, stream
from .io import atomic_save_dir, load_tensors, read_json, save_tensors, write_json
from .model import GPT, GPTConfig, GPTOutput, PastKeyValues
from .pretrained import load_pretrained, save_pretrained
from .tokenizer import EOT_ID, Tokenizer, get_tokenizer
from .device import resolve_device

__all__ = [
    "GPT", "GPTConfig", "GPTOutput", "PastKeyValues", "generate", "stream", "sample_next_token",
    "check_sampling", "get_tokenizer", "Tokenizer", "EOT_ID", "load_pretrained", "save_pretrained",
    "atomic_save_dir", "save_tensors", "load_tensors", "read_json", "write_json", "resolve_device",
]
__version__ = "0.1.0"
