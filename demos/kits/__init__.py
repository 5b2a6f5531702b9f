"""The kits: what the tour and the projects share, one module per concern, each function with explicit
arguments (no command-line options; those live in demos/projects/common.py).

- data: the poem verses and the E2E records in data/, and how they become prompts and examples;
- lora: the paper's LoRA (r=8, alpha=16 on q and v), its learning rate, training, loading, seeded samples;
- prefix: prefix tuning's learning rate, training (reparametrised, folded), loading, decoding, held-out loss;
- pplm: seeded PPLM continuations of prompts;
- measures: perplexity by its definition, a mean, sacrebleu's corpus BLEU.
"""
from .data import DATA, E2E, EOT, POEMS, e2e_prompt, group_by_mr, read_e2e, read_verses, verse_examples
from .lora import (LORA, load_lora, lora_lr, lora_train_config, new_lora_model, sample_continuations, train_lora,
                   train_lora_parameters, train_poem_lora)
from .measures import Perplexity, corpus_bleu, mean, text_perplexity
from .pplm import Samples, continuations, prompt_ids
from .prefix import (PREFIX_HIDDEN, TRADEOFF_PS, PrefixRun, complete, fit_prefix, heldout_loss, load_prefix,
                     matched_prefix_plus, output_change, prefix_attention_share, prefix_lr, save_prefix,
                     tradeoff_curves, tradeoff_figure)

__all__ = ["DATA", "E2E", "EOT", "POEMS", "e2e_prompt", "group_by_mr", "read_e2e", "read_verses", "verse_examples",
           "LORA", "load_lora", "lora_lr", "lora_train_config", "new_lora_model", "sample_continuations", "train_lora",
           "train_lora_parameters", "train_poem_lora", "Perplexity", "corpus_bleu", "mean", "text_perplexity",
           "Samples", "continuations", "prompt_ids", "PREFIX_HIDDEN", "PrefixRun", "complete", "fit_prefix",
           "heldout_loss",
           "load_prefix", "prefix_lr", "save_prefix", "TRADEOFF_PS", "matched_prefix_plus", "output_change",
           "prefix_attention_share", "tradeoff_curves", "tradeoff_figure"]
