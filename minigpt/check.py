"""`python -m minigpt check`: this GPT-2 against transformers (and peft), on the user's own files.

The tests compare the two on random models; this command does it on whatever
the user loads (`--model`, `--weights`, and the adapters `--lora`, `--prefix`).
The same files are read both ways, here by `GPT.from_pretrained` and
`techniques.*.load_adapter`, there by `GPT2LMHeadModel.from_pretrained` and
`PeftModel.from_pretrained`, and every row of the table is one comparison:

- logits and hidden states, in float32: max |Δ| over the real (unpadded)
  positions, within 1e-4 · max(1, largest |value| on transformers' side). The scale
  factor is there because trained GPT-2 hidden states reach hundreds, where
  float32 itself rounds at ~1e-5; on values of order 1 the tolerance is the
  tests' 1e-4;
- greedy tokens: equal, token for token, on one prompt and on a left-padded
  batch (ours `minigpt.generate`, theirs `generate` with the attention mask),
  both stopping at <|endoftext|> and padding finished rows with it;
- the tokenizer: the same ids for sample texts (ours is tiktoken on the BPE
  files in minigpt/data; theirs GPT2Tokenizer on the same files);
- LoRA: logits vs peft, unmerged and merged (`merge_lora` / `merge_and_unload`);
- prefix: logits vs peft's forward, and greedy tokens vs a greedy loop over
  peft's forward (PREFIX_GENERATE_NOTE says why not peft's `generate`). With
  --lora too, the prefix runs on the LoRA-merged model on both sides, as
  `python -m minigpt generate --lora --prefix` runs it.

transformers and peft are imported only here, and only when the command runs:
they are in the `test` extra, not in minigpt's dependencies.
"""
from __future__ import annotations

import contextlib
import copy
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .cli import model_from_args, run_command
from .generation import generate
from .pretrained import resolve_weights_dir
from .tokenizer import EOT_ID, data_file, get_tokenizer

__all__ = ["Row", "diff_row", "tokens_row", "format_table", "check_command", "run_check", "FP32_TOL",
           "PREFIX_GENERATE_NOTE", "MISSING_EXTRA"]

FP32_TOL = 1e-4
GREEDY_TOKENS = 20
PROMPTS = ("The meaning of life is", "Once upon a time", "In the morning, the old fisherman walked down to the")
SAMPLE_TEXTS = (*PROMPTS, "Hello world", "  two  spaces\n\nand\ttabs", "naïve café 東京 🙂", "don't we'll I'm",
                "<|endoftext|>next", "1234567 + 89", "def f(x):\n    return x ** 2\n")
PREFIX_GENERATE_NOTE = ("prefix greedy tokens are checked against a loop over peft's forward, not PeftModel.generate: "
                        "with transformers 5 and peft 0.21, generate hands the prefix over as past_key_values, which "
                        "transformers replaces with its own empty cache, so the prefix is dropped "
                        "(tests/test_prefix.py pins that bug)")
MISSING_EXTRA = ('minigpt check compares against transformers and peft, which are not installed ({}); install the '
                 'test extra: pip install -e ".[test]"')


# ---- one row of the table ------------------------------------------------------------------
@dataclass
class Row:
    """One comparison: what was compared, the measured value, the bound, and whether it holds."""
    what: str
    value: str
    tolerance: str
    ok: bool


def fp32_tolerance(scale: float) -> float:
    """1e-4 for values of order 1, relative beyond: 1e-4 · max(1, scale)."""
    return FP32_TOL * max(1.0, scale)


