"""pFedMoE: Data-Level Personalization with Mixture of Experts for Model-Heterogeneous Personalized Federated Learning (Yi, Yu, Liu, Wang, Li, arXiv 2402.01350, 2024)."""

from __future__ import annotations

import torch
from torch import nn

from fedcoe_bench.baselines.fedper import LatestHeads
from fedcoe_bench.method import ClientContext, ClientUpdate, FederatedMethod, RoundContext
from fedcoe_bench.models import Gate


class PFedMoE(LatestHeads, FederatedMethod):
    """Each client mixes a shared small feature extractor :math:`G` (the global expert) with its own
    larger one :math:`F_i` (the local expert) through a personal gate
    :math:`H_i(x) = (a_1(x), a_2(x))` (softmax over two), and classifies with a personal head:

    .. math:: z = a_1(x)\\, G(x) + a_2(x)\\, F_i(x), \\qquad p_i(y|x) = \\mathrm{softmax}(\\mathrm{head}_i(z))_y .

    :math:`G`, :math:`F_i`, :math:`H_i` and the head train together on cross-entropy; only
    :math:`G` is uploaded and averaged as in FedAvg,
    :math:`G \\leftarrow \\sum_{i \\in S} n_i G_i / \\sum_{i \\in S} n_i`.

    :math:`G` is the backbone's body at channel width ``global_width`` (the CNN's default is 32,
    ResNet-18's 64), followed by a linear projection to :math:`F_i`'s feature width *d* when the two
    differ (the CNN's body always ends in 512 features, so it needs none). The gate is the light
    :class:`~fedcoe_bench.models.Gate` on the input.

    Convention for global and cold-start accuracy (not in the paper, where every client has its own
    model; ``global_model = "convention"``, marked in tables): :math:`G` with the evaluation head
    :math:`\\bar h`, the n-weighted average of the latest heads of all clients trained so far, as for
    :class:`~fedcoe_bench.baselines.fedper.FedPer` (:class:`~fedcoe_bench.baselines.fedper.LatestHeads`). The heads were
    trained on the mixed :math:`z`, not on :math:`G(x)` alone, so this is a lower bound on what the
    global expert knows.

    **Against the paper.** The paper pairs a homogeneous small feature extractor shared by all clients
    (the global expert) with each client's own, possibly differently shaped, large model, whose
    feature extractor is the local expert and whose header classifies the gate-weighted sum of the
    two representations; a personal gating network reads the input sample and outputs the two
    weights; experts, gate and header train together on cross-entropy, and only the small extractor
    is uploaded and averaged. Ours follows that; its departures are documented rather than switched,
    because none changes the algorithm. Every client's local model has the same
    architecture, since a benchmark run has one backbone, so the method is not exercised on the
    model heterogeneity it was built for. The global expert is our backbone at a smaller channel
    width (plus a projection when the widths of the two representations differ) rather than a
    separately designed small network, and the gate is the benchmark's light
    :class:`~fedcoe_bench.models.Gate` (pooled input) rather than the paper's own small network. The
    global and cold-start columns are the convention above, since the paper evaluates only
    personal models.

    Args:
        global_width: channel width of the global expert's backbone.
        gate_hidden: hidden units of the gate.

    Example:
        >>> import torch
        >>> m = PFedMoE(num_classes=10, in_channels=1, image_size=12)
        >>> m.flatten_parameters()
        >>> {n.split(".")[0] for n in m.layout["shared"]}, sorted({n.split(".")[0] for n in m.layout["personal"]})
        ({'global_expert'}, ['gate', 'head', 'head_weight', 'local_expert'])
        >>> m(torch.zeros(2, 1, 12, 12)).shape
        torch.Size([2, 10])
    """

    personal = ("local_expert.", "gate.", "head.", "head_weight")
    server_only = ("eval_head",)  # the evaluation head and its running sums
    global_model = "convention"
    head_prefix = "head."

    def __init__(self, global_width: int = 16, gate_hidden: int = 64, **kwargs):
        super().__init__(**kwargs)
        local = self.make_backbone()
        small = self.make_backbone(width=global_width)
        d, d_small = local.head.in_features, small.head.in_features
        project = nn.Identity() if d_small == d else nn.Linear(d_small, d)
        self.global_expert = nn.Sequential(small.body, project)
        self.local_expert = local.body
        self.head = local.head
        self.gate = Gate(self.in_channels, 2, hidden=gate_hidden)
        self.init_eval_head(self.head)

    def mixed_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z = a_1 G(x) + a_2 F_i(x)`` and the gate weights ``[B, 2]``."""
        a = self.gate(x)
        return a[:, :1] * self.global_expert(x) + a[:, 1:] * self.local_expert(x), a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mixed_features(x)[0])

    @torch.no_grad()
    def on_client_end(self, x: torch.Tensor, ctx: ClientContext) -> dict[str, torch.Tensor]:
        return {**super().on_client_end(x, ctx), "global_weight": self.gate(x)[:, 0].mean()}

    def aggregate(self, server: torch.Tensor, updates: list[ClientUpdate],
                  ctx: RoundContext) -> tuple[torch.Tensor, dict[str, float]]:
        """FedAvg over G; logs ``global_weight``, the sampled clients' n-weighted mean gate weight
        :math:`a_1` on G."""
        weights = [u.weight for u in updates]
        global_weight = float(sum(w * float(u.report["global_weight"]) for w, u in zip(weights, updates)) / sum(weights))
        server, scalars = super().aggregate(server, updates, ctx)
        return server, {**scalars, "global_weight": global_weight}

    def start_finetune(self) -> tuple[str, ...]:
        """A new client fine-tunes what a client trains as its own: its local expert (from its
        initialization: it has none yet), its gate and its head (from the evaluation head :math:`\\bar h`);
        without the local expert the personal mixture would keep an untrained extractor in it."""
        return (*super().start_finetune(), "gate.", "local_expert.")

    @torch.no_grad()
    def predict_global(self, x: torch.Tensor) -> torch.Tensor:
        return self.eval_head(self.global_expert(x)).softmax(-1)

    @torch.no_grad()
    def predict_personal(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).softmax(-1)
