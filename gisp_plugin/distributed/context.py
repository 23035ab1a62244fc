"""Who this process is in a ``torchrun`` job, and how work is split between ranks.

``torchrun --nproc-per-node N -m gisp_plugin prune ...`` starts N processes with ``RANK``, ``LOCAL_RANK``
and ``WORLD_SIZE`` in their environment; ``init_distributed`` joins them into one process group (NCCL on
GPUs, gloo on CPU). Outside torchrun nothing is initialised and ``current_setup()`` is the single
process: rank 0 of 1. Every method sees the same ``DistributedSetup``, so a method's code is the same
with one rank or many: it calibrates on ``shard_range`` of the data and sums its statistics over ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from gisp_plugin.inputs import InputError

# How long a collective waits for the slowest rank before the job fails (torch's own gloo default). Ranks
# wait for each other only while they compute (rank 0 writes and evaluates after the group is left), so this
# bounds a hang, not a legitimately long step; a rank that dies is noticed at once by gloo and by torchrun.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class DistributedSetup:
    """This process's place in the job. ``fsdp``: decoder layers are sharded with FSDP2 ``fully_shard``."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None
    fsdp: bool = False

    @property
    def enabled(self) -> bool:
        """Whether collectives are needed (more than one rank)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes outputs and prints results."""
        return self.rank == 0

    def record(self) -> dict[str, Any]:
        """What ``pruning.json`` says of the setup."""
        return {"world_size": self.world_size, "backend": self.backend, "fsdp": self.fsdp}


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher setting its variables)."""
    return all(name in os.environ for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def launch_rank() -> int:
    """This process's rank as the launcher set it (0 outside torchrun); known before the group is joined."""
    return int(os.environ["RANK"]) if launched_by_torchrun() else 0


def is_main_process() -> bool:
    """Whether this process is rank 0 (or alone): the one that logs, shows progress and writes."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return launch_rank() == 0


def launch_setup() -> DistributedSetup:
    """The setup the launcher's environment describes, before ``init_distributed`` joins the group:
    enough to choose this rank's device and to check the data split before the model is loaded."""
    if not launched_by_torchrun():
        return DistributedSetup()
    return DistributedSetup(int(os.environ["WORLD_SIZE"]), launch_rank(), int(os.environ["LOCAL_RANK"]))


def current_setup(fsdp: bool = False) -> DistributedSetup:
    """The setup of the initialised process group, or the single process when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistributedSetup(fsdp=fsdp)
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return DistributedSetup(dist.get_world_size(), dist.get_rank(), local_rank, dist.get_backend(), fsdp)


def backend_for(device: str) -> str:
    """NCCL for CUDA devices, gloo for everything else."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_distributed(device: str, fsdp: bool = False) -> DistributedSetup:
    """Join the ``torchrun`` process group when launched by it (idempotent); otherwise the single process.

    On CUDA each rank takes the GPU ``LOCAL_RANK``. The returned setup's ``device`` choice is the
    caller's: ``device_for(setup, device)``.
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        if fsdp:
            raise InputError("--fsdp shards the model across ranks: launch with torchrun --nproc-per-node N (N >= 2)")
        return DistributedSetup()
    if not dist.is_initialized():
        backend = backend_for(device)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    return current_setup(fsdp)


def leave_distributed() -> None:
    """Wait for every rank, then leave the process group (idempotent; nothing outside torchrun).

    Called once the collective work is done, so rank 0 can go on alone (write, evaluate) while the
    other ranks exit: none of them waits on rank 0's writing, however long it takes.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def device_for(setup: DistributedSetup, device: str) -> str:
    """The device this rank computes on: ``cuda:LOCAL_RANK`` for a bare ``cuda`` under torchrun.

    A numbered GPU (``cuda:0``) would put every rank of a node on that one GPU: refused, naming ``cuda``.
    """
    if setup.enabled and device == "cuda":
        return f"cuda:{setup.local_rank}"
    if setup.enabled and device.startswith("cuda:") and int(os.environ.get("LOCAL_WORLD_SIZE", setup.world_size)) > 1:
        raise InputError(
            f"--device {device} would put every rank of this node on one GPU; give --device cuda "
            "(each rank takes cuda:LOCAL_RANK), and choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    return device


def check_split(given: str, n_samples: int, world_size: int) -> None:
    """Every rank needs at least one calibration sequence: checked before any model loads, by ``gisp prune``
    and ``gisp compare`` alike (``given`` names the count as the user gave it: ``--n-samples 3``, ``n_samples=3``)."""
    if world_size > n_samples:
        raise InputError(
            f"{given} cannot be split across {world_size} ranks; give at least {world_size} calibration samples, or fewer ranks"
        )


def shard_range(n: int, setup: DistributedSetup) -> range:
    """This rank's contiguous share of ``n`` items, in order: rank r takes ``[n*r//W, n*(r+1)//W)``.

    Contiguous and in rank order, so concatenating the ranks' shards gives the whole set in its own
    order (order-dependent statistics can be rebuilt exactly).
    """
    if setup.world_size > n:
        raise InputError(
            f"{n} calibration samples cannot be split across {setup.world_size} ranks; give at least {setup.world_size}"
        )
    return range(n * setup.rank // setup.world_size, n * (setup.rank + 1) // setup.world_size)
