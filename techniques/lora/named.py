"""Several LoRA adapters on one model, by name, and peft's weighted merging of them.

The design: every adapter is a set of ordinary `LoRALinear` layers (one per target), all
wrapping the *same* frozen base `nn.Linear` objects. The model holds them in a plain dict,
`model.lora_adapters = {name: {layer name: LoRALinear}}`, and the active adapter's layers are
the ones installed in the module tree; the others sit outside it (not in `model.parameters()`,
not in `state_dict`). Switching adapter is putting other modules in place, so the layer math
stays exactly `LoRALinear.forward` and the single-adapter API (`apply_lora`, `save_adapter`,
`merge_lora`) is unchanged: a model built by `apply_lora` becomes the adapter "default" the
first time a function here touches it.

"All adapters off" is `disable_adapters(model)` (= `set_adapter(model, None)`): every target
gets its base `nn.Linear` back, so the logits are the base model's bit for bit (it *is* the base
model's module tree). `merge_lora(model)` merges the active adapter and forgets the others (their
shared base weights have just changed).

Weighted merging (`add_weighted_adapter`) follows peft's `LoraModel.add_weighted_adapter`
(peft 0.17+, `tuners/lora/model.py`), for adapters A_i, B_i with scalings s_i and weights w_i:

    linear:  r' = r (all equal),  A' = Σ sign(w_i)·sqrt(|w_i·s_i|)·A_i,  B' = Σ sqrt(|w_i·s_i|)·B_i
    cat:     r' = Σ r_i,          A' = [w_1·s_1·A_1; ...; w_n·s_n·A_n],  B' = [B_1, ..., B_n]
    svd:     r' = svd_rank or max r_i;  Δ = Σ w_i·s_i·B_i·A_i = U·S·Vᵀ;  B' = U[:, :r']·S[:r'],  A' = Vᵀ[:r']

and the new adapter has alpha = r' (scaling 1; peft copies the first adapter's other settings,
rslora included, and so do we). `cat` is exact (B'·A' = Σ w_i·s_i·B_i·A_i); `linear` is not
(cross terms B_i·A_j appear), which is peft's choice, kept. Where we differ from peft, and why:
- peft lets `cat` and `svd` combine adapters on different targets (a layer then mixes only the
  adapters it has); we refuse, as the issue asks, since the result then means something different
  per layer. `linear` takes the union of targets, as peft.
- peft does not refuse DoRA adapters, but what it makes is not a merge of them. Its new adapter's
  config is `replace(self.peft_config[adapters[0]], r=new_rank, lora_alpha=new_rank, ...)` (peft
  0.21.2 tuners/lora/model.py:863-869; the same in huggingface/peft@00277830's add_weighted_adapter),
  so it is DoRA exactly when the *first* adapter is; `inject_adapter` (line 871) then computes its
  magnitude from W0 + s·B·A while B is still 0, i.e. m = ||W0||, and the loop writes only lora_A
  and lora_B (cat: lines 909-910). A DoRA first: the result has m = ||W0||, not its trained m; a
  DoRA after a LoRA: its m is dropped. tests/test_adapters_bad_input.py shows both in peft. We
  refuse any DoRA adapter in a combination, with an error that says so and gives the way round
  (merge the DoRA into the base first, then combine the LoRAs on top).
- a per-projection `LoRAQKV` enters the combination in its exact fused form (`_fused_factors`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from ..peft_format import ADAPTER_CONFIG
from .lora import LoRALinear, LoRAQKV, apply_lora, lora_modules
from .peft_files import _fused_factors, load_adapter, save_adapter

__all__ = ["add_adapter", "load_named_adapter", "load_adapters", "save_adapters", "set_adapter",
           "disable_adapters", "delete_adapter", "adapter_names", "active_adapter", "add_weighted_adapter",
           "COMBINATIONS"]

DEFAULT = "default"  # peft's name for the first adapter (the one at the folder's top level)
COMBINATIONS = ("linear", "cat", "svd")


# ---- the store -------------------------------------------------------------------------
def _store(model: nn.Module) -> dict[str, dict[str, LoRALinear]]:
    """model.lora_adapters, created on first use; a model made by apply_lora joins as "default"."""
    if "lora_adapters" not in model.__dict__:
        layers = dict(lora_modules(model))
        model.lora_adapters = {DEFAULT: layers} if layers else {}
        model.lora_adapter_targets = {DEFAULT: getattr(model, "lora_targets", None)} if layers else {}
        model.lora_active = DEFAULT if layers else None
    return model.lora_adapters


def _check_name(model: nn.Module, name: str) -> None:
    if name not in _store(model):
        have = ", ".join(map(repr, model.lora_adapters)) or "none"
        raise KeyError(f"no adapter named {name!r} on this model (loaded: {have}); add_adapter or "
                       "load_named_adapter it first")


def _put(model: nn.Module, layer_name: str, module: nn.Module) -> None:
    parent, _, child = layer_name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _install(model: nn.Module, name: Optional[str]) -> None:
    """Put adapter `name`'s layers in the module tree, and the bare base wherever it has none."""
    store = _store(model)
    for layer_name in {n for layers in store.values() for n in layers}:
        any_layer = next(layers[layer_name] for layers in store.values() if layer_name in layers)
        _put(model, layer_name, store[name].get(layer_name, any_layer.base) if name else any_layer.base)
    model.lora_active = name
    if name is None or model.lora_adapter_targets.get(name) is None:
        model.__dict__.pop("lora_targets", None)
    else:
        model.lora_targets = model.lora_adapter_targets[name]


