"""The data the tour and the projects read, from the repository's data/ folder.

- data/poem_sentiment: poem verses (Project Gutenberg poems, CC BY 4.0), one per line of
  `id<TAB>verse<TAB>label`, in train, dev and test splits; the LoRA steps train on them.
- data/e2e: the E2E restaurant records (Novikova et al. 2017), CSV files with the columns mr (the
  "meaning representation") and ref (a sentence); the prefix-tuning paper's first benchmark.

GPT-2 has no beginning-of-text token, so a text that starts a document is read after "<|endoftext|>" (EOT).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

from minigpt import Example, examples_from_pairs, get_tokenizer

__all__ = ["DATA", "POEMS", "E2E", "EOT", "read_verses", "verse_examples", "read_e2e", "group_by_mr", "e2e_prompt"]

DATA = Path(__file__).resolve().parents[2] / "data"    # the repository's data/ folder
POEMS = DATA / "poem_sentiment"
E2E = DATA / "e2e"
EOT = "<|endoftext|>"


# ---- poem verses -------------------------------------------------------------------------------
def read_verses(split: str, *, with_labels: bool = False) -> list:
    """data/poem_sentiment/{split}.tsv (id<TAB>verse<TAB>label, no header) -> the verses, in the file's order
    (with_labels: (verse, label) pairs, the label an int)."""
    path = POEMS / f"{split}.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this needs the poem verses shipped in data/poem_sentiment")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split("\t")
        if len(parts) != 3 or not parts[1].strip():
            raise ValueError(f"{path}, line {n}: expected id<TAB>verse<TAB>label")
        rows.append((parts[1].strip(), int(parts[2])) if with_labels else parts[1].strip())
    return rows


def verse_examples(verses: Sequence[str], max_len: int) -> list[Example]:
    """One training example per verse: "<|endoftext|>", then " " + the verse; the loss is on the verse and
    its closing "<|endoftext|>" (at most max_len tokens each)."""
    return examples_from_pairs(get_tokenizer(), [(EOT, " " + v) for v in verses], max_len)


# ---- E2E -------------------------------------------------------------------------------------------
def read_e2e(path: str | Path) -> list[tuple[str, str]]:
    """An E2E CSV (columns mr, ref; e.g. data/e2e/devset.csv) -> its (mr, ref) rows, in the file's order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this needs the E2E records (data/e2e in the repository, "
                                "or a folder with devset.csv and testset_w_refs.csv)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"mr", "ref"} <= set(rows[0]):
        raise ValueError(f"{path}: expected a CSV with columns mr, ref")
    return [(r["mr"].strip(), r["ref"].strip()) for r in rows]


def group_by_mr(rows: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    """mr -> its references, in the file's order (the test set has several per input)."""
    groups: dict[str, list[str]] = {}
    for mr, ref in rows:
        groups.setdefault(mr, []).append(ref)
    return groups


def e2e_prompt(mr: str) -> str:
    """The prompt for one E2E record, " {mr} <|endoftext|>"; the target " {ref}" follows it (the format of
    the prefix-tuning paper's table-to-text runs, Li & Liang 2021)."""
    return f" {mr} {EOT}"
