"""QLoRA's 4-bit base: NF4 storage of the frozen Linears, dequantised on the fly (written by hand).

Dettmers et al. 2023 (arXiv:2305.14314), section 3. A frozen weight W [out, in] is
read row-major as one long vector and cut into blocks of 64. Each block keeps its
absolute maximum c (fp32) and, for each element, the index of the nearest value of
the 16-value NormalFloat code book q_j (eq. 4: quantiles of N(0, 1), rescaled to
[-1, 1]):

    W_4bit = round_NF4(W / c)        dequant(W_4bit, c) = q[W_4bit] · c          (eqs. 1-2, blockwise)

(the paper writes the scale as 1/c and divides; we keep c and multiply, as bitsandbytes
stores it).
Two 4-bit indices are packed per byte. Double quantisation (section 3, "Double
Quantization") stores the block absmaxes c themselves in 8 bits: their mean is
subtracted, the centred values are cut into blocks of 256, and each is stored as
an 8-bit code of the dynamic data type with one fp32 absmax per 256:

    c ≈ dequant(c_8bit, c2) + mean(c)        ≈ 4 + 8/64 + 32/(64·256) = 4.127 bits per weight   (eq. 6)

(without it 4 + 32/64 = 4.5 bits). The forward pass is eq. (5) with the adapter
added by `LoRALinear` around this layer:

    Y = X · doubleDequant(c1, c2, W_NF4)ᵀ + b        (+ s·X·Aᵀ·Bᵀ in LoRALinear)

in the compute dtype of the run (fp32, or bf16/fp16 under autocast) where the paper
writes BF16 throughout.

Reading order: the two code books (`NF4_CODE`, `dynamic_map`), blockwise absmax
quantisation (`quantize_blocks` / `dequantize_blocks`), nibble packing, NF4 with or
without double quantisation (`quantize_nf4` / `dequantize_nf4`), the layer
(`NF4Linear`) and where it goes (`quantize_base`, `dequantize_base`, `nf4_memory`).

The storage matches bitsandbytes' `quantize_4bit(..., quant_type="nf4", blocksize=64,
compress_statistics=True|False)` byte for byte (tests/test_qlora.py): the same code
books, nearest code with ties to the lower one, the first of two elements in the
high nibble, the same 8-bit code for the absmaxes (equal to bitsandbytes' pure-PyTorch
reference kernel; its native CPU kernel picks a neighbouring 8-bit code for ~0.2% of
the absmaxes, those near a midpoint). Where it differs, and why:
- a last block shorter than 64 (in·out not a multiple of 64) is padded with zeros
  to a whole block, so every tensor here has whole blocks; zeros change neither the
  block's absmax nor the other codes, and the bytes bitsandbytes stores are the
  first ceil(n/2) of ours. (GPT-2's projections are all whole blocks.)
- the matmul is a plain dequantise-then-`F.linear` in PyTorch, not a fused 4-bit
  kernel; like bitsandbytes' MatMul4Bit, backward dequantises again instead of
  keeping the fp32 W from the forward pass, so training holds 4-bit weights only.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt import Linear

__all__ = ["NF4_CODE", "dynamic_map", "quantize_nf4", "dequantize_nf4", "NF4Linear", "quantize_base", "dequantize_base",
           "nf4_memory"]

BLOCK = 64           # weights per absmax (the paper's block size for W)
ABSMAX_BLOCK = 256   # absmaxes per second-level absmax (double quantisation)

# The paper's NF4 (the values its appendix lists; bitsandbytes' table), as fp32: the 16 values of eq. (4) built
# asymmetrically, 8 quantiles of N(0, 1) for the positive half, 7 for the negative half and an exact zero, divided
# by the largest. tests/test_qlora.py builds them again from that definition.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=torch.float32)


def dynamic_map() -> torch.Tensor:
    """The 256 values of the signed 8-bit dynamic data type (Dettmers 2015, arXiv:1511.04561), sorted.

    A code is a sign bit, then E zero bits that set the magnitude 10^-E (E = 0..6), a 1 that ends
    them, and the 6 - E bits left as a linear fraction: the 2^(6-E) midpoints of [0.1, 1] cut into
    equal steps. Each smaller exponent buys range with one bit of precision. With 0 and 1 that is
    2·(1 + 2 + ... + 64) + 2 = 256 values. The paper's double quantisation stores the absmaxes with it
    ("8-bit Floats"); this is bitsandbytes' `create_dynamic_map()`, computed the same way in fp32."""
    values = [torch.tensor([0.0, 1.0])]
    for i in range(7):                                        # exponent 10^(i-6), 2^i fractions
        edges = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += [(10.0 ** (i - 6)) * mids, (-(10.0 ** (i - 6))) * mids]
    return torch.cat(values).sort().values


