"""How the model is spread over ranks: one process, DDP, or FSDP (`trainer.strategy`).

A strategy wraps the model before the optimizer is built (FSDP replaces
parameters with shards), turns gradient sync off for accumulation
micro-steps, and converts model/optimizer state to and from the plain,
unwrapped form that checkpoints hold, so a checkpoint loads under any strategy.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from trainer.checkpoint.io import check_state_fits, load_model_state, unwrapped_state_dict
from trainer.distributed.context import SINGLE, DistContext


class SingleProcess:
    name = "single"

    def __init__(self, ctx: DistContext = SINGLE) -> None:
        self.ctx = ctx
        self.wrapped: nn.Module | None = None  # what attach() made of the model

    def attach(self, model: nn.Module) -> nn.Module:
        """Wrap `model` for this strategy and keep the result: the strategy owns it."""
        self.wrapped = self.wrap(model)
        return self.wrapped

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def grad_sync(self, wrapped: nn.Module, stepping: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return unwrapped_state_dict(model.state_dict())

    def load_model(self, model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
        load_model_state(model, state, source)

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict):
        optimizer.load_state_dict(state)


class DDP(SingleProcess):
    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def grad_sync(self, wrapped: nn.Module, stepping: bool) -> contextlib.AbstractContextManager:
        # Accumulating micro-batches skip the gradient all-reduce; the stepping one syncs.
        return contextlib.nullcontext() if stepping else wrapped.no_sync()


class FSDP(SingleProcess):
    """FSDP2 (`fully_shard`): every Linear/Conv layer is a shard unit, then the root.

    Checkpoints hold full (gathered) state through torch.distributed.checkpoint's
    state-dict API, so they load in a single process too.
    """

    name = "fsdp"

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
                fully_shard(module)
        fully_shard(model)
        return model

    def grad_sync(self, wrapped: nn.Module, stepping: bool) -> contextlib.AbstractContextManager:
        wrapped.set_requires_gradient_sync(stepping)
        return contextlib.nullcontext()

    @staticmethod
    def _options(**kwargs: Any):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, **kwargs)

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=self._options(cpu_offload=True))

    def load_model(self, model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        state = unwrapped_state_dict(state)
        # Sharded parameters are DTensors whose .shape is the full shape: check before loading.
        check_state_fits(unwrapped_state_dict(model.state_dict()), state, source)
        set_model_state_dict(model, state, options=self._options(broadcast_from_rank0=False))

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=self._options(cpu_offload=True))

    def load_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict):
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=self._options())


def make_strategy(name: str, ctx: DistContext) -> SingleProcess:
    """`name` was checked with the config (validation.py)."""
    if not ctx.enabled:
        return SingleProcess(ctx)
    return {"ddp": DDP, "fsdp": FSDP}[name](ctx)
