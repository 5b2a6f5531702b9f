"""PPLM (Dathathri et al. 2020), by hand: the algorithm, as the paper's steps, in `pplm.py`; the
attribute models (bags of words, labelled data, the discriminator head, its training and files) in
`attributes.py`; the command `python -m techniques.pplm [...] | train-discriminator` in `__main__.py`.

    from techniques import pplm
    out = pplm.generate(model, ids, bow="military", max_new_tokens=50)
"""
from .attributes import (PAPER_HEADS, BagOfWords, Discriminator, bag_names, cache_features, check_classes_have_rows,
                         clean_word_lines, load_bag, load_discriminator, load_labelled_tsv, mean_hidden,
                         paper_head_path, read_paper_head, train_discriminator)
from .baselines import bag_indicator, rerank, weighted_decoding
from .jam import JAMConfig, LogitAdjust, head_direction, jam_adjust, margin, minimal_move, steered_generate
from .pplm import (SMALL_CONST, Context, Objective, PPLMConfig, PPLMOutput, Step, avoid_loss, bow_loss, check_fits,
                   descent_step, fuse, generate, kl_divergence, layer_grad_norms, perturb_past, perturbed_loss,
                   perturbed_step, prompt_context, repetition_penalty, unperturbed_step, window_weights)

__all__ = [
    # the algorithm (pplm.py)
    "generate", "PPLMConfig", "PPLMOutput", "Step", "Context", "Objective", "prompt_context", "unperturbed_step",
    "bow_loss", "avoid_loss", "kl_divergence", "perturbed_loss", "window_weights", "layer_grad_norms", "descent_step",
    "perturb_past", "perturbed_step", "fuse", "repetition_penalty", "check_fits", "SMALL_CONST",
    # the attribute models (attributes.py)
    "BagOfWords", "load_bag", "bag_names", "clean_word_lines", "load_labelled_tsv", "check_classes_have_rows",
    "PAPER_HEADS", "paper_head_path", "read_paper_head", "Discriminator", "load_discriminator", "mean_hidden",
    "cache_features", "train_discriminator",
    # JAM (jam.py) and the paper's baselines (baselines.py)
    "JAMConfig", "LogitAdjust", "head_direction", "margin", "minimal_move", "jam_adjust", "steered_generate",
    "bag_indicator", "weighted_decoding", "rerank",
]
