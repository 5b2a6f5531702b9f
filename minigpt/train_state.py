"""A training run's state on disk, so that `--resume DIR` continues it exactly.

An optimizer step depends on more than the weights. To take step s + 1 after a
restart exactly as an uninterrupted run would, the checkpoint holds:

    trainer_state.json       the position (step, epoch, offset into the epoch's shuffled order), the settings
                             that define the run (compared on resume), the loss history so far, the fp16 loss
                             scale, the caller's `run` description (e.g. the LoRA rank, the data file), and the
                             wall time the steps so far took, summed over resumes (not compared: a report)
    trainable.safetensors    the trainable parameters, in the order `train` was given them
    optimizer.safetensors    AdamW's moments (exp_avg, exp_avg_sq) and step count for each of them
    rng.safetensors          the random generators: the data order's, and torch's of every process (dropout)

The learning-rate schedule is a function of the step alone, so the step is its
whole state. Everything is safetensors or JSON (nothing is unpickled). The folder
is replaced as a whole by `io.atomic_save_dir`, so a process killed at any moment
of a save leaves the previous checkpoint or the new one, complete. As a second
guard, every file carries the step and a random token of the save that wrote it
(safetensors metadata, and trainer_state.json's "save"): `load_train_state` refuses
a folder whose files come from different saves, or that lacks one, instead of
resuming from a state that never existed. Only rank 0 writes; every process reads,
so with several machines the folder must be on a file system they share.
"""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from .distributed import Processes, all_gather, comm_device
from .io import (atomic_save_dir, load_tensors, read_json, recover_dir, save_tensors, tensor_metadata,
                 write_json)

__all__ = ["TrainState", "save_train_state", "load_train_state", "read_meta", "check_consistent", "STATE_FILE",
           "FORMAT"]

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE, OPTIMIZER_FILE, RNG_FILE = "trainable.safetensors", "optimizer.safetensors", "rng.safetensors"
FORMAT = "minigpt-train-state/1"
ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")


@dataclass
class TrainState:
    """Where a run is: the next step to take and the data position it starts from.

    data_rng is the data generator's state at the start of `epoch`, before that epoch's
    shuffle: redrawing the shuffle from it gives the same order, and `offset` is where
    the next step's examples begin in it.
    """
    step: int = 0
    epoch: int = 0
    offset: int = 0
    data_rng: Optional[torch.Tensor] = None
    history: list = field(default_factory=list)
    seconds: Optional[float] = 0.0  # wall time of the steps so far, over every resume (None: not recorded)


def _rng_states(device: torch.device, procs: Processes) -> dict[str, torch.Tensor]:
    """torch's generators of every process (gathered to all; rank 0 writes them)."""
    comm = comm_device(device)
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    out = {}
    for name, s in states.items():
        for rank, t in enumerate(all_gather(s.to(comm), procs)):
            out[f"{name}.rank{rank}"] = t.cpu()
    return out


def save_train_state(directory: str | os.PathLike, state: TrainState, *, params: Sequence[torch.Tensor],
                     optimizer: torch.optim.Optimizer, scaler, settings: dict, run: dict, device: torch.device,
                     procs: Processes) -> Path:
    """Write the checkpoint (rank 0; every process must call it, to hand over its random state)."""
    rng = _rng_states(device, procs)
    if not procs.is_main:
        return Path(directory)
    adam = {}
    for i, p in enumerate(params):
        for key, value in optimizer.state.get(p, {}).items():
            adam[f"{i}.{key}"] = value if torch.is_tensor(value) else torch.tensor(float(value))
    meta = {"format": FORMAT, "step": state.step, "epoch": state.epoch, "offset": state.offset,
            "settings": settings, "run": run, "history": state.history, "seconds": state.seconds,
            "shapes": [list(p.shape) for p in params],
            "grad_scaler": scaler.state_dict() if scaler is not None else None,
            "save": secrets.token_hex(8)}
    stamp = {"step": str(state.step), "save": meta["save"]}  # which save wrote each file: see check_consistent
    with atomic_save_dir(directory) as tmp:
        save_tensors({str(i): p for i, p in enumerate(params)}, tmp / WEIGHTS_FILE, metadata=stamp)
        save_tensors(adam, tmp / OPTIMIZER_FILE, metadata=stamp)
        save_tensors({"data": state.data_rng, **rng}, tmp / RNG_FILE, metadata=stamp)
        write_json(meta, tmp / STATE_FILE)
    return Path(directory)


