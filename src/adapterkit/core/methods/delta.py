"""Adapters whose update is a change of the host's weight, ``W + delta``: merged by adding it.

:class:`WeightDelta` merges and unmerges any such update; :class:`DenseDelta` is the whole method for
those that build a dense ``(out, in)`` delta from their parameters (LoHa, LoKr, VeRA, FourierFT):
``y = W x + b + delta x``, computed as peft computes it (the delta built, then one ``F.linear``), and
per row as one batched product over the group's stacked deltas.
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.core.arch import out_in
from adapterkit.core.hosts import stack_rows
from adapterkit.core.methods.base import AdapterModule


class WeightDelta(AdapterModule, metaclass=abc.ABCMeta):
    """Merges as ``host.weight += delta_weight(host)``; unmerges by subtracting it."""

    @abc.abstractmethod
    def delta_weight(self, host: nn.Module) -> torch.Tensor:
        """The update in the host's weight layout."""

    @torch.no_grad()
    def merge(self, host: nn.Module) -> None:
        host.weight.add_(self.delta_weight(host).to(host.weight.dtype))

    @torch.no_grad()
    def unmerge(self, host: nn.Module) -> None:
        host.weight.sub_(self.delta_weight(host).to(host.weight.dtype))


class DenseDelta(WeightDelta):
    """A linear host's update as a dense matrix built from the method's parameters."""

    @abc.abstractmethod
    def delta(self) -> torch.Tensor:
        """The update, ``(out, in)``, in the adapter's dtype."""

    def adapt(self, host, x, out):
        delta = self.delta()
        return out + F.linear(x.to(delta.dtype), delta).to(out.dtype)

    def delta_weight(self, host: nn.Module) -> torch.Tensor:
        return out_in(host, self.delta())

    def row_key(self):
        first = next(self.parameters())
        return (type(self), first.dtype, *(p.shape for p in self.parameters()))

    @staticmethod
    def row_tables(modules: list[DenseDelta]) -> list[torch.Tensor]:
        return [stack_rows([m.delta() for m in modules])]  # (n + 1, out, in): the last, zero, for no adapter

    @staticmethod
    def adapt_tables(host, x, out, rows, modules):
        (delta,) = rows  # (B, out, in)
        flat = x.to(delta.dtype).reshape(x.shape[0], -1, x.shape[-1])  # (B, T, in)
        return out + torch.bmm(flat, delta.transpose(1, 2)).reshape(*x.shape[:-1], -1).to(out.dtype)
