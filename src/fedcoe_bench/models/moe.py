"""Mixture-of-experts parts shared by FedMix and FedCoE: the experts, a light gate, the mixture of the
experts' posteriors and the entropy used by the routing diagnostics."""

from __future__ import annotations

import torch
from torch import nn


class Experts(nn.ModuleList):
    """K independent expert classifiers run on the same input; calling it gives their logits
    stacked as ``[K, B, C]``, the layout :func:`mixture` takes. Parameters are named
    ``experts.<k>.*`` when the module is an attribute ``experts``, so each expert is one span.

    Example:
        >>> ex = Experts([nn.Linear(3, 2), nn.Linear(3, 2)])
        >>> ex(torch.zeros(5, 3)).shape
        torch.Size([2, 5, 2])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([expert(x) for expert in self])


class Gate(nn.Module):
    """A light router ``x -> simplex^K``: average-pool the image to ``pooled x pooled``, then a
    two-layer MLP. Optional top-m sparse routing keeps the m largest weights and renormalises.
    With ``route_bias``, a buffer :math:`b` (zeros) is added to the logits, :math:`\\mathrm{softmax}(
    \\mathrm{net}(x) + b)`: a bias no gradient moves, for a balancing rule that sets it from outside
    (FedCoE's ``balance_rate``).

    Example:
        >>> g = Gate(in_channels=1, num_outputs=4, top_m=2)
        >>> w = g(torch.zeros(3, 1, 28, 28))
        >>> w.shape, bool(torch.allclose(w.sum(1), torch.ones(3))), int((w > 0).sum(1).max())
        (torch.Size([3, 4]), True, 2)
    """

    def __init__(self, in_channels: int, num_outputs: int, hidden: int = 64, pooled: int = 7, top_m: int = 0,
                 route_bias: bool = False):
        super().__init__()
        self.register_buffer("route_bias", torch.zeros(num_outputs) if route_bias else None)
        self.net = nn.Sequential(
            nn.AdaptiveAvgPool2d(pooled), nn.Flatten(),
            nn.Linear(in_channels * pooled * pooled, hidden), nn.ReLU(), nn.Linear(hidden, num_outputs),
        )
        self.top_m = top_m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_weights(x).exp()

    def log_weights(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        if self.route_bias is not None:
            logits = logits + self.route_bias
        if 0 < self.top_m < logits.shape[1]:
            kth = logits.topk(self.top_m, dim=1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return logits.log_softmax(dim=1)


def mixture(log_weights: torch.Tensor, expert_logits: torch.Tensor) -> torch.Tensor:
    """Log-posterior of a mixture of experts, computed stably in log space.

    .. math:: \\log p(y|x) = \\log \\sum_k w_k(x)\\, \\mathrm{softmax}(f_k(x))_y

    Args:
        log_weights: ``[B, K]`` log mixture weights (rows sum to 1 after ``exp``).
        expert_logits: ``[K, B, C]`` logits of the K experts.

    Example:
        >>> lw = torch.log(torch.tensor([[0.25, 0.75]]))
        >>> logits = torch.tensor([[[0.0, 0.0]], [[10.0, -10.0]]])
        >>> mixture(lw, logits).exp().round(decimals=3)
        tensor([[0.8750, 0.1250]])
    """
    return torch.logsumexp(log_weights.t().unsqueeze(-1) + expert_logits.log_softmax(-1), dim=0)


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats, :math:`H(p) = -\\sum_k p_k \\log p_k` (0 log 0 = 0).

    Example:
        >>> entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
        tensor([0.6931, 0.0000])
    """
    return torch.special.entr(p).sum(dim)
