"""Ditto: Fair and Robust Federated Learning Through Personalization (Li, Hu, Beirami, Smith, ICML 2021,
arXiv 2012.04221)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from fedcoe_bench.baselines.fedavg import FedAvg
from fedcoe_bench.errors import ConfigError
from fedcoe_bench.method import ClientContext


class Ditto(FedAvg):
    """A global model trained as FedAvg and, on each client, a personal model pulled towards it. With
    :math:`w^t` the global model client *i* received and :math:`F_i` its local loss, the client runs
    local SGD on both

    .. math:: \\min_w F_i(w) \\quad\\text{and}\\quad
              \\min_{v_i} F_i(v_i) + \\frac{\\lambda}{2} \\lVert v_i - w^t \\rVert^2 ,

    the server averages the :math:`w` updates as FedAvg does and :math:`v_i` never leaves the client.
    Personal prediction: :math:`v_i`; global and cold start: :math:`w`. The personal model starts as a
    copy of the initial global model :math:`w^0`. A new client fine-tunes its personal model on its
    shots from the model it is served, :math:`v \\leftarrow w`, on the same objective (anchored at
    that :math:`w`). ``lam = 0`` is FedAvg for :math:`w` and Local for :math:`v_i`; a large ``lam``
    keeps :math:`v_i` near :math:`w^t`.

    Departures from the paper (Algorithm 1), so that Ditto runs in the benchmark's loop with its
    optimizer:

    - both models take the client's ``ctx.steps`` local steps, on the same mini-batches, as one
      ``training_step`` returning :math:`F_i(w) + F_i(v_i) + \\frac{\\lambda}{2}\\lVert v_i - w^t\\rVert^2`:
      the two parameter sets are disjoint, so SGD on the sum is each objective's own SGD at the same
      step size. The paper runs :math:`s` personal iterations (a count of its own, tuned) in a loop
      of their own; interleaving them changes nothing else, since neither update reads the other's
      iterate (:math:`v_i` is pulled towards :math:`w^t`, not towards the moving :math:`w`). A
      client's step is two forward and backward passes, twice FedAvg's compute;
    - the local optimizer is the benchmark's (SGD with ``momentum`` and ``weight_decay``) for both
      models; the paper uses plain SGD.

    Args:
        lam: :math:`\\lambda`, the pull of the personal model towards the global one (the paper tunes
            it between 0.01 and 2; METHODS.md suggests 0.1 to 1).

    Example:
        >>> m = Ditto(lam=2.0, num_classes=10, in_channels=1, image_size=12)
        >>> m.flatten_parameters()
        >>> sorted({n.split(".")[0] for n in m.layout["personal"]}), torch.equal(m.flat["personal"], m.flat["shared"])
        (['personal_net'], True)
        >>> m.on_client_start(torch.zeros(1, 1, 12, 12), torch.zeros(1, dtype=torch.long), None)
        >>> with torch.no_grad():
        ...     m.flat["personal"] += 0.5  # every personal weight 0.5 away from the global model received
        >>> round(m.proximal_term().item() / m.flat["personal"].numel(), 3)  # lam/2 * 0.5^2
        0.25
    """

    personal = ("personal_net.",)

    def __init__(self, lam: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        if not lam >= 0:
            raise ConfigError(f"method.init_args.lam must be >= 0 (got {lam}); 0 trains the personal model alone, "
                              f"as Local does")
        self.lam = lam
        # A copy, not a second draw: v_i starts from w^0, and the global model keeps FedAvg's initial weights.
        self.personal_net = copy.deepcopy(self.net)
        self._anchor: torch.Tensor | None = None
        self._ctx: ClientContext | None = None

    def on_client_start(self, x: torch.Tensor, y: torch.Tensor, ctx: ClientContext) -> None:
        # w^t as received: the global model moves during the same local steps, so it is copied before the first.
        self._anchor = self.flat["shared"].detach().clone()
        self._ctx = ctx

    def proximal_term(self) -> torch.Tensor:
        """:math:`\\frac{\\lambda}{2} \\lVert v_i - w^t \\rVert^2`, differentiable in :math:`v_i`."""
        # personal_net.X pairs with net.X: the same module, copied, so the same order and strides.
        total = self._anchor.new_zeros(())
        for v, (_, anchor) in zip(self.personal_net.parameters(), self.parameters_with(self._anchor)):
            total = total + (v - anchor).pow(2).sum()
        return 0.5 * self.lam * total

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.personal_net(x), y)
        if not (self._ctx is not None and self._ctx.finetune):  # a new client fine-tunes v only: w is frozen
            loss = F.cross_entropy(self.net(x), y) + loss
        if self.lam == 0:  # skipped rather than multiplied by 0: lam = 0 is Local exactly, at no extra cost
            return loss
        return loss + self.proximal_term()

    @torch.no_grad()
    def predict_personal(self, x: torch.Tensor) -> torch.Tensor:
        return self.personal_net(x).softmax(-1)

    @torch.no_grad()
    def start_finetune(self) -> tuple[str, ...]:
        """A new client is served :math:`w`: its personal model starts there (the anchor, taken in
        :meth:`on_client_start`, is that same :math:`w`)."""
        self.personal_net.load_state_dict(self.net.state_dict())  # in place: the flat views stay
        return ("personal_net.",)
