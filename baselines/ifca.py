"""IFCA: An Efficient Framework for Clustered Federated Learning (Ghosh, Chung, Yin, Ramchandran, NeurIPS 2020, arXiv 2006.04088)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedcoe_bench.method import ClientContext, ClientUpdate, FederatedMethod, RoundContext, weighted_mean
from fedcoe_bench.models import Experts, entropy
from fedcoe_bench.routing import RoutingTable


def expert_losses(experts: Experts, x: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``[K, n]`` per-sample cross-entropy of every expert, without gradients, in eval mode (a
    scoring pass must not move normalisation statistics); in chunks, so that a large client's
    activations never exist for all of its samples at once."""
    was = experts.training
    experts.eval()
    with torch.no_grad():
        out = [F.cross_entropy(experts(xc).flatten(0, 1).float(), yc.repeat(len(experts)), reduction="none")
               .view(len(experts), -1) for xc, yc in zip(x.split(chunk), y.split(chunk))]
    experts.train(was)
    return torch.cat(out, 1) if out else x.new_zeros(len(experts), 0, dtype=torch.float32)


class IFCA(RoutingTable, FederatedMethod):
    """K cluster models :math:`\\theta_1..\\theta_K` (full backbones, independently initialized). A
    sampled client *i* estimates its cluster identity with the models it received and trains only
    that model (the paper's Algorithm 1 with model averaging, option II: local SGD steps):

    .. math:: c_i = \\arg\\min_k \\frac{1}{n_i} \\sum_{(x, y) \\in D_i} \\ell(\\theta_k; x, y), \\qquad
              \\theta_k \\leftarrow \\frac{\\sum_{i \\in S} n_i [c_i = k]\\, \\theta_k^i}{\\sum_{i \\in S} n_i [c_i = k]}

    (:math:`\\theta_k` unchanged when no sampled client chose it). Personal prediction is
    :math:`\\mathrm{softmax}(\\theta_{c_i}(x))` with the client's latest :math:`c_i` (a personal buffer,
    ``cluster``; -1, no choice yet, is served the global prediction).

    The report is the one-hot of :math:`c_i`: **label-derived** (the choice is an argmin of a
    loss on labels), as in the paper, where the server needs it to average. It is also the routing
    profile of the expert-cluster NMI / purity diagnostics.

    Departures and conventions:

    - The cluster models are averaged by client size :math:`n_i`, as every model average in this
      suite (FedAvg's); the paper's option II averages the clients that chose a model uniformly, the
      same where clients are of one size, as in its experiments.
    - Global and cold-start prediction have no rule in the paper (``global_model = "convention"``):
      global, per input, the model of lowest predictive entropy :math:`H(\\mathrm{softmax}(\\theta_k(x)))`;
      cold start, the one model of lowest mean predictive entropy on the new client's unlabeled inputs.
    - Fine-tuned cold start: the new client picks :math:`c` by the loss on its labelled shots (IFCA's
      own rule) and fine-tunes :math:`\\theta_c` only.
    - No random restarts: the paper reruns IFCA from several random initializations and keeps the
      best, which a benchmark run (one seed) does not. Where clusters conflict (a rotation that maps
      one class's images onto another's), the first rounds break the symmetry by themselves: a model
      trained on one cluster is confidently wrong on the other, which then moves to another model.
      Where they do not, one model may keep every client: the sensitivity to initialization the
      restarts are for.

    Args:
        num_experts: K, the number of cluster models.

    Example:
        >>> import torch
        >>> m = IFCA(num_experts=2, num_classes=3, in_channels=1, image_size=12)
        >>> m.flatten_parameters()
        >>> s0, s1 = m.span("experts.0."), m.span("experts.1.")
        >>> a, b = torch.zeros_like(m.flat["shared"]), torch.ones_like(m.flat["shared"])
        >>> ups = [ClientUpdate(0, 1.0, a, {"cluster": torch.tensor([1.0, 0.0])}),
        ...        ClientUpdate(1, 3.0, b, {"cluster": torch.tensor([1.0, 0.0])})]
        >>> new, scalars = m.aggregate(torch.full_like(a, 7.0), ups, RoundContext(1, 2, 2))
        >>> float(new[s0][0]), float(new[s1][0]), scalars["expert_usage_0"]  # model 1: nobody chose it
        (0.75, 7.0, 1.0)
    """

    personal = ("cluster",)
    global_model = "convention"

    def __init__(self, num_experts: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.experts = self.make_experts(num_experts)
        self.register_buffer("cluster", torch.tensor(-1.0))  # float: personal state travels in a float vector

    def chosen(self) -> int:
        return int(self.cluster)

    # ------------------------------------------------------------------ client
    def on_client_start(self, x: torch.Tensor, y: torch.Tensor, ctx: ClientContext) -> None:
        self.cluster.fill_(int(expert_losses(self.experts, x, y).mean(1).argmin()))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.experts[self.chosen()](x), y)

    def start_finetune(self) -> tuple[str, ...]:
        """The model the new client chose on its shots (in :meth:`on_client_start`)."""
        return (f"experts.{self.chosen()}.",)

    @torch.no_grad()
    def on_client_end(self, x: torch.Tensor, ctx: ClientContext) -> dict[str, torch.Tensor]:
        onehot = self.cluster.new_zeros(self.num_experts)
        onehot[self.chosen()] = 1.0
        return {"cluster": onehot}

    # ------------------------------------------------------------------ server
    def aggregate(self, server: torch.Tensor, updates: list[ClientUpdate],
                  ctx: RoundContext) -> tuple[torch.Tensor, dict[str, float]]:
        """The models as above; logs each model's share of the round's clients (``expert_usage_k``)."""
        onehot = torch.stack([u.report["cluster"].double().cpu() for u in updates])
        n = torch.tensor([u.weight for u in updates], dtype=torch.float64)
        for u in updates:
            self.record_routing(u.client, u.report["cluster"])
        new = server.clone()  # the models are IFCA's only shared state
        for k in range(self.num_experts):
            s = self.span(f"experts.{k}.")
            new[s] = weighted_mean([u.shared[s] for u in updates], n * onehot[:, k], server[s])
        return new, {f"expert_usage_{k}": float(v) for k, v in enumerate(onehot.mean(0))}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict_global(self, x: torch.Tensor) -> torch.Tensor:
        p = self.experts(x).softmax(-1)  # [K, B, C]
        best = entropy(p).argmin(0)
        return p[best, torch.arange(x.shape[0], device=x.device)]

    @torch.no_grad()
    def predict_personal(self, x: torch.Tensor) -> torch.Tensor:
        c = self.chosen()
        return self.predict_global(x) if c < 0 else self.experts[c](x).softmax(-1)

    @torch.no_grad()
    def predict_cold_start(self, x: torch.Tensor, unlabeled: torch.Tensor) -> torch.Tensor:
        if len(unlabeled) == 0:
            return self.predict_global(x)
        spread = sum(entropy(self.experts(u).softmax(-1)).sum(1) for u in unlabeled.split(1024))  # [K]
        k = int(spread.argmin())
        return self.experts[k](x).softmax(-1)
