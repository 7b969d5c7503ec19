"""FedEM: Federated Multi-Task Learning under a Mixture of Distributions (Marfoq, Neglia, Bellet, Kameni, Vidal, NeurIPS 2021, arXiv 2108.10252)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedcoe_bench.baselines.ifca import expert_losses
from fedcoe_bench.method import ClientContext, ClientUpdate, FederatedMethod, RoundContext, weighted_mean
from fedcoe_bench.models import entropy, mixture
from fedcoe_bench.routing import RoutingTable


def em_update(pi: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """One EM update of mixture weights ``pi`` ``[K]`` given per-sample losses ``[K, n]`` (negative
    log-likelihoods): the posteriors :math:`q_{sk} \\propto \\pi_k e^{-\\ell_k(s)}`, then their mean."""
    return (pi.float().log()[:, None] - losses.float()).softmax(0).mean(1).to(pi.dtype)


class FedEM(RoutingTable, FederatedMethod):
    """K shared components :math:`\\theta_1..\\theta_K` (full backbones); client *i* holds personal
    mixture weights :math:`\\pi_i \\in \\Delta^K` (uniform at first) and models

    .. math:: p_i(y|x) = \\sum_k \\pi_{ik}\\, p_k(y|x), \\qquad p_k(y|x) = \\mathrm{softmax}(\\theta_k(x))_y .

    A sampled client first runs the E-step with the components it received and updates
    :math:`\\pi_i` (one EM update per round, the paper's Algorithm 2); the M-step trains the
    components on the posterior-weighted loss; the server averages each component by client size:

    .. math:: q_{sk} = \\frac{\\pi_{ik}\\, e^{-\\ell_k(x_s, y_s)}}{\\sum_j \\pi_{ij}\\, e^{-\\ell_j(x_s, y_s)}}, \\quad
              \\pi_i \\leftarrow \\frac{1}{n_i} \\sum_s q_s, \\quad
              \\min_\\theta \\frac{1}{|B|} \\sum_{s \\in B} \\sum_k q_{sk}\\, \\ell_k(x_s, y_s), \\quad
              \\theta_k \\leftarrow \\frac{\\sum_{i \\in S} n_i \\theta_k^i}{\\sum_{i \\in S} n_i} .

    The report is :math:`\\pi_i` (K **label-derived** scalars: the E-step reads labels), and with it the
    previous :math:`\\pi_i` and the weight it counted with, for the server's mean below; :math:`\\pi_i` is
    also the routing profile of the expert-cluster NMI / purity diagnostics.

    Departures and conventions:

    - :math:`q` is recomputed on every mini-batch from the current components' (detached) losses and
      the :math:`\\pi_i` the round's E-step started from, in the forward pass the loss needs anyway;
      the paper fixes :math:`q` per sample at the round's start, which would need a second pass over
      the client's data. Each sample's
      weights sum to 1, so the step has one model's gradient scale at the same lr.
    - Global and cold-start prediction have no rule in the paper (``global_model = "convention"``):
      the mixture with :math:`\\bar\\pi = \\sum_{i \\in T} n_i \\pi_i / \\sum_{i \\in T} n_i`, the n-weighted
      mean of the latest :math:`\\pi_i` of every client trained so far (*T*; uniform before any), a
      server-only running sum kept as :class:`~fedcoe_bench.baselines.fedper.LatestHeads` keeps its heads.
      A label-free rule: a new client has no labels for an E-step.
    - Fine-tuned cold start: the paper's rule for clients unseen in training, EM on :math:`\\pi` alone
      with the components fixed, here ``loop.cold_start_steps`` EM updates on the labelled shots from
      the uniform :math:`\\pi`; no gradient step (:meth:`start_finetune` names nothing).

    Args:
        num_experts: K, the number of components.

    Example:
        >>> import torch
        >>> m = FedEM(num_experts=2, num_classes=3, in_channels=1, image_size=12)
        >>> m.pi.tolist()
        [0.5, 0.5]
        >>> [round(p, 4) for p in em_update(m.pi, torch.tensor([[0.0, 0.0], [1.0, 1.0]])).tolist()]  # 0 fits better
        [0.7311, 0.2689]
    """

    personal = ("pi",)  # pi and pi_weight
    server_only = ("server_pi",)
    global_model = "convention"
    exact_personal_state = True  # server_pi_sum replaces each client's previous n_i pi_i

    def __init__(self, num_experts: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.experts = self.make_experts(num_experts)
        self.register_buffer("pi", torch.full((num_experts,), 1.0 / num_experts))
        self.register_buffer("pi_weight", torch.zeros(()))  # what this client's pi counts with on the server
        self.register_buffer("server_pi_sum", torch.zeros(num_experts))  # sum_T n_i pi_i
        self.register_buffer("server_pi_weight", torch.zeros(()))  # sum_T n_i

    # ------------------------------------------------------------------ client
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the client's mixture."""
        return mixture(self.pi.log().expand(x.shape[0], -1), self.experts(x))

    @torch.no_grad()
    def on_client_start(self, x: torch.Tensor, y: torch.Tensor, ctx: ClientContext) -> None:
        self._previous = (self.pi.clone(), self.pi_weight.clone())
        losses = expert_losses(self.experts, x, y)  # components fixed: one pass serves every EM update
        for _ in range(max(ctx.steps, 1) if ctx.finetune else 1):
            self.pi.copy_(em_update(self.pi, losses))
        self.pi_weight.fill_(len(y))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        ce = F.cross_entropy(self.experts(x).flatten(0, 1), y.repeat(self.num_experts), reduction="none")
        ce = ce.view(self.num_experts, -1)
        prior = self._previous[0]  # the E-step's: q_t from pi_{t-1}; pi_t = mean q_t would count the data twice
        q = (prior.float().log()[:, None] - ce.detach()).softmax(0).to(ce.dtype)
        return (q * ce).sum(0).mean()

    def start_finetune(self) -> tuple[str, ...]:
        """Nothing: a new client learns only :math:`\\pi`, by EM in :meth:`on_client_start`."""
        return ()

    @torch.no_grad()
    def on_client_end(self, x: torch.Tensor, ctx: ClientContext) -> dict[str, torch.Tensor]:
        pi, weight = self._previous
        return {"pi": self.pi.clone(), "previous_pi": pi, "previous_weight": weight}

    # ------------------------------------------------------------------ server
    def served_pi(self) -> torch.Tensor:
        """:math:`\\bar\\pi`, the mixture weights of the global model and of new clients."""
        if self.server_pi_weight <= 0:
            return torch.full_like(self.server_pi_sum, 1.0 / self.num_experts)
        pi = (self.server_pi_sum / self.server_pi_weight).clamp_min(0)  # the running sums' rounding
        return pi / pi.sum()

    @torch.no_grad()
    def aggregate(self, server: torch.Tensor, updates: list[ClientUpdate],
                  ctx: RoundContext) -> tuple[torch.Tensor, dict[str, float]]:
        """The components as above; updates :math:`\\bar\\pi` (each client's previous contribution replaced
        by its new one) and logs the mean :math:`\\pi_i` of the round's clients (``expert_usage_k``) and
        their mean entropy (``pi_entropy``)."""
        for u in updates:
            pi, old = u.report["pi"].to(self.server_pi_sum), u.report["previous_weight"].to(self.server_pi_sum)
            self.server_pi_sum += u.weight * pi - old * u.report["previous_pi"].to(self.server_pi_sum)
            self.server_pi_weight += u.weight - old
            self.record_routing(u.client, u.report["pi"])
        pis = torch.stack([u.report["pi"].double().cpu() for u in updates])
        scalars = {f"expert_usage_{k}": float(v) for k, v in enumerate(pis.mean(0))}
        scalars["pi_entropy"] = float(entropy(pis).mean())
        return weighted_mean([u.shared for u in updates], [u.weight for u in updates], server), scalars

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict_global(self, x: torch.Tensor) -> torch.Tensor:
        log_pi = self.served_pi().to(x.device).log().expand(x.shape[0], -1)
        return mixture(log_pi, self.experts(x)).exp()

    @torch.no_grad()
    def predict_personal(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).exp()