def adapter_names(model: nn.Module) -> list[str]:
    return list(_store(model))


def active_adapter(model: nn.Module) -> Optional[str]:
    """The installed adapter's name; None when all are off (or there are none)."""
    _store(model)
    return model.lora_active


def set_adapter(model: nn.Module, name: Optional[str]) -> nn.Module:
    """Make `name` the adapter the model runs (and trains); None turns every adapter off."""
    if name is not None:
        _check_name(model, name)
    _install(model, name)
    return model


def disable_adapters(model: nn.Module) -> nn.Module:
    """Every adapter off: the model is its frozen base, module for module. `set_adapter(model, name)` turns one
    back on."""
    return set_adapter(model, None)


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Drop adapter `name`; if it was active, all adapters are off afterwards (as in peft, nothing is guessed)."""
    _check_name(model, name)
    active = model.lora_active
    _install(model, None)
    del model.lora_adapters[name], model.lora_adapter_targets[name]
    _install(model, active if active != name else None)
    return model


def _new_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ValueError(f"adapter name must be a non-empty string without '/', got {name!r}")
    if name in _store(model):
        raise ValueError(f"an adapter named {name!r} is already loaded; delete_adapter(model, {name!r}) first "
                         "or choose another name")


def _capture(model: nn.Module, name: str, build) -> nn.Module:
    """Run `build()` (which injects LoRA into the bare base model) and keep what it made as adapter `name`;
    the previously active adapter is installed again afterwards."""
    _new_name(model, name)
    active = model.lora_active
    _install(model, None)
    try:
        build()
        model.lora_adapters[name] = dict(lora_modules(model))
        model.lora_adapter_targets[name] = getattr(model, "lora_targets", None)
    finally:
        _install(model, None)  # removes what build() made from the tree (it is in the store now, if it succeeded)
        for layer_name, layer in list(lora_modules(model)):  # a failed build: put its bases back
            _put(model, layer_name, layer.base)
        _install(model, active)
    return model


def add_adapter(model: nn.Module, name: str, **lora) -> nn.Module:
    """A new, untrained adapter `name` (apply_lora's options: r, alpha, dropout, targets, qkv, rslora, use_dora).
    It is not made active, as in peft: `set_adapter(model, name)` to train it. The first adapter of a model
    with none is made active."""
    first = not _store(model)
    _capture(model, name, lambda: apply_lora(model, verbose=False, **lora))
    return set_adapter(model, name) if first else model


def load_named_adapter(model: nn.Module, directory: Union[str, Path], name: str) -> nn.Module:
    """Load one peft adapter folder as adapter `name` (not made active unless it is the first)."""
    first = not _store(model)
    _capture(model, name, lambda: load_adapter(model, directory))
    return set_adapter(model, name) if first else model


def load_adapters(model: nn.Module, directory: Union[str, Path]) -> list[str]:
    """peft's multi-adapter folder: the top level is "default", each subfolder holding an adapter_config.json
    is the adapter of that name (what `PeftModel.save_pretrained` writes). Returns the names loaded; the first
    is made active if the model had none."""
    directory = Path(directory)
    names = []
    if (directory / ADAPTER_CONFIG).is_file():
        names.append(DEFAULT)
    names += sorted(p.name for p in directory.iterdir() if p.is_dir() and (p / ADAPTER_CONFIG).is_file())
    if not names:
        raise FileNotFoundError(f"{directory} holds no {ADAPTER_CONFIG}, neither at its top level nor in a "
                                "subfolder; point at the folder peft's save_pretrained wrote")
    for name in names:
        load_named_adapter(model, directory if name == DEFAULT else directory / name, name)
    return names


def save_adapters(model: nn.Module, directory: Union[str, Path]) -> Path:
    """Every adapter in peft's multi-adapter layout: "default" at the top level, the others in subfolders."""
    store = _store(model)
    if not store:
        raise ValueError("this model has no LoRA adapters to save; add_adapter(model, name, ...) first")
    directory, active = Path(directory), model.lora_active
    try:
        for name in sorted(store, key=lambda n: n != DEFAULT):
            _install(model, name)
            save_adapter(model, directory if name == DEFAULT else directory / name)
    finally:
        _install(model, active)
    return directory


# ---- weighted merging (peft's add_weighted_adapter) ------------------------------------
def _whole_factors(layer: LoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the layer as one adapter on the whole projection (LoRAQKV: its exact fused form)."""
    if isinstance(layer, LoRAQKV):
        return _fused_factors(layer, len(layer.parts) * layer.r)
    return layer.A, layer.B


def _check_combination(model, names, weights, combination_type, svd_rank, label=repr):
    """Every refusal before anything is built; `label(name)` is how a message names an adapter (the command
    line: its --lora folder)."""
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type must be one of {', '.join(COMBINATIONS)}, got {combination_type!r}")
    if not names:
        raise ValueError("name at least one adapter to combine")
    for n in names:
        _check_name(model, n)
    weights = [float(w) for w in weights]
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} weight(s) for {len(names)} adapter(s) ({', '.join(names)}); give one "
                         "weight per adapter")
    store = model.lora_adapters
    for n in names:
        if any(layer.magnitude is not None for layer in store[n].values()):
            raise ValueError(f"adapter {label(n)} is DoRA, which weighted merging does not combine: peft gives the "
                             "result the first adapter's use_dora and writes only A and B (a DoRA first gets "
                             "m = ||W0||, not its trained m; a DoRA later loses its m). Merge the DoRA into the "
                             "base first (python -m techniques.lora merge --lora DORA --out DIR), then combine "
                             "the other adapters on --weights DIR")
    combination_type = "linear" if len(names) == 1 else combination_type  # peft's rule
    ranks = {n: max(_whole_factors(layer)[0].shape[0] for layer in store[n].values()) for n in names}
    if combination_type == "linear" and len(set(ranks.values())) != 1:
        raise ValueError(f"combination_type 'linear' needs adapters of one rank (as peft), got "
                         f"{', '.join(f'{label(n)}: r={r}' for n, r in ranks.items())}; use 'cat' or 'svd'")
    if combination_type in ("cat", "svd"):
        targets = {n: sorted(store[n]) for n in names}
        if len({tuple(t) for t in targets.values()}) != 1:
            a, b = names[0], next(n for n in names if targets[n] != targets[names[0]])
            raise ValueError(f"combination_type {combination_type!r} needs adapters on the same layers, but "
                             f"{label(a)} adapts {len(targets[a])} layer(s) and {label(b)} "
                             f"{len(targets[b])} others/more; "
                             "use 'linear', or adapters trained on the same targets")
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank < 1):
        raise ValueError(f"svd_rank must be a positive integer, got {svd_rank!r}")
    new_rank = {"linear": next(iter(ranks.values())), "cat": sum(ranks.values()),
                "svd": svd_rank or max(ranks.values())}[combination_type]
    return weights, combination_type, new_rank


def _combine(layers: list[tuple[LoRALinear, float]], combination_type: str, rank: int):
    """(A', B') for one layer from its (adapter layer, weight) pairs: the equations in the module docstring."""
    if combination_type == "linear":
        A = sum(math.copysign(math.sqrt(abs(w * m.scaling)), w * m.scaling) * _whole_factors(m)[0] for m, w in layers)
        B = sum(math.sqrt(abs(w * m.scaling)) * _whole_factors(m)[1] for m, w in layers)
        return A, B
    if combination_type == "cat":
        A = torch.cat([w * m.scaling * _whole_factors(m)[0] for m, w in layers], dim=0)   # (Σ r_i, in)
        B = torch.cat([_whole_factors(m)[1] for m, _ in layers], dim=1)                    # (out, Σ r_i)
        return A, B
    delta = sum(w * m.delta_weight() for m, w in layers)                                   # (out, in)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=True)
    return Vh[:rank, :], U[:, :rank] @ torch.diag(S[:rank])                                # A' (r', in), B' (out, r')


@torch.no_grad()
def add_weighted_adapter(model: nn.Module, names: Sequence[str], weights: Sequence[float], new_name: str,
                         combination_type: str = "svd", svd_rank: Optional[int] = None) -> nn.Module:
    """A new adapter `new_name` combining `names` with `weights`, as peft's add_weighted_adapter does
    (module docstring: linear, cat, svd). It is added, not made active: `set_adapter(model, new_name)`."""
    names = list(names)
    weights, combination_type, rank = _check_combination(model, names, weights, combination_type, svd_rank)
    _new_name(model, new_name)
    store = model.lora_adapters
    first = store[names[0]][next(iter(store[names[0]]))]
    layer_names = sorted({n for a in names for n in store[a]})
    new = {}
    for layer_name in layer_names:
        pairs = [(store[a][layer_name], w) for a, w in zip(names, weights) if layer_name in store[a]]
        base = pairs[0][0].base
        layer = LoRALinear(base, r=rank, alpha=rank, rslora=first.rslora)
        layer.dropout = pairs[0][0].dropout
        A, B = _combine(pairs, combination_type, rank)
        layer.A.copy_(A)
        layer.B.copy_(B)
        new[layer_name] = layer.requires_grad_(False)
        layer.A.requires_grad_(True), layer.B.requires_grad_(True)
    store[new_name] = new
    targets = [model.lora_adapter_targets.get(a) for a in names]
    model.lora_adapter_targets[new_name] = (sorted({t for ts in targets for t in ts})
                                            if all(isinstance(t, list) for t in targets) else None)
    return model


def load_combined(model: nn.Module, directories: Sequence[Union[str, Path]], weights: Optional[Sequence[float]] = None,
                  combination_type: str = "linear", svd_rank: Optional[int] = None) -> nn.Module:
    """The command line's `--lora A --lora B --lora-weights wA,wB --combine TYPE`: load each folder as adapter
    "lora0", "lora1", ..., combine them with add_weighted_adapter into "combined" and make that active.
    One folder and no weights: that adapter alone, active (weight 1)."""
    directories = list(directories)
    if not directories:
        raise ValueError("give at least one --lora folder")
    weights = [1.0] * len(directories) if weights is None else [float(w) for w in weights]
    if len(weights) != len(directories):
        raise ValueError(f"--lora-weights has {len(weights)} weight(s) for {len(directories)} --lora folder(s); "
                         "give one weight per folder, comma-separated")
    names = [f"lora{i}" for i in range(len(directories))]
    for d, n in zip(directories, names):
        load_named_adapter(model, d, n)
    if len(names) == 1 and weights == [1.0]:
        return set_adapter(model, names[0])
    folders = dict(zip(names, directories))
    _check_combination(model, names, weights, combination_type, svd_rank, label=lambda n: f"--lora {folders[n]}")
    add_weighted_adapter(model, names, weights, "combined", combination_type, svd_rank)
    return set_adapter(model, "combined")
