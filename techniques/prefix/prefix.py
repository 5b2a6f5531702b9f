"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation").

The idea in three lines: freeze the language model; learn, for every layer,
P key vectors and P value vectors that the real tokens attend to as if an
earlier prompt had produced them; train only those (a "virtual prompt").

In the paper's notation, the activations at prefix positions i in P_idx are
free parameters, h_i = P_theta[i, :], and every other activation is computed
by the frozen LM as usual (eq. 3). For GPT-2, "activation" means the per-layer
(key, value) pair, so P_theta has shape [P, 2·L·d] (L layers, width d = n_embd).

Two parameterisations (section 4.3, "reparametrization"):

    direct:          P_theta                                     [P, 2·L·d]
    reparametrised:  P_theta = MLP_theta(P'_theta),  P'_theta    [P, d]
                     MLP = Linear(d, hidden) -> tanh -> Linear(hidden, 2·L·d)

The paper optimises the reparametrised form because updating P_theta directly
is unstable; after training only P_theta is needed, so `fold()` keeps the
table and drops the MLP.

How P_theta becomes a past: each row of the table is viewed as
(L, 2, H, hd), the batch (B, P, L, 2, H, hd) is permuted to minigpt's one
stacked layout (L, 2, B, H, P, hd) (`minigpt.stack_past`) and unstacked into
per-layer (k, v) pairs, each [B, H, P, hd] -- the `past_key_values` minigpt's
forward accepts. peft and the reference code view the row as (2L, H, hd)
instead and take slot 2l as layer l's key and 2l + 1 as its value; that is the
same memory order, so the table means the same thing in both and adapter
files move between them unchanged.

Real tokens take positions P, P+1, ... (the model counts the past), as in the
reference and peft, so P + sequence length must fit in n_positions.

Where we differ from peft, and why:
  - `fold()` and `init_from_text()` (the paper's initialisation from real
    words) are ours; peft has neither.
  - optional dropout on the prefix (the reference code's `prefix_dropout`);
    peft has none. The default 0.0 matches peft exactly.
  - adapters are always loaded as a direct table, because the file holds the
    table with the MLP already applied (as peft's does); resuming training of
    the MLP uses the separate full checkpoint (`save_checkpoint`).

The command line is in `__main__.py` (`python -m techniques.prefix train`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from minigpt import (GPT, GPTConfig, PastKeyValues, TrainConfig, atomic_save_dir, extend_mask, get_tokenizer,
                     lm_loss_fn, load_tensors, read_json, save_tensors, stack_past, train, unstack_past, write_json)

from ..peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_config, read_adapter_weights
from .prefix_plus import PLUS_CONFIG

__all__ = ["PrefixTuning", "init_from_text", "train_prefix", "save_adapter", "load_adapter", "save_checkpoint",
           "load_checkpoint", "past_to_table"]

CHECKPOINT_CONFIG = "prefix_config.json"
CHECKPOINT_WEIGHTS = "prefix_checkpoint.safetensors"
PEFT_KEY = "prompt_embeddings"


# ---- the prefix ------------------------------------------------------------------------
class PrefixTuning(nn.Module):
    """P learned (key, value) vectors per layer of a frozen GPT.

    config:              the GPT's config (only L, n_head, d and n_positions are used)
    num_virtual_tokens:  P
    projection:          False = direct table P_theta [P, 2·L·d] (peft's prefix_projection=False);
                         True  = Embedding(P, d) -> Linear(d, hidden) -> tanh -> Linear(hidden, 2·L·d)
    hidden_size:         the MLP's hidden width (peft's encoder_hidden_size); unused when direct
    dropout:             dropout on the prefix while training (0 = none, as in peft)

    Parameter names follow peft's PrefixEncoder (`embedding`, `transform.0`,
    `transform.2`), and the initial values are drawn the same way (N(0, 1)
    embedding rows, PyTorch's default Linear init).
    """

    def __init__(self, config: GPTConfig, num_virtual_tokens: int, *, projection: bool = False,
                 hidden_size: int = 512, dropout: float = 0.0):
        super().__init__()
        P, L, d = int(num_virtual_tokens), config.n_layer, config.n_embd
        if P < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {num_virtual_tokens}")
        if P >= config.n_positions:
            raise ValueError(f"num_virtual_tokens P={P} leaves no room for real tokens: the model has "
                             f"n_positions={config.n_positions} and real tokens take positions P, P+1, ...; "
                             f"use P <= {config.n_positions - 1} (much fewer in practice)")
        if projection and hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.config = config
        self.num_virtual_tokens, self.projection, self.hidden_size = P, bool(projection), int(hidden_size)
        if self.projection:
            self.embedding = nn.Embedding(P, d)                      # P'_theta  [P, d]
            self.transform = nn.Sequential(nn.Linear(d, hidden_size), nn.Tanh(), nn.Linear(hidden_size, 2 * L * d))
        else:
            self.embedding = nn.Embedding(P, 2 * L * d)              # P_theta   [P, 2·L·d]
        self.dropout = nn.Dropout(dropout)

    def extra_repr(self) -> str:
        return f"P={self.num_virtual_tokens}, projection={self.projection}"

    def table(self) -> torch.Tensor:
        """P_theta, [P, 2·L·d]: the embedding itself, or the MLP applied to it."""
        if self.projection:
            return self.transform(self.embedding.weight)
        return self.embedding.weight

    def past_key_values(self, batch_size: int) -> PastKeyValues:
        """The prefix as a past for `batch_size` rows: per layer (k, v), each [B, n_head, P, head_dim]."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        cfg, P = self.config, self.num_virtual_tokens
        t = self.table().unsqueeze(0).expand(batch_size, -1, -1)           # (B, P, 2·L·d), no copy
        if self.dropout.p > 0:
            t = self.dropout(t)                                            # a separate mask per row
        t = t.reshape(batch_size, P, cfg.n_layer, 2, cfg.n_head, cfg.head_dim)  # (B, P, L, 2, H, hd)
        return unstack_past(t.permute(2, 3, 0, 4, 1, 5))                   # (L, 2, B, H, P, hd) -> L x (k, v)

    def inputs_for(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
                   ) -> tuple[PastKeyValues, torch.Tensor]:
        """The one way to run a prefixed batch: (past_key_values, attention_mask) for
        `model(input_ids, past_key_values=..., attention_mask=...)`.

        The mask over the tokens ([B, T], 1 = real, 0 = padding; None = all real)
        gets P ones in front, so the prefix is always attended and every row's
        real tokens take positions P, P+1, ... whatever its padding.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a [batch, seq] tensor, got {getattr(input_ids, 'shape', input_ids)}")
        B, T = input_ids.shape
        self.check_length(T)
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=input_ids.device)
        elif tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"attention_mask must cover the tokens only, [{B}, {T}], got {list(attention_mask.shape)}")
        mask = extend_mask(attention_mask, before=self.num_virtual_tokens)  # (B, P + T)
        return self.past_key_values(B), mask

    def check_length(self, total_tokens: int) -> None:
        """Raise if P prefix positions plus `total_tokens` real ones do not fit in n_positions."""
        P, n = self.num_virtual_tokens, self.config.n_positions
        if P + total_tokens > n:
            raise ValueError(f"prefix of P={P} virtual tokens + {total_tokens} tokens = {P + total_tokens} > "
                             f"n_positions {n}: real tokens start at position P; use at most {n - P} tokens "
                             "(prompt plus new ones) or a shorter prefix")

    @torch.no_grad()
    def fold(self) -> "PrefixTuning":
        """A direct copy holding just P_theta = MLP(P'_theta): equal logits, no MLP at inference."""
        folded = PrefixTuning(self.config, self.num_virtual_tokens, projection=False,
                              dropout=self.dropout.p).to(self.embedding.weight)  # same device and dtype
        folded.embedding.weight.copy_(self.table())
        return folded

    def load_table_(self, table: torch.Tensor) -> None:
        """Set a direct prefix's P_theta (e.g. from an adapter file), checking its shape."""
        if self.projection:
            raise ValueError("a reparametrised prefix has no table to set; build it with projection=False or fold() it")
        want = tuple(self.embedding.weight.shape)
        if tuple(table.shape) != want:
            raise ValueError(f"prefix table has shape {list(table.shape)}, expected [P, 2·L·d] = {list(want)}")
        with torch.no_grad():
            self.embedding.weight.copy_(table)


def _place(prefix: PrefixTuning, model_or_config) -> PrefixTuning:
    """On the model's device and in its dtype (a config leaves it on the CPU, float32)."""
    if isinstance(model_or_config, GPT):
        w = model_or_config.transformer.wte.weight
        return prefix.to(device=w.device, dtype=w.dtype)
    return prefix


def _config_of(model_or_config: Union[GPT, GPTConfig]) -> GPTConfig:
    if isinstance(model_or_config, GPTConfig):
        return model_or_config
    if isinstance(getattr(model_or_config, "config", None), GPTConfig):
        return model_or_config.config
    raise TypeError(f"expected a minigpt GPT model or GPTConfig, got {type(model_or_config).__name__}")


# ---- initialisation from real words ------------------------------------------------------
def past_to_table(past: PastKeyValues) -> torch.Tensor:
    """The inverse of `PrefixTuning.past_key_values`: a batch-1 past -> table P_theta [P, 2·L·d]."""
    t = stack_past(past)                                # (L, 2, 1, H, P, hd)
    if t.size(2) != 1:
        raise ValueError(f"past_to_table needs a past of one row (batch 1), got batch {t.size(2)}")
    t = t[:, :, 0].permute(3, 0, 1, 2, 4)               # (P, L, 2, H, hd)
    return t.reshape(t.size(0), -1)                     # (P, 2·L·d)


def init_from_text(model: GPT, words: Union[str, Sequence[int]], *, projection: bool = False, hidden_size: int = 512,
                   dropout: float = 0.0, fit_steps: int = 1000, lr: float = 1e-3, rel_tol: float = 1e-4,
                   progress: bool = False) -> PrefixTuning:
    """The paper's low-data initialisation (section 7.2): start from the frozen model's
    own keys and values for real words such as "summarize" or "table-to-text:".

    P is the number of tokens in `words` (text, through the GPT-2 tokenizer, or ids).
    Direct: P_theta is exactly those keys/values, so the prefix starts out as that
    prompt. Reparametrised: P'_theta is the words' token embeddings and the MLP is
    first fitted to the keys/values by MSE (Adam, at most `fit_steps` steps, stopping
    once the MSE is below rel_tol · mean(target²)); the final MSE is kept as
    `prefix.init_mse`.
    """
    ids = get_tokenizer().encode(words) if isinstance(words, str) else list(words)
    if not ids:
        raise ValueError("init_from_text needs at least one token of text")
    dev = model.device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        x = torch.tensor([ids], dtype=torch.long, device=dev)
        target = past_to_table(model(x).past_key_values)  # (P, 2·L·d)
        words_embd = model.transformer.wte(x)[0]          # (P, d)
    model.train(was_training)
    prefix = _place(PrefixTuning(model.config, len(ids), projection=projection, hidden_size=hidden_size,
                                 dropout=dropout), model)
    if not projection:
        prefix.load_table_(target)
        return prefix
    with torch.no_grad():
        prefix.embedding.weight.copy_(words_embd)
    opt = torch.optim.Adam(prefix.parameters(), lr=lr)
    good_enough = rel_tol * target.pow(2).mean().item()
    for _ in tqdm(range(fit_steps), desc="fit prefix MLP", disable=not progress):
        loss = (prefix.table() - target).pow(2).mean()
        if loss.item() < good_enough:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        prefix.init_mse = float((prefix.table() - target).pow(2).mean())
    return prefix


# ---- adapter files in peft's format -------------------------------------------------------
def peft_config_dict(prefix: PrefixTuning, base_model_name_or_path: Optional[str] = None) -> dict:
    """adapter_config.json as peft writes it for a GPT-2 prefix (PrefixTuningConfig's fields)."""
    cfg = prefix.config
    return {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path or cfg.name_or_path or None,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": prefix.num_virtual_tokens,
        "token_dim": cfg.n_embd,
        "num_transformer_submodules": 1,
        "num_attention_heads": cfg.n_head,
        "num_layers": cfg.n_layer,
        "modules_to_save": None,
        "init_weights": None,
        "encoder_hidden_size": prefix.hidden_size if prefix.projection else cfg.n_embd,
        "prefix_projection": prefix.projection,
    }


def save_adapter(prefix: PrefixTuning, directory: Union[str, os.PathLike],
                 base_model_name_or_path: Optional[str] = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors ({"prompt_embeddings": P_theta}),
    the table with the MLP already applied, as peft stores it. Atomic."""
    with atomic_save_dir(directory) as tmp:
        write_json(peft_config_dict(prefix, base_model_name_or_path), tmp / ADAPTER_CONFIG)
        with torch.no_grad():
            save_tensors({PEFT_KEY: prefix.table().float()}, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    return Path(directory)


def _check_shape(cfg: GPTConfig, found: dict, source: Path) -> None:
    """Name every dimension where the file's model differs from ours."""
    wanted = {"num_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "token_dim": cfg.n_embd}
    ours = {"num_layers": "n_layer", "num_attention_heads": "n_head", "token_dim": "n_embd"}
    bad = [f"{k}={found.get(k)} (the model has {ours[k]}={v})" for k, v in wanted.items() if found.get(k) != v]
    if bad:
        raise ValueError(f"{source} was made for another model shape: {', '.join(bad)}; load it on the model it "
                         "was trained for")


def _refuse_prefix_plus(d: Path) -> None:
    """A Prefix-Tuning+ folder holds M's, not a prefix: say so, and which loader reads it."""
    if (d / PLUS_CONFIG).is_file():
        raise ValueError(f"{d} holds a Prefix-Tuning+ adapter ({PLUS_CONFIG}), not a prefix-tuning one; load it with "
                         "techniques.prefix.load_prefix_plus (minigpt generate --prefix reads either kind)")


def load_adapter(model_or_config: Union[GPT, GPTConfig], directory: Union[str, os.PathLike]) -> PrefixTuning:
    """Read a prefix adapter saved by peft or by `save_adapter` -> a direct PrefixTuning.

    The result is on the model's device when given a model, on the CPU for a config.
    Errors name the file and the problem: a missing folder or file, not a prefix
    adapter, another model shape, a damaged (e.g. truncated) weights file.
    """
    cfg = _config_of(model_or_config)
    d = Path(directory)
    _refuse_prefix_plus(d)
    conf = read_adapter_config(d, "PREFIX_TUNING")
    if conf.get("num_transformer_submodules", 1) not in (None, 1):
        raise ValueError(f"{d / ADAPTER_CONFIG}: num_transformer_submodules="
                         f"{conf['num_transformer_submodules']} is for encoder-decoder models; GPT-2 has 1")
    _check_shape(cfg, conf, d / ADAPTER_CONFIG)
    P = conf.get("num_virtual_tokens")
    if not isinstance(P, int) or P < 1:
        raise ValueError(f"{d / ADAPTER_CONFIG}: num_virtual_tokens must be a positive integer, got {P!r}")
    tensors = read_adapter_weights(d)
    if PEFT_KEY not in tensors:
        raise ValueError(f"{d / ADAPTER_WEIGHTS} has no {PEFT_KEY!r} tensor (found {sorted(tensors)})")
    prefix = PrefixTuning(cfg, P)
    prefix.load_table_(tensors[PEFT_KEY].float())
    return _place(prefix, model_or_config)


# ---- the full checkpoint (with the MLP), for resuming training -------------------------------
def save_checkpoint(prefix: PrefixTuning, directory: Union[str, os.PathLike]) -> Path:
    """prefix_config.json + prefix_checkpoint.safetensors: every parameter, MLP included. Atomic."""
    cfg = prefix.config
    meta = {"num_virtual_tokens": prefix.num_virtual_tokens, "projection": prefix.projection,
            "hidden_size": prefix.hidden_size, "dropout": prefix.dropout.p,
            "num_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "token_dim": cfg.n_embd}
    with atomic_save_dir(directory) as tmp:
        write_json(meta, tmp / CHECKPOINT_CONFIG)
        save_tensors(prefix.state_dict(), tmp / CHECKPOINT_WEIGHTS)
    return Path(directory)


def load_checkpoint(model_or_config: Union[GPT, GPTConfig], directory: Union[str, os.PathLike]) -> PrefixTuning:
    """The inverse of `save_checkpoint`: the prefix exactly as it was, MLP included."""
    cfg = _config_of(model_or_config)
    d = Path(directory)
    _refuse_prefix_plus(d)
    if not (d / CHECKPOINT_CONFIG).is_file() and (d / "checkpoint" / CHECKPOINT_CONFIG).is_file():
        raise FileNotFoundError(f"{d / CHECKPOINT_CONFIG} not found; {d} is a training run's output, its full "
                                f"checkpoint is {d / 'checkpoint'}")
    meta = read_json(d / CHECKPOINT_CONFIG)
    needed = ("num_virtual_tokens", "projection", "hidden_size", "dropout")
    if not isinstance(meta, dict) or any(k not in meta for k in needed):
        raise ValueError(f"{d / CHECKPOINT_CONFIG} is not a prefix checkpoint config: it needs the fields "
                         f"{', '.join(needed)}")
    _check_shape(cfg, meta, d / CHECKPOINT_CONFIG)
    prefix = PrefixTuning(cfg, meta["num_virtual_tokens"], projection=meta["projection"],
                          hidden_size=meta["hidden_size"], dropout=meta["dropout"])
    state = load_tensors(d / CHECKPOINT_WEIGHTS)
    missing, unexpected = set(prefix.state_dict()) - set(state), set(state) - set(prefix.state_dict())
    if missing or unexpected:
        raise ValueError(f"{d / CHECKPOINT_WEIGHTS} does not match its config: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    prefix.load_state_dict(state)
    return _place(prefix, model_or_config)


# ---- training ----------------------------------------------------------------------------
def train_prefix(model: GPT, prefix: PrefixTuning, train_examples, *, eval_examples=(),
                 config: TrainConfig = TrainConfig(), run_info: Optional[dict] = None) -> list[dict]:
    """Train only the prefix through the shared loop; the model stays frozen and in eval mode.

    Examples are `minigpt.Example`s (text blocks, or prompt -> completion pairs
    with the loss on the completion only). The longest must fit after the prefix.
    `config` carries precision, accumulation and checkpoints; `run_info` is
    what a resumed run must share with its checkpoint (see minigpt.train).
    """
    longest = max(len(e.input_ids) for e in train_examples) if len(train_examples) else 0
    prefix.check_length(max([longest] + [len(e.input_ids) for e in eval_examples]))
    model.requires_grad_(False)
    model.eval()
    prefix.train()
    past_fn = lambda B: (prefix.past_key_values(B), prefix.num_virtual_tokens)  # noqa: E731
    history = train(prefix.parameters(), lm_loss_fn(model, past_fn=past_fn), train_examples,
                    eval_examples=eval_examples, config=config, run_info=run_info)
    prefix.eval()
    return history
