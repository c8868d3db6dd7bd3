"""A mixture-of-experts feed-forward layer (Switch / GShard style) for `trainer.models.gpt`.

A router picks `top_k` of `num_experts` GELU MLPs per token; the layer's output
is their gate-weighted sum. The experts' weights are stacked into (E, ...)
tensors and computed per expert on the tokens routed to it, never per token in
Python. Two ways to batch them:

- dropless (`capacity_factor: null`, the default): tokens are sorted by expert
  and each expert runs one matmul on its contiguous slice. Every token is
  computed; the slice sizes are read back to the host once per layer (free on a
  CPU, a sync on a GPU).
- capacity (`capacity_factor: 1.25`, training only): each expert takes at most
  `ceil(capacity_factor * tokens * top_k / num_experts)` tokens, all experts run
  as one batched matmul on fixed shapes (no host sync, torch.compile friendly);
  the overflow is dropped (its residual stream passes through unchanged). First
  choices take places before second choices, as in GShard. Evaluation and
  generation always run dropless, so a token's output never depends on its batch.

The load-balancing loss is Switch Transformer's `E * sum_i f_i * P_i` (f_i: the
share of routed slots that went to expert i, P_i: the mean router probability
of expert i): 1.0 when the load is uniform, up to E when one expert takes all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from trainer.error_messages import did_you_mean
from trainer.errors import ConfigError


@dataclass(frozen=True)
class MoEConfig:
    """`model.moe`: the mixture-of-experts settings (null in `model.moe` = a dense model)."""

    num_experts: int = 4
    top_k: int = 1
    # MoE feed-forward in every `every`-th block (blocks every-1, 2*every-1, ...); 1 = all.
    every: int = 1
    # Weight of the load-balancing loss added to the training loss (0 turns it off).
    aux_loss_weight: float = 0.01
    # null: dropless; a number: fixed expert capacity while training (see module docstring).
    capacity_factor: float | None = None
    # Hidden width of each expert; null: 4 * n_embd / top_k, so a token uses as many
    # feed-forward parameters as in the dense model (4 * n_embd: each expert as wide).
    hidden: int | None = None

    @classmethod
    def from_dict(cls, values: dict, n_layer: int) -> MoEConfig:
        known = [f.name for f in fields(cls)]
        for key in values:
            if key not in known:
                hint = did_you_mean(f"model.moe.{key}", [f"model.moe.{k}" for k in known])
                raise ConfigError(
                    f"unknown config key model.moe.{key}"
                    f"{hint or '; model.moe has: ' + ', '.join(known)}"
                )
        config = cls(**values)
        config.check(n_layer)
        return config

    def check(self, n_layer: int) -> None:
        if self.num_experts < 1:
            raise ConfigError(f"model.moe.num_experts={self.num_experts} must be >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(
                f"model.moe.top_k={self.top_k} must be between 1 and model.moe.num_experts="
                f"{self.num_experts}: each token goes to top_k different experts"
            )
        if not 1 <= self.every <= n_layer:
            raise ConfigError(
                f"model.moe.every={self.every} must be between 1 and model.n_layer={n_layer}, "
                "or no block would get experts"
            )
        if self.aux_loss_weight < 0:
            raise ConfigError(f"model.moe.aux_loss_weight={self.aux_loss_weight} must be >= 0")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ConfigError(
                f"model.moe.capacity_factor={self.capacity_factor} must be > 0, "
                "or null for dropless experts"
            )
        if self.hidden is not None and self.hidden < 1:
            raise ConfigError(f"model.moe.hidden={self.hidden} must be >= 1")


class MoEFeedForward(nn.Module):
    """`forward(x) -> (y, balance_loss, expert_fractions)`; x and y are (B, T, C).

    `balance_loss` is unweighted; `expert_fractions` (num_experts,) is the share
    of routed slots each expert got in this forward (detached).
    """

    def __init__(self, n_embd: int, config: MoEConfig, bias: bool, dropout: float) -> None:
        super().__init__()
        experts = config.num_experts
        hidden = config.hidden or max(1, 4 * n_embd // config.top_k)
        self.num_experts, self.top_k = experts, config.top_k
        self.capacity_factor = config.capacity_factor
        self.router = nn.Linear(n_embd, experts, bias=False)
        self.w_fc = nn.Parameter(torch.empty(experts, n_embd, hidden))
        self.w_proj = nn.Parameter(torch.empty(experts, hidden, n_embd))
        self.fc_bias = nn.Parameter(torch.zeros(experts, hidden)) if bias else None
        self.proj_bias = nn.Parameter(torch.zeros(experts, n_embd)) if bias else None
        self.dropout = nn.Dropout(dropout)

    def init_weights(self, std: float, proj_std: float) -> None:
        nn.init.normal_(self.router.weight, std=std)
        nn.init.normal_(self.w_fc, std=std)
        nn.init.normal_(self.w_proj, std=proj_std)
        for bias in (self.fc_bias, self.proj_bias):
            if bias is not None:
                nn.init.zeros_(bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        # Routing in fp32 under autocast: bf16 probabilities tie and flip the top-k.
        probs = F.softmax(self.router(x).float(), dim=-1)
        gates, experts = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            # With one expert the raw probability stays the gate, so the task loss trains the
            # router (Switch); with several, the chosen ones share the token (Mixtral).
            gates = gates / gates.sum(dim=-1, keepdim=True)
        gates = gates.to(x.dtype)
        counts = torch.bincount(experts.reshape(-1), minlength=self.num_experts)
        fractions = counts.to(probs.dtype) / experts.numel()
        balance_loss = self.num_experts * (fractions * probs.mean(dim=0)).sum()
        if self.training and self.capacity_factor is not None:
            y = self._with_capacity(x, gates, experts)
        else:
            y = self._dropless(x, gates, experts, counts)
        return self.dropout(y.reshape(shape)), balance_loss, fractions.detach()

    def _expert(self, e: int, h: torch.Tensor) -> torch.Tensor:
        h = (
            h @ self.w_fc[e]
            if self.fc_bias is None
            else torch.addmm(self.fc_bias[e], h, self.w_fc[e])
        )
        h = F.gelu(h)
        return (
            h @ self.w_proj[e]
            if self.proj_bias is None
            else torch.addmm(self.proj_bias[e], h, self.w_proj[e])
        )

    def _dropless(
        self, x: torch.Tensor, gates: torch.Tensor, experts: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        n, c = x.shape
        k = self.top_k
        order = experts.reshape(-1).argsort(stable=True)
        # Each token's k copies by expansion, not by indexing with repeats: the backward
        # then sums them in a fixed order (index_add with repeats is atomic on CUDA).
        routed = x.unsqueeze(1).expand(n, k, c).reshape(n * k, c).index_select(0, order)
        chunks = routed.split(counts.tolist())
        out = torch.cat([self._expert(e, chunk) for e, chunk in enumerate(chunks)])
        # Back to (token, slot) order through the inverse permutation: a gather, no atomics.
        out = out.index_select(0, order.argsort()) * gates.reshape(-1, 1)
        return out.view(n, k, c).sum(dim=1)

    def _with_capacity(
        self, x: torch.Tensor, gates: torch.Tensor, experts: torch.Tensor
    ) -> torch.Tensor:
        n, c = x.shape
        k, num = self.top_k, self.num_experts
        capacity = max(1, math.ceil(self.capacity_factor * n * k / num))
        # Slot-major order: every token's first choice is placed before any second choice.
        flat_experts = experts.t().reshape(-1)
        onehot = F.one_hot(flat_experts, num)
        position = (onehot.cumsum(dim=0) * onehot).sum(dim=1) - 1
        kept = position < capacity
        # Dropped slots all write to one spare row, which is never read back.
        slot = torch.where(kept, flat_experts * capacity + position, num * capacity)
        routed = x.unsqueeze(0).expand(k, n, c).reshape(k * n, c)
        buffer = x.new_zeros(num * capacity + 1, c).index_put((slot,), routed)
        h = buffer[:-1].view(num, capacity, c)
        h = (
            torch.bmm(h, self.w_fc)
            if self.fc_bias is None
            else torch.baddbmm(self.fc_bias.unsqueeze(1), h, self.w_fc)
        )
        h = F.gelu(h)
        h = (
            torch.bmm(h, self.w_proj)
            if self.proj_bias is None
            else torch.baddbmm(self.proj_bias.unsqueeze(1), h, self.w_proj)
        )
        h = torch.cat([h.reshape(num * capacity, c), h.new_zeros(1, c)])
        weight = (gates.t().reshape(-1) * kept).unsqueeze(1)
        return (h.index_select(0, slot) * weight).view(k, n, c).sum(dim=0)
