"""An ensemble of K FedAvg models: the capacity control of the mixture methods (METHODS.md)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fedcoe_bench.method import FederatedMethod


class Ensemble(FederatedMethod):
    """K independently initialised FedAvg models :math:`f_1, \\dots, f_K`, all shared, trained side by
    side on every sampled client on

    .. math:: \\sum_{k=1}^{K} \\mathrm{CE}(f_k(x), y)

    and each averaged as FedAvg averages its model, :math:`f_k^{t+1} = \\sum_{i \\in S_t}
    \\frac{n_i}{\\sum_j n_j} f_{k,i}^{t+1}`. The prediction (global, personal and cold start alike) is
    the mean of the members' posteriors,

    .. math:: p(y|x) = \\frac{1}{K} \\sum_{k=1}^{K} \\mathrm{softmax}(f_k(x))_y .

    Not a method of a paper: the control a mixture of K experts must beat, with the same parameters
    and compute as a dense mixture of K experts without a gate. The loss is a sum, not a mean, so
    each member gets exactly FedAvg's gradient at the same learning rate: member *k* trains as a
    FedAvg run of its own from its own initial weights, and ``num_experts = 1`` is FedAvg (the same
    initial weights too, drawn in the same order). The members differ by their initialisation only;
    a new client fine-tunes all of them.

    Args:
        num_experts: K, the number of members (FedCoE's default K).

    Example:
        >>> m = Ensemble(num_experts=3, num_classes=10, in_channels=1, image_size=12)
        >>> x = torch.zeros(2, 1, 12, 12)
        >>> p = m.predict_global(x)
        >>> bool(torch.allclose(p, sum(f(x).softmax(-1) for f in m.experts) / 3)), p.shape
        (True, torch.Size([2, 10]))
        >>> bool(torch.allclose(m(x).softmax(-1), p))
        True
    """

    def __init__(self, num_experts: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.experts = self.make_experts(num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The log of the ensemble's posterior, ``[B, C]`` (logits whose softmax is the prediction)."""
        return torch.logsumexp(self.experts(x).log_softmax(-1), 0) - math.log(self.num_experts)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        # member by member rather than on the stacked logits: K = 1 is then FedAvg's computation exactly
        return sum(F.cross_entropy(f(x), y) for f in self.experts)

    @torch.no_grad()
    def predict_global(self, x: torch.Tensor) -> torch.Tensor:
        # the mean itself rather than softmax(forward): K = 1 is then FedAvg's prediction bit for bit
        return self.experts(x).softmax(-1).mean(0)
