"""The contract every federated method fulfils. The loop knows nothing else about a method."""

from __future__ import annotations

from dataclasses import dataclass, field

import lightning as L
import torch
import torch.nn.functional as F

from fedcoe_bench.models import Backbone, build_backbone


@dataclass
class ClientUpdate:
    """What one client sends back after local training."""

    client: int
    weight: float  # n_i, the client's number of local training samples
    shared: torch.Tensor  # the flat vector of its shared parameters
    report: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. routing profile, gate mass
    loss: float = 0.0  # mean local training loss (for logging)
    samples: int = 0  # samples processed in local training (for throughput)


class FederatedMethod(L.LightningModule):
    """Base class of federated methods: a LightningModule that also says what is shared and how the
    server aggregates.

    Parameters whose names start with one of ``personal`` never leave their client; those starting
    with one of ``server_only`` live on the server and are never sent to clients (evaluation
    heads, statistics); all others are *shared*: the server sends them to every sampled client
    and aggregates what comes back. The loop moves shared and personal parameters as flat vectors
    (see :meth:`flatten_parameters`).

    A method overrides what differs from FedAvg:

    - ``__init__``: its modules, built with :meth:`make_backbone`;
    - :meth:`training_step`: the local objective;
    - :meth:`on_client_start` / :meth:`client_report`: what a client does before training and
      reports after it (no labels in the report);
    - :meth:`aggregate`: the server update from the sampled clients' :class:`ClientUpdate` s;
    - :meth:`predict_global`, :meth:`predict_personal`, :meth:`predict_cold_start`: class
      probabilities for the three metrics.

    Args:
        backbone: ``cnn`` (McMahan et al., 2017) or ``resnet18``.
        lr, momentum, weight_decay: local SGD.
        num_classes, in_channels, image_size: filled in from the data source by the CLI.
    """

    personal: tuple[str, ...] = ()
    server_only: tuple[str, ...] = ()
    serving: tuple[str, ...] = ()  # init args that training never reads: ``fedbench eval`` may change them

    def __init__(self, backbone: str = "cnn", lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0,
                 num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        self.backbone, self.lr, self.momentum, self.weight_decay = backbone, lr, momentum, weight_decay
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size

    def make_backbone(self, **kwargs) -> Backbone:
        return build_backbone(self.backbone, self.in_channels, self.num_classes, self.image_size, **kwargs)

    # ------------------------------------------------------------------ what is shared
    def _kind(self, name: str) -> str:
        if name.startswith(self.personal) and self.personal:
            return "personal"
        if name.startswith(self.server_only) and self.server_only:
            return "server"
        return "shared"

    def named_group(self, kind: str) -> list[tuple[str, torch.nn.Parameter]]:
        """Parameters of one kind (``shared``, ``personal`` or ``server``) in registration order."""
        return [(n, p) for n, p in self.named_parameters() if self._kind(n) == kind]

    def flatten_parameters(self) -> None:
        """Make the shared and the personal parameters views into one flat buffer each.

        Loading a client is then one ``copy_`` per buffer and reading its update one ``clone``; the
        optimizer keeps working on the same Parameter objects. Call after moving to the device (and
        after ``.to(memory_format=torch.channels_last)``, if wanted).

        Each parameter keeps its memory format: its slice holds its elements in memory order (for a
        channels-last convolution weight, output x height x width x input channels), so a flat
        vector's element order depends on the format; read a parameter's part of a flat vector
        with :meth:`view_like`, not with ``view_as``.
        """
        self.flat: dict[str, torch.Tensor] = {}
        self.layout: dict[str, dict[str, slice]] = {}
        for kind in ("shared", "personal"):
            params = self.named_group(kind)
            ref = next(self.parameters())
            buf = torch.cat([_memory_order(p.detach()) for _, p in params]) if params else ref.new_zeros(0)
            self.layout[kind], start = {}, 0
            for name, p in params:
                p.data = buf[start : start + p.numel()].as_strided(p.shape, p.stride())
                self.layout[kind][name] = slice(start, start + p.numel())
                start += p.numel()
            self.flat[kind] = buf

    def view_like(self, flat: torch.Tensor, name: str, kind: str = "shared") -> torch.Tensor:
        """Parameter ``name``'s part of a flat ``kind`` vector, shaped and strided like the parameter.

        Example:
            >>> m = FederatedMethod()
            >>> m.lin = torch.nn.Linear(2, 1)
            >>> m.flatten_parameters()
            >>> torch.equal(m.view_like(m.flat["shared"], "lin.weight"), m.lin.weight)
            True
        """
        p = self.get_parameter(name)
        return flat[self.layout[kind][name]].as_strided(p.shape, p.stride())

    def span(self, prefix: str, kind: str = "shared") -> slice:
        """The contiguous range of the flat ``kind`` vector held by parameters under ``prefix``."""
        hits = [s for n, s in self.layout[kind].items() if n.startswith(prefix)]
        if not hits:
            raise KeyError(f"no {kind} parameter under '{prefix}'")
        return slice(min(s.start for s in hits), max(s.stop for s in hits))

    # ------------------------------------------------------------------ local training
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for n, p in self.named_parameters() if p.requires_grad and self._kind(n) != "server"]
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def on_client_start(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Called with the client's local training data after its state is loaded, before training."""

    def client_report(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Label-free statistics the client sends with its update, computed on its local train inputs."""
        return {}

    # ------------------------------------------------------------------ server
    def aggregate(self, server: torch.Tensor, updates: list[ClientUpdate]) -> torch.Tensor:
        """FedAvg: :math:`w \\leftarrow \\sum_{i \\in S} n_i w_i / \\sum_{i \\in S} n_i`.

        Example:
            >>> m = FederatedMethod()
            >>> ups = [ClientUpdate(0, 1.0, torch.tensor([0.0, 4.0])), ClientUpdate(1, 3.0, torch.tensor([4.0, 0.0]))]
            >>> m.aggregate(torch.zeros(2), ups)
            tensor([3., 1.])
        """
        return weighted_mean(torch.stack([u.shared for u in updates]), [u.weight for u in updates], server)

    # ------------------------------------------------------------------ evaluation (class probabilities)
    @torch.no_grad()
    def predict_global(self, x: torch.Tensor) -> torch.Tensor:
        """The server model alone, on any input."""
        return self(x).softmax(-1)

    @torch.no_grad()
    def predict_personal(self, x: torch.Tensor) -> torch.Tensor:
        """The personalised model of the client whose state is loaded."""
        return self.predict_global(x)

    @torch.no_grad()
    def predict_cold_start(self, x: torch.Tensor, unlabeled: torch.Tensor) -> torch.Tensor:
        """A new client that never trained: may read its unlabeled inputs, never labels or gradients.
        The loop loads the server state and the initial personal state before calling this."""
        return self.predict_global(x)

    def round_diagnostics(self) -> dict[str, float]:
        """Scalars logged after each aggregation (routing entropy, expert usage, ...)."""
        return {}

    def save_artifacts(self, run_dir) -> None:
        """Write method-specific results (e.g. a routing matrix) into the run directory at the end."""


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor's elements as a 1-D tensor in the order they lie in memory (a copy)."""
    dims = sorted(range(t.dim()), key=lambda d: -t.stride(d))  # stable: ties (size-1 dims) keep their order
    return t.permute(dims).flatten()


def weighted_mean(stacked: torch.Tensor, weights, fallback: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``sum_i w_i x_i / sum_i w_i`` over the first dim; ``fallback`` where the weights sum to ~0."""
    w = torch.as_tensor(weights, dtype=stacked.dtype, device=stacked.device)
    total = w.sum()
    if total <= eps:
        return fallback.clone()
    return (w @ stacked) / total
