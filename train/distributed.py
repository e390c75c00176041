"""Several training processes under torchrun: DistributedDataParallel, gloo on CPUs, NCCL on GPUs.

    torchrun --nproc-per-node 2 -m scl.train.finetune_cli --base-model base --data train.h5ad --out run

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without them (plain `scl-train`) there is one process and nothing here
changes what it computes. Every process draws the same batch order from the run's seed; each reads and trains on its
share of every batch and DDP averages the gradients, so a step is one process's step on the whole batch up to the
order of floating-point sums (cross-entropy and reconstruction are means over equal shares; triplets are mined within
each share). Passes over every cell (keying them, embedding the validation cells) are split between the processes
(split_work); the probe is fitted on rank 0 and sent to all (on_main); rank 0's decision to stop is broadcast; and
everything after training (the head, calibration, the run folder) happens on rank 0 alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from scl.runtime.errors import SclError

TIMEOUT = timedelta(minutes=30)  # the longest one process may wait for the others at a collective (rank 0 fitting the probe, say)


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes; Processes() is the single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where this process trains, and collectives' tensors live (NCCL: CUDA only)

    @property
    def several(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, index):
        """This process's part of a batch every process drew alike."""
        return index[self.rank :: self.world_size] if self.several else index

    def own_generator(self, shared: torch.Generator, seed: int) -> torch.Generator:
        """The generator for what each process draws for itself (triplet mining draws as many numbers as its share
        asks for): on several processes one of its own, so that `shared` (the batch order) stays in step on all."""
        return torch.Generator().manual_seed(seed + 1 + self.rank) if self.several else shared

    def refuse_small_batches(self, batch_size: int) -> None:
        if self.several and batch_size < 2 * self.world_size:
            raise SclError(f"--batch-size {batch_size} on {self.world_size} processes leaves fewer than 2 cells a process per step; "
                           f"give --batch-size {2 * self.world_size} or more.")

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        if not self.several:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def agree(self, flag: bool) -> bool:
        """Rank 0's flag on every process (whether to stop: all must leave the loop at the same step)."""
        if not self.several:
            return flag
        tensor = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())

    def average(self, values: np.ndarray) -> np.ndarray:
        """The mean over the processes of each one's `values` (an epoch's mean losses: the whole batches' then)."""
        if not self.several:
            return values
        tensor = torch.tensor(np.asarray(values, dtype=np.float64), device=self.device)
        dist.all_reduce(tensor)
        return tensor.cpu().numpy() / self.world_size

    def split_work(self, n: int, compute) -> np.ndarray:
        """compute(start, stop) over rows 0..n-1, each process doing one contiguous part and every process receiving
        the whole, in row order: a pass over every cell (keying the cells, embedding the validation cells) costs each
        process its share of it."""
        if not self.several:
            return compute(0, n)
        bounds = np.linspace(0, n, self.world_size + 1).astype(int)
        parts = [None] * self.world_size
        dist.all_gather_object(parts, compute(int(bounds[self.rank]), int(bounds[self.rank + 1])))
        return np.concatenate(parts)

    def on_main(self, compute):
        """compute() on rank 0 alone, its result sent to every process (the probe the training head starts from:
        fitted once)."""
        if not self.several:
            return compute()
        box = [compute() if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def describe(self) -> dict:
        return {"processes": self.world_size, "backend": dist.get_backend() if self.several else None}


@contextlib.contextmanager
def training_processes(device: torch.device, batch_size: int):
    """This process among those torchrun started (or the single one: Processes(device=device)), joined to the others
    for the block and parted from them after it, whatever happens; a batch too small to share is refused first."""
    processes = _join(device)
    try:
        processes.refuse_small_batches(batch_size)
        yield processes
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _join(device: torch.device) -> Processes:
    """Join the process group torchrun set up (one process: nothing to join), on this process's GPU when training on CUDA."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if rank:  # rank 0 says it once
        logging.getLogger("scl").setLevel(logging.ERROR)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise SclError(f"--nproc-per-node asks for {world_size} processes on this machine but torch sees {torch.cuda.device_count()} GPU(s); "
                           "start at most one process per GPU.")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return Processes(rank, world_size, local_rank, device)


@contextlib.contextmanager
def lost_peers(processes: Processes):
    """A collective that fails because another process died becomes one line (torchrun's summary names that process)."""
    try:
        yield
    except RuntimeError as err:
        if not processes.several:
            raise
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise SclError(f"training process {processes.rank} of {processes.world_size}: another process stopped mid-step ({first}); "
                       "no run folder was written. torchrun's summary names the process that failed; start the run again.") from None
