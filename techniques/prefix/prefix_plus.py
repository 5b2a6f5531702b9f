"""Prefix-Tuning+ (Wang et al. 2025, arXiv 2506.13674; v3 "PrefixMemory-Tuning", ICLR 2026): the prefix moved
out of the attention head.

Prefix tuning puts P trainable vectors s_j in front of the keys and values of every head, so one head's output is
(the paper's Eq. 2)

    o_i = Σ_j sim(q_i, W_K s_j) W_V s_j + Σ_t sim(q_i, k_t) v_t        (one softmax over prefix and input)
          ------------------------------------------------------------
          Σ_j sim(q_i, W_K s_j)           + Σ_t sim(q_i, k_t)

The derivation, in three steps (each one a function below):
  1. split (Eq. 3-4):  o_i = (1 - λ_i) · Attn(q_i, K, V) + λ_i · (prefix part, normalised on its own), λ_i the
     prefix's share of the softmax mass (`split_prefix_attention`; exact). The paper then fixes λ to a constant.
  2. linearise (Eq. 5): sim(q, k) ≈ φ(q)ᵀ φ(k), so the prefix part is  φ(q_i)ᵀ Σ_j φ(W_K s_j)(W_V s_j)ᵀ / normaliser
     (`prefix_memory` is that sum, the paper's b_1)
  3. free M (Eq. 6-7):  replace the sum by a trainable M ∈ R^{d_φ × hs}; λ and the normaliser φ(q_i)ᵀN are dropped
     (the paper: trainable weights and the next LayerNorm absorb them), no gate, no scale:

    o_i = Attn(q_i, K, V) + φ(q_i)ᵀ M                                   (Eq. 7; per layer, per head)

The module wraps each block's attention the way LoRA wraps a Linear (no monkeypatching, no model internals
touched): it runs the frozen attention unchanged, recomputes q with the frozen c_attn, and adds the term through
the frozen output projection. Eq. 7's o_i is one head's output, before the heads are concatenated and W_O applied;
c_proj is linear, so c_proj(o + φ(q)ᵀM) = c_proj(o) + W_proj · (φ(q)ᵀM): the bias is added once, by the frozen
attention.

The settings, checked against the paper (2026-12-07). The stored arXiv copies (v1, v2, v3 HTML) show only the
abstract and introduction here, and the authors' code (github.com/haonan3/PrefixMemory-Tuning) is not stored; the
method section was read through the ICLR 2026 paper note (en.papernotes.org, "PrefixMemory-Tuning ...", which
quotes Eq. 2-7, Remark 1 and Table 2 by number):
  - φ: the paper's default is plain φ(x) = elu(x) ("elu", the default here); it also reports φ(x) = gelu(x)
    ("gelu"), slightly better on most of its tasks (Table 2), and, in Remark 1, a learned kernel φ_W(x) =
    ReLU(Wx + b) (an "MLP kernel", less stable in its Table 2; not implemented). "elu+1" is elu(x) + 1, the positive
    map of linear attention (Katharopoulos et al. 2020) and this module's earlier default, kept as an option: it
    differs from "elu" only by the query-independent per-head bias 1ᵀM.
  - d_φ: φ is elementwise on the head's query, so d_φ = head_dim (M is [hs, hs] per head); no projection.
  - M's init: the sources read do not state it. Ours: M = 0, so the wrapped model is exactly the frozen model at
    step 0 (the gradient in M, φ(q)ᵀ·∂L/∂o, is not zero, so training starts).
  - which layers: not stated in the note; Eq. 7 replaces prefix tuning, which has a prefix in every layer, so the
    default is every layer (`layers` chooses).
  - Dropout: the term goes through the block's resid_dropout with the attention's output; exact in eval mode.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt import TrainConfig, atomic_save_dir, lm_loss_fn, load_tensors, read_json, save_tensors, train, write_json

FEATURE_MAPS = ("elu", "gelu", "elu+1")   # the paper's default first


def phi(x: torch.Tensor, feature_map: str = "elu") -> torch.Tensor:
    """The feature map of step 2: elu(x) (the paper's default), GELU(x), or elu(x) + 1 (linear attention's)."""
    if feature_map == "elu":
        return F.elu(x)
    if feature_map == "gelu":
        return F.gelu(x)
    if feature_map == "elu+1":
        return F.elu(x) + 1.0
    raise ValueError(f"unknown feature map {feature_map!r}: choose one of {', '.join(FEATURE_MAPS)}")


def split_prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor,
                           v_pre: torch.Tensor):
    """Step 1, exactly: causal softmax attention over [prefix; input] = (1 - λ) · o_input + λ · o_prefix.

    q, k, v: (..., T, hs) the input's; k_pre, v_pre: (..., P, hs) the prefix's W_K s_j, W_V s_j. Returns o_input
    (the frozen model's attention, normalised over the input), o_prefix (normalised over the prefix) and
    λ (..., T, 1), the prefix's share Σ_j sim(q_i, W_K s_j) / Σ_all sim."""
    T, scale = q.size(-2), q.size(-1) ** -0.5
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    s_in = (q @ k.transpose(-2, -1) * scale).masked_fill(~causal, float("-inf"))   # (..., T, T)
    s_pre = q @ k_pre.transpose(-2, -1) * scale                                    # (..., T, P)
    o_input = torch.softmax(s_in, -1) @ v                                          # (..., T, hs)
    o_prefix = torch.softmax(s_pre, -1) @ v_pre                                    # (..., T, hs)
    lam = torch.sigmoid(torch.logsumexp(s_pre, -1) - torch.logsumexp(s_in, -1))    # Z_pre / (Z_pre + Z_in)
    return o_input, o_prefix, lam.unsqueeze(-1)


def prefix_memory(k: torch.Tensor, v: torch.Tensor, feature_map: str = "elu") -> torch.Tensor:
    """Step 2's sum for real prefix keys/values: Σ_j φ(W_K s_j)(W_V s_j)ᵀ. k, v: (nh, P, hs) -> M: (nh, hs, hs)."""
    return phi(k, feature_map).transpose(-2, -1) @ v


def linear_prefix_output(q: torch.Tensor, M: torch.Tensor, feature_map: str = "elu") -> torch.Tensor:
    """Step 3: φ(q)ᵀ M per head. q: (B, nh, T, hs), M: (nh, d_φ, hs) -> (B, nh, T, hs)."""
    return phi(q, feature_map) @ M.unsqueeze(0)


class PrefixPlusAttention(nn.Module):
    """One block's attention, frozen, plus W_proj · φ(q)ᵀM; same call and return signature as the wrapped one."""

    def __init__(self, attn: nn.Module, feature_map: str = "elu"):
        super().__init__()
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"unknown feature map {feature_map!r}: choose one of {', '.join(FEATURE_MAPS)}")
        self.attn, self.feature_map = attn, feature_map
        nh, hs = attn.n_head, attn.head_dim
        self.M = nn.Parameter(torch.zeros(nh, hs, hs, device=attn.c_proj.weight.device))  # (nh, d_φ, hs)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """q_i of the frozen model, recomputed with the frozen c_attn: (B, nh, T, hs)."""
        q = self.attn.c_attn(x).split(x.size(-1), dim=2)[0]
        return self.attn.split_heads(q)

    def forward(self, x, past=None, mask=None, output_attentions=False, store=None):
        out, present, probs = self.attn(x, past, mask, output_attentions, store)   # c_proj(Attn(q, K, V))
        term = linear_prefix_output(self.query(x), self.M.to(x.dtype), self.feature_map)  # (B, nh, T, hs)
        term = term.transpose(1, 2).reshape(x.shape)                                # (B, T, C)
        return out + self.attn.resid_dropout(F.linear(term, self.attn.c_proj.weight)), present, probs


