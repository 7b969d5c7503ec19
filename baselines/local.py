"""Local training: every client learns alone, the no-collaboration reference of personalized FL tables."""

from __future__ import annotations

import torch

from fedcoe_bench.baselines.fedavg import FedAvg
from fedcoe_bench.method import ClientUpdate, RoundContext


class Local(FedAvg):
    """Nothing is shared: client *i* keeps its whole model :math:`w_i` and only ever runs local SGD on
    :math:`D_i`, in the rounds it is sampled (the same compute budget as every other method):

    .. math:: w_i^{t+1} = \\mathrm{SGD}(w_i^t; D_i) \\text{ if } i \\in S_t, \\qquad w_i^{t+1} = w_i^t \\text{ otherwise.}

    The shared vector is empty and the server never aggregates. Personal accuracy is the
    personalization ceiling at no collaboration. There is no global model and a new client has no
    model of its own (``global_model = "none"``): the loop still measures the untrained initial
    model there, and tables print n/a. Its fine-tuned cold start is a real number: a new client
    trains its own model from the initial one on its few labelled shots.

    Example:
        >>> m = Local(num_classes=10, in_channels=1, image_size=12)
        >>> m.flatten_parameters()
        >>> m.flat["shared"].numel(), m.flat["personal"].numel() == sum(p.numel() for p in m.parameters())
        (0, True)
    """

    personal = ("net.",)
    global_model = "none"
    batchable = True

    def aggregate(self, server: torch.Tensor, updates: list[ClientUpdate],
                  ctx: RoundContext) -> tuple[torch.Tensor, dict[str, float]]:
        return server, {}
