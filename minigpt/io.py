"""Small file helpers shared by checkpoints and adapters, and the all-or-nothing save.

Everything this project writes goes through `atomic_save_dir`, which replaces a
whole folder at once. Moving files into the target one by one is not enough: each
move is atomic, the folder is not, and a process killed between two moves leaves
new files beside old ones (a checkpoint whose optimizer is one step ahead of its
weights). So a save goes like this, all in the target's parent folder P:

    1. write every file into P/.tmp-save-NAME.<tag>, with hard links to the entries
       of the old folder that this save does not rewrite (a run folder keeps its
       train_state/ when history.json is rewritten), and fsync it all;
    2. rename it to P/.new-save-NAME.<tag>: from here on the new folder is complete;
    3. rename the old NAME to P/.old-save-NAME.<tag>   (the commit point);
    4. rename .new-save-NAME.<tag> to NAME, fsync P, delete the old folder.

A rename inside one file system is atomic, so whatever moment the process dies
(SIGKILL, power loss, a full disk), P holds a complete folder: NAME itself, or,
between steps 3 and 4, the .new one (complete) and the .old one. `recover_dir`
turns that back into NAME: the next save does it first (and tidies the leftovers,
with a warning), and readers ask it where the complete folder is without changing
anything. Nothing here unpickles: tensors are safetensors, metadata is JSON.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

__all__ = ["atomic_save_dir", "recover_dir", "write_json", "read_json", "save_tensors", "load_tensors",
           "tensor_metadata"]

_KINDS = (".tmp-save-", ".new-save-", ".old-save-")


def _leftovers(target: Path, kind: str) -> list[Path]:
    """Folders an interrupted save of `target` left in its parent, newest last."""
    prefix = f"{kind}{target.name}."
    found = [p for p in target.parent.iterdir() if p.name.startswith(prefix)] if target.parent.is_dir() else []
    return sorted(found, key=lambda p: p.stat().st_mtime)


def recover_dir(target: str | os.PathLike, *, tidy: bool = True) -> Path:
    """Where the complete copy of `target` is, after a save that may have died midway.

    The commit point of a save is the rename of the old folder to .old-save-: so if
    `target` exists it is the complete folder (the old or the new one), and if it does
    not, the .new-save- folder is the complete new one (else the .old-save- folder is
    the old one). With tidy=False (readers) nothing is changed and the path to read is
    returned. With tidy=True (writers, before saving) a missing `target` is put back
    by a rename, and the other leftovers are deleted, with a warning.
    """
    target = Path(target)
    news, olds = _leftovers(target, ".new-save-"), _leftovers(target, ".old-save-")
    source = target
    if not target.exists():
        source = news[-1] if news else olds[-1] if olds else target
    if not tidy:
        return source
    if source != target:
        os.rename(source, target)
    stale = [p for kind in _KINDS for p in _leftovers(target, kind)]
    if stale:
        warnings.warn(f"an earlier save of {target} was interrupted; {target} holds the last complete save, "
                      f"and its leftovers are removed: {', '.join(p.name for p in stale)}", stacklevel=3)
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
    return target


def _refuse_cwd(target: Path) -> None:
    here, there = Path.cwd().resolve(), target.resolve()
    if here == there or there in here.parents:
        raise ValueError(f"cannot save into {target}: it is the current folder (or holds it), and a save replaces "
                         "the whole folder at once; save into a subfolder of it instead (e.g. --out runs/x)")


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (or, where links fail, copy) the entries of `old` that `new` lacks."""
    for entry in old.iterdir():
        dest = new / entry.name
        if dest.exists() or entry.name.startswith(_KINDS):
            continue
        if entry.is_dir() and not entry.is_symlink():
            os.mkdir(dest)
            _carry_over(entry, dest)
        else:
            try:
                os.link(entry, dest, follow_symlinks=False)
            except OSError:
                shutil.copy2(entry, dest, follow_symlinks=False)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a folder cannot be opened on some systems (Windows): the rename still orders it
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync(Path(dirpath) / f)
        _fsync(Path(dirpath))


def _disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    text = str(e)
    return isinstance(e, (OSError, SafetensorError, RuntimeError)) and (
        "No space left" in text or "os error 28" in text)


@contextlib.contextmanager
def atomic_save_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder to write into; when the body ends, it replaces `target` as a whole.

    Entries of the old `target` that the body did not write are kept (hard links).
    If the body raises, or the disk fills, `target` is left exactly as it was.
    """
    target = Path(target).absolute()
    _refuse_cwd(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)  # finish what an interrupted save left, before starting this one
    tag = secrets.token_hex(4)
    tmp = target.parent / f".tmp-save-{target.name}.{tag}"
    new, old = (target.parent / f"{kind}{target.name}.{tag}" for kind in (".new-save-", ".old-save-"))
    os.mkdir(tmp)
    committed = False
    try:
        yield tmp
        if target.is_dir():
            _carry_over(target, tmp)
        _fsync_tree(tmp)
        os.rename(tmp, new)                 # 2. the new folder is complete
        if target.exists():
            os.rename(target, old)          # 3. the commit point
        committed = True
        os.rename(new, target)              # 4.
        _fsync(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if committed:  # died between 3 and 4 in Python, not by a kill: finish the swap now
            with contextlib.suppress(OSError):
                recover_dir(target)
        else:
            shutil.rmtree(new, ignore_errors=True)
        if _disk_full(e):
            raise OSError(errno.ENOSPC, f"no space left on the device while saving {target}: the folder is as it "
                                        "was before this save; free some space and run again") from None
        raise


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


def tensor_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored in a safetensors file's header (empty if none)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except SafetensorError as e:
        raise ValueError(f"{path} is damaged and cannot be read ({e}); save or download it again") from None
