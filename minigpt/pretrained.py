"""Hugging Face GPT-2 checkpoints <-> GPT.

Where weights come from:
- a local folder in Hugging Face's layout: `config.json` plus `model.safetensors`,
  a sharded `model.safetensors.index.json`, or `pytorch_model.bin` (read with
  `torch.load(weights_only=True)`, which never runs pickled code);
- one of the names gpt2, gpt2-medium, gpt2-large, gpt2-xl, looked up in the
  Hugging Face hub cache first (what transformers downloaded is reused), then
  downloaded once if the network allows.

Two key layouts are accepted: the raw hub files (`h.0.attn.c_attn.weight`, with
`h.{i}.attn.bias` mask buffers) and `GPT2LMHeadModel.state_dict()` keys
(`transformer.h.0...`, `lm_head.weight`). HF stores the four projections as
Conv1D, weight [in, out]; ours are nn.Linear, weight [out, in], so they are
transposed. `attn.c_proj` is square: only values, not shapes, catch a missing
transpose, which is why the tests compare logits.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import torch

from .config import GPT2_SIZES, GPTConfig
from .io import atomic_save_dir, load_tensors, read_json, recover_dir, save_tensors, write_json

__all__ = ["resolve_weights_dir", "read_checkpoint", "write_checkpoint", "config_from_hf", "config_to_hf",
           "hf_to_minigpt_state_dict", "minigpt_to_hf_state_dict", "BUNDLED"]

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
SKIPPED = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of old checkpoints
HUB_REPOS = {name: [f"openai-community/{name}", name] for name in GPT2_SIZES}
BUNDLED = {"tiny": "tiny"}  # name -> folder under minigpt/weights/, shipped with the package


# ---- config.json -----------------------------------------------------------------------
def config_from_hf(hf: dict) -> GPTConfig:
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"config.json has model_type {hf.get('model_type')!r}; only GPT-2 checkpoints load here")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise ValueError(f"config.json sets {flag}=true, which this GPT-2 does not implement")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"config.json asks for activation {hf['activation_function']!r}; GPT-2 uses gelu_new")
    if hf.get("tie_word_embeddings", True) is False:
        raise ValueError("config.json sets tie_word_embeddings=false (a separate lm_head); GPT-2 ties the head to "
                         "the token embedding, and so does this GPT-2")
    if hf.get("scale_attn_weights", True) is False:
        raise ValueError("config.json sets scale_attn_weights=false; GPT-2 scales scores by 1/sqrt(head_dim)")
    return GPTConfig(
        vocab_size=hf["vocab_size"], n_positions=hf["n_positions"], n_embd=hf["n_embd"],
        n_layer=hf["n_layer"], n_head=hf["n_head"], n_inner=hf.get("n_inner"),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        embd_pdrop=hf.get("embd_pdrop", 0.1), attn_pdrop=hf.get("attn_pdrop", 0.1),
        resid_pdrop=hf.get("resid_pdrop", 0.1), name_or_path=hf.get("_name_or_path", ""),
    )


def config_to_hf(cfg: GPTConfig) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.n_positions, "n_ctx": cfg.n_positions,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.n_inner,
        "activation_function": "gelu_new", "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "embd_pdrop": cfg.embd_pdrop, "attn_pdrop": cfg.attn_pdrop, "resid_pdrop": cfg.resid_pdrop,
        "initializer_range": 0.02, "bos_token_id": 50256, "eos_token_id": 50256,
        "scale_attn_weights": True, "tie_word_embeddings": True,
    }


# ---- state dicts -------------------------------------------------------------------------
def hf_to_minigpt_state_dict(sd: dict[str, torch.Tensor], expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Map HF keys (either layout) to ours, transpose Conv1D weights, check everything.

    `expected` is our model's state-dict shapes (GPT(config) on the meta device).
    Every missing, unexpected or wrongly shaped tensor is named in one error.
    """
    expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}

    out, unexpected, bad_shape = {}, [], []
    for key, t in sd.items():
        if key.endswith(SKIPPED) or key == "lm_head.weight":
            continue  # mask buffers are rebuilt; the head is tied to wte
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        name = "transformer." + name
        if name not in expected:
            unexpected.append(key)
            continue
        if name.endswith(CONV1D):
            # A view, no copy: the storage stays [in, out] as in the file and nn.Linear
            # sees [out, in]. Measured on CPU, that layout also decodes ~10% faster.
            t = t.t()
        if tuple(t.shape) != tuple(expected[name]):
            bad_shape.append(f"{key}: checkpoint {list(t.shape)} vs model {list(expected[name])}")
            continue
        out[name] = t
    missing = sorted(set(expected) - set(out) - {b.split(":")[0] for b in bad_shape})
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing[:20])}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {', '.join(sorted(unexpected)[:20])}")
    if bad_shape:
        problems.append(f"wrong shape {len(bad_shape)}: {'; '.join(bad_shape[:20])}")
    if problems:
        raise ValueError("checkpoint does not fit the GPT-2 config in config.json — " + " | ".join(problems))
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def minigpt_to_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in GPT2LMHeadModel's key names, Conv1D weights as [in, out].
    The tied lm_head is left out, as transformers saves it."""
    sd = {}
    for key, t in state_dict.items():
        if key == "lm_head.weight":
            continue
        sd[key] = t.t() if key.endswith(CONV1D) else t
    return sd


# ---- finding and reading files ------------------------------------------------------------
def bundled_dir(name: str) -> Path:
    """The folder of a model shipped inside the package (see minigpt/weights/)."""
    return Path(str(resources.files("minigpt") / "weights" / BUNDLED[name]))


def resolve_weights_dir(name_or_path: str | os.PathLike) -> Path:
    """A folder as given, a bundled model ("tiny"), or a GPT-2 name found in (or fetched into) the hub cache."""
    name = str(name_or_path)
    if name in BUNDLED:
        d = bundled_dir(name)
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"the bundled model {name!r} is missing from {d}; reinstall minigpt, or "
                                    "re-create it with `python -m demos.pretrain_data` then "
                                    "`python -m demos.pretrain --bundle`")
        return d
    path = recover_dir(Path(name_or_path).expanduser(), tidy=False)  # a save killed mid-swap: its whole copy
    if path.is_dir():
        _check_model_dir(path)
        return path
    if name not in HUB_REPOS:
        raise FileNotFoundError(
            f"{name!r} is neither a folder nor a known model ({', '.join([*BUNDLED, *HUB_REPOS])}); pass a folder "
            "with config.json and model.safetensors (e.g. --weights DIR), or --model tiny to run offline")
    from huggingface_hub import snapshot_download
    patterns = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
    for local_only in (True, False):
        for repo in HUB_REPOS[name]:
            try:
                d = Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=local_only))
            except Exception:  # not cached / no network: try the next source, report below
                continue
            if (d / "config.json").is_file():
                return d
    raise FileNotFoundError(
        f"GPT-2 weights {name!r} are not in the Hugging Face cache and could not be downloaded "
        f"(offline?). Use --model tiny (bundled, offline), download them once on a connected machine "
        f"(e.g. `huggingface-cli download openai-community/{name}`), or pass a local folder with config.json and "
        f"model.safetensors via --weights DIR / GPT.from_pretrained('path/to/dir').")


def _check_model_dir(d: Path) -> None:
    """A folder that is an adapter, not a model, is named as such (with the flag that loads it)."""
    if (d / "config.json").is_file():
        return
    if (d / "adapter_config.json").is_file():
        try:
            kind = read_json(d / "adapter_config.json").get("peft_type")
        except ValueError:
            kind = None
        flag = {"LORA": "--lora", "PREFIX_TUNING": "--prefix"}.get(kind, "--lora or --prefix")
        raise FileNotFoundError(f"{d} is a {kind or 'peft'} adapter, not a model (it has adapter_config.json, "
                                f"no config.json): load a base model with --model/--weights and pass this "
                                f"folder with {flag}")
    raise FileNotFoundError(f"{d} has no config.json: --weights needs a model folder in Hugging Face's layout "
                            "(config.json + model.safetensors)")


def read_state_dict(d: Path) -> dict[str, torch.Tensor]:
    if (d / "model.safetensors").is_file():
        return load_tensors(d / "model.safetensors")
    if (d / "model.safetensors.index.json").is_file():
        index = read_json(d / "model.safetensors.index.json")
        sd = {}
        for shard in sorted(set(index["weight_map"].values())):
            sd.update(load_tensors(d / shard))
        return sd
    if (d / "pytorch_model.bin").is_file():
        try:
            return torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{d / 'pytorch_model.bin'} could not be read as plain tensors "
                             f"(weights_only=True refuses pickled code): {e}") from None
    raise FileNotFoundError(f"{d} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def read_checkpoint(name_or_path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """(config, state dict in the file's key names) of a folder, a hub name or a bundled model."""
    d = resolve_weights_dir(name_or_path)
    config = config_from_hf(read_json(d / "config.json"))
    config.name_or_path = str(name_or_path)
    return config, read_state_dict(d)


def write_checkpoint(config: GPTConfig, state_dict: dict[str, torch.Tensor], directory) -> None:
    """config.json + model.safetensors in Hugging Face's layout, atomically."""
    with atomic_save_dir(directory) as tmp:
        write_json(config_to_hf(config), tmp / "config.json")
        save_tensors(minigpt_to_hf_state_dict(state_dict), tmp / "model.safetensors", metadata={"format": "pt"})
