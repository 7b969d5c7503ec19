"""FedProx: Federated Optimization in Heterogeneous Networks (Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, MLSys 2020)."""

from __future__ import annotations

import torch

from fedcoe_bench.baselines.fedavg import FedAvg
from fedcoe_bench.errors import ConfigError
from fedcoe_bench.method import ClientContext


class FedProx(FedAvg):
    """FedAvg whose clients minimise a proximal local objective. With :math:`w^t` the server model a
    client received,

    .. math:: \\min_w \\; F_i(w) + \\frac{\\mu}{2} \\lVert w - w^t \\rVert^2

    in every local step, over the shared parameters. The server update is FedAvg's; ``mu = 0`` is
    FedAvg exactly (same parameters, bit for bit).

    Args:
        mu: strength of the proximal term (Li et al. tune it in {0.001, 0.01, 0.1, 1}).

    Example:
        >>> import torch
        >>> m = FedProx(mu=2.0, num_classes=10, in_channels=1, image_size=12)
        >>> m.flatten_parameters()
        >>> m.on_client_start(torch.zeros(1, 1, 12, 12), torch.zeros(1, dtype=torch.long), None)
        >>> with torch.no_grad():
        ...     m.flat["shared"] += 0.5  # every shared weight 0.5 away from the server's
        >>> round(m.proximal_term().item() / m.flat["shared"].numel(), 3)  # mu/2 * 0.5^2
        0.25
    """

    batchable = True  # the anchor set in on_client_start is the server state, the same for every batched client

    def __init__(self, mu: float = 0.01, **kwargs):
        super().__init__(**kwargs)
        if mu < 0:
            raise ConfigError(f"method.init_args.mu must be >= 0 (got {mu})")
        self.mu = mu
        self._anchor: torch.Tensor | None = None

    def on_client_start(self, x: torch.Tensor, y: torch.Tensor, ctx: ClientContext) -> None:
        # The anchor is the server model as received, so it must be taken before the first step.
        self._anchor = self.flat["shared"].detach().clone()

    def proximal_term(self) -> torch.Tensor:
        """:math:`\\frac{\\mu}{2} \\lVert w - w^t \\rVert^2` over the shared parameters (differentiable)."""
        # Summed per Parameter: autograd sees the Parameters, not the flat buffer they are views of.
        total = self._anchor.new_zeros(())
        for p, anchor in self.parameters_with(self._anchor):
            total = total + (p - anchor).pow(2).sum()
        return 0.5 * self.mu * total

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.mu == 0:  # skipped rather than multiplied by 0 so that mu = 0 costs nothing extra
            return loss
        return loss + self.proximal_term()
