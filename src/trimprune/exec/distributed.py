"""The process group of a data-parallel run started by `torchrun` (NCCL on GPUs, gloo on CPU).

`torchrun --nproc-per-node N -m trimprune prune ...` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous address in their environment; `init_from_env` joins them. What the
ranks then share is in `core.ranks`. When a rank fails it exits with its error and `torchrun` stops
the others (its default: no restarts), so no rank waits for a collective that never comes.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from trimprune.errors import TrimpruneError

# a collective waits this long for the slowest rank (rank 0 alone runs the zero-shot tasks)
TIMEOUT = timedelta(minutes=int(os.environ.get("TRIMPRUNE_DIST_TIMEOUT_MINUTES", "120")))


def launched() -> bool:
    """Whether this process is one of several started by torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group; returns this rank's device (cuda:LOCAL_RANK on GPUs)."""
    if dist.is_initialized():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index not in (None, local):
            raise TrimpruneError(
                f"--device {device} with torchrun: leave --device out or give cuda; each process "
                "uses the GPU of its LOCAL_RANK"
            )
        if local >= torch.cuda.device_count():
            raise TrimpruneError(
                f"LOCAL_RANK {local} but {torch.cuda.device_count()} GPUs: start at most "
                f"{torch.cuda.device_count()} processes per node (--nproc-per-node)"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    return device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