class PrefixTuningPlus(nn.Module):
    """Wraps the attention of the chosen layers of a GPT in place; model.wrapped_layers lists them.

    The base model's parameters are frozen; only each layer's M trains. unwrap() restores the plain model."""

    def __init__(self, model: nn.Module, layers=None, feature_map: str = "elu"):
        super().__init__()
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"unknown feature map {feature_map!r}: choose one of {', '.join(FEATURE_MAPS)}")
        n_layer = len(model.transformer.h)
        layers = list(range(n_layer)) if layers is None else sorted(set(int(i) for i in layers))
        bad = [i for i in layers if not 0 <= i < n_layer]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has {n_layer} layers (0..{n_layer - 1})")
        for p in model.parameters():
            p.requires_grad_(False)
        self.model, self.layers, self.feature_map = model, layers, feature_map
        self.wrappers = nn.ModuleDict()
        for i in layers:
            block = model.transformer.h[i]
            if isinstance(block.attn, PrefixPlusAttention):
                raise ValueError(f"layer {i} already has Prefix-Tuning+: unwrap() it first")
            block.attn = PrefixPlusAttention(block.attn, feature_map)
            self.wrappers[str(i)] = block.attn

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def trainable_parameters(self):
        return [w.M for w in self.wrappers.values()]

    def state_dict_M(self) -> dict:
        return {f"layers.{i}.M": w.M.detach().clone() for i, w in self.wrappers.items()}

    def load_state_dict_M(self, state: dict) -> None:
        want = set(self.state_dict_M())
        if set(state) != want:
            raise ValueError(f"Prefix-Tuning+ weights name layers {sorted(state)}, this model has {sorted(want)}")
        for i, w in self.wrappers.items():
            t = state[f"layers.{i}.M"]
            if t.shape != w.M.shape:
                raise ValueError(f"layer {i}: M is {tuple(t.shape)}, this model needs {tuple(w.M.shape)} "
                                 "(an adapter for another model size?)")
            with torch.no_grad():
                w.M.copy_(t)

    def unwrap(self) -> nn.Module:
        for i, w in self.wrappers.items():
            self.model.transformer.h[int(i)].attn = w.attn
        self.wrappers = nn.ModuleDict()
        return self.model


