"""Device selection shared by every command line: cpu, cuda, mps or auto."""
from __future__ import annotations

import torch

from .distributed import processes

__all__ = ["resolve_device"]


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit choice that is not available is an error.

    Under torchrun, a plain 'cuda' means this process's own GPU: cuda:LOCAL_RANK."""
    device = _resolve(name)
    if device.type == "cuda" and device.index is None and processes().several:
        return torch.device("cuda", processes().local_rank)
    return device


def _resolve(name: str) -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("--device mps was asked for, but MPS is not available here; use --device cpu or auto")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}; choose cpu, cuda, mps or auto")
    return torch.device(name)
