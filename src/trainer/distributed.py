"""torch.distributed plumbing: torchrun detection, in-process spawning, rank-0 helpers.

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
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from trainer.errors import ConfigError, UserError

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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker: Callable[..., None], nprocs: int, args: tuple) -> None:
    """Run `worker(*args)` in `nprocs` fresh processes joined as one group.

    Each call gets its own port, so consecutive sweep jobs never collide; the
    call returns only after every worker has exited, and if one fails the
    others are terminated and the failure is raised here: a worker's UserError
    comes back as the same one-line UserError.
    """
    import torch.multiprocessing as mp

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    errors = mp.get_context("spawn").SimpleQueue()
    try:
        mp.start_processes(
            _worker_entry,
            args=(worker, nprocs, env, errors, args),
            nprocs=nprocs,
            join=True,
            start_method="spawn",
        )
    except mp.ProcessExitedException as e:
        signal_name = getattr(e, "signal_name", None)
        # A killed rank is the news; the survivors' "peer is gone" errors are consequences.
        if not signal_name and not errors.empty():
            raise UserError(errors.get()) from None
        how = f"was killed by {signal_name}" if signal_name else f"exited with code {e.exit_code}"
        raise UserError(
            f"distributed worker rank {e.error_index} {how}; the other workers were stopped"
        ) from None
    except mp.ProcessRaisedException as e:
        raise RuntimeError(f"a distributed worker failed:\n{e}") from None
    finally:
        errors.close()


def _worker_entry(
    rank: int, worker: Callable, nprocs: int, env: dict, errors: Any, args: tuple
) -> None:
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nprocs)})
    try:
        worker(*args)
    except UserError as e:
        errors.put(str(e))
        sys.exit(2)


def configure_worker_logging(log_file: str | None, is_main: bool) -> None:
    """Spawned workers start without Hydra's logging: rank 0 logs like the job did."""
    root = logging.getLogger()
    root.handlers.clear()
    fmt = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if is_main and log_file:
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(fmt)
        root.addHandler(file_handler)
    root.setLevel(logging.INFO if is_main else logging.WARNING)