DYNAMIC_CODE = dynamic_map()
# (256, 2): row b is the pair a packed byte b stands for, (NF4[b >> 4], NF4[b & 15])
NF4_PAIRS = torch.stack((NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)), dim=1)


# ---- blockwise absmax quantisation, for any sorted code book -----------------------------------
def quantize_blocks(x: torch.Tensor, code: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n,) fp32 -> (indices (nblocks·block,) uint8, absmax (nblocks,) fp32): each element of a block is
    scaled by 1/absmax of its block and given the index of the nearest code value (a tie goes to the
    lower one). The tail is padded with zeros to a whole block; an all-zero block has absmax 0 and
    stores the code of 0."""
    n = x.numel()
    nblocks = -(-n // block)
    blocks = F.pad(x.reshape(-1).float(), (0, nblocks * block - n)).view(nblocks, block)  # (nblocks, block)
    absmax = blocks.abs().amax(dim=1)                                                     # (nblocks,)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)            # in [-1, 1]
    midpoints = (code[:-1] + code[1:]) / 2                                                # decision edges
    return torch.bucketize(scaled, midpoints.to(x.device)).to(torch.uint8).view(-1), absmax


def dequantize_blocks(idx: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block: int) -> torch.Tensor:
    """(indices (nblocks·block,), absmax (nblocks,)) -> code[index] · absmax, (nblocks·block,) fp32."""
    values = code.to(absmax.device)[idx.long()]                # (nblocks·block,), fresh: scaled in place
    return values.view(-1, block).mul_(absmax[:, None]).view(-1)


def pack_nibbles(idx: torch.Tensor) -> torch.Tensor:
    """4-bit indices (2k,) -> (k,) uint8, the first of each pair in the high nibble (bitsandbytes' order)."""
    return (idx[0::2] << 4) | idx[1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(k,) uint8 -> (2k,) indices: high nibble, then low nibble, of each byte."""
    return torch.stack((packed >> 4, packed & 0xF), dim=1).view(-1)


# ---- NF4, with or without double quantisation ---------------------------------------------------
def quantize_nf4(w: torch.Tensor, double_quant: bool = True) -> dict[str, torch.Tensor]:
    """W (any shape, float) -> the tensors that store it: `codes` (uint8, two NF4 indices a byte) and either
    `absmax` (fp32, one per 64 weights) or, with double quantisation, `absmax_codes` (uint8, one per 64
    weights), `absmax_scale` (fp32, one per 256 absmaxes) and `absmax_offset` (fp32, their mean)."""
    if not torch.is_floating_point(w):
        raise TypeError(f"NF4 quantises floating-point weights, got {w.dtype}")
    if w.numel() == 0 or not torch.isfinite(w).all():
        raise ValueError("NF4 needs a non-empty weight with finite values (no inf or nan)")
    idx, absmax = quantize_blocks(w.detach(), NF4_CODE, BLOCK)
    out = {"codes": pack_nibbles(idx)}                                     # (nblocks·32,) uint8
    if not double_quant:
        return {**out, "absmax": absmax}                                   # (nblocks,) fp32
    offset = absmax.mean()                                                 # absmaxes are > 0: centre them first
    q, scale = quantize_blocks(absmax - offset, DYNAMIC_CODE, ABSMAX_BLOCK)
    return {**out, "absmax_codes": q[:absmax.numel()], "absmax_scale": scale, "absmax_offset": offset}


def dequantize_absmax(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The block absmaxes c, (nblocks,) fp32: stored as they are, or dequant(c_8bit, c2) + mean(c)."""
    if "absmax" in t:
        return t["absmax"]
    q = t["absmax_codes"]
    padded = F.pad(q, (0, t["absmax_scale"].numel() * ABSMAX_BLOCK - q.numel()))  # whole blocks of 256
    return dequantize_blocks(padded, t["absmax_scale"], DYNAMIC_CODE, ABSMAX_BLOCK)[:q.numel()] + t["absmax_offset"]


def dequantize_nf4(t: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """The tensors of `quantize_nf4` -> W' (shape) fp32, W' = NF4[index] · c, block by block.

    Each packed byte is looked up whole in NF4_PAIRS, (NF4[high nibble], NF4[low nibble]): the same
    values as unpacking first, with fewer temporaries (this runs twice per layer and step)."""
    n = math.prod(shape)
    values = NF4_PAIRS.to(t["codes"].device)[t["codes"].long()].view(-1, BLOCK)   # (nblocks, 64), fresh
    return values.mul_(dequantize_absmax(t)[:, None]).view(-1)[:n].view(shape)


# ---- the layer --------------------------------------------------------------------------------
class _NF4Matmul(torch.autograd.Function):
    """y = x·W'ᵀ + b, W' dequantised from the layer's 4-bit buffers in forward, and again in backward
    (dx = dy·W'), so that no full-precision W' is kept between the two. W' is frozen: no gradient."""

    @staticmethod
    def forward(ctx, x, bias, layer):
        ctx.layer, ctx.x_dtype = layer, x.dtype
        ctx.bias_shape = None if bias is None else bias.shape
        return F.linear(x, layer.weight.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, dy):
        dx = (dy @ ctx.layer.weight.to(dy.dtype)).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None  # (..., in)
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None                  # (out,)
        return dx, db, None


class NF4Linear(nn.Module):
    """A frozen nn.Linear stored in 4-bit NF4: y = x·dequant(W_NF4)ᵀ + b (module docstring).

    Buffers hold the packed codes and the (double-quantised) absmaxes; the bias, small, stays a
    frozen parameter in its dtype. `weight` dequantises on every read (fp32, or the dtype the
    Linear had), so code that reads `layer.base.weight` (LoRA's init, DoRA's norm) sees W0'.
    Build one with `NF4Linear.from_linear(linear)`; `to_linear()` gives the plain layer back
    (with the dequantised W0', which is all that is kept)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, double_quant: bool = True):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"NF4Linear takes a 2-D weight [out, in], got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.double_quant = bool(double_quant)
        self.weight_dtype = weight.dtype
        for name, t in quantize_nf4(weight, double_quant).items():
            self.register_buffer(name, t)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, double_quant: bool = True) -> NF4Linear:
        return cls(linear.weight, linear.bias, double_quant)

    def _stored(self) -> dict[str, torch.Tensor]:
        return {n: b for n, b in self.named_buffers(recurse=False)}

    @property
    def weight(self) -> torch.Tensor:
        """W0' = dequant(W_NF4) [out, in], made fresh on each read (no gradient)."""
        return dequantize_nf4(self._stored(), (self.out_features, self.in_features)).to(self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NF4Matmul.apply(x, self.bias, self)

    def nbytes(self) -> int:
        """Bytes of the stored weight (codes and absmaxes; not the bias)."""
        return sum(b.numel() * b.element_size() for b in self._stored().values())

    def to_linear(self) -> Linear:
        """A plain frozen Linear holding W0' = dequant(W_NF4) (the original W0 is not kept): the model's own
        projection class (an nn.Linear), so the merged model keeps its bf16 decoding path on CPU."""
        b = self.bias
        linear = Linear(self.in_features, self.out_features, bias=b is not None,
                        device=self.codes.device, dtype=self.weight_dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if b is not None:
                linear.bias.copy_(b)
        return linear.requires_grad_(False)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 block={BLOCK}, double_quant={self.double_quant}")


# ---- where it goes ----------------------------------------------------------------------------
def quantize_base(model: nn.Module, double_quant: bool = True, device: Optional[torch.device | str] = None) -> int:
    """Store every nn.Linear inside the transformer blocks (`transformer.h.*`: c_attn, attn.c_proj,
    mlp.c_fc, mlp.c_proj) as an NF4Linear, in place, as QLoRA does for the whole frozen base.
    Embeddings, LayerNorms and the head (tied to the token embedding) stay as they are.
    Call it before `apply_lora` (DoRA's magnitude starts at the norms of the quantised W0').
    device: where to quantise and keep the 4-bit layers (default: where each layer is). A model loaded
    into host memory can so go to a small GPU one layer at a time, never whole in full precision; move
    the rest of it (`model.to(device)`) afterwards. Returns how many layers were quantised."""
    # a LoRA layer is told by its parts (base, A, B): lora.py imports this file, not the other way round
    if any(all(hasattr(m, part) for part in ("base", "A", "B")) for m in model.modules()):
        raise ValueError("the model already carries LoRA layers; quantize_base(model) first, then apply_lora "
                         "(the adapter starts from the quantised W0)")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("transformer.h.")]
    if not names:
        raise ValueError("no nn.Linear under transformer.h.* to quantise (already NF4, or not a GPT)")
    for name in names:
        parent, _, child = name.rpartition(".")
        linear = model.get_submodule(name)
        w, b = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
        if device is not None:
            w, b = w.to(device), None if b is None else b.to(device)
        setattr(model.get_submodule(parent), child, NF4Linear(w, b, double_quant))
    return len(names)


def dequantize_base(model: nn.Module) -> int:
    """Put a plain frozen Linear (minigpt.Linear, an nn.Linear) holding W0' = dequant(W_NF4) back in place of
    every NF4Linear of `model` (what `merge_lora` does at the end). Returns how many layers were replaced."""
    names = [n for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, model.get_submodule(name).to_linear())
    return len(names)


def nf4_memory(model: nn.Module) -> tuple[int, int, int]:
    """(bytes of the NF4 weights, bytes they would take in fp32, number of NF4 layers) over `model`."""
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    return (sum(m.nbytes() for m in layers), sum(4 * m.in_features * m.out_features for m in layers), len(layers))
