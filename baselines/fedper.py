"""FedPer: Federated Learning with Personalization Layers (Arivazhagan, Aggarwal, Singh, Choudhary, arXiv 1912.00818, 2019)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from fedcoe_bench.baselines.fedavg import FedAvg
from fedcoe_bench.method import ClientContext, ClientUpdate, RoundContext


class LatestHeads:
    """Mixin of methods whose clients keep a personal head (FedPer, pFedMoE) and whose paper defines
    no server head: the evaluation head :math:`\\bar h` (a ``server_only`` module, never sent to a
    client, never trained) is the n-weighted mean of the latest head of every client trained so far,

    .. math:: \\bar h = \\frac{\\sum_{i \\in T} n_i h_i}{\\sum_{i \\in T} n_i}, \\qquad
              T = \\bigcup_{s \\le t} S_s ,

    :math:`h_i` being the head client *i* held after its last training. Before any client trained
    it is the initial head, which every client starts from.

    The server keeps two running sums, :math:`\\Sigma = \\sum_{i \\in T} n_i h_i` and
    :math:`N = \\sum_{i \\in T} n_i`, so its memory is one head whatever the number of clients.
    A training client reports its new head and the contribution its previous head made, which it
    knows from its own personal state: its previous head and ``head_weight``, the weight its head
    counts with on the server (0 before its first report). The server replaces that contribution,
    :math:`\\Sigma \\leftarrow \\Sigma - w_i h_i^{old} + n_i h_i`, :math:`N \\leftarrow N - w_i + n_i`.

    A subclass names its personal head in ``head_prefix``, lists ``"head_weight"`` among its
    ``personal`` prefixes and ``"eval_head"`` among its ``server_only`` ones, and calls
    :meth:`init_eval_head` in ``__init__``.
    """

    head_prefix: str
    exact_personal_state = True

    def init_eval_head(self, head: nn.Module) -> None:
        """The evaluation head (a copy of ``head``), the server's running sums and the client's ``head_weight``."""
        self.eval_head = copy.deepcopy(head)
        size = parameters_to_vector(head.parameters()).numel()
        self.register_buffer("eval_head_sum", torch.zeros(size))  # Sigma
        self.register_buffer("eval_head_weight", torch.zeros(()))  # N
        self.register_buffer("head_weight", torch.zeros(()))  # personal: w_i

    def _head(self) -> torch.Tensor:
        return self.flat["personal"][self.span(self.head_prefix, "personal")]

    @torch.no_grad()
    def on_client_start(self, x: torch.Tensor, y: torch.Tensor, ctx: ClientContext) -> None:
        super().on_client_start(x, y, ctx)
        self._previous = (self._head().clone(), self.head_weight.detach().clone())
        self.head_weight.fill_(len(y))  # what the report below makes this client's head count with

    @torch.no_grad()
    def start_finetune(self) -> tuple[str, ...]:
        """A new client is served the evaluation head :math:`\\bar h`: it becomes the personal head,
        which the client fine-tunes."""
        self._head().copy_(parameters_to_vector(self.eval_head.parameters()))
        return (self.head_prefix,)

    @torch.no_grad()
    def on_client_end(self, x: torch.Tensor, ctx: ClientContext) -> dict[str, torch.Tensor]:
        head, weight = self._previous
        return {**super().on_client_end(x, ctx), "head": self._head().clone(), "previous_head": head,
                "previous_weight": weight}

    @torch.no_grad()
    def aggregate(self, server: torch.Tensor, updates: list[ClientUpdate],
                  ctx: RoundContext) -> tuple[torch.Tensor, dict[str, float]]:
        for u in updates:
            old = u.report["previous_weight"].to(self.eval_head_sum)
            self.eval_head_sum += u.weight * u.report["head"].to(self.eval_head_sum) - old * u.report["previous_head"].to(self.eval_head_sum)
            self.eval_head_weight += u.weight - old
        if self.eval_head_weight > 0:
            vector_to_parameters(self.eval_head_sum / self.eval_head_weight, self.eval_head.parameters())
        return super().aggregate(server, updates, ctx)


class FedPer(LatestHeads, FedAvg):
    """Base layers shared, personalization layers kept. The body :math:`\\phi` is averaged as in
    FedAvg; client *i*'s head :math:`h_i` starts from the first server head (the initial model's) and
    never leaves the client:

    .. math:: \\phi^{t+1} = \\sum_{i \\in S_t} \\frac{n_i}{\\sum_{j \\in S_t} n_j} \\phi_i^{t+1}, \\qquad
              p_i(y|x) = \\mathrm{softmax}(h_i(\\phi(x)))_y .

    Convention for global and cold-start accuracy (not in the paper, which has no server head;
    ``global_model = "convention"``, marked in tables): the server body with the evaluation head
    :math:`\\bar h`, the n-weighted average of the latest heads of all clients trained so far
    (:class:`LatestHeads`). A new client fine-tunes the head, starting from :math:`\\bar h`.

    Example:
        >>> import torch
        >>> m = FedPer(num_classes=10, in_channels=1, image_size=12)
        >>> m.flatten_parameters()
        >>> sorted(m.layout["personal"]), any("head" in n for n in m.layout["shared"])
        (['head_weight', 'net.head.bias', 'net.head.weight'], False)
    """

    personal = ("net.head", "head_weight")
    server_only = ("eval_head",)
    global_model = "convention"
    head_prefix = "net.head."
    batchable = True  # its hooks read only the loaded head and the data; the batched executor replays them before the report

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.init_eval_head(self.net.head)

    @torch.no_grad()
    def predict_global(self, x: torch.Tensor) -> torch.Tensor:
        return self.eval_head(self.net.body(x)).softmax(-1)

    @torch.no_grad()
    def predict_personal(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).softmax(-1)
