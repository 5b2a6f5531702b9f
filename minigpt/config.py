"""GPTConfig: the shape of a GPT-2, and the four public sizes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

__all__ = ["GPTConfig", "GPT2_SIZES"]

GPT2_SIZES = {  # name: (n_layer, n_head, n_embd)
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None  # MLP width; None means 4 * n_embd, as in GPT-2
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    name_or_path: str = field(default="", compare=False)

    def __post_init__(self):
        for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"GPTConfig.{k} must be a positive integer, got {getattr(self, k)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @classmethod
    def from_name(cls, name: str, **overrides) -> "GPTConfig":
        """The four public GPT-2 sizes: gpt2, gpt2-medium, gpt2-large, gpt2-xl."""
        key = name.split("/")[-1]
        if key not in GPT2_SIZES:
            raise ValueError(f"unknown GPT-2 size {name!r}; choose one of {', '.join(GPT2_SIZES)}, "
                             "or build GPTConfig(...) yourself")
        n_layer, n_head, n_embd = GPT2_SIZES[key]
        return cls(n_layer=n_layer, n_head=n_head, n_embd=n_embd, name_or_path=name, **overrides)
