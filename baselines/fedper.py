"""FedPer: Federated Learning with Personalization Layers (Arivazhagan, Aggarwal, Singh, Choudhary, arXiv 1912.00818, 2019)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from baselines.fedavg import FedAvg
from fedcoe_bench.method import ClientUpdate, weighted_mean


class FedPer(FedAvg):
    """Base layers shared, personalization layers kept. The body :math:`\\phi` is averaged as in
    FedAvg; client *i*'s head :math:`h_i` starts from the first server head (the initial model's) and
    never leaves the client:

    .. math:: \\phi^{t+1} = \\sum_{i \\in S_t} \\frac{n_i}{\\sum_{j \\in S_t} n_j} \\phi_i^{t+1}, \\qquad
              p_i(y|x) = \\mathrm{softmax}(h_i(\\phi(x)))_y .

    Convention for global and cold-start accuracy (not in the paper, which has no server head): the
    server body with the evaluation head
    :math:`\\bar h^t = \\sum_{i \\in S_t} n_i h_i / \\sum_{i \\in S_t} n_i`, the n-weighted average of
    the heads of the clients sampled in the latest round. :math:`\\bar h` lives on the server
    (``eval_head``, a ``server_only`` module), reaches it through ``client_report`` and serves only
    evaluation: it is never sent to a client and never trained.

    Example:
        >>> import torch
        >>> m = FedPer(num_classes=10, in_channels=1, image_size=12)
        >>> m.flatten_parameters()
        >>> sorted(m.layout["personal"]), any("head" in n for n in m.layout["shared"])
        (['net.head.bias', 'net.head.weight'], False)
    """

    personal = ("net.head",)
    server_only = ("eval_head",)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # Before the first aggregation the best server-side head is the initial one, which is also
        # what every client starts from (the loop's initial personal state).
        self.eval_head = copy.deepcopy(self.net.head)

    @torch.no_grad()
    def client_report(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"head": self.flat["personal"][self.span("net.head.", "personal")].clone()}

    def aggregate(self, server: torch.Tensor, updates: list[ClientUpdate]) -> torch.Tensor:
        average_into(self.eval_head, [u.report["head"] for u in updates], [u.weight for u in updates])
        return super().aggregate(server, updates)

    @torch.no_grad()
    def predict_global(self, x: torch.Tensor) -> torch.Tensor:
        return self.eval_head(self.net.body(x)).softmax(-1)

    @torch.no_grad()
    def predict_personal(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).softmax(-1)


@torch.no_grad()
def average_into(module: nn.Module, vectors: list[torch.Tensor], weights: list[float]) -> None:
    """Set ``module``'s parameters (flattened in registration order) to the weighted mean of ``vectors``.

    Example:
        >>> lin = torch.nn.Linear(1, 1)
        >>> average_into(lin, [torch.tensor([0.0, 0.0]), torch.tensor([4.0, 8.0])], [3.0, 1.0])
        >>> lin.weight.item(), lin.bias.item()
        (1.0, 2.0)
    """
    params = list(module.parameters())
    current = torch.cat([p.detach().flatten() for p in params])
    mean = weighted_mean(torch.stack(vectors).to(current), weights, current)
    start = 0
    for p in params:
        p.copy_(mean[start : start + p.numel()].view_as(p))
        start += p.numel()
