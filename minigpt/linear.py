"""The model's projection layer: `nn.Linear`, y = x·Wᵀ + b, with one fast path for bf16 decoding on CPU.

Why it exists: with bfloat16 weights, PyTorch's eager matmul for one or a few rows (a decode step)
on CPU runs at about fp32's speed, 0.4 ms for GPT-2's 768 x 3072 projection on one core, because it
widens each weight to fp32 as it goes; bf16 was then slower than fp32 for decoding (0.62x at batch 1).
oneDNN, which PyTorch ships, has a bf16 kernel that uses the CPU's bf16 dot-product instructions on a
copy of W reordered once into its blocked layout: about 5x faster on the same projection, with the
same values: both sum the same products in fp32, so the outputs are equal bit for bit except, rarely, where
the exact result sits on a bf16 rounding boundary and the two summation orders round to neighbours (one
bf16 step apart; the tests hold both).

The reference is `F.linear(x, W, b)`; `Linear.forward` takes the fast path only when all of these hold:
- autograd is off (decoding; training and anything that needs gradients take the reference);
- x and W are bfloat16 on the CPU, and this PyTorch has oneDNN's packed-linear ops;
- `fast_cpu` is True (set it to False to compare, or to save the packed copy's memory).

The packed copy costs one more copy of W in memory (bf16: 2 bytes a weight) and is made on first use.
It is made again whenever W changes: a new tensor (loading, `.to()`) or an in-place update (a LoRA
merge, an optimizer step), which PyTorch counts in W._version. Edits through `W.data` are the exception:
PyTorch gives `.data` a counter of its own, so after one call `drop_packed()` (or edit W under
`torch.no_grad()` instead, which is counted). The module is an nn.Linear in every
other respect (state dict, LoRA's wrapping, isinstance checks), so nothing else needs to know.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Linear", "packed_linear_available"]


def packed_linear_available() -> bool:
    """Whether this PyTorch has oneDNN's packed-linear ops (the CPU builds on PyPI do)."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")
            and hasattr(ops, "_reorder_linear_weight"))


_PACKED = packed_linear_available()


class Linear(nn.Linear):
    """nn.Linear (y = x·Wᵀ + b) whose no-grad bf16 forward on CPU runs through oneDNN's packed kernel.

    `reference(x)` is the math; `forward` gives the same numbers by the fast path where it applies
    (see the module docstring for when)."""

    fast_cpu: bool = True

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._packed = None   # (key of the W it was made from, the packed copy)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """y = x·Wᵀ + b, PyTorch's plain linear."""
        return F.linear(x, self.weight, self.bias)

    def takes_fast_path(self, x: torch.Tensor) -> bool:
        W = self.weight
        return (self.fast_cpu and _PACKED and not torch.is_grad_enabled() and x.dtype == torch.bfloat16
                and W.dtype == torch.bfloat16 and x.device.type == "cpu" and W.device.type == "cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.takes_fast_path(x):
            return self.reference(x)
        # fast path: oneDNN's bf16 kernel on W packed into its blocked layout (reference's values, see above)
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), bias, "none", [], "")

    def drop_packed(self) -> None:
        """Forget the packed copy; the next fast-path call makes it again from W. Needed only after an edit
        PyTorch does not count in W._version, i.e. one through `W.data`."""
        self._packed = None

    def _packed_weight(self) -> torch.Tensor:
        W = self.weight
        key = (W.data_ptr(), W._version, W.shape)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(W.detach(), 1))
        return self._packed[1]
