"""Mixture of experts: batched routing equals a per-token reference; the balance loss works."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.models.gpt import GPT, MoEOutput
from trainer.models.moe import MoEConfig, MoEFeedForward


def layer(top_k: int = 2, experts: int = 4, bias: bool = True, **kwargs) -> MoEFeedForward:
    torch.manual_seed(0)
    config = MoEConfig(num_experts=experts, top_k=top_k, **kwargs)
    moe = MoEFeedForward(16, config, bias=bias, dropout=0.0)
    moe.init_weights(0.3, 0.3)
    for b in (moe.fc_bias, moe.proj_bias):
        if b is not None:
            torch.nn.init.normal_(b, std=0.3)
    return moe


def per_token(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """The definition, one token and one expert at a time."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(flat)
    probs = F.softmax(moe.router(flat), dim=-1)
    for n in range(flat.shape[0]):
        gates, chosen = probs[n].topk(moe.top_k)
        if moe.top_k > 1:
            gates = gates / gates.sum()
        for gate, e in zip(gates, chosen.tolist(), strict=True):
            h = F.gelu(flat[n] @ moe.w_fc[e] + moe.fc_bias[e])
            out[n] += gate * (h @ moe.w_proj[e] + moe.proj_bias[e])
    return out.view_as(x)


@pytest.mark.parametrize("top_k", [1, 2])
def test_batched_experts_equal_the_per_token_definition(top_k: int) -> None:
    moe = layer(top_k)
    x = torch.randn(3, 10, 16)
    expected = per_token(moe, x)
    y, _, fractions = moe(x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert fractions.sum().item() == pytest.approx(1.0)
    # With room for every token, fixed capacity computes the same, gradients included.
    roomy = layer(top_k, capacity_factor=4 / top_k)
    roomy.load_state_dict(moe.state_dict())
    x.requires_grad_(True)
    moe(x)[0].square().sum().backward()
    y_cap, _, _ = roomy(x.detach().requires_grad_(True))
    torch.testing.assert_close(y_cap, expected, rtol=1e-5, atol=1e-5)
    y_cap.square().sum().backward()
    for a, b in zip(moe.parameters(), roomy.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_capacity_drops_the_overflow_first_choices_first() -> None:
    moe = layer(top_k=2, experts=3, capacity_factor=0.75)
    x = torch.randn(1, 12, 16)
    y, _, _ = moe(x)
    # The rule, one slot at a time: 0.75 * 12 tokens * 2 / 3 experts = 6 places per expert;
    # every token's first choice takes a place before any second choice does.
    probs = F.softmax(moe.router(x[0]), dim=-1)
    gates, chosen = probs.topk(2)
    gates = gates / gates.sum(-1, keepdim=True)
    expected, taken, dropped = torch.zeros(12, 16), [0, 0, 0], 0
    for k in range(2):
        for n in range(12):
            e = chosen[n, k].item()
            if taken[e] == 6:
                dropped += 1
                continue
            taken[e] += 1
            h = F.gelu(x[0, n] @ moe.w_fc[e] + moe.fc_bias[e]) @ moe.w_proj[e] + moe.proj_bias[e]
            expected[n] += gates[n, k] * h
    assert dropped > 0
    torch.testing.assert_close(y[0], expected, rtol=1e-5, atol=1e-5)
    moe.eval()  # evaluation is dropless: the full two-expert output
    torch.testing.assert_close(moe(x)[0], per_token(moe, x), rtol=1e-5, atol=1e-5)


def test_balance_loss_evens_out_a_router_that_favours_one_expert() -> None:
    moe = layer(top_k=1, experts=4, bias=False)
    x = torch.randn(512, 16) + 1.0
    with torch.no_grad():
        # Expert 0 takes nearly every token to start with.
        moe.router.weight[0] = 0.5
    _, loss_before, fractions = moe(x)
    assert fractions.max() > 0.5
    optimizer = torch.optim.SGD(moe.router.parameters(), lr=1.0)
    for _ in range(50):
        optimizer.zero_grad()
        moe(x)[1].backward()
        optimizer.step()
    _, loss_after, fractions = moe(x)
    assert loss_after < loss_before
    assert fractions.max() <= 2 * 0.25 and fractions.min() >= 0.25 / 2, fractions


def test_gpt_with_experts_returns_the_weighted_aux_loss_and_per_layer_shares() -> None:
    torch.manual_seed(0)
    model = GPT(11, 16, n_layer=4, n_head=2, n_embd=16, moe={"num_experts": 3, "every": 2})
    out = model(torch.randint(0, 11, (2, 16)))
    assert isinstance(out, MoEOutput) and out.logits.shape == (2, 16, 11)
    assert out.expert_fractions.shape == (2, 3)  # blocks 1 and 3
    torch.testing.assert_close(out.expert_fractions.sum(1), torch.ones(2))
    # Uniform routing gives a balance loss of 1; the aux loss is that times the weight.
    assert 0.01 <= out.aux_loss.item() <= 0.03
    assert isinstance(model.transformer.h[0].mlp, torch.nn.Module)
    assert [type(b.mlp).__name__ for b in model.transformer.h] == [
        "MLP",
        "MoEFeedForward",
        "MLP",
        "MoEFeedForward",
    ]
