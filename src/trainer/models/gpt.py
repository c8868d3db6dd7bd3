"""A decoder-only transformer: GPT-2's architecture at any size, as in nanoGPT.

Pre-LayerNorm blocks, causal self-attention through
`F.scaled_dot_product_attention` (flash kernels on CPU and GPU), a GELU MLP or
a mixture of experts (`model.moe`, see moe.py), learned positions, input and
output embeddings tied, GPT-2 init with the residual projections scaled by
1/sqrt(2 * n_layer). Parameter names are nanoGPT's (`transformer.h.0.attn.c_attn`),
so its checkpoints load with `finetune.init_from`.

`forward(input_ids)` returns the logits (B, T, vocab_size); with experts it
returns a `MoEOutput` whose `aux_loss` (already weighted) the language-modeling
task adds to the loss. `decode(input_ids, cache)` is the incremental forward
that `trainer.generation` samples with.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import ConfigError
from trainer.models.moe import MoEConfig, MoEFeedForward

INIT_STD = 0.02


class MoEOutput(NamedTuple):
    """What a GPT with experts returns (a tuple, so DDP and torch.compile see its tensors)."""

    logits: torch.Tensor  # (B, T, vocab_size)
    aux_loss: torch.Tensor  # load-balancing loss, times model.moe.aux_loss_weight
    expert_fractions: torch.Tensor  # (MoE layers, num_experts): share of routed tokens


class KVCache:
    """Keys and values of the positions decoded so far, preallocated to block_size.

    `length` is a host int, so generation knows where to write without a sync.
    """

    def __init__(
        self, n_layer: int, batch: int, n_head: int, block_size: int, head_dim: int, like: Any
    ) -> None:
        shape = (n_layer, batch, n_head, block_size, head_dim)
        self.keys = torch.empty(shape, dtype=like.dtype, device=like.device)
        self.values = torch.empty(shape, dtype=like.dtype, device=like.device)
        self.length = 0

    def reset(self) -> None:
        self.length = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    ) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)
        causal = mask is None
        if cache is not None:
            keys, values, start = cache
            keys[:, :, start : start + t] = k
            values[:, :, start : start + t] = v
            k, v = keys[:, :, : start + t], values[:, :, : start + t]
            if start > 0:
                # Queries at start..start+t-1 see every cached key up to their own position.
                causal = False
                if t > 1:
                    mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(start)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal and t > 1,
        )
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, t, c)))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(
        self, n_embd: int, n_head: int, dropout: float, bias: bool, moe: MoEConfig | None
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = (
            MLP(n_embd, dropout, bias)
            if moe is None
            else MoEFeedForward(n_embd, moe, bias, dropout)
        )
        self.is_moe = moe is not None

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        x = x + self.attn(self.ln_1(x), mask, cache)
        if not self.is_moe:
            return x + self.mlp(self.ln_2(x)), None
        y, balance_loss, fractions = self.mlp(self.ln_2(x))
        return x + y, (balance_loss, fractions)


class GPT(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        bias: bool = False,
        moe: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_sizes(vocab_size, block_size, n_layer, n_head, n_embd, dropout)
        self.moe = None if moe is None else MoEConfig.from_dict(dict(moe), n_layer)
        self.vocab_size, self.block_size = vocab_size, block_size
        self.n_layer, self.n_head, self.n_embd = n_layer, n_head, n_embd
        every = self.moe.every if self.moe else 0
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(vocab_size, n_embd),
                "wpe": nn.Embedding(block_size, n_embd),
                "drop": nn.Dropout(dropout),
                "h": nn.ModuleList(
                    Block(
                        n_embd,
                        n_head,
                        dropout,
                        bias,
                        self.moe if every and (i + 1) % every == 0 else None,
                    )
                    for i in range(n_layer)
                ),
                "ln_f": nn.LayerNorm(n_embd, bias=bias),
            }
        )
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        # Tied: one matrix embeds tokens and scores them (GPT-2; fewer params, better loss).
        self.lm_head.weight = self.transformer.wte.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02), zero biases, residual projections N(0, 0.02/sqrt(2L)).

        Each block adds two projections to the residual stream; scaling them keeps
        its variance from growing with depth.
        """
        proj_std = INIT_STD / math.sqrt(2 * self.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = proj_std if name.endswith("c_proj") else INIT_STD
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=INIT_STD)
            elif isinstance(module, MoEFeedForward):
                module.init_weights(INIT_STD, proj_std)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()

    def num_params(self, active: bool = False) -> int:
        """Parameters, the tied matrix counted once; `active`: those one token uses
        (top_k of each MoE layer's experts)."""
        total = sum(p.numel() for p in self.parameters())
        if active and self.moe is not None:
            for module in self.modules():
                if isinstance(module, MoEFeedForward):
                    experts = [module.w_fc, module.w_proj, module.fc_bias, module.proj_bias]
                    size = sum(p.numel() for p in experts if p is not None)
                    total -= size * (module.num_experts - module.top_k) // module.num_experts
        return total

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor | MoEOutput:
        """Logits (B, T, vocab_size); `attention_mask` (B, T): 0 marks padding keys.

        Padding is only needed for left-padded batches: with right padding no real
        token attends to a later pad. Positions count from the first column.
        """
        b, t = input_ids.shape
        if t > self.block_size:
            raise ConfigError(
                f"a sequence of {t} tokens is longer than model.block_size={self.block_size}; "
                "use windows of at most block_size tokens"
            )
        mask = None if attention_mask is None else padding_mask(attention_mask)
        x, stats = self._trunk(input_ids, 0, mask, None)
        logits = self.lm_head(x)
        if self.moe is None:
            return logits
        balance = torch.stack([s[0] for s in stats]).mean()
        return MoEOutput(
            logits, self.moe.aux_loss_weight * balance, torch.stack([s[1] for s in stats])
        )

    def new_cache(self, batch: int) -> KVCache:
        return KVCache(
            self.n_layer,
            batch,
            self.n_head,
            self.block_size,
            self.n_embd // self.n_head,
            self.lm_head.weight,
        )

    def decode(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, vocab_size) of the last position, for tokens that follow the
        `cache.length` positions already in `cache`; adds theirs to it."""
        start, t = cache.length, input_ids.shape[1]
        if start + t > self.block_size:
            raise ValueError(
                f"{start} cached + {t} new positions exceed block_size={self.block_size}"
            )
        layers = [(cache.keys[i], cache.values[i], start) for i in range(self.n_layer)]
        x, _ = self._trunk(input_ids, start, None, layers)
        cache.length = start + t
        return self.lm_head(x[:, -1])

    def _trunk(
        self,
        input_ids: torch.Tensor,
        start: int,
        mask: torch.Tensor | None,
        caches: list[tuple[torch.Tensor, torch.Tensor, int]] | None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        t = input_ids.shape[1]
        pos = torch.arange(start, start + t, device=input_ids.device)
        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(pos))
        stats = []
        for i, block in enumerate(self.transformer.h):
            x, block_stats = block(x, mask, None if caches is None else caches[i])
            if block_stats is not None:
                stats.append(block_stats)
        return self.transformer.ln_f(x), stats


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Causal and key-padding mask (B, 1, T, T) for SDPA; True = may attend.

    Each position also sees itself, so a pad query's row is never empty (an empty
    row makes SDPA return NaN).
    """
    t = attention_mask.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device).tril()
    keys = attention_mask.bool()[:, None, None, :]
    eye = torch.eye(t, dtype=torch.bool, device=attention_mask.device)
    return (causal & keys) | eye


def check_sizes(
    vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, dropout: float
) -> None:
    for name, value in (
        ("vocab_size", vocab_size),
        ("block_size", block_size),
        ("n_layer", n_layer),
        ("n_head", n_head),
        ("n_embd", n_embd),
    ):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"model.{name}={value!r} must be a positive integer")
    if n_embd % n_head:
        raise ConfigError(
            f"model.n_embd={n_embd} must be divisible by model.n_head={n_head}: each head "
            f"gets n_embd / n_head dimensions (try n_embd={n_embd // n_head * n_head or n_head})"
        )
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"model.dropout={dropout} must be in [0, 1)")
