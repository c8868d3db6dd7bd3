"""LoRA: a trainable low-rank update `scaling * B @ A` added to a frozen Linear or Conv2d.

Our own small implementation rather than peft: peft pulls in transformers and
targets its model classes, while this needs two layer types and a merge.

An adapted layer keeps the original `weight` and `bias` parameters under the
same names, so `features.0.weight` is still `features.0.weight`, and adds
`lora_A` and `lora_B`. B starts at zero: before training the adapted model
computes exactly what the pre-trained one did. `merge_lora` folds the update
into plain layers for export.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from trainer.errors import ConfigError
from trainer.patterns import check_all_match, matches_any


class _LoRABase(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        # The same Parameter objects as the base layer: frozen, and loaded/saved by name.
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Without dropout, adding B @ A to the weight first is the same function and
        # cheaper whenever the input has more rows (samples x positions) than the
        # update costs; with dropout the adapter path needs its own input.
        if isinstance(self.dropout, nn.Identity) or not self.training:
            if self._rows(x) * (self._fan_in + self._fan_out) >= self.weight.numel():
                return self._base_op(x, self.weight + self.delta_weight(), self.bias)
        return self._base_op(x, self.weight, self.bias) + self._adapter(self.dropout(x))

    def _init_adapters(self) -> None:
        # As in the LoRA paper: A like a fresh layer, B zero so the update starts at 0.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"

    def _with_merged_weights(self, layer: nn.Module) -> nn.Module:
        """`layer` (a plain copy of the base) given the base weight plus the adapters' update."""
        with torch.no_grad():
            layer.weight.copy_(self.weight + self.delta_weight())
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer


class LoRALinear(_LoRABase):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__(base, rank, alpha, dropout)
        self.in_features, self.out_features = base.in_features, base.out_features
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, **factory))
        self._init_adapters()
        self._fan_in, self._fan_out = self.in_features, self.out_features

    def _rows(self, x: torch.Tensor) -> int:
        return x.numel() // self.in_features

    def _base_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        return F.linear(x, weight, bias)

    def _adapter(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def merged(self) -> nn.Linear:
        layer = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        return self._with_merged_weights(layer)


class LoRAConv2d(_LoRABase):
    """A is a conv with the base's kernel, stride and padding into `rank` channels;
    B a 1x1 conv back out. Both are linear, so B(A(x)) = conv(x, B @ A) exactly."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, dropout: float) -> None:
        if base.groups != 1 or base.padding_mode != "zeros":
            raise ConfigError(
                "finetune.lora supports Conv2d layers with groups=1 and zero padding only; "
                "leave grouped or non-zero-padded convs out of finetune.lora.targets"
            )
        super().__init__(base, rank, alpha, dropout)
        self.in_channels, self.out_channels = base.in_channels, base.out_channels
        self.kernel_size, self.stride = base.kernel_size, base.stride
        self.padding, self.dilation = base.padding, base.dilation
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(
            torch.empty(rank, self.in_channels, *self.kernel_size, **factory)
        )
        self.lora_B = nn.Parameter(torch.empty(self.out_channels, rank, 1, 1, **factory))
        self._init_adapters()
        self._fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        self._fan_out = self.out_channels

    def _rows(self, x: torch.Tensor) -> int:
        return x.numel() // self.in_channels  # one row per sample and position

    def _base_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)

    def _adapter(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self._base_op(x, self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        a = self.lora_A.flatten(1)  # rank x (in * kh * kw)
        b = self.lora_B.flatten(1)  # out x rank
        return (b @ a).view_as(self.weight) * self.scaling

    def merged(self) -> nn.Conv2d:
        layer = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        return self._with_merged_weights(layer)


LORA_LAYERS = {nn.Linear: LoRALinear, nn.Conv2d: LoRAConv2d}


def apply_lora(
    model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float
) -> list[str]:
    """Wrap every Linear/Conv2d whose module name matches `targets`; returns their names."""
    if rank < 1:
        raise ConfigError(f"finetune.lora.rank={rank} must be >= 1")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"finetune.lora.dropout={dropout} must be in [0, 1)")
    # Exact types: subclasses such as MultiheadAttention's out_proj are read as raw
    # weights by their parent, so a wrapper there would silently do nothing.
    adaptable = [
        name for name, module in model.named_modules() if type(module) in LORA_LAYERS and name
    ]
    check_all_match(targets, adaptable, "Linear or Conv2d layer", "finetune.lora.targets")
    chosen = [name for name in adaptable if matches_any(name, targets)]
    for name in chosen:
        base = model.get_submodule(name)
        _replace(model, name, LORA_LAYERS[type(base)](base, rank, alpha, dropout))
    return chosen


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [
        p
        for module in model.modules()
        if isinstance(module, _LoRABase)
        for p in (module.lora_A, module.lora_B)
    ]


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every adapted layer by a plain one holding `weight + scaling * B @ A`."""
    names = [name for name, module in model.named_modules() if isinstance(module, _LoRABase)]
    for name in names:
        _replace(model, name, model.get_submodule(name).merged())
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