def check_consistent(directory: str | os.PathLike, meta: dict) -> None:
    """Refuse a checkpoint whose files were not all written by the same save, or that lacks one.

    atomic_save_dir makes this impossible for folders it writes; the check catches folders
    put together by hand, copied half-way, or written by an older minigpt.
    """
    d = Path(directory)
    missing = [f for f in (WEIGHTS_FILE, OPTIMIZER_FILE, RNG_FILE) if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(f"incomplete checkpoint: {', '.join(missing)} missing from {d}; resume from a "
                                "complete checkpoint, or start the run again without --resume")
    if "save" not in meta:  # written before the files were stamped: nothing to compare
        return
    stamps = {f: tensor_metadata(d / f) for f in (WEIGHTS_FILE, OPTIMIZER_FILE, RNG_FILE)}
    if any(s.get("save") != meta["save"] for s in stamps.values()):
        parts = [f"{STATE_FILE} step {meta['step']}"] + [
            f"{f} step {s.get('step', '?')}" + ("" if s.get("save") == meta["save"] else f" (save {s.get('save')})")
            for f, s in stamps.items()]
        raise ValueError(f"checkpoint {d} mixes files of different saves: " + "; ".join(parts) + ". Resuming "
                         "would continue from a state that never existed: resume from a complete checkpoint, "
                         "or start the run again without --resume")


def _differences(saved: dict, now: dict) -> list[str]:
    keys = sorted(set(saved) | set(now))
    return [f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in keys if saved.get(k) != now.get(k)]


def read_meta(directory: str | os.PathLike) -> dict:
    """trainer_state.json, with a clear error for a folder that is not a training checkpoint."""
    d = recover_dir(directory, tidy=False)  # after a save killed mid-swap, its complete copy
    if not (d / STATE_FILE).is_file():
        nested = [c for c in ("train_state",) if (d / c / STATE_FILE).is_file()]
        hint = f"; the checkpoint of that run is {d / nested[0]}" if nested else \
            "; it is written by a run given --save-every (into OUT/train_state)"
        raise FileNotFoundError(f"{d} is not a training checkpoint: it has no {STATE_FILE}{hint}")
    meta = read_json(d / STATE_FILE)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{d / STATE_FILE} is not a minigpt training checkpoint (format {FORMAT!r})")
    return meta


def load_train_state(directory: str | os.PathLike, *, params: Sequence[torch.Tensor],
                     optimizer: torch.optim.Optimizer, scaler, settings: dict, run: dict,
                     device: torch.device, procs: Processes) -> TrainState:
    """Put a checkpoint back: parameters, AdamW's state, the random generators; returns the position.

    The run must be the same one: every setting that shapes the steps (batch size,
    accumulation, processes, learning rate and schedule, seed, precision, the number
    of examples) and the caller's `run` description are compared, and any difference
    is named in a ValueError instead of continuing a different run.
    """
    d = recover_dir(directory, tidy=False)
    meta = read_meta(d)
    check_consistent(d, meta)
    diff = _differences(meta["settings"], settings) + _differences(meta.get("run") or {}, run or {})
    if diff:
        raise ValueError(f"{d} is a checkpoint of a different run, so resuming would not continue it exactly: "
                         + "; ".join(diff) + ". Resume with the same command and options")
    shapes = [list(p.shape) for p in params]
    if meta["shapes"] != shapes:
        raise ValueError(f"{d / WEIGHTS_FILE} holds parameters of shapes {meta['shapes']}, this run trains "
                         f"{shapes}; resume with the same model and technique options")
    weights = load_tensors(d / WEIGHTS_FILE)
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(weights[str(i)])
    adam = load_tensors(d / OPTIMIZER_FILE)
    state = {i: {k: adam[f"{i}.{k}"] for k in ADAM_KEYS if f"{i}.{k}" in adam} for i in range(len(params))}
    optimizer.load_state_dict({"state": {i: s for i, s in state.items() if s},
                               "param_groups": optimizer.state_dict()["param_groups"]})
    if scaler is not None and meta.get("grad_scaler"):
        scaler.load_state_dict(meta["grad_scaler"])
    rng = load_tensors(d / RNG_FILE)
    if f"cpu.rank{procs.rank}" in rng:
        torch.set_rng_state(rng[f"cpu.rank{procs.rank}"])
    if device.type == "cuda" and f"cuda.rank{procs.rank}" in rng:
        torch.cuda.set_rng_state(rng[f"cuda.rank{procs.rank}"], device)
    return TrainState(step=meta["step"], epoch=meta["epoch"], offset=meta["offset"], data_rng=rng["data"],
                      history=list(meta["history"]), seconds=meta.get("seconds"))
