"""SCAFFOLD: Stochastic Controlled Averaging for Federated Learning (Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, ICML 2020, arXiv 1910.06378)."""

from __future__ import annotations

import torch

from fedcoe_bench.method import ClientContext, ClientUpdate, FederatedMethod, RoundContext, weighted_mean


def unit_path(steps: int, momentum: float) -> float:
    """How far ``steps`` steps of SGD with ``momentum`` (heavy ball, fresh buffer, lr 1) move under a
    constant unit gradient: the buffer after step k is :math:`(1 - \\beta^k) / (1 - \\beta)`.

    >>> unit_path(5, 0.0), round(unit_path(5, 0.9), 4)
    (5.0, 13.1441)
    """
    return float(sum((1 - momentum**k) / (1 - momentum) if momentum else 1.0 for k in range(1, steps + 1)))


class SCAFFOLD(FederatedMethod):
    """FedAvg with control variates that correct client drift. The server keeps a control variate
    :math:`c` and every client one of its own, :math:`c_i` (0 before it first trains). A sampled
    client starts from the server model :math:`x` and takes :math:`K` local steps

    .. math:: y \\leftarrow y - \\eta_l \\left(g_i(y) - c_i + c\\right),

    then updates its control variate with the paper's option II and reports the change,

    .. math:: c_i^+ = c_i - c + \\frac{x - y}{K \\eta_l}, \\qquad \\Delta c_i = c_i^+ - c_i .

    The server moves :math:`x` to the mean of the clients' models and :math:`c` by the clients'
    changes over the whole federation of :math:`N` clients,

    .. math:: x \\leftarrow \\sum_{i \\in S} \\frac{n_i}{\\sum_{j \\in S} n_j}\\, y_i, \\qquad
              c \\leftarrow c + \\frac{1}{N} \\sum_{i \\in S} \\Delta c_i ,

    so that :math:`c` stays the mean of all clients' :math:`c_i`.

    Where our reading departs from the paper: the model mean is weighted by :math:`n_i` (the
    paper's is unweighted, with a global step size :math:`\\eta_g = 1`) so that with :math:`c = c_i
    = 0` SCAFFOLD is this suite's FedAvg; and the local optimizer is the suite's SGD with momentum
    :math:`\\beta`, through which the correction passes like the gradient. Option II divides the
    local path by how far :math:`K` steps move under a unit gradient: :math:`K \\eta_l` for plain SGD
    (the paper's), :math:`\\eta_l \\sum_{k=1}^{K} (1 - \\beta^k) / (1 - \\beta)` with momentum from a
    fresh buffer, so that :math:`c_i` estimates the client's gradient, not up to :math:`1/(1-\\beta)`
    times it (an overcorrection that drives the clients apart).

    The correction enters the local objective as the linear term :math:`\\langle y, c - c_i \\rangle`,
    whose gradient is :math:`c - c_i`. :math:`c` is shared state the clients receive and never
    train (the buffer ``control``, set by :meth:`aggregate`); :math:`c_i` is personal
    (``client_control``). Each control variate is laid out like the model's part of the shared flat
    vector, so a client sends and receives twice FedAvg's bytes.

    Example:
        >>> m = SCAFFOLD(num_classes=10, in_channels=1, image_size=12)
        >>> m.flatten_parameters()
        >>> m.control.numel() == m.flat["shared"][m.span("net.")].numel() == m.client_control.numel()
        True
    """

    personal = ("client_control",)
    received_only = ("control",)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.net = self.make_backbone()
        size = sum(p.numel() for p in self.net.parameters())
        self.register_buffer("control", torch.zeros(size))  # c, shared: the server writes it, clients read it
        self.register_buffer("client_control", torch.zeros(size))  # c_i, personal

    def on_client_start(self, x: torch.Tensor, y: torch.Tensor, ctx: ClientContext) -> None:
        model = self.span("net.")
        self._received = self.flat["shared"][model].detach().clone()  # x
        correction = torch.zeros_like(self.flat["shared"])
        correction[model] = self.control - self.client_control
        self._correction = self.parameters_with(correction)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss + sum((p * c).sum() for p, c in self._correction)

    @torch.no_grad()
    def on_client_end(self, x: torch.Tensor, ctx: ClientContext) -> dict[str, torch.Tensor]:
        local = self.flat["shared"][self.span("net.")]  # y after K steps
        path = self.lr * unit_path(max(ctx.steps, 1), self.momentum)
        updated = self.client_control - self.control + (self._received - local) / path
        delta = updated - self.client_control
        self.client_control.copy_(updated)  # kept: the personal state after this hook is the client's
        return {"control_delta": delta}

    @torch.no_grad()
    def aggregate(self, server: torch.Tensor, updates: list[ClientUpdate],
                  ctx: RoundContext) -> tuple[torch.Tensor, dict[str, float]]:
        new = weighted_mean([u.shared for u in updates], [u.weight for u in updates], server)
        control = self.span("control")
        step = torch.stack([u.report["control_delta"].to(server) for u in updates]).sum(0) / ctx.num_clients
        new[control] = server[control] + step
        return new, {"control_norm": float(new[control].norm())}
