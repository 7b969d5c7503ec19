"""FedMix — federated mixture of experts: Federated Mixture of Experts (Reisser, Louizos, Gavves, Welling, arXiv 2107.06724, 2021).

Not the FedMix of Yoon et al. (ICLR 2021, mean-augmented mixup); that one would get its own name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fedcoe_bench.errors import ConfigError
from fedcoe_bench.method import ClientContext, ClientUpdate, FederatedMethod, RoundContext, weighted_mean
from fedcoe_bench.models import Gate, entropy, mixture
from fedcoe_bench.routing import RoutingTable

GATE_SCOPES = ("personal", "shared")


class FedMix(RoutingTable, FederatedMethod):
    """K shared experts :math:`f_1..f_K` (full backbones) and a gate :math:`g(x) \\in \\Delta^K`,
    personal to each client (``gate_scope="personal"``, :math:`g_i`) or shared by all of them
    (``gate_scope="shared"``). Client *i* predicts with, and trains experts and gate on the negative
    log-likelihood of, the mixture

    .. math:: p_i(y|x) = \\sum_k g_i(x)_k \\, \\mathrm{softmax}(f_k(x))_y .

    It reports its mean gate mass :math:`m_{ik} = \\frac{1}{n_i} \\sum_{x \\in D_i} g_i(x)_k` and
    sends back only its top-m experts by :math:`m_{ik}` (m = K by default), which the server models
    as weight 0 for the others. Each expert is averaged over the clients that sent it,

    .. math:: f_k \\leftarrow \\frac{\\sum_{i \\in S} n_i m_{ik} f_k^i}{\\sum_{i \\in S} n_i m_{ik}}
              \\quad (f_k \\text{ unchanged when the denominator is} \\approx 0).

    A shared gate is averaged as in FedAvg, :math:`g \\leftarrow \\sum_{i \\in S} n_i g^i / \\sum_{i \\in S} n_i`,
    and global and cold-start prediction use it: :math:`\\sum_k g(x)_k \\, \\mathrm{softmax}(f_k(x))`.
    With personal gates there is no server gate, so global and cold-start prediction use the uniform
    mixture :math:`\\frac{1}{K} \\sum_k \\mathrm{softmax}(f_k(x))` (a new client has no gate: the
    method's known weakness at cold start), in which an expert that saw few of a class's samples
    weighs as much as one that saw many.

    **Against the paper.** The paper's gating function is one network shared by all users and
    trained with the experts on the mixture likelihood: that is how users with similar data come to
    select the same experts, and how the federation's model predicts on any input. Its users select
    the experts they train and send back by their gate mass over their data, and the server averages
    each expert over the users that sent it. That is our default (``gate_scope="shared"``); the
    runs published before it kept a personal gate per client (``gate_scope="personal"``), which
    leaves the server without a gate and falls back on the uniform mixture above: on MNIST-10k at
    Dirichlet 0.1 its server columns swung with the seed (``benchmarks/results/mnist10k.md``). We
    weight each expert's average by :math:`n_i m_{ik}`, so that a client that barely routes to an
    expert barely moves it. We add no term on the gate beyond the likelihood; ``expert_usage_k``
    shows whether the gate collapses onto few experts. ``label_coverage=True`` is a diagnostic of
    the uniform mixture's fragility, not in the paper: clients then send label-derived statistics
    (below) that a deployment would not.

    Args:
        num_experts: K.
        top_m: experts a client sends back (0: all K).
        gate_hidden: hidden units of the gate (:class:`~fedcoe_bench.models.Gate`).
        gate_scope: ``shared`` (one gate, averaged by the server and used for global and cold-start
            prediction; the paper's) or ``personal`` (each client's own gate, kept between its rounds).
        label_coverage: diagnostic. Each client also reports its gate mass per class,
            :math:`m_{ikc} = \\frac{1}{n_i} \\sum_{(x, y) \\in D_i,\\, y = c} g_i(x)_k` (so
            :math:`\\sum_c m_{ikc} = m_{ik}`: the only label-derived values FedMix sends), and the
            server logs ``label_share_k_c``, the share of expert *k*'s aggregation weight this round
            that came from class *c*, :math:`W_{kc} / \\sum_{c'} W_{kc'}` with
            :math:`W_{kc} = \\sum_{i \\in S,\\, k \\text{ sent}} n_i m_{ikc}` (0 for an expert nobody
            sent), and ``label_classes_k``, the effective number of classes behind that weight,
            :math:`\\exp H(\\text{share}_k)`.

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
    # what a config written before gate_scope existed ran with (fedcoe_bench.runs.argument_default)
    predating = {"gate_scope": "personal"}

    def __init__(self, num_experts: int = 4, top_m: int = 0, gate_hidden: int = 64, gate_scope: str = "shared",
                 label_coverage: bool = False, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= top_m <= num_experts:
            raise ConfigError(f"method.init_args.top_m must be in [0, num_experts={num_experts}] (got {top_m}); 0 sends all")
        if gate_scope not in GATE_SCOPES:
            raise ConfigError(f"method.init_args.gate_scope must be one of {', '.join(GATE_SCOPES)} "
                              f"(got {gate_scope!r}); 'shared' is the paper's global gate, 'personal' the runs "
                              f"published before it")
        if not isinstance(label_coverage, bool):
            raise ConfigError(f"method.init_args.label_coverage must be true or false (got {label_coverage!r})")
        self.num_experts, self.top_m = num_experts, top_m
        self.gate_scope, self.label_coverage = gate_scope, label_coverage
        if gate_scope == "shared":
            self.personal = ()  # the gate is shared state: sent to every client and averaged
        self.experts = self.make_experts(num_experts)
        # Dense routing: top_m limits what is *sent*, not which experts a client mixes.
        self.gate = Gate(self.in_channels, num_experts, hidden=gate_hidden)

    # ------------------------------------------------------------------ the mixture
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the client's mixture (its gate: personal or the shared one)."""
        return mixture(self.gate.log_weights(x), self.experts(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.nll_loss(self(x), y)

    def start_finetune(self) -> tuple[str, ...]:
        """A new client fine-tunes a gate of its own (from the initial one, or from the shared gate), over
        the shared experts."""
        return ("gate.",)

    def on_client_start(self, x: torch.Tensor, y: torch.Tensor, ctx: ClientContext) -> None:
        super().on_client_start(x, y, ctx)
        if self.label_coverage:
            self._labels = y  # for the diagnostic report in on_client_end (same inputs, same order)

    @torch.no_grad()
    def on_client_end(self, x: torch.Tensor, ctx: ClientContext) -> dict[str, torch.Tensor]:
        w = self.gate(x)
        report = {"gate_mass": w.mean(0), "gate_entropy": entropy(w).mean()}
        if self.label_coverage:
            onehot = F.one_hot(self._labels.to(x.device).long(), self.num_classes).to(w.dtype)
            report["class_mass"] = w.t() @ onehot / max(len(x), 1)  # [K, C], m_ikc
        return report

    # ------------------------------------------------------------------ server
    def sent_mask(self, mass: torch.Tensor) -> torch.Tensor:
        """``[S, K]``: 1 for the experts each client sends back (its top-m by gate mass), else 0."""
        if 0 < self.top_m < self.num_experts:
            return torch.zeros_like(mass).scatter_(1, mass.topk(self.top_m, dim=1).indices, 1.0)
        return torch.ones_like(mass)

    def aggregation_weights(self, updates: list[ClientUpdate]) -> torch.Tensor:
        """``[S, K]`` weights :math:`n_i m_{ik}`, zero for the experts a client did not send."""
        mass = torch.stack([u.report["gate_mass"] for u in updates]).double()
        n = torch.tensor([u.weight for u in updates], dtype=mass.dtype, device=mass.device)
        return n[:, None] * mass * self.sent_mask(mass)

    def label_shares(self, updates: list[ClientUpdate]) -> torch.Tensor:
        """``[K, C]``: the share of each expert's aggregation weight this round from each class
        (``label_coverage``; rows of 0 for experts nobody sent)."""
        cls_mass = torch.stack([u.report["class_mass"] for u in updates]).double()  # [S, K, C]
        mass = torch.stack([u.report["gate_mass"] for u in updates]).double()
        n = torch.tensor([u.weight for u in updates], dtype=cls_mass.dtype, device=cls_mass.device)
        weight = (n[:, None] * self.sent_mask(mass).to(cls_mass))[:, :, None] * cls_mass
        total = weight.sum(0)  # [K, C]: W_kc
        return total / total.sum(1, keepdim=True).clamp_min(1e-12)

    def aggregate(self, server: torch.Tensor, updates: list[ClientUpdate],
                  ctx: RoundContext) -> tuple[torch.Tensor, dict[str, float]]:
        """The experts (and a shared gate) as above; logs each expert's share of the aggregation
        weight (``expert_usage_k``), the mean gate entropy and, with ``label_coverage``, the label shares."""
        # The experts and a shared gate are FedMix's only shared parameters, so every entry is covered below.
        w = self.aggregation_weights(updates)
        for u in updates:
            self.record_routing(u.client, u.report["gate_mass"])  # its latest gate mass m_i
        new = server.clone()
        for k in range(self.num_experts):
            s = self.span(f"experts.{k}.")
            new[s] = weighted_mean([u.shared[s] for u in updates], w[:, k], server[s])
        if self.gate_scope == "shared":
            s = self.span("gate.")
            new[s] = weighted_mean([u.shared[s] for u in updates], [u.weight for u in updates], server[s])
        usage = w.sum(0) / w.sum().clamp_min(1e-12)
        scalars = {f"expert_usage_{k}": float(u) for k, u in enumerate(usage)}
        scalars["gate_entropy"] = float(torch.stack([u.report["gate_entropy"] for u in updates]).mean())
        if self.label_coverage:
            shares = self.label_shares(updates)
            for k, row in enumerate(shares):
                scalars.update({f"label_share_{k}_{c}": float(v) for c, v in enumerate(row)})
                scalars[f"label_classes_{k}"] = float(entropy(row).exp()) if row.sum() > 0 else 0.0
        return new, scalars

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict_global(self, x: torch.Tensor) -> torch.Tensor:
        """The shared gate's mixture, or (personal gates) the uniform mixture of the experts."""
        logits = self.experts(x)
        if self.gate_scope == "shared":
            return mixture(self.gate.log_weights(x), logits).exp()
        uniform = logits.new_full((x.shape[0], self.num_experts), -math.log(self.num_experts))
        return mixture(uniform, logits).exp()

    @torch.no_grad()
    def predict_personal(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).exp()