def diff_row(what: str, ours: torch.Tensor, theirs: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Row:
    """max |ours - theirs| over the positions where `mask` ([B, T]) is 1 (all when None).

    A NaN anywhere, or a shape mismatch, fails the row.
    """
    if ours.shape != theirs.shape:
        return Row(what, f"shape {list(ours.shape)} vs {list(theirs.shape)}", "same shape", False)
    if mask is not None:
        keep = mask.bool()
        ours, theirs = ours[keep], theirs[keep]  # (real positions, ...)
    ours, theirs = ours.detach().double(), theirs.detach().double()
    diff = (ours - theirs).abs().max().item()
    if ours.isnan().any() or theirs.isnan().any():
        diff = math.nan
    tol = fp32_tolerance(theirs.abs().max().item())
    return Row(what, f"{diff:.1e}", f"{tol:.1e}", diff <= tol)  # NaN <= tol is False


def tokens_row(what: str, ours: torch.Tensor, theirs: torch.Tensor) -> Row:
    """Token ids [B, T] equal, every one; otherwise where they first differ."""
    if ours.shape != theirs.shape:
        return Row(what, f"lengths {list(ours.shape)} vs {list(theirs.shape)}", "equal", False)
    differ = (ours != theirs).nonzero()
    if len(differ) == 0:
        return Row(what, f"equal ({ours.numel()} ids)", "equal", True)
    row, col = differ[0].tolist()
    return Row(what, f"{len(differ)} differ, first row {row} pos {col}", "equal", False)


def count_row(what: str, equal: int, total: int) -> Row:
    return Row(what, f"{equal}/{total} equal", "equal", equal == total)


def format_table(rows: Sequence[Row]) -> str:
    """The rows as an aligned text table, with a header and a verdict line."""
    head = ("what", "value", "tolerance", "result")
    cells = [head] + [(r.what, r.value, r.tolerance, "ok" if r.ok else "FAIL") for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(4)).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    failed = sum(not r.ok for r in rows)
    lines.append(f"all {len(rows)} rows ok" if not failed else f"{failed} of {len(rows)} rows FAIL")
    return "\n".join(lines)


# ---- the references, imported only here ------------------------------------------------------
def import_references(need_peft: bool):
    """(transformers, peft or None); a missing one is a one-line error naming the test extra."""
    try:
        import transformers
        peft = None
        if need_peft:
            import peft
    except ImportError as e:
        raise ValueError(MISSING_EXTRA.format(e)) from None
    return transformers, peft


@contextlib.contextmanager
def quiet(transformers):
    """No progress bars, info logs or warnings from transformers/peft while comparing; restored after."""
    tlog = transformers.utils.logging
    verbosity, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()


def load_theirs(transformers, folder, device):
    """transformers' GPT2LMHeadModel from the same folder, float32, eval mode."""
    model = transformers.GPT2LMHeadModel.from_pretrained(folder, torch_dtype=torch.float32)
    return model.to(device).eval()


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Each left-padded row's own positions (pads at 0), as ours derives them from the mask."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def their_forward(model, ids, mask=None, hidden=False):
    """transformers' (or peft's) forward on [B, T] ids; a mask brings explicit positions."""
    kwargs = {} if mask is None else dict(attention_mask=mask, position_ids=positions(mask))
    return model(input_ids=ids, output_hidden_states=hidden, **kwargs)


def greedy_by_forward(logits_of: Callable, ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding by re-running a forward on the whole sequence each step (no cache).

    Stops at <|endoftext|> and pads finished rows with it, as `minigpt.generate`
    and transformers' generate do with eos_token_id = pad_token_id = 50256.
    """
    finished = torch.zeros(ids.size(0), dtype=torch.bool, device=ids.device)
    for _ in range(n):
        tok = logits_of(ids, mask)[:, -1].argmax(-1).masked_fill(finished, EOT_ID)  # (B,)
        finished |= tok == EOT_ID
        ids = torch.cat([ids, tok[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if bool(finished.all()):
            break
    return ids


def greedy_budget(n_positions: int, used: int) -> int:
    """New tokens for the greedy rows: GREEDY_TOKENS, or what the context leaves."""
    room = n_positions - used
    if room < 1:
        raise ValueError(f"the check's prompts ({used} positions with the prefix) leave no room in the model's "
                         f"context of {n_positions}; use a shorter prefix")
    return min(GREEDY_TOKENS, room)


# ---- the comparisons ------------------------------------------------------------------------
@torch.no_grad()
def base_rows(ours, theirs, tokenizer, their_tokenizer) -> list[Row]:
    """The model itself: logits, hidden states, greedy tokens; and the tokenizer."""
    device = ours.device
    singles = [torch.tensor([tokenizer.encode(p)], device=device) for p in PROMPTS]
    d_logits, d_hidden = [], []
    for ids in singles:
        mine = ours(ids, output_hidden_states=True)
        ref = their_forward(theirs, ids, hidden=True)
        d_logits.append(diff_row("", mine.logits, ref.logits))
        d_hidden.append(diff_row("", torch.stack(mine.hidden_states), torch.stack(ref.hidden_states))
                        if len(mine.hidden_states) == len(ref.hidden_states) else
                        Row("", f"{len(mine.hidden_states)} vs {len(ref.hidden_states)} layers", "", False))
    n_layer = ours.config.n_layer  # hidden states: the input of every block, then ln_f's output
    rows = [worst(f"logits max |Δ|, {len(PROMPTS)} prompts one at a time", d_logits),
            worst(f"hidden states max |Δ|, embeddings + {n_layer} blocks", d_hidden)]

    ids, mask = tokenizer.encode_batch(list(PROMPTS), device=device)  # (B, T) left-padded
    rows.append(diff_row("logits max |Δ|, left-padded batch", ours(ids, attention_mask=mask).logits,
                         their_forward(theirs, ids, mask).logits, mask))

    n = greedy_budget(ours.config.n_positions, ids.size(1))
    for what, x, m in ((f"greedy tokens, 1 prompt, {n} new", singles[0], torch.ones_like(singles[0])),
                       (f"greedy tokens, left-padded batch of {len(PROMPTS)}, {n} new", ids, mask)):
        mine = generate(ours, x, attention_mask=m, max_new_tokens=n, eos_token_id=EOT_ID, pad_token_id=EOT_ID)
        ref = theirs.generate(x, attention_mask=m, max_new_tokens=n, do_sample=False, eos_token_id=EOT_ID,
                              pad_token_id=EOT_ID)
        rows.append(tokens_row(what, mine, ref))

    same = sum(tokenizer.encode(t) == their_tokenizer.encode(t) for t in SAMPLE_TEXTS)
    rows.append(count_row(f"tokenizer ids, {len(SAMPLE_TEXTS)} sample texts", same, len(SAMPLE_TEXTS)))
    return rows


def worst(what: str, rows: Sequence[Row]) -> Row:
    """One row for several comparisons of the same kind: the first failure, else the largest value."""
    failed = [r for r in rows if not r.ok]
    pick = failed[0] if failed else max(rows, key=lambda r: float(r.value))
    return Row(what, pick.value, pick.tolerance, not failed)


@torch.no_grad()
def lora_rows(ours, transformers, peft, folder, lora_dir, tokenizer):
    """LoRA logits vs peft, unmerged then merged; returns (rows, our merged model, their merged model)."""
    from techniques.lora import load_adapter, merge_lora
    adapted = load_adapter(copy.deepcopy(ours), lora_dir)
    theirs = peft.PeftModel.from_pretrained(load_theirs(transformers, folder, ours.device), str(lora_dir)).eval()
    ids, mask = tokenizer.encode_batch(list(PROMPTS), device=ours.device)
    rows = [diff_row("LoRA logits vs peft, unmerged", adapted(ids, attention_mask=mask).logits,
                     their_forward(theirs, ids, mask).logits, mask)]
    merged, their_merged = merge_lora(adapted), theirs.merge_and_unload().eval()
    rows.append(diff_row("LoRA logits vs peft, merged", merged(ids, attention_mask=mask).logits,
                         their_forward(their_merged, ids, mask).logits, mask))
    return rows, merged, their_merged


@torch.no_grad()
def prefix_rows(ours, theirs, peft, prefix_dir, tokenizer, over: str = "") -> list[Row]:
    """Prefix logits vs peft's forward, and greedy tokens vs a greedy loop over it.

    `ours`/`theirs` are the models the prefix runs on (the base, or both LoRA-merged)."""
    from techniques.prefix import load_adapter
    prefix = load_adapter(ours, prefix_dir)
    wrapped = peft.PeftModel.from_pretrained(theirs, str(prefix_dir)).eval()
    ids, mask = tokenizer.encode_batch(list(PROMPTS), device=ours.device)
    past, full_mask = prefix.inputs_for(ids, mask)
    rows = [diff_row(f"prefix logits vs peft forward{over}", ours(ids, past_key_values=past,
                                                                 attention_mask=full_mask).logits,
                     their_forward(wrapped, ids, mask).logits, mask)]
    n = greedy_budget(ours.config.n_positions, prefix.num_virtual_tokens + ids.size(1))
    mine = generate(ours, ids, attention_mask=mask, past_key_values=prefix.past_key_values(ids.size(0)),
                    max_new_tokens=n, eos_token_id=EOT_ID, pad_token_id=EOT_ID)
    ref = greedy_by_forward(lambda x, m: their_forward(wrapped, x, m).logits, ids, mask, n)
    rows.append(tokens_row(f"prefix greedy tokens vs peft forward loop{over}, {n} new", mine, ref))
    return rows


def check_adapter_folders(lora_dir, prefix_dir) -> None:
    """Before any model loads: each adapter folder exists and is of the kind its flag says."""
    from techniques.peft_format import read_adapter_config
    from techniques.prefix import is_prefix_plus_dir
    if prefix_dir and is_prefix_plus_dir(prefix_dir):
        raise ValueError(f"--prefix {prefix_dir} is a Prefix-Tuning+ adapter: peft has no such adapter type, so there "
                         "is nothing to compare it against; its math is checked by tests/test_prefix_plus.py, and "
                         "`python -m minigpt generate --prefix` runs it")
    for directory, kind in ((lora_dir, "LORA"), (prefix_dir, "PREFIX_TUNING")):
        if directory:
            read_adapter_config(directory, kind)


def check_command(args) -> list[Row]:
    """Load the files both ways, compare, print the table; returns the rows."""
    transformers, peft = import_references(need_peft=bool(args.lora or args.prefix))
    check_adapter_folders(args.lora, args.prefix)
    name = args.weights or args.model
    folder = resolve_weights_dir(name)
    ours = model_from_args(args)
    versions = f"transformers {transformers.__version__}" + (f", peft {peft.__version__}" if peft else "")
    where = name if str(folder) == str(name) else f"{name} ({folder})"
    print(f"checking {where} on {ours.device}, float32: minigpt vs {versions}")
    tokenizer = get_tokenizer()
    with quiet(transformers):
        theirs = load_theirs(transformers, folder, ours.device)
        # positional: the arguments are (vocab_file, merges_file) in transformers 4, (vocab, merges) in 5
        their_tokenizer = transformers.GPT2Tokenizer(data_file("encoder.json"), data_file("vocab.bpe"))
        rows = base_rows(ours, theirs, tokenizer, their_tokenizer)
        if args.lora:
            more, ours, theirs = lora_rows(ours, transformers, peft, folder, args.lora, tokenizer)
            rows += more
        if args.prefix:
            rows += prefix_rows(ours, theirs, peft, args.prefix, tokenizer,
                                over=" (LoRA merged)" if args.lora else "")
    print(format_table(rows))
    if args.prefix:
        print(f"note: {PREFIX_GENERATE_NOTE}")
    return rows


def run_check(args) -> int:
    """Exit code: 0 when every row holds, 1 when one fails, 2 for a user error (one line, see cli.py)."""
    rows: list[Row] = []
    code = run_command(lambda: rows.extend(check_command(args)))
    if code:
        return code
    return 0 if all(r.ok for r in rows) else 1
