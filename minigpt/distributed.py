"""Training on several processes with torch.distributed: the one home of it.

`torchrun` starts N copies of a command and tells each who it is through the
environment: RANK (0 .. N-1 over every machine), WORLD_SIZE (N) and LOCAL_RANK
(the process's index on its own machine, which picks its GPU). Data-parallel
training then needs only four ideas, and `minigpt.train` uses each of them
from here:

1. Every process holds the same trainable parameters. DDP broadcasts rank 0's
   values when it wraps them, so a random initialisation cannot drift apart.
2. Each process computes the loss on its own shard of every batch.
3. After backward, the gradients are averaged over the processes (an
   all-reduce), so every process takes the same optimizer step. DDP does this
   in buckets while backward is still running; `no_sync()` skips it on the
   micro-batches of an accumulation that are not the last.
4. Numbers everyone must agree on (the loss to report, the token count that
   normalises the loss, the eval loss) are summed with `all_reduce_sum`.

Rank 0 alone prints, draws progress bars and saves. A process that fails ends
the run: torchrun stops the others, and a process waiting on a collective with
a dead peer raises `PeerFailed`, one line that says so, instead of hanging.

Backends: `nccl` on CUDA, `gloo` on CPU. DDP wraps only the trainable
parameters (the frozen model is loaded from the same files by every process),
and gets no `device_ids` on CPU. Without torchrun (no WORLD_SIZE, or 1)
nothing here does anything: one process, no process group.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["Processes", "processes", "setup", "teardown", "all_reduce_sum", "all_gather", "barrier", "PeerFailed",
           "collective", "LossModule", "wrap", "comm_device"]

# How long a collective waits for a silent peer before giving up (a peer that dies is noticed at once).
TIMEOUT = datetime.timedelta(minutes=30)


class PeerFailed(ConnectionError):
    """Another process of this run stopped; this one stops too (its own error is in that process's output)."""


@dataclass(frozen=True)
class Processes:
    """Who this process is in the run: rank, world_size, local_rank (1 process: 0, 1, 0)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints and saves."""
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"the environment variable {name}={text!r} is not a whole number; torchrun sets it, "
                         "so unset it when starting one process by hand") from None


def processes() -> Processes:
    """This process's place in the run, from torchrun's environment variables (none: one process)."""
    world = _env_int("WORLD_SIZE", 1)
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world} do not describe a process of the run "
                         "(0 <= RANK < WORLD_SIZE); start several processes with torchrun")
    return Processes(rank, world, local)


def setup(device: torch.device) -> Processes:
    """Join the process group once, when torchrun started several processes; returns who we are.

    The backend follows the device: nccl for CUDA (each process on cuda:LOCAL_RANK), gloo for CPU.
    """
    procs = processes()
    if not procs.several or dist.is_initialized():
        return procs
    if device.type == "cuda":
        torch.cuda.set_device(device.index if device.index is not None else procs.local_rank)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"multi-process training runs on cuda (nccl) or cpu (gloo), not {device.type}; "
                         "pass --device cpu or cuda")
    dist.init_process_group(backend, timeout=TIMEOUT)
    return procs


def teardown() -> None:
    """Leave the process group (at the end of a command), if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Run a step that talks to the other processes; a dead peer becomes PeerFailed, one clear line."""
    try:
        yield
    except RuntimeError as e:
        if not (dist.is_available() and dist.is_initialized()):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PeerFailed(f"process {dist.get_rank()} of {dist.get_world_size()} lost contact with the others "
                         f"during {what} ({first[:200]}); another process probably failed: its error is in its "
                         "output above") from None


def comm_device(device: torch.device) -> torch.device:
    """Where tensors for collectives must be: the GPU for nccl, the CPU for gloo."""
    return device if device.type == "cuda" else torch.device("cpu")


def all_reduce_sum(t: torch.Tensor, procs: Processes) -> torch.Tensor:
    """The sum of `t` over every process (in place, and returned); `t` itself for one process."""
    if procs.several:
        with collective("an all-reduce"):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather(t: torch.Tensor, procs: Processes) -> list[torch.Tensor]:
    """[t of rank 0, t of rank 1, ...]; every process gives a tensor of the same shape."""
    if not procs.several:
        return [t]
    out = [torch.empty_like(t) for _ in range(procs.world_size)]
    with collective("an all-gather"):
        dist.all_gather(out, t)
    return out


def barrier(procs: Processes) -> None:
    if procs.several:
        with collective("a barrier"):
            dist.barrier()


class LossModule(nn.Module):
    """What DDP wraps: the trainable parameters, and the loss function as the forward pass.

    DDP needs a module whose forward it calls (that is where it arms its gradient
    hooks); the training loop only has parameters and a loss function. Holding the
    parameters here (the same tensors, not copies) lets DDP broadcast and average
    exactly them, and nothing of the frozen model.
    """

    def __init__(self, params: Sequence[nn.Parameter], loss_fn: Callable):
        super().__init__()
        self.params = nn.ParameterList(params)
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(batch)


def wrap(module: LossModule, device: torch.device, procs: Processes) -> nn.Module:
    """DDP around `module` for several processes (rank 0's parameter values broadcast to all); itself for one."""
    if not procs.several:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP
    with collective("DDP's start (broadcasting rank 0's parameters)"):
        if device.type == "cuda":
            return DDP(module, device_ids=[device.index if device.index is not None else procs.local_rank])
        return DDP(module)  # CPU: no device_ids

