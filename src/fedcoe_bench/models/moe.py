"""Mixture-of-experts parts shared by FedMix and FedCoE: a light gate and the mixture of experts' posteriors."""

from __future__ import annotations

import torch
from torch import nn


class Gate(nn.Module):
    """A light router ``x -> simplex^K``: average-pool the image to ``pooled x pooled``, then a
    two-layer MLP. Optional top-m sparse routing keeps the m largest weights and renormalises.

    Example:
        >>> g = Gate(in_channels=1, num_outputs=4, top_m=2)
        >>> w = g(torch.zeros(3, 1, 28, 28))
        >>> w.shape, bool(torch.allclose(w.sum(1), torch.ones(3))), int((w > 0).sum(1).max())
        (torch.Size([3, 4]), True, 2)
    """

    def __init__(self, in_channels: int, num_outputs: int, hidden: int = 64, pooled: int = 7, top_m: int = 0):
        super().__init__()
        self.net = nn.Sequential(
            nn.AdaptiveAvgPool2d(pooled), nn.Flatten(),
            nn.Linear(in_channels * pooled * pooled, hidden), nn.ReLU(), nn.Linear(hidden, num_outputs),
        )
        self.top_m = top_m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_weights(x).exp()

    def log_weights(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
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
