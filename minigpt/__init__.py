"""minigpt: GPT-2 from scratch in plain PyTorch, with one seam (past_key_values) for techniques."""
from .config import GPT2_SIZES, GPTConfig
from .device import resolve_device
from .generation import (BeamOutput, StopStrings, beam_search, check_sampling, cut_at_stop, generate, penalize,
                         sample_next_token, stream)
from .linear import Linear, packed_linear_available
from .io import (atomic_save_dir, load_tensors, read_json, recover_dir, save_tensors, tensor_metadata,
                 write_json)
from .model import GPT, GPTOutput, load_pretrained, save_pretrained
from .past import (KVBuffer, PastKeyValues, check_left_padded, extend_mask, left_pad, mask_with_past, past_length,
                   stack_past, unstack_past)
from .tokenizer import EOT_ID, Tokenizer, get_tokenizer
from .distributed import PeerFailed, Processes, all_reduce_sum, comm_device, processes
from .distributed import setup as setup_processes
from .train_state import TrainState, load_train_state, save_train_state
from .training import (PRECISIONS, Example, TrainConfig, TrainingInterrupted, autocast, cast_frozen_linears,
                       causal_lm_loss, collate_lm, count_terms, evaluate, examples_from_pairs, examples_from_text,
                       lm_loss_fn, load_lm_data, plan_steps, resolve_precision, save_history, split_examples, train)

__all__ = [
    "GPT", "GPTConfig", "GPT2_SIZES", "GPTOutput", "load_pretrained", "save_pretrained",
    "Linear", "packed_linear_available",
    "PastKeyValues", "KVBuffer", "stack_past", "unstack_past", "past_length", "extend_mask", "mask_with_past",
    "check_left_padded", "left_pad",
    "generate", "stream", "sample_next_token", "check_sampling", "beam_search", "BeamOutput", "penalize",
    "StopStrings", "cut_at_stop",
    "get_tokenizer", "Tokenizer", "EOT_ID",
    "atomic_save_dir", "recover_dir", "save_tensors", "load_tensors", "tensor_metadata", "read_json", "write_json",
    "resolve_device",
    "train", "TrainConfig", "plan_steps", "evaluate", "Example", "causal_lm_loss", "collate_lm",
    "examples_from_text", "examples_from_pairs", "load_lm_data", "lm_loss_fn", "save_history", "split_examples",
    "PRECISIONS", "resolve_precision", "autocast", "cast_frozen_linears", "count_terms", "TrainingInterrupted",
    "TrainState", "save_train_state",
    "load_train_state", "Processes", "processes", "setup_processes", "all_reduce_sum", "comm_device",
    "PeerFailed",
]
__version__ = "0.1.0"
