"""Attention that hands its projection weights to ``F.multi_head_attention_forward`` (WavLM).

WavLM's attention never calls its ``q_proj``/``k_proj``/``v_proj``/``out_proj`` modules: it passes
their weights to ``torch.nn.functional.multi_head_attention_forward``. Hooks on those modules (LoRA,
IA3, a Houlsby adapter on ``out_proj``) would never run, and prefix keys have nowhere to go. For
an architecture marked ``functional_attention`` adapterkit gives each attention module an instance
method :func:`projected_attention` in place of ``torch_multi_head_self_attention``: the projections
run as modules (with their hooks), the active prefixes join the keys and values, and torch's own
function computes the attention with identity projections (``x @ I + 0`` is exact in floating
point). Without adapters the outputs equal the original's to rounding.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.core.state import SLOT

METHOD = "torch_multi_head_self_attention"


def projected_attention(
    self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, gated_position_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T, E) -> (B, T, E)``, attention weights ``(B, heads, T, P + T)``; WavLM's signature."""
    q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
    padding = attention_mask.ne(1) if attention_mask is not None else None  # (B, T), True = padding
    k, v, padding, bias = _with_prefixes(self, q, k, v, padding, gated_position_bias)
    if padding is not None:  # a float mask like the position bias (torch deprecates mixing the two)
        padding = torch.zeros(padding.shape, dtype=bias.dtype, device=bias.device).masked_fill(padding, float("-inf"))
    dim, heads = q.shape[-1], self.num_heads
    eye = torch.eye(dim, dtype=q.dtype, device=q.device)
    out, weights = F.multi_head_attention_forward(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        dim,
        heads,
        torch.empty([0]),
        q.new_zeros(3 * dim),
        None,
        None,
        False,
        self.dropout,
        eye,
        q.new_zeros(dim),
        self.training,
        padding,
        need_weights=True,
        attn_mask=bias,
        use_separate_proj_weight=True,
        q_proj_weight=eye,
        k_proj_weight=eye,
        v_proj_weight=eye,
    )
    out = self.out_proj(out.transpose(0, 1))
    return out, weights[:, None].broadcast_to(weights.shape[:1] + (heads,) + weights.shape[1:])


def _with_prefixes(module: nn.Module, q, k, v, padding, bias):
    """Prepend the active prefixes' keys and values (``(B, P, E)``), unmasked where visible."""
    slot = module._modules.get(SLOT)
    batch, length, dim = k.shape
    heads = module.num_heads
    prefixes = slot.prefixes(k.view(batch, length, heads, -1).transpose(1, 2)) if slot is not None else []
    if not prefixes:
        return k, v, padding, bias

    def flat(t: torch.Tensor) -> torch.Tensor:  # (B, heads, P, hd) -> (B, P, E)
        return t.transpose(1, 2).reshape(batch, -1, dim)

    keys = torch.cat([flat(pk) for pk, _, _ in prefixes], dim=1)
    values = torch.cat([flat(pv) for _, pv, _ in prefixes], dim=1)
    visible = torch.cat(
        [
            torch.ones(batch, pk.shape[2], dtype=torch.bool, device=k.device) if s is None else s
            for pk, _, s in prefixes
        ],
        dim=1,
    )
    padding = padding if padding is not None else torch.zeros(batch, length, dtype=torch.bool, device=k.device)
    bias = torch.cat([bias.new_zeros(bias.shape[0], bias.shape[1], keys.shape[1]), bias], dim=2)
    return torch.cat([keys, k], 1), torch.cat([values, v], 1), torch.cat([~visible, padding], 1), bias


def install(attention: nn.Module) -> Callable[[], None]:
    """Route ``attention``'s projections through their modules; returns what undoes it."""
    setattr(attention, METHOD, types.MethodType(projected_attention, attention))
    return lambda: delattr(attention, METHOD)
