"""Small file helpers shared by checkpoints and adapters.

Everything this project writes goes through `atomic_save_dir`: the files are
written into a fresh temporary folder beside the target and only moved into
place once every one of them is complete, so a crash or Ctrl-C never leaves a
half-written checkpoint behind. Nothing here unpickles: tensors are
safetensors, metadata is JSON.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = ["atomic_save_dir", "write_json", "read_json", "save_tensors", "load_tensors"]


@contextlib.contextmanager
def atomic_save_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success move each file in it into `target`.

    Files are moved with `os.replace`, which is atomic on one file system, so a
    reader sees either the old file or the complete new one. If the body raises,
    the temporary folder is removed and `target` is left as it was.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-save-", dir=target))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        for f in sorted(tmp.iterdir()):
            os.chmod(f, 0o666 & ~umask)  # ordinary file permissions, whatever the writer used
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(f, target / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(obj: dict, path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                 metadata: dict[str, str] | None = None) -> None:
    """safetensors needs contiguous tensors that share no memory: give it copies."""
    save_file({k: v.detach().contiguous().clone().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a missing file is FileNotFoundError, a damaged one
    (truncated, or not safetensors at all) a ValueError that names it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as e:
        raise ValueError(f"{path} is damaged and cannot be read (truncated, or not a safetensors file: {e}); "
                         "save or download it again") from None
