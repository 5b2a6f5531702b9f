"""GPT-2 in one file, read top to bottom.

The math is exactly OpenAI's GPT-2 (and transformers' `GPT2LMHeadModel`):

    h0 = wte[x] + wpe[pos]
    for each block:  h = h + Attn(LN1(h));  h = h + MLP(LN2(h))        (pre-LN)
    logits = LN_f(h) @ wteᵀ                                            (tied head)

    Attn:  q|k|v = c_attn(x);  softmax(q kᵀ / sqrt(head_dim) + causal mask) v;  c_proj
    MLP:   c_proj(gelu_new(c_fc(x)))   with gelu_new the tanh approximation

Module names mirror Hugging Face's (`transformer.h.0.attn.c_attn`, ...), so
loading the public weights is a one-to-one key mapping (see pretrained.py).
One difference in storage: HF keeps the four projections as `Conv1D` with the
weight stored [in, out]; here they are `nn.Linear` ([out, in]), which is what
LoRA wraps. The loader hands nn.Linear a transposed view of the file's [in, out]
tensor, so no weight is copied. (They are minigpt.linear.Linear, an nn.Linear
whose bf16 decoding on CPU takes oneDNN's packed kernel; the math is F.linear.)

The one seam for every technique is `GPT.forward(..., past_key_values=...)`:
the past is a plain tuple over layers of `(k, v)` tensors, each
[B, n_head, T_past, head_dim]. Prefix tuning passes a learned past, PPLM a
nudged one; both need it differentiable, so nothing here detaches it.
Decoding without autograd may instead hand the forward pass a preallocated
`KVBuffer` (past.py) that it writes in place: the past is then not copied at
every token, and what comes back is still the plain tuple (views of the buffer).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig
from .linear import Linear
from .past import KVBuffer, PastKeyValues
from .pretrained import hf_to_minigpt_state_dict, read_checkpoint, write_checkpoint

__all__ = ["GPTConfig", "GPT", "GPTOutput", "PastKeyValues", "load_pretrained", "save_pretrained"]

@dataclass
class GPTOutput:
    logits: torch.Tensor                     # [B, T, vocab]
    past_key_values: PastKeyValues           # per layer (k, v), [B, nh, T_past + T, hs]
    hidden_states: Optional[tuple] = None    # L + 1 tensors [B, T, C]; the last is after ln_f
    attentions: Optional[tuple] = None       # L tensors [B, nh, T, T_past + T]


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU: the tanh approximation 0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³))).
    The exact-erf GELU differs from it by up to ~5e-4, enough to break a logits match."""
    return F.gelu(x, approximate="tanh")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)  # fused q|k|v
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.attn_pdrop = config.attn_pdrop
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, C = t.shape
        return t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)

    def forward(self, x, past=None, mask=None, output_attentions=False, store=None):
        # x: (B, T, C); past: (k, v) each (B, nh, T_past, hs); store: KVBuffer.write for this layer, or None;
        # mask: (B|1, 1, T, T_past+T), bool for output_attentions, else additive float; or None: every key
        # (one new token) or, for T > 1 (then there is no past), the plain causal mask, SDPA's is_causal
        q, k, v = self.c_attn(x).split(x.size(-1), dim=2)
        q, k, v = self.split_heads(q), self.split_heads(k), self.split_heads(v)  # (B, nh, T, hs)
        if store is not None:
            k, v = store(k, v)  # written in place after the buffered past; views (B, nh, T_past + T, hs)
        elif past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, nh, T_past + T, hs)
            v = torch.cat([past[1], v], dim=2)
        present = (k, v)

        probs = None
        if output_attentions or self.plain_is_faster(q):
            y, probs = self.plain_attention(q, k, v, mask)
        else:
            # The fast path: PyTorch's fused kernel, the same math as plain_attention without the (T, T) matrices.
            dropout_p = self.attn_pdrop if self.training else 0.0
            is_causal = mask is None and q.size(2) > 1
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
        y = y.transpose(1, 2).reshape(x.shape)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y)), present, probs if output_attentions else None

    def plain_attention(self, q, k, v, mask):
        """The form a learner reads: softmax(q kᵀ / sqrt(hs) + mask) v, with the softmax in fp32.
        mask: bool (True = may attend), additive float, or None (causal when T > 1, else every key)."""
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)    # (B, nh, T, T_past + T)
        scores = scores.float()
        if mask is None and q.size(2) > 1:
            mask = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).tril(k.size(2) - q.size(2))
        if mask is not None and mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        elif mask is not None:
            scores = scores + mask
        probs = scores.softmax(dim=-1).to(q.dtype)
        return self.attn_dropout(probs) @ v, probs                      # (B, nh, T, hs)

    @staticmethod
    def plain_is_faster(q) -> bool:
        """bf16/fp16 on a CPU (autocast training): SDPA's CPU kernel runs its backward slower in bf16 than in
        fp32, and the plain form is 2.4x faster than it there (forward + backward at 8 x 12 x 128 x 64:
        10.1 vs 23.7 ms on the 2-core development CPU; 7-10% of a GPT-2 LoRA step)."""
        return q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.mlp_dim)
        self.c_proj = Linear(config.mlp_dim, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(gelu_new(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, past=None, mask=None, output_attentions=False, store=None):
        a, present, probs = self.attn(self.ln_1(x), past, mask, output_attentions, store)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present, probs


class GPT(nn.Module):
    HEAD_LEFT_ROWS = 32  # up to this many rows, a no-grad head runs as (wte · xᵀ)ᵀ; see _lm_head

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            drop=nn.Dropout(config.embd_pdrop),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.head_cache, self._head_t, self._head_low = True, None, None  # see _lm_head
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        # GPT-2's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    # ---- the seam -------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[PastKeyValues] = None,
        position_ids: Optional[torch.Tensor] = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        inputs_embeds: Optional[torch.Tensor] = None,
        kv_buffer: Optional[KVBuffer] = None,
    ) -> GPTOutput:
        """Run T new tokens after an optional past.

        input_ids:       [B, T] token ids (or `inputs_embeds` [B, T, C] instead, for soft tokens).
        attention_mask:  [B, T_past + T], 1 = attend, 0 = padding; None attends to everything.
        past_key_values: per layer (k, v), each [B, n_head, T_past, head_dim]; kept differentiable.
        position_ids:    [B, T]; by default T_past, T_past + 1, ... or, with a mask,
                         cumsum(mask) - 1, so a left-padded row gets the positions it has alone.
        kv_buffer:       a preallocated past (past.KVBuffer), written in place; only without autograd.
                         It holds the past (T_past = kv_buffer.length); a `past_key_values` given with
                         an empty buffer is copied into it first. The returned past is views of it.
        """
        cfg = self.config
        if inputs_embeds is None:
            B, T = self._check_ids(input_ids)
            x = self.transformer.wte(input_ids)
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.size(-1) != cfg.n_embd:
                raise ValueError(f"inputs_embeds must be [B, T, {cfg.n_embd}], got {list(inputs_embeds.shape)}")
            B, T = inputs_embeds.shape[:2]
            x = inputs_embeds
        if kv_buffer is None:
            T_past = self._check_past(past_key_values, B)
        else:
            T_past = self._use_buffer(kv_buffer, past_key_values, B, T)
        if T_past + T > cfg.n_positions:
            raise ValueError(
                f"sequence too long: {T_past} past + {T} new tokens = {T_past + T} > n_positions {cfg.n_positions}; "
                "shorten the prompt or max_new_tokens")
        if attention_mask is not None:
            attention_mask = self._check_mask(attention_mask, B, T_past + T)
        if position_ids is None:
            position_ids = self._positions(attention_mask, B, T, T_past)
        mask = self._attention_bias(attention_mask, T, T_past)
        if mask is not None and not output_attentions:
            # SDPA's own causal path skips the masked half when nothing is padded and there is no past;
            # any other mask goes in additive form, made once here instead of once per layer by SDPA
            plain_causal = T_past == 0 and (attention_mask is None or bool(attention_mask.all()))
            mask = None if plain_causal else self._additive(mask, x.dtype)

        x = self.transformer.drop(x + self.transformer.wpe(position_ids))  # (B, T, C)
        hidden, presents, attentions = [], [], []
        for i, block in enumerate(self.transformer.h):
            if output_hidden_states:
                hidden.append(x)
            past = None if past_key_values is None or kv_buffer is not None else past_key_values[i]
            store = None if kv_buffer is None else partial(kv_buffer.write, i)
            x, present, probs = block(x, past, mask, output_attentions, store)
            presents.append(present)
            attentions.append(probs)
        if kv_buffer is not None:
            kv_buffer.advance(T)
        x = self.transformer.ln_f(x)
        if output_hidden_states:
            hidden.append(x)
        logits = self._lm_head(x)  # (B, T, vocab): lm_head_reference(x), by the fastest form for the row count
        return GPTOutput(
            logits=logits,
            past_key_values=tuple(presents),
            hidden_states=tuple(hidden) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )

    def lm_head_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The head as the math has it: logits = x · wteᵀ, with the weight tied to the token embedding.

        This is F.linear(x, W), the plain linear (no bias) of the `lm_head` module. `_lm_head`, which the forward pass
        calls, is the fast path: it gives these logits (to float rounding) by whichever matmul form
        reads wte fastest; tests/test_speed_paths.py holds the two equal."""
        if isinstance(self.lm_head, Linear):
            return self.lm_head.reference(x)
        return self.lm_head(x)

    def _lm_head(self, x: torch.Tensor) -> torch.Tensor:
        """Fast path of `lm_head_reference`: logits = x · wteᵀ, by the matmul form that reads wte
        fastest for the row count.

        Without autograd (decoding), on CPU:
        - bf16 weights: `lm_head`'s own fast path, oneDNN's packed bf16 kernel
          (minigpt/linear.py), for any row count;
        - one row (a batch-1 step): through a cached contiguous copy of wteᵀ [C, V];
          a one-row matmul reads that layout faster, and the head is ~30% of such a
          step. It costs one more copy of wte (154 MB for gpt2); `head_cache = False`
          turns it off. The copy is rebuilt whenever the weight changes (new tensor,
          or an in-place update, which bumps its _version).
        - a few rows (a batched step, up to HEAD_LEFT_ROWS): as (wte · xᵀ)ᵀ, which
          streams wte [V, C] once for all rows; x · wteᵀ runs ~1.5x slower at 8 rows.
        Under autocast (bf16/fp16 training) with the head frozen (LoRA, prefix tuning):
        through a cached copy of wte in the autocast dtype, the very values autocast
        would make by casting wte at every step (38.6M weights for GPT-2); wte itself
        stays fp32, since the embedding shares it.
        Otherwise (training, prefill) the reference itself, `lm_head_reference`. The
        forms sum the same products in different orders: equal to float rounding (~1e-6
        relative); the autocast copy gives autocast's own numbers bit for bit.
        """
        W = self.lm_head.weight
        rows = x.shape[0] * x.shape[1]
        low = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        if low is not None and not W.requires_grad and isinstance(self.lm_head, nn.Linear):
            # fast path: a cached copy of wte in the autocast dtype, instead of a cast at every step
            key = (W.data_ptr(), W._version, W.device, low)
            if self._head_low is None or self._head_low[0] != key:
                self._head_low = (key, W.detach().to(low))  # (V, C) in bf16/fp16
            return F.linear(x.to(low), self._head_low[1])
        if isinstance(self.lm_head, Linear) and self.lm_head.takes_fast_path(x):
            return self.lm_head(x)  # fast path: oneDNN's packed bf16 kernel (minigpt/linear.py)
        if torch.is_grad_enabled() or not isinstance(self.lm_head, nn.Linear) or rows > self.HEAD_LEFT_ROWS:
            return self.lm_head_reference(x)
        if rows > 1:  # fast path: a few rows as (wte · xᵀ)ᵀ, one pass over wte for all rows
            return (W @ x.reshape(rows, -1).t()).t().reshape(*x.shape[:-1], -1).contiguous()  # (B, T, V)
        if not self.head_cache:
            return self.lm_head_reference(x)
        # fast path: one row through a cached contiguous wteᵀ [C, V]
        key = (W.data_ptr(), W._version, W.device, W.dtype)
        if self._head_t is None or self._head_t[0] != key:
            self._head_t = (key, W.detach().t().contiguous())  # (C, V)
        return x @ self._head_t[1]

    # ---- input checks and masks -------------------------------------------------------
    def _check_ids(self, input_ids):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a 2-D LongTensor [batch, seq], got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if input_ids.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.numel() == 0:
            raise ValueError("input_ids is empty: give at least one token")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        return input_ids.shape

    def _check_past(self, past, B):
        if past is None:
            return 0
        cfg = self.config
        if len(past) != cfg.n_layer:
            raise ValueError(f"past_key_values has {len(past)} layers, the model has {cfg.n_layer}")
        T_past = None
        for i, layer in enumerate(past):
            if len(layer) != 2:
                raise ValueError(f"past_key_values[{i}] must be a (key, value) pair, got {len(layer)} tensors")
            for name, t in zip(("key", "value"), layer):
                want = (B, cfg.n_head, t.shape[2] if t.dim() == 4 else -1, cfg.head_dim)
                if t.dim() != 4 or tuple(t.shape) != want or (T_past is not None and t.shape[2] != T_past):
                    raise ValueError(
                        f"past_key_values[{i}] {name} has shape {list(t.shape)}; expected "
                        f"[batch={B}, n_head={cfg.n_head}, T_past{'=' + str(T_past) if T_past is not None else ''}, "
                        f"head_dim={cfg.head_dim}]")
                T_past = t.shape[2]
        return T_past

    def _use_buffer(self, buf, past, B, T):
        """Check a KVBuffer against this model and batch, copy an initial past into it; return T_past."""
        cfg = self.config
        if torch.is_grad_enabled():
            raise ValueError("kv_buffer is written in place and carries no gradient: use it under torch.no_grad() "
                             "or torch.inference_mode(); pass the past as past_key_values to train through it")
        want = (cfg.n_layer, 2, B, cfg.n_head, buf.max_length, cfg.head_dim)
        if tuple(buf.data.shape) != want:
            raise ValueError(f"kv_buffer has shape {list(buf.data.shape)}; expected [n_layer, 2, batch, n_head, "
                             f"max_length, head_dim] = {list(want)}")
        if past is not None:
            self._check_past(past, B)
            buf.fill(past)
        if buf.length + T > buf.max_length:
            raise ValueError(f"kv_buffer is full: {buf.length} past + {T} new tokens > its max_length "
                             f"{buf.max_length}")
        return buf.length

    @staticmethod
    def _check_mask(attention_mask, B, total):
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (B, total):
            raise ValueError(f"attention_mask must be [batch, T_past + T] = [{B}, {total}], got "
                             f"{list(attention_mask.shape)}")
        return attention_mask.to(torch.long)

    def _positions(self, attention_mask, B, T, T_past):
        if attention_mask is None:
            return torch.arange(T_past, T_past + T, device=self.device).unsqueeze(0)  # (1, T)
        pos = attention_mask.cumsum(-1) - 1  # each row counts only its real tokens
        return pos[:, -T:].clamp(min=0)  # (B, T)

    def _attention_bias(self, attention_mask, T, T_past):
        """Boolean (B|1, 1, T, T_past + T): True where query i may look at key j.

        Query i sits at absolute index T_past + i, so it sees keys j <= T_past + i
        that are not padding. A query always sees itself, so a padding query is
        never fully masked (that would give NaN, which poisons gradients even
        where the loss ignores it). Returns None when nothing needs masking.
        """
        if attention_mask is None and T == 1:
            return None
        dev = self.device
        q_idx = torch.arange(T_past, T_past + T, device=dev).unsqueeze(1)  # (T, 1)
        k_idx = torch.arange(T_past + T, device=dev).unsqueeze(0)          # (1, T_past + T)
        allowed = k_idx <= q_idx                                           # causal
        if attention_mask is None:
            return allowed[None, None]                                     # (1, 1, T, T_past + T)
        keep = attention_mask.bool()[:, None, None, :]                     # (B, 1, 1, T_past + T)
        return (allowed & keep) | (k_idx == q_idx)                         # (B, 1, T, T_past + T)

    @staticmethod
    def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The boolean mask as the additive one softmax needs: 0 where allowed, -inf elsewhere.
        SDPA would make exactly this from a boolean mask in every layer; here it is made once per
        forward pass (B|1, 1, T, T_past + T)."""
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))

    # ---- loading and saving (the files: see pretrained.py) ------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str, *, device=None, dtype=None) -> "GPT":
        """Load GPT-2 weights: "tiny" (bundled), a Hugging Face folder, or a hub name (gpt2, gpt2-medium, ...).

        The weights load as float32 unless `dtype` says otherwise, whatever the file
        stores (the bundled model is saved in float16 to stay small).
        """
        config, sd = read_checkpoint(name_or_path)
        with torch.device("meta"):  # shapes only, no memory
            model = cls(config)
        sd = hf_to_minigpt_state_dict(sd, {k: v.shape for k, v in model.state_dict().items()})
        model.load_state_dict(sd, assign=True)
        model.lm_head.weight = model.transformer.wte.weight  # re-tie after assign
        model.to(device=device, dtype=dtype or torch.float32)
        return model.eval()

    def save_pretrained(self, directory: str) -> None:
        """Write config.json + model.safetensors in Hugging Face's layout, atomically."""
        write_checkpoint(self.config, self.state_dict(), directory)


def load_pretrained(name_or_path: str, *, device=None, dtype=None) -> GPT:
    """The same as GPT.from_pretrained."""
    return GPT.from_pretrained(name_or_path, device=device, dtype=dtype)


def save_pretrained(model: GPT, directory: str) -> None:
    """The same as model.save_pretrained(directory)."""
    model.save_pretrained(directory)
