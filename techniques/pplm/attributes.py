"""PPLM's attribute models: their data, the discriminator head, its persistence and training.

Kept apart from pplm.py so that the algorithm there reads in one sitting, as the
paper's steps. Everything here is what an attribute model IS (a bag of token ids,
a linear head on a mean hidden state) and how it is made, saved and loaded.

Bags of words
    The paper's lists ship in techniques/data/pplm/wordlists/ (one word or
    phrase a line). The files have blemishes (see the README there) that the
    loader survives: junk suffixes like `  [126/1852]`, multi-word entries,
    duplicates, a missing final newline; also a UTF-8 BOM, CRLF line ends,
    blank lines and `#` comments in user files.

    A word is scored as the token(s) of " " + word (with the leading space, as
    the reference encodes it). The reference keeps only words that are a single
    token and drops the rest silently. Here `BagOfWords.summary()` says how many
    were kept, and `multi_token` chooses what happens to the others:
      "drop"  (default, the reference's behaviour) they are left out;
      "first" the bag also holds the FIRST sub-token of each multi-token word,
              so p(word) is scored as p(first sub-token) — an upper bound on the
              word's probability at this step (the later sub-tokens are not
              scored: the loss looks one token ahead only).
    Duplicates count once (the reference's one-hot matrix counts a duplicated
    word twice in the sum; that is an accident of the files, not a weight).

Labelled text: a TSV of `label<TAB>text`, with an optional header row.

The discriminator
    p(a|x) = softmax(W · mean_t h_t + b), h_t the last hidden states (after ln_f)
    of the frozen model over the real tokens. It is trained on features cached
    once per text (the model runs once, not once per epoch), with minigpt.train,
    and saved as discriminator.safetensors + discriminator.json. As in the
    reference's training script, "<|endoftext|>" leads every text; unlike it,
    texts longer than max_len tokens are cut rather than skipped. Every class
    named must have training rows: a class the data never shows is refused, not trained.

The paper's heads (techniques/data/pplm/heads/*.pt): linear layers on
GPT-2 medium's mean hidden state; read with torch.load(weights_only=True).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from minigpt import (EOT_ID, GPT, TrainConfig, Tokenizer, all_reduce_sum, atomic_save_dir, autocast, comm_device,
                     get_tokenizer, left_pad, load_tensors, read_json, save_tensors, setup_processes, train, write_json)

__all__ = ["BagOfWords", "load_bag", "bag_names", "clean_word_lines", "load_labelled_tsv", "check_classes_have_rows",
           "PAPER_HEADS", "paper_head_path", "read_paper_head", "Discriminator", "load_discriminator",
           "mean_hidden", "cache_features", "train_discriminator"]

_JUNK_SUFFIX = re.compile(r"\s*\[\d+/\d+\]\s*$")  # e.g. "algorithm     [126/1852]"
MULTI_TOKEN_MODES = ("drop", "first")


# ---- bags of words ----------------------------------------------------------------------------------
def _data_dir(kind: str) -> Path:
    return Path(str(resources.files("techniques") / "data" / "pplm" / kind))


def bag_names() -> list[str]:
    """Names of the word lists shipped with the package (the paper's)."""
    return sorted(p.stem for p in _data_dir("wordlists").glob("*.txt"))


def clean_word_lines(lines: Sequence[str]) -> tuple[list[str], int]:
    """Strip junk suffixes, whitespace, blank lines and comments; drop duplicates
    (first occurrence wins). Returns (words, number of duplicates dropped)."""
    words, seen, dups = [], set(), 0
    for line in lines:
        w = _JUNK_SUFFIX.sub("", line.replace("\ufeff", "")).strip()
        if not w or w.startswith("#"):
            continue
        if w in seen:
            dups += 1
            continue
        seen.add(w)
        words.append(w)
    return words, dups


@dataclass
class BagOfWords:
    """One bag: its words and the token ids its loss -log Σ_{w in bag} p(w) sums over."""
    name: str
    words: list[str]
    single: dict[str, int]                # word -> its one token id
    multi: dict[str, list[int]]           # word -> its several token ids
    duplicates: int = 0
    multi_token: str = "drop"
    token_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        ids = set(self.single.values())
        if self.multi_token == "first":
            ids |= {t[0] for t in self.multi.values()}
        self.token_ids = sorted(ids)

    def summary(self) -> str:
        n, s, m = len(self.words), len(self.single), len(self.multi)
        what = "dropped, as the reference does" if self.multi_token == "drop" else "scored by their first sub-token"
        dup = f", {self.duplicates} duplicate(s) removed" if self.duplicates else ""
        return (f"bag {self.name!r}: {n} words, {s} single-token ({100 * s / max(1, n):.0f}%), "
                f"{m} multi-token ({what}){dup} -> {len(self.token_ids)} token ids")


def _read_lines(path: Path) -> list[str]:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: not UTF-8 text ({e.reason}); save the word list as UTF-8") from None


def load_bag(spec: Union[str, Path, Sequence[str]], tokenizer: Tokenizer, *, multi_token: str = "drop",
             name: Optional[str] = None) -> BagOfWords:
    """A bag from a shipped name ("space"), a file path, or a list of words."""
    if multi_token not in MULTI_TOKEN_MODES:
        raise ValueError(f"multi_token must be one of {MULTI_TOKEN_MODES}, got {multi_token!r}")
    if isinstance(spec, (str, Path)):
        shipped = _data_dir("wordlists") / f"{spec}.txt"
        path = shipped if shipped.is_file() else Path(spec)
        if not path.is_file():
            raise ValueError(f"unknown bag of words {str(spec)!r}: not one of the shipped lists "
                             f"({', '.join(bag_names())}) and not a file")
        lines, name = _read_lines(path), name or path.stem
    else:
        if not all(isinstance(w, str) for w in spec):
            raise TypeError("a bag of words given as a list must hold strings")
        lines, name = list(spec), name or "custom"
    words, dups = clean_word_lines(lines)
    if not words:
        raise ValueError(f"bag of words {name!r} is empty: give at least one word")
    single, multi = {}, {}
    for w in words:
        ids = tokenizer.encode(" " + w)
        if len(ids) == 1:
            single[w] = ids[0]
        else:
            multi[w] = ids
    bag = BagOfWords(name, words, single, multi, dups, multi_token)
    if not bag.token_ids:
        raise ValueError(f"bag of words {name!r}: none of its {len(words)} words is a single GPT-2 token; "
                         "use multi_token='first' (--multi-token first) to score their first sub-tokens")
    return bag


# ---- labelled text ----------------------------------------------------------------------------------
def load_labelled_tsv(path: Union[str, Path], class_names: Optional[Sequence[str]] = None
                      ) -> tuple[list[str], list[int], list[str]]:
    """`label<TAB>text` rows -> (texts, class indices, class names).

    A first row whose label is "label" (or "class"/"target") is a header.
    Labels are class names, or integer indices into `class_names`. Without
    `class_names`: integer labels 0..K-1 name themselves, other labels are
    sorted (as the reference's generic loader does).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labelled data file {path} does not exist")
    rows = []
    for n, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise ValueError(f"{path}, line {n}: expected `label<TAB>text`, found no tab")
        label, text = (s.strip() for s in line.split("\t", 1))
        if not rows and n == 1 and label.lower() in ("label", "labels", "class", "target"):
            continue
        if not text:
            raise ValueError(f"{path}, line {n}: the text is empty")
        rows.append((n, label, text))
    if not rows:
        raise ValueError(f"{path} holds no labelled rows")
    labels = [r[1] for r in rows]
    all_int = all(re.fullmatch(r"\d+", s) for s in labels)
    if class_names is None:
        class_names = [str(i) for i in range(max(int(s) for s in labels) + 1)] if all_int else sorted(set(labels))
    class_names = list(class_names)
    index = {c: i for i, c in enumerate(class_names)}
    ys = []
    for n, label, _ in rows:
        y = int(label) if all_int else index.get(label)
        if y is None or not 0 <= y < len(class_names):
            raise ValueError(f"{path}, line {n}: label {label!r} is not one of the classes {class_names}")
        ys.append(y)
    if len(class_names) < 2:
        raise ValueError(f"{path}: a discriminator needs at least two classes, found {class_names}")
    return [r[2] for r in rows], ys, class_names


def check_classes_have_rows(labels: Sequence[int], class_names: Sequence[str], source: str = "the training data"
                            ) -> None:
    """Refuse class names that no row carries: a head would learn a class it never sees
    (and a dev accuracy computed over the wrong classes means nothing)."""
    present = set(labels)
    missing = [f"{c!r} ({i})" for i, c in enumerate(class_names) if i not in present]
    if missing:
        what = f"class {missing[0]} has" if len(missing) == 1 else f"classes {', '.join(missing)} have"
        raise ValueError(f"{what} no rows in {source} (classes named: {', '.join(class_names)}); every named "
                         "class needs training rows: name only the classes the data holds, or add rows for the others")


# ---- the paper's heads ------------------------------------------------------------------------------
# The paper's heads: file, class names (index order, from the reference's training script), base model.
PAPER_HEADS = {
    "sentiment": ("sentiment_classifierhead.pt",
                  ["positive", "negative", "very_positive", "very_negative", "neutral"], "gpt2-medium"),
    "clickbait": ("clickbait_classifierhead.pt", ["non_clickbait", "clickbait"], "gpt2-medium"),
    "toxicity": ("toxicity_classifierhead.pt", ["non_toxic", "toxic"], "gpt2-medium"),
}


def paper_head_path(name: str) -> Path:
    if name not in PAPER_HEADS:
        raise ValueError(f"unknown paper head {name!r}; choose one of {', '.join(PAPER_HEADS)}")
    return _data_dir("heads") / PAPER_HEADS[name][0]


def read_paper_head(path: Union[str, Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [classes, n_embd], bias [classes]) from a reference .pt state dict.
    weights_only=True: tensors are read, no code is unpickled."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"discriminator head {path} not found")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict) or set(sd) != {"mlp.weight", "mlp.bias"}:
        raise ValueError(f"{path} is not a PPLM classifier head (expected keys mlp.weight, mlp.bias; "
                         f"got {sorted(sd) if isinstance(sd, dict) else type(sd).__name__})")
    w, b = sd["mlp.weight"], sd["mlp.bias"]
    if w.dim() != 2 or b.shape != (w.shape[0],):
        raise ValueError(f"{path}: mlp.weight {list(w.shape)} and mlp.bias {list(b.shape)} do not form a linear head")
    return w.float(), b.float()


# ---- the discriminator: a linear head on the mean hidden state -------------------------------------
class Discriminator(nn.Module):
    """p(a|x) = softmax(W · mean_t h_t + b), h_t the last hidden states (after ln_f)
    over the real (non-padded) tokens. Parameter names match the paper's heads (mlp.*)."""

    def __init__(self, n_embd: int, class_names: Sequence[str], base_model: str = ""):
        super().__init__()
        if len(class_names) < 2:
            raise ValueError(f"a discriminator needs at least two classes, got {list(class_names)}")
        self.mlp = nn.Linear(n_embd, len(class_names))
        self.class_names, self.base_model = [str(c) for c in class_names], base_model

    @property
    def n_embd(self) -> int:
        return self.mlp.in_features

    def forward(self, mean_hidden: torch.Tensor) -> torch.Tensor:  # (B, C) -> (B, classes)
        return self.mlp(mean_hidden)

    def class_index(self, label: Union[int, str]) -> int:
        """A class by name ("very_positive", "very positive") or by index."""
        names = [c.lower().replace(" ", "_") for c in self.class_names]
        key = str(label).strip().lower().replace(" ", "_")
        if key in names:
            return names.index(key)
        if key.lstrip("-").isdigit() and 0 <= int(key) < len(names):
            return int(key)
        raise ValueError(f"class label {label!r} is not one of this head's classes: "
                         + ", ".join(f"{i}={c}" for i, c in enumerate(self.class_names)))

    def check_model(self, model: GPT) -> None:
        if model.config.n_embd != self.n_embd:
            want = f" ({self.base_model})" if self.base_model else ""
            raise ValueError(f"this discriminator head reads hidden states of size n_embd={self.n_embd}{want}, but the "
                             f"model has n_embd={model.config.n_embd}; load the model it was trained on "
                             f"(e.g. --model {self.base_model or 'gpt2-medium'}) or train a head for this one")

    def save(self, directory: Union[str, Path]) -> None:
        """discriminator.safetensors + discriminator.json, written atomically."""
        meta = {"class_names": self.class_names, "n_embd": self.n_embd, "base_model": self.base_model}
        with atomic_save_dir(directory) as tmp:
            save_tensors(dict(self.state_dict()), tmp / "discriminator.safetensors", {"format": "pt"})
            write_json(meta, tmp / "discriminator.json")

    @classmethod
    def load(cls, directory: Union[str, Path]) -> "Discriminator":
        d = Path(directory)
        meta, tensors = read_json(d / "discriminator.json"), load_tensors(d / "discriminator.safetensors")
        head = cls(tensors["mlp.weight"].shape[1], meta["class_names"], meta.get("base_model", ""))
        head.load_state_dict(tensors)
        return head.eval()

    @classmethod
    def from_paper(cls, name_or_path: Union[str, Path], class_names: Optional[Sequence[str]] = None) -> "Discriminator":
        """One of the paper's heads by name (sentiment, clickbait, toxicity) or a .pt state dict."""
        if str(name_or_path) in PAPER_HEADS:
            _, names, base = PAPER_HEADS[str(name_or_path)]
            w, b = read_paper_head(paper_head_path(str(name_or_path)))
        else:
            w, b = read_paper_head(name_or_path)
            names, base = [str(i) for i in range(w.shape[0])], ""
        head = cls(w.shape[1], class_names or names, base)
        head.mlp.weight.data.copy_(w)
        head.mlp.bias.data.copy_(b)
        return head.eval()


def load_discriminator(spec: Union[str, Path]) -> Discriminator:
    """A paper head name, a folder saved by Discriminator.save, or a reference .pt file."""
    p = Path(spec)
    if str(spec) in PAPER_HEADS or p.suffix == ".pt":
        return Discriminator.from_paper(spec)
    if p.is_dir() and (p / "discriminator.safetensors").is_file():
        return Discriminator.load(p)
    raise ValueError(f"unknown discriminator {str(spec)!r}: give one of the paper's heads "
                     f"({', '.join(PAPER_HEADS)}), a folder saved by train-discriminator, or a .pt head")


# ---- training a head on the frozen model's features ------------------------------------------------
def mean_hidden(model: GPT, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over the real positions of the last hidden states (after ln_f): (B, C)."""
    out = model(input_ids, attention_mask=attention_mask, output_hidden_states=True)
    h = out.hidden_states[-1]                                       # (B, T, C)
    m = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    m = m.to(h.dtype)[..., None]                                    # (B, T, 1)
    return (h * m).sum(1) / m.sum(1).clamp(min=1)


@torch.no_grad()
def cache_features(model: GPT, texts: Sequence[str], *, batch_size: int = 32, max_len: int = 100,
                   progress: bool = True, precision: str = "fp32") -> torch.Tensor:
    """The frozen model's mean hidden state of "<|endoftext|>" + text for each text, (N, C), on the CPU.
    Like the reference's training script, the end-of-text token leads (generation prompts start
    with it too); texts longer than max_len tokens are cut (the reference skips them).
    `precision` bf16/fp16 runs the model under autocast. Under torchrun each process computes
    every world_size-th batch and the rows are summed across processes (each row is written by
    one process, zeros elsewhere), so every process ends with all of them."""
    tok = get_tokenizer()
    procs = setup_processes(model.device)
    seqs = [[EOT_ID] + tok.encode(t)[:max_len - 1] for t in texts]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # batches of similar length: little padding
    out = torch.zeros(len(seqs), model.config.n_embd)
    starts = list(range(0, len(seqs), batch_size))[procs.rank::procs.world_size]
    for i in tqdm(starts, disable=not (progress and procs.is_main), desc="features", unit="batch"):
        idx = order[i:i + batch_size]
        ids, mask = left_pad([seqs[j] for j in idx], EOT_ID, model.device)     # (b, T) each
        with autocast(model.device, precision):
            out[idx] = mean_hidden(model, ids, mask).float().cpu()
    if procs.several:
        out = all_reduce_sum(out.to(comm_device(model.device)), procs).cpu()
    return out


def train_discriminator(model: GPT, texts: Sequence[str], labels: Sequence[int], class_names: Sequence[str], *,
                        eval_texts: Sequence[str] = (), eval_labels: Sequence[int] = (),
                        config: TrainConfig = TrainConfig(epochs=10, batch_size=64, lr=1e-4, decay=False),
                        max_len: int = 100, progress: bool = True,
                        run_info: Optional[dict] = None) -> tuple[Discriminator, dict]:
    """Train a head on cached features of the frozen model with minigpt.train.
    Returns (head, report) with the loss history and dev accuracy (None without dev data).
    `config` carries precision, accumulation and checkpoints; `run_info` is what a resumed
    run must share with its checkpoint (see minigpt.train)."""
    if len(texts) != len(labels) or len(eval_texts) != len(eval_labels):
        raise ValueError("texts and labels must have the same length")
    check_classes_have_rows(labels, class_names)
    head = Discriminator(model.config.n_embd, class_names, model.config.name_or_path).to(model.device)

    def examples(ts, ys):  # (feature (C,), label) pairs: the model runs once per text, not once per epoch
        return list(zip(cache_features(model, ts, max_len=max_len, progress=progress, precision=config.precision),
                        ys))

    def collate(batch):
        return {"x": torch.stack([f for f, _ in batch]), "y": torch.tensor([y for _, y in batch])}

    def loss_fn(batch):
        return F.cross_entropy(head(batch["x"]), batch["y"])

    train_ex, eval_ex = examples(texts, labels), (examples(eval_texts, eval_labels) if eval_texts else [])
    history = train(head.parameters(), loss_fn, train_ex, eval_examples=eval_ex, config=config, collate_fn=collate,
                    run_info=run_info)
    head.eval()
    acc = None
    if eval_ex:
        with torch.no_grad():
            batch = collate(eval_ex)
            acc = (head(batch["x"].to(model.device)).argmax(-1).cpu() == batch["y"]).float().mean().item()
    return head, {"history": history, "dev_accuracy": acc, "n_train": len(train_ex), "n_dev": len(eval_ex)}