# ---- save / load: our own format (peft has no Prefix-Tuning+ adapter type, so no peft folder can hold it) -------
PLUS_CONFIG = "prefix_plus_config.json"
PLUS_WEIGHTS = "prefix_plus_model.safetensors"
PLUS_TYPE = "PREFIX_TUNING_PLUS"
# 2: "feature_map" "elu" is the paper's plain elu(x). Files without "format_version" came before it, when "elu"
# named elu(x) + 1: they load as "elu+1", so an old adapter gives the logits it was trained to give.
PLUS_FORMAT = 2


def _shape_of(model: nn.Module) -> dict:
    cfg = model.config
    return {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "head_dim": cfg.n_embd // cfg.n_head}


def save_prefix_plus(model_or_pp, directory) -> Path:
    """Write prefix_plus_config.json + prefix_plus_model.safetensors ({"layers.<i>.M": (nh, d_φ, hs)}), atomically
    (minigpt.io.atomic_save_dir). Takes the PrefixTuningPlus, or the GPT it wraps."""
    pp = model_or_pp if isinstance(model_or_pp, PrefixTuningPlus) else _plus_of(model_or_pp)
    conf = {"adapter_type": PLUS_TYPE, "format_version": PLUS_FORMAT, "feature_map": pp.feature_map,
            "layers": list(pp.layers),
            "d_phi": _shape_of(pp.model)["head_dim"], **_shape_of(pp.model)}
    with atomic_save_dir(directory) as tmp:
        write_json(conf, tmp / PLUS_CONFIG)
        save_tensors({k: v.float() for k, v in pp.state_dict_M().items()}, tmp / PLUS_WEIGHTS,
                     metadata={"format": "pt"})
    return Path(directory)


def _plus_of(model: nn.Module) -> PrefixTuningPlus:
    """Rebuild a PrefixTuningPlus view over a GPT whose blocks are already wrapped (for save_prefix_plus(model))."""
    wrapped = {i: b.attn for i, b in enumerate(model.transformer.h) if isinstance(b.attn, PrefixPlusAttention)}
    if not wrapped:
        raise ValueError("this model has no Prefix-Tuning+ layers: wrap it with PrefixTuningPlus first")
    pp = PrefixTuningPlus.__new__(PrefixTuningPlus)
    nn.Module.__init__(pp)
    pp.model, pp.layers = model, sorted(wrapped)
    pp.feature_map = next(iter(wrapped.values())).feature_map
    pp.wrappers = nn.ModuleDict({str(i): w for i, w in wrapped.items()})
    return pp


def load_prefix_plus(model: nn.Module, directory) -> PrefixTuningPlus:
    """Wrap `model` (a plain GPT) with the saved Prefix-Tuning+ and load its M's. Another model size, another
    adapter type, missing or damaged files: a ValueError / FileNotFoundError that names the file and the problem."""
    d = Path(directory)
    if not (d / PLUS_CONFIG).is_file() and (d / "adapter_config.json").is_file():
        raise ValueError(f"{d} holds a peft adapter (adapter_config.json), not a Prefix-Tuning+ one "
                         f"({PLUS_CONFIG}); load a prefix-tuning adapter with techniques.prefix.load_adapter")
    if not (d / PLUS_CONFIG).is_file() and (d / "prefix_config.json").is_file():
        raise ValueError(f"{d} holds a prefix-tuning checkpoint (prefix_config.json), not a Prefix-Tuning+ adapter "
                         f"({PLUS_CONFIG}); load it with techniques.prefix.load_checkpoint")
    conf = read_json(d / PLUS_CONFIG)
    if not isinstance(conf, dict) or conf.get("adapter_type") != PLUS_TYPE:
        found = conf.get("adapter_type") if isinstance(conf, dict) else None
        raise ValueError(f"{d / PLUS_CONFIG}: adapter_type is {found!r}, not {PLUS_TYPE!r}")
    ours = _shape_of(model)
    bad = [f"{k}={conf.get(k)} (this model has {v})" for k, v in ours.items() if conf.get(k) != v]
    if bad:
        raise ValueError(f"{d / PLUS_CONFIG} was made for another model size: {', '.join(bad)}; load it on the "
                         "model it was trained for")
    tensors = load_tensors(d / PLUS_WEIGHTS)
    pp = PrefixTuningPlus(model, layers=conf["layers"], feature_map=_feature_map_of(conf, d / PLUS_CONFIG))
    dev = next(model.parameters()).device
    pp.load_state_dict_M({k: v.to(dev) for k, v in tensors.items()})
    return pp


def _feature_map_of(conf: dict, path: Path) -> str:
    """The config's φ, read by its format version (see PLUS_FORMAT)."""
    version = conf.get("format_version", 1)
    if version not in (1, PLUS_FORMAT):
        raise ValueError(f"{path}: format_version {version!r} is not one this minigpt reads (1 or {PLUS_FORMAT}); "
                         "update minigpt, or save the adapter again with this one")
    fmap = conf.get("feature_map", "elu")
    if version == 1 and fmap == "elu":
        return "elu+1"
    if fmap not in FEATURE_MAPS:
        raise ValueError(f"{path}: unknown feature_map {fmap!r}; this minigpt knows {', '.join(FEATURE_MAPS)}")
    return fmap


def is_prefix_plus_dir(directory) -> bool:
    """Whether `directory` holds a Prefix-Tuning+ adapter (by its config's file name and type)."""
    path = Path(directory) / PLUS_CONFIG
    if not path.is_file():
        return False
    conf = read_json(path)
    return isinstance(conf, dict) and conf.get("adapter_type") == PLUS_TYPE


def parse_layers(text: str, n_layer: int) -> list[int]:
    """--layers: "all", or indices and ranges ("0,2,4-7"), each in 0..n_layer-1."""
    if text.strip().lower() == "all":
        return list(range(n_layer))
    layers = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            layers += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise ValueError(f"--layers {text!r}: give \"all\" or layer indices and ranges like \"0,2,4-7\"") from None
    bad = sorted(set(i for i in layers if not 0 <= i < n_layer))
    if bad or not layers:
        raise ValueError(f"--layers {text!r}: {bad or 'no layer'} out of range; this model has {n_layer} layers, "
                         f"0..{n_layer - 1}")
    return sorted(set(layers))


def train_prefix_plus(pp: PrefixTuningPlus, train_examples, *, eval_examples=(),
                      config: TrainConfig = TrainConfig(), run_info=None) -> list[dict]:
    """Train only the M's through the shared loop (minigpt.train: precision, accumulation, checkpoints, resume);
    the wrapped model stays frozen and in eval mode. The loss is the plain causal-LM loss of the wrapped model:
    unlike prefix tuning there is no past to prepend, the term sits inside each attention."""
    model = pp.model
    model.eval()
    return train(pp.trainable_parameters(), lm_loss_fn(model), train_examples, eval_examples=eval_examples,
                 config=config, run_info=run_info)
