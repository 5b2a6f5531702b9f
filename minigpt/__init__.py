"""minigpt: GPT-2 from scratch in plain PyTorch, with one seam (past_key_values) for techniques."""
from .generate import check_sampling, generate, sample_next_token, stream
from .io import atomic_save_dir, load_tensors, read_json, save_tensors, write_json
from .model import GPT, GPTConfig, GPTOutput, PastKeyValues
from .pretrained import load_pretrained, save_pretrained
from .tokenizer import EOT_ID, Tokenizer, get_tokenizer
from .device import resolve_device
from .train import (Example, TrainConfig, causal_lm_loss, collate_lm, examples_from_pairs, examples_from_text,
                    load_lm_data, lm_loss_fn, save_history, split_examples, train)

__all__ = [
    "GPT", "GPTConfig", "GPTOutput", "PastKeyValues", "generate", "stream", "sample_next_token",
    "check_sampling", "get_tokenizer", "Tokenizer", "EOT_ID", "load_pretrained", "save_pretrained",
    "atomic_save_dir", "save_tensors", "load_tensors", "read_json", "write_json", "resolve_device",
    "train", "TrainConfig", "Example", "causal_lm_loss", "collate_lm", "examples_from_text", "examples_from_pairs",
    "load_lm_data", "lm_loss_fn", "save_history", "split_examples",
]
__version__ = "0.1.0"
