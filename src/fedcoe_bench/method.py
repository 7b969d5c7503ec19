"""The contract every federated method fulfils. The loop knows nothing else about a method."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import lightning as L
import torch
import torch.nn.functional as F

from fedcoe_bench.errors import ConfigError
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

    Parameters and buffers whose names start with one of ``personal`` never leave their client;
    those starting with one of ``server_only`` live on the server and are never sent to clients
    (evaluation heads, statistics, server optimizer state); all others are *shared*: the server
    sends them to every sampled client and aggregates what comes back. A BatchNorm's running
    statistics thus follow its weights: averaged when it is shared, kept per client when it is
    personal. The loop moves shared and personal state as flat vectors (see
    :meth:`flatten_parameters`).

    The method contract, in one place: a method overrides what differs from FedAvg, and the loop
    calls nothing else (it never branches on a method's name).

    Class attributes:

    - ``personal``: name prefixes of the state that never leaves its client.
    - ``server_only``: name prefixes of the state that lives on the server, never sent to a client.
    - ``serving``: init args that training never reads (``fedbench eval`` may change them).
    - ``global_model``: what the global and cold-start columns measure: ``trained``,
      ``convention`` or ``none`` (tables print n/a).

    Hooks (in the order the loop calls them):

    - ``__init__``: its modules, built with :meth:`make_backbone`.
    - :meth:`setup_server`: server-side state sized from the initial server state (e.g. a momentum buffer).
    - :meth:`configure_optimizers`: the local optimizer (fresh state for every client and round).
    - :meth:`on_client_start`: a client, its state loaded, sees its local training data before training.
    - :meth:`on_client_validation`: then its local validation split, for label-free scores to report.
    - :meth:`training_step`: the local objective of one mini-batch.
    - :meth:`client_report`: label-free statistics sent with the update after training.
    - :meth:`aggregate`: the server update from the sampled clients' :class:`ClientUpdate` s.
    - :meth:`round_diagnostics`: scalars logged after each aggregation.
    - :meth:`predict_global`, :meth:`predict_personal`, :meth:`predict_cold_start`: class
      probabilities for the global, personalized and cold-start columns.
    - :meth:`start_finetune`: the parameters a new client fine-tunes on its few labelled shots
      (the ``cold_start_ft_acc`` column), and the served model they start from.
    - :meth:`routing_profiles`: each trained client's latest routing profile (methods with experts).
    - :meth:`save_artifacts`: method-specific files written into the run directory at the end.

    To read one tensor's part of a flat vector (a :class:`ClientUpdate`'s ``shared``, a server
    state) use :meth:`span` and :meth:`view_like`, never ``view_as``: a flat vector holds each tensor
    in its memory order, which channels-last changes.

    Args:
        backbone: ``cnn`` (McMahan et al., 2017), ``resnet18``, or the class path of a user's
            :class:`~fedcoe_bench.models.Backbone`-like module (see :func:`~fedcoe_bench.models.build_backbone`).
        lr, momentum, weight_decay: local SGD.
        num_classes, in_channels, image_size: filled in from the data source by the CLI.
    """

    personal: tuple[str, ...] = ()
    server_only: tuple[str, ...] = ()
    serving: tuple[str, ...] = ()  # init args that training never reads: ``fedbench eval`` may change them
    # What the global and cold-start columns measure (summary.json records it, tables read it):
    # "trained", a server model the method trains; "convention", a server model the method's paper
    # does not define, served by this benchmark's convention (the class docstring says which; tables
    # mark it); "none", no such model at all (tables print n/a).
    global_model: str = "trained"
    # Trainable side by side with other clients (loop.client_batch > 1, fedcoe_bench.batched): the local step is a plain
    # training_step (a mean cross-entropy, plus terms of the state) and the client hooks read only the loaded state and data.
    batchable: bool = False

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

    def named_state(self, kind: str) -> list[tuple[str, torch.Tensor]]:
        """Parameters and buffers of one kind, module by module (a module's own
        parameters, then its own buffers, then its children's), so that the state under any module
        prefix is one contiguous range of the flat vector.

        Integer buffers cannot be averaged or carried in a float vector: they are allowed under
        ``server_only`` and, left out of the shared and personal lists, as a BatchNorm's
        ``num_batches_tracked`` (a counter no computation reads while the BatchNorm has a momentum);
        any other is refused, by name.

        Example:
            >>> m = FederatedMethod()
            >>> m.net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
            >>> [n for n, _ in m.named_state("shared")]
            ['net.0.weight', 'net.0.bias', 'net.1.weight', 'net.1.bias', 'net.1.running_mean', 'net.1.running_var']
        """
        out, seen = [], set()
        for prefix, module in self.named_modules():
            own = itertools.chain(module.named_parameters(prefix, recurse=False), module.named_buffers(prefix, recurse=False))
            for name, t in own:
                if id(t) in seen or self._kind(name) != kind:
                    continue
                seen.add(id(t))
                if t.is_floating_point() or kind == "server":
                    out.append((name, t))
                elif not (name.split(".")[-1] == "num_batches_tracked" and getattr(module, "momentum", None) is not None):
                    raise ConfigError(
                        f"{type(self).__name__} has the {t.dtype} buffer '{name}', which can be neither averaged nor "
                        f"kept per client; make it floating-point, list it in server_only, or (a BatchNorm's "
                        f"counter) give that BatchNorm a momentum"
                    )
        return out

    def flatten_parameters(self) -> None:
        """Make the shared and the personal state (parameters and floating-point buffers, see
        :meth:`named_state`) views into one flat vector each.

        Loading a client is then one ``copy_`` per vector and reading its update one ``clone``; the
        optimizer keeps working on the same Parameter objects. Call after casting and moving to the
        device: both replace tensors, which would end the views.

        Each piece of state keeps its memory format: its slice holds its elements in memory order (for
        a channels-last convolution weight, output x height x width x input channels), so a flat
        vector's element order depends on the format; read one tensor's part of a flat vector with
        :meth:`view_like`, not with ``view_as``.
        """
        self.flat: dict[str, torch.Tensor] = {}
        self.layout: dict[str, dict[str, slice]] = {}
        ref = next(self.parameters())
        for kind in ("shared", "personal"):
            state = self.named_state(kind)
            for name, t in state:
                if t.dtype != ref.dtype:
                    raise ConfigError(f"{type(self).__name__}.{name} is {t.dtype} but its other state is {ref.dtype}; "
                                      f"the loop moves each kind as one flat vector, so register it as {ref.dtype}")
            buf = torch.cat([_memory_order(t.detach()) for _, t in state]) if state else ref.new_zeros(0)
            self.layout[kind], start = {}, 0
            for name, t in state:
                t.data = buf[start : start + t.numel()].as_strided(t.shape, t.stride())
                self.layout[kind][name] = slice(start, start + t.numel())
                start += t.numel()
            self.flat[kind] = buf

    def check_state(self) -> None:
        """Refuse shared or personal state that is not in the flat vectors, e.g. a buffer registered
        by :meth:`setup_server` outside ``server_only``: it would stay in the model, silently passed
        from one client to the next."""
        for kind in ("shared", "personal"):
            extra = [n for n, _ in self.named_state(kind) if n not in self.layout[kind]]
            if extra:
                raise ConfigError(f"{type(self).__name__}.{extra[0]} was added after flatten_parameters, so it would "
                                  f"not move as {kind} state; list it in server_only if it is server state")

    def view_like(self, flat: torch.Tensor, name: str, kind: str = "shared") -> torch.Tensor:
        """State ``name``'s part of a flat ``kind`` vector, shaped and strided like that parameter or buffer.

        Example:
            >>> m = FederatedMethod()
            >>> m.lin = torch.nn.Linear(2, 1)
            >>> m.flatten_parameters()
            >>> torch.equal(m.view_like(m.flat["shared"], "lin.weight"), m.lin.weight)
            True
        """
        t = dict(self.named_state(kind))[name]
        return flat[self.layout[kind][name]].as_strided(t.shape, t.stride())

    def span(self, prefix: str, kind: str = "shared") -> slice:
        """The contiguous range of the flat ``kind`` vector held by the state under ``prefix``."""
        hits = [s for n, s in self.layout[kind].items() if n.startswith(prefix)]
        if not hits:
            raise KeyError(f"no {kind} state under '{prefix}'")
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
        """Called with the client's local training data after its state is loaded, before training
        (and with a new client's labelled shots before it fine-tunes, see :meth:`start_finetune`)."""

    def on_client_validation(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Called with the client's local validation split (inputs and labels; possibly empty) after
        :meth:`on_client_start`, in eval mode and without gradients, before training. What the method
        learns here may reach the server only as label-free scores in :meth:`client_report`, and
        must not change the model (validation samples are not training data)."""

    def client_report(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Label-free statistics the client sends with its update, computed on its local train inputs."""
        return {}

    # ------------------------------------------------------------------ server
    def setup_server(self, server: torch.Tensor) -> None:
        """Called once with the initial server state (the flat shared vector, on its device and in its
        dtype), after :meth:`flatten_parameters` and before training or restoring a checkpoint.

        Create server-side state whose shape depends on the server state here, as buffers under
        ``server_only`` (then ``load_state_dict`` restores it on resume), e.g.
        ``self.register_buffer("velocity", torch.zeros_like(server))``.
        """

    def aggregate(self, server: torch.Tensor, updates: list[ClientUpdate]) -> torch.Tensor:
        """FedAvg: :math:`w \\leftarrow \\sum_{i \\in S} n_i w_i / \\sum_{i \\in S} n_i`.

        Example:
            >>> m = FederatedMethod()
            >>> ups = [ClientUpdate(0, 1.0, torch.tensor([0.0, 4.0])), ClientUpdate(1, 3.0, torch.tensor([4.0, 0.0]))]
            >>> m.aggregate(torch.zeros(2), ups)
            tensor([3., 1.])
        """
        return weighted_mean([u.shared for u in updates], [u.weight for u in updates], server)

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

    def start_finetune(self) -> tuple[str, ...]:
        """Name prefixes of the parameters a new client fine-tunes on its labelled shots (FedAvg: the
        whole model, ``("",)``; server-only parameters never are).

        The evaluator loads the server state and the initial personal state, calls
        :meth:`on_client_start` with the shots, then this; a method whose cold-start predictor
        serves something other than that state (e.g. an evaluation head) copies it into the
        parameters it names here, so fine-tuning starts from what a new client is served. Then
        ``loop.cold_start_steps`` steps of :meth:`training_step` with :meth:`configure_optimizers`'
        settings update only the named parameters, :meth:`predict_personal` is scored on the
        client's local test split, and the state is discarded.
        """
        return ("",)

    def round_diagnostics(self) -> dict[str, float]:
        """Scalars logged after each aggregation (routing entropy, expert usage, ...)."""
        return {}

    def routing_profiles(self) -> dict[int, torch.Tensor]:
        """Client id -> the latest label-free routing profile the client reported (its mean gate
        weights over its local inputs, ``[experts]``), for every client trained so far; empty for
        methods without experts. The run writes them to ``routing.csv`` and, with feature-shift
        clusters, logs how well each client's top expert follows its cluster (:mod:`fedcoe_bench.routing`)."""
        return {}

    def save_artifacts(self, run_dir) -> None:
        """Write method-specific results (e.g. a routing matrix) into the run directory at the end."""


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor's elements as a 1-D tensor in the order they lie in memory (a copy)."""
    dims = sorted(range(t.dim()), key=lambda d: -t.stride(d))  # stable: ties (size-1 dims) keep their order
    return t.permute(dims).flatten()


def overrides(method: FederatedMethod, hook: str) -> bool:
    """Whether ``method``'s class overrides the base class's ``hook``: where it does not, the loop and
    the evaluator may skip the hook's inputs or share its predictions between clients.

    Example:
        >>> class Quiet(FederatedMethod):
        ...     def client_report(self, x):
        ...         return {}
        >>> overrides(Quiet(), "client_report"), overrides(Quiet(), "on_client_validation")
        (True, False)
    """
    return getattr(type(method), hook) is not getattr(FederatedMethod, hook)


def weighted_mean(vectors, weights, fallback: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """:math:`\\sum_i w_i x_i / \\sum_i w_i` over ``vectors`` (tensors shaped like ``fallback``, or the rows
    of one stacked tensor); ``fallback`` where the weights sum to ~0.

    Accumulated in place into one output: stacking a round's updates first would copy them all
    once more (a few percent of a CPU round for the CNN).

    Example:
        >>> weighted_mean([torch.tensor([0.0, 4.0]), torch.tensor([4.0, 0.0])], [1.0, 3.0], torch.zeros(2))
        tensor([3., 1.])
    """
    w = [float(x) for x in weights]
    total = sum(w)
    if total <= eps:
        return fallback.clone()
    out = torch.zeros_like(fallback)
    for x, wi in zip(vectors, w):
        out.add_(x, alpha=wi / total)
    return out
