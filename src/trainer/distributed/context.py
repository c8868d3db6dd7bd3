"""torch.distributed plumbing: torchrun detection, the process group, collectives.

Two ways in, one process group:
- `torchrun --nproc_per_node=N train.py ...` starts N processes with RANK /
  WORLD_SIZE / MASTER_ADDR set; each joins the group from the environment.
- `trainer.devices=N` without torchrun: the Hydra job spawns N workers with
  torch.multiprocessing and waits for them, so it also works inside
  `python train.py -m ...`, each sweep job with its own workers and port.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from trainer.errors import ConfigError

log = logging.getLogger(__name__)

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()


def launched_by_torchrun() -> bool:
    return all(var in os.environ for var in TORCHRUN_VARS)


def init_process_group(device_type: str, timeout_s: float) -> DistContext:
    """Join the group described by the environment (torchrun's variables)."""
    ctx = DistContext(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ["LOCAL_RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
    )
    if device_type == "cuda":
        if ctx.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {ctx.local_rank} has no GPU: only {torch.cuda.device_count()} are "
                "visible; lower --nproc_per_node or trainer.devices"
            )
        torch.cuda.set_device(ctx.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device_type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return ctx


# What gloo and NCCL say when a peer process died or closed its connections.
_LOST_PEER = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "gloo",
    "NCCL",
)
_SOURCE_PREFIX = re.compile(r"^\[[^\]]*\]\s*")  # gloo's "[.../pair.cc:537] "


def peer_error_line(error: BaseException) -> str:
    """The first line of a lost-peer error, without gloo's source location."""
    text = str(error).strip()
    return _SOURCE_PREFIX.sub("", text.splitlines()[0]) if text else type(error).__name__


def lost_peer(error: BaseException) -> bool:
    """Whether a collective failed because another rank is gone (not a bug here)."""
    return isinstance(error, dist.DistBackendError) or any(s in str(error) for s in _LOST_PEER)


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_min(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_rng_states(state: dict, ctx: DistContext) -> dict | list[dict]:
    """One process: its RNG state. Distributed: the list of every rank's state."""
    if not ctx.enabled:
        return state
    states: list = [None] * ctx.world_size
    dist.all_gather_object(states, state)
    return states
