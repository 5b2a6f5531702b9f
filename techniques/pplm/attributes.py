"""Data for PPLM's attribute models: bags of words, labelled TSV files, the paper's heads.

Kept apart from pplm.py so that the algorithm there reads in one sitting.

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

from minigpt import Tokenizer

__all__ = ["BagOfWords", "load_bag", "bag_names", "clean_word_lines", "load_labelled_tsv",
           "PAPER_HEADS", "paper_head_path", "read_paper_head"]

_JUNK_SUFFIX = re.compile(r"\s*\[\d+/\d+\]\s*$")  # e.g. "algorithm     [126/1852]"
MULTI_TOKEN_MODES = ("drop", "first")


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
