"""FedRep: Exploiting Shared Representations for Personalized Federated Learning (Collins, Hassani, Mokhtari,
Shakkottai, ICML 2021, arXiv 2102.07078)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from fedcoe_bench.baselines.fedper import FedPer
from fedcoe_bench.errors import ConfigError
from fedcoe_bench.method import ClientContext


class FedRep(FedPer):
    """A shared representation :math:`\\phi` (the body) and a personal head :math:`h_i`, learned in
    alternation. Client *i* receives :math:`\\phi^t`, then

    .. math:: h_i \\leftarrow \\mathrm{SGD}_h\\big(F_i(h \\circ \\phi^t)\\big) \\;(\\tau_h \\text{ steps}), \\qquad
              \\phi_i \\leftarrow \\mathrm{SGD}_\\phi\\big(F_i(h_i \\circ \\phi)\\big) \\;(\\tau - \\tau_h \\text{ steps}),

    the head trained with the body frozen, then the body with the new head frozen; the server averages
    the bodies as FedAvg does, :math:`\\phi^{t+1} = \\sum_{i \\in S_t} \\frac{n_i}{\\sum_j n_j} \\phi_i`,
    and :math:`h_i` never leaves the client. Personal prediction: :math:`h_i \\circ \\phi`. Global and
    cold start follow FedPer's convention (``global_model = "convention"``): the server body with the
    evaluation head :math:`\\bar h`, the n-weighted mean of the latest heads
    (:class:`~fedcoe_bench.baselines.fedper.LatestHeads`). A new client fine-tunes the head only, from
    :math:`\\bar h`, on the frozen body: FedRep's own recipe for a new client.

    The frozen part gets no gradient at all (its ``.grad`` stays ``None``, so SGD, momentum and weight
    decay included, leaves it as it is): the head phase runs the body without autograd, the body
    phase calls the head with detached weights.

    Departure from the paper: its clients run 10 head epochs, then 1 body epoch, about 11 times
    FedAvg's local compute. Here a client takes the ``ctx.steps`` local steps of every method and
    splits them: the first :math:`\\tau_h = \\mathrm{round}(\\text{head\\_share} \\cdot \\tau)` train
    the head, the rest the body (with :math:`0 < \\text{head\\_share} < 1` and two steps or more,
    each phase gets at least one). The paper's ratio is ``head_share`` = 10/11.

    Args:
        head_share: the share of a client's local steps that train the head (0: body only, as FedAvg
            with a fixed personal head; 1: head only, the body never moves).

    Example:
        >>> m = FedRep(head_share=0.25, num_classes=10, in_channels=1, image_size=12)
        >>> [m.head_steps(s) for s in (1, 2, 4, 10)]  # of a client's 1, 2, 4 or 10 steps
        [0, 1, 1, 3]
    """

    def __init__(self, head_share: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= head_share <= 1:
            raise ConfigError(f"method.init_args.head_share must be in [0, 1] (got {head_share}); it is the share of "
                              f"a client's local steps that train the head, the rest train the body")
        self.head_share = head_share
        self._ctx: ClientContext | None = None

    def head_steps(self, steps: int) -> int:
        """How many of a client's ``steps`` local steps train the head (the first ones)."""
        n = int(self.head_share * steps + 0.5)  # half up, the same way every time (round() sends 2.5 to 2 but 3.5 to 4)
        if 0 < self.head_share < 1 and steps >= 2:  # a share strictly inside (0, 1) means both phases run
            n = min(max(n, 1), steps - 1)
        return n

    def on_client_start(self, x: torch.Tensor, y: torch.Tensor, ctx: ClientContext) -> None:
        super().on_client_start(x, y, ctx)
        self._ctx = ctx

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        # A new client's body is frozen by the evaluator (start_finetune names the head): head phase only.
        if self._ctx.finetune or batch_idx < self.head_steps(self._ctx.steps):
            with torch.no_grad():
                features = self.net.body(x)
            return F.cross_entropy(self.net.head(features), y)
        frozen = {k: v.detach() for k, v in self.net.head.named_parameters()}
        return F.cross_entropy(functional_call(self.net.head, frozen, (self.net.body(x),)), y)
