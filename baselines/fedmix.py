"""FedMix — federated mixture of experts: Federated Mixture of Experts (Reisser, Louizos, Gavves, Welling, arXiv 2107.06724, 2021).

Not the FedMix of Yoon et al. (ICLR 2021, mean-augmented mixup); that one would get its own name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fedcoe_bench.errors import ConfigError
from fedcoe_bench.method import ClientContext, ClientUpdate, FederatedMethod, RoundContext, weighted_mean
from fedcoe_bench.models import Experts, Gate, entropy, mixture
from fedcoe_bench.routing import RoutingTable


class FedMix(RoutingTable, FederatedMethod):
    """K shared experts :math:`f_1..f_K` (full backbones) and a personal gate
    :math:`g_i(x) \\in \\Delta^K` per client. Client *i* predicts with, and trains experts and gate
    on the negative log-likelihood of, the mixture

    .. math:: p_i(y|x) = \\sum_k g_i(x)_k \\, \\mathrm{softmax}(f_k(x))_y .

    It reports its mean gate mass :math:`m_{ik} = \\frac{1}{n_i} \\sum_{x \\in D_i} g_i(x)_k` and
    sends back only its top-m experts by :math:`m_{ik}` (m = K by default), which the server models
    as weight 0 for the others. Each expert is averaged over the clients that sent it,

    .. math:: f_k \\leftarrow \\frac{\\sum_{i \\in S} n_i m_{ik} f_k^i}{\\sum_{i \\in S} n_i m_{ik}}
              \\quad (f_k \\text{ unchanged when the denominator is} \\approx 0).

    There is no server gate, so global and cold-start prediction use the uniform mixture
    :math:`\\frac{1}{K} \\sum_k \\mathrm{softmax}(f_k(x))` (a new client has no gate: the method's
    known weakness at cold start).

    Args:
        num_experts: K.
        top_m: experts a client sends back (0: all K).
        gate_hidden: hidden units of the gate (:class:`~fedcoe_bench.models.Gate`).

    Example:
        >>> import torch
        >>> m = FedMix(num_experts=2, num_classes=3, in_channels=1, image_size=12)
        >>> m.flatten_parameters()
        >>> s0, s1 = m.span("experts.0."), m.span("experts.1.")
        >>> a, b = torch.zeros_like(m.flat["shared"]), torch.ones_like(m.flat["shared"])
        >>> ups = [ClientUpdate(0, 1.0, a, {"gate_mass": torch.tensor([0.9, 0.1]), "gate_entropy": torch.tensor(0.3)}),
        ...        ClientUpdate(1, 3.0, b, {"gate_mass": torch.tensor([0.1, 0.9]), "gate_entropy": torch.tensor(0.3)})]
        >>> new, _ = m.aggregate(torch.zeros_like(a), ups, RoundContext(1, 2, 2))  # expert 0: (0.9*0 + 0.3*1) / 1.2
        >>> round(float(new[s0][0]), 4), round(float(new[s1][0]), 4)
        (0.25, 0.9643)
    """

    personal = ("gate.",)

    def __init__(self, num_experts: int = 4, top_m: int = 0, gate_hidden: int = 64, **kwargs):
        super().__init__(**kwargs)
        if num_experts < 1:
            raise ConfigError(f"method.init_args.num_experts must be >= 1 (got {num_experts})")
        if not 0 <= top_m <= num_experts:
            raise ConfigError(f"method.init_args.top_m must be in [0, num_experts={num_experts}] (got {top_m}); 0 sends all")
        self.num_experts, self.top_m = num_experts, top_m
        self.experts = Experts(self.make_backbone() for _ in range(num_experts))
        # Dense routing: top_m limits what is *sent*, not which experts a client mixes.
        self.gate = Gate(self.in_channels, num_experts, hidden=gate_hidden)

    # ------------------------------------------------------------------ the mixture
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the client's mixture (personal gate)."""
        return mixture(self.gate.log_weights(x), self.experts(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.nll_loss(self(x), y)

    def start_finetune(self) -> tuple[str, ...]:
        """A new client fine-tunes a gate of its own (from the initial one), over the shared experts."""
        return ("gate.",)

    @torch.no_grad()
    def on_client_end(self, x: torch.Tensor, ctx: ClientContext) -> dict[str, torch.Tensor]:
        w = self.gate(x)
        return {"gate_mass": w.mean(0), "gate_entropy": entropy(w).mean()}

    # ------------------------------------------------------------------ server
    def aggregation_weights(self, updates: list[ClientUpdate]) -> torch.Tensor:
        """``[S, K]`` weights :math:`n_i m_{ik}`, zero for the experts a client did not send."""
        mass = torch.stack([u.report["gate_mass"] for u in updates]).double()
        n = torch.tensor([u.weight for u in updates], dtype=mass.dtype, device=mass.device)
        w = n[:, None] * mass
        if 0 < self.top_m < self.num_experts:
            sent = torch.zeros_like(w).scatter_(1, mass.topk(self.top_m, dim=1).indices, 1.0)
            w = w * sent
        return w

    def aggregate(self, server: torch.Tensor, updates: list[ClientUpdate],
                  ctx: RoundContext) -> tuple[torch.Tensor, dict[str, float]]:
        """The experts as above; logs each expert's share of the aggregation weight (``expert_usage_k``)
        and the mean gate entropy."""
        # The experts are FedMix's only shared parameters, so every entry is covered below.
        w = self.aggregation_weights(updates)
        for u in updates:
            self.record_routing(u.client, u.report["gate_mass"])  # its latest gate mass m_i
        new = server.clone()
        for k in range(self.num_experts):
            s = self.span(f"experts.{k}.")
            new[s] = weighted_mean([u.shared[s] for u in updates], w[:, k], server[s])
        usage = w.sum(0) / w.sum().clamp_min(1e-12)
        scalars = {f"expert_usage_{k}": float(u) for k, u in enumerate(usage)}
        scalars["gate_entropy"] = float(torch.stack([u.report["gate_entropy"] for u in updates]).mean())
        return new, scalars

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict_global(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.experts(x)
        uniform = logits.new_full((x.shape[0], self.num_experts), -math.log(self.num_experts))
        return mixture(uniform, logits).exp()

    @torch.no_grad()
    def predict_personal(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).exp()
