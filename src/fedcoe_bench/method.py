"""The method contract: everything a federated method's author must know, in one place.

A method is a :class:`lightning.LightningModule` subclass of :class:`FederatedMethod`. The loop
(:mod:`fedcoe_bench.loop`) never branches on a method's name: it calls the hooks below, in this
order, and nothing else. A method overrides what differs from FedAvg.

**State.** Every parameter and floating-point buffer is one of three kinds, by name prefix:

- *shared* (the default): the server sends it to every sampled client and aggregates what comes
  back. A buffer that clients must receive but never train (e.g. SCAFFOLD's server control
  variate) is shared: :meth:`FederatedMethod.aggregate` writes it into the new server state; its
  prefix goes in ``received_only``, so that the cost counts it as received, not sent back (a
  client must leave it as received: tests/test_cost.py checks the built-in methods).
- *personal* (prefixes in ``personal``): stays with one client, kept in the client-state store
  between the rounds it trains in; every client starts from the initial value.
- *server-only* (prefixes in ``server_only``): lives on the server only (evaluation heads,
  statistics, server optimizer state). **It is hidden during a client's local training**: from
  :meth:`~FederatedMethod.on_client_start` to :meth:`~FederatedMethod.on_client_end` each such
  parameter or buffer reads as ``None``, and a hook that reads it fails with a
  :class:`~fedcoe_bench.errors.MethodError` naming the state. Only :meth:`~FederatedMethod.aggregate`,
  :meth:`~FederatedMethod.setup_server` and the predictors (and :meth:`~FederatedMethod.start_finetune`,
  which prepares what a new client is *served*) see it.

All state a client must receive is registered in ``__init__``: the loop turns the shared and the
personal state into one flat vector each (:meth:`~FederatedMethod.flatten_parameters`) before
training, and state added later would silently stay behind (refused by
:meth:`~FederatedMethod.check_state`). :meth:`~FederatedMethod.setup_server` may add server-only
state only.

**Flat vectors carry no gradient.** ``self.flat["shared"]`` and ``self.flat["personal"]`` are the
storage the parameters are views of; arithmetic on them is outside autograd, so a loss term built
on them is silently constant. Build loss terms from the parameters
(:meth:`~FederatedMethod.named_group`, and :meth:`~FederatedMethod.view_like` for the matching part
of a flat vector), as FedProx's proximal term and SCAFFOLD's correction do.

**Context.** Hooks that need to know where they are get a :class:`ClientContext` (round, number of
training clients, clients this round, local steps this client takes, training or cold-start
fine-tuning) or, on the server, a :class:`RoundContext`. ``training_step`` keeps Lightning's
signature: a method that needs the context there keeps it from ``on_client_start``.

**Hooks**, in the order the loop calls them:

1. ``__init__``: the modules (:meth:`~FederatedMethod.make_backbone`) and every state clients receive.
2. :meth:`~FederatedMethod.setup_server` ``(server)``: server-only state sized from the initial server state.
3. Per sampled client, its shared and personal state loaded:
   :meth:`~FederatedMethod.on_client_start` ``(x, y, ctx)`` with its local training data;
   :meth:`~FederatedMethod.on_client_validation` ``(x, y, ctx)`` with its local validation split
   (eval mode, no gradients, must not change the model); ``ctx.steps`` calls of
   :meth:`~FederatedMethod.training_step` with :meth:`~FederatedMethod.configure_optimizers`'
   optimizer (fresh every client and round); :meth:`~FederatedMethod.on_client_end` ``(x, ctx)``,
   which **returns the client's report** (tensors, label-free unless the method's docstring says
   which label-derived scalars it sends, with the same keys and shapes on every client: several
   processes stack them; checked); **the personal state as it stands when it returns is what the
   client keeps**, and the shared state is its update.
4. :meth:`~FederatedMethod.aggregate` ``(server, updates, ctx) -> (new server state, scalars)``:
   the new flat shared vector and the scalars to log this round (nothing is stashed on ``self``
   for a later hook; server-only state is the method's own and may be updated here).
5. Evaluation: :meth:`~FederatedMethod.predict_global` (server state loaded),
   :meth:`~FederatedMethod.predict_personal` (a client's personal state loaded),
   :meth:`~FederatedMethod.predict_cold_start` (a new client: may read its unlabeled inputs,
   never labels, no gradient steps); :meth:`~FederatedMethod.start_finetune` for the fine-tuned
   cold start, whose local steps call ``on_client_start`` with ``ctx.finetune = True``;
   :meth:`~FederatedMethod.cold_start_diagnostics` (optional) for each new client, averaged.
6. :meth:`~FederatedMethod.routing_profiles` and :meth:`~FederatedMethod.save_artifacts` at the end.

A new method is one file in ``baselines/`` (the package ``fedcoe_bench.baselines``) with its short
name in :mod:`fedcoe_bench.registry`, or any importable class given by class path.

(Over 400 lines because the contract is in one place: this docstring, the base class and the
helpers every method uses to honour it.)
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field

import lightning as L
import torch
import torch.nn.functional as F

from fedcoe_bench.errors import ConfigError, MethodError
from fedcoe_bench.models import Backbone, Experts, build_backbone


@dataclass(frozen=True)
class RoundContext:
    """Where the server is: round ``round`` (1 for the first) of a federation of ``num_clients``
    training clients, ``clients`` of them sampled this round."""

    round: int
    num_clients: int
    clients: int


@dataclass(frozen=True)
class ClientContext(RoundContext):
    """Where a client is: the round's context plus the ``steps`` local steps (mini-batches) this
    client takes, and ``finetune``: a new client fine-tuning on its labelled shots (the
    ``cold_start_ft_acc`` column) rather than a training client."""

    steps: int = 0
    finetune: bool = False


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
    """Base class of federated methods (the contract: this module's docstring).

    Class attributes:

    - ``personal``: name prefixes of the state that never leaves its client.
    - ``server_only``: name prefixes of the state that lives on the server only.
    - ``received_only``: name prefixes of the shared state clients read and never change.
    - ``serving``: init args that training never reads (``fedbench eval`` may change them).
    - ``global_model``: what the global and cold-start columns measure: ``trained``,
      ``convention`` or ``none`` (tables print n/a).

    A BatchNorm's running statistics follow its weights: averaged when it is shared, kept per
    client when it is personal. To read one tensor's part of a flat vector (a
    :class:`ClientUpdate`'s ``shared``, a server state) use :meth:`span` and :meth:`view_like`,
    never ``view_as``: a flat vector holds each tensor in its memory order, which channels-last
    changes.

    Args:
        backbone: ``cnn`` (McMahan et al., 2017), ``resnet18``, or the class path of a user's
            :class:`~fedcoe_bench.models.Backbone`-like module (see :func:`~fedcoe_bench.models.build_backbone`).
        lr, momentum, weight_decay: local SGD.
        num_classes, in_channels, image_size: filled in from the data source by the CLI.
    """

    personal: tuple[str, ...] = ()
    server_only: tuple[str, ...] = ()
    received_only: tuple[str, ...] = ()  # shared, written by the server alone: a client receives it, sends none of it back
    serving: tuple[str, ...] = ()  # init args that training never reads: ``fedbench eval`` may change them
    # What the global and cold-start columns measure (summary.json records it, tables read it):
    # "trained", a server model the method trains; "convention", a server model the method's paper
    # does not define, served by this benchmark's convention (the class docstring says which; tables
    # mark it); "none", no such model at all (tables print n/a).
    global_model: str = "trained"
    # Trainable side by side with other clients (loop.client_batch > 1, fedcoe_bench.batched): the local step is a plain
    # training_step (a mean cross-entropy, plus terms of the state) and the client hooks read only the loaded state and data.
    # Read from the class itself, never inherited: a subclass whose hooks keep per-client state on self would be wrong.
    batchable: bool = False
    # The server keeps running sums over clients and subtracts what a client's stored personal state says
    # it added before (FedPer's evaluation head, FedEM's mean pi): a store that rounds the state
    # (loop.client_state_dtype=bfloat16) would leave part of every old contribution in the sums.
    exact_personal_state: bool = False

    def __init__(self, backbone: str = "cnn", lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0,
                 num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        if not lr > 0:  # also NaN
            raise ConfigError(f"method.init_args.lr must be > 0 (got {lr}); e.g. 0.01")
        self.backbone, self.lr, self.momentum, self.weight_decay = backbone, lr, momentum, weight_decay
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size

    def make_backbone(self, **kwargs) -> Backbone:
        return build_backbone(self.backbone, self.in_channels, self.num_classes, self.image_size, **kwargs)

    def make_experts(self, num_experts: int) -> Experts:
        """``num_experts`` independently initialised backbones: a mixture's experts, a clustered method's
        models, an ensemble's members (``experts.<k>.*``, each one span of the flat vector)."""
        if num_experts < 1:
            raise ConfigError(f"method.init_args.num_experts must be >= 1 (got {num_experts})")
        return Experts(self.make_backbone() for _ in range(num_experts))

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
                raise MethodError(f"{type(self).__name__}.{extra[0]} was registered after flatten_parameters (e.g. in "
                                  f"setup_server), so it would not move as {kind} state: register it in __init__ if "
                                  f"clients need it, or list its prefix in server_only if only the server does")

    @contextlib.contextmanager
    def server_state_hidden(self):
        """Hide the server-only state (each such parameter or buffer reads as ``None``) for the
        duration of a client's local work, so that client code cannot use what clients never
        receive; a hook that tries fails with a :class:`~fedcoe_bench.errors.MethodError`."""
        hidden = []
        for prefix, module in self.named_modules():
            for kind, own in (("parameter", module.named_parameters(prefix, recurse=False)),
                              ("buffer", module.named_buffers(prefix, recurse=False))):
                for name, t in list(own):
                    if self._kind(name) == "server":
                        hidden.append((module, name.rpartition(".")[2], kind, t))
        for module, attr, kind, _ in hidden:
            getattr(module, f"register_{kind}")(attr, None)
        try:
            yield
        except (TypeError, AttributeError) as err:
            if hidden and "NoneType" in str(err):
                names = ", ".join(sorted({n for n, _ in self.named_state("server")} or self.server_only))
                raise MethodError(f"{type(self).__name__} read server-only state during a client's local training "
                                  f"({err}); clients never receive {names}: drop its prefix from server_only (then it "
                                  f"is shared and sent to clients) or use it only in aggregate and the predictors") from err
            raise
        finally:
            for module, attr, kind, t in hidden:
                getattr(module, f"register_{kind}")(attr, t)

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

    def parameters_with(self, flat: torch.Tensor, kind: str = "shared"):
        """``(parameter, its part of flat)`` for each parameter of ``kind``: the way to build a loss term
        that compares the parameters with a flat vector (an anchor, a control variate) and keeps
        their gradient, since the flat vectors themselves carry none.

        Example:
            >>> m = FederatedMethod()
            >>> m.lin = torch.nn.Linear(2, 1)
            >>> m.flatten_parameters()
            >>> anchor = m.flat["shared"].clone()
            >>> term = sum((p - a).pow(2).sum() for p, a in m.parameters_with(anchor + 1))
            >>> term.item(), term.requires_grad
            (3.0, True)
        """
        return [(p, self.view_like(flat, name, kind)) for name, p in self.named_group(kind)]

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

    def on_client_start(self, x: torch.Tensor, y: torch.Tensor, ctx: ClientContext) -> None:
        """Called with the client's local training data after its state is loaded, before training
        (and with a new client's labelled shots before it fine-tunes, ``ctx.finetune``; see
        :meth:`start_finetune`)."""

    def on_client_validation(self, x: torch.Tensor, y: torch.Tensor, ctx: ClientContext) -> None:
        """Called with the client's local validation split (inputs and labels; possibly empty) after
        :meth:`on_client_start`, in eval mode and without gradients, before training. What the method
        learns here may reach the server only as scores in :meth:`on_client_end`'s report, and
        must not change the model (validation samples are not training data)."""

    def on_client_end(self, x: torch.Tensor, ctx: ClientContext) -> dict[str, torch.Tensor]:
        """Called in eval mode after local training with the client's local train inputs; returns the
        report sent with its update (same keys and shapes on every client). The personal state as
        it stands when this returns is what the client keeps; the shared state is its update."""
        return {}

    # ------------------------------------------------------------------ server
    def setup_server(self, server: torch.Tensor) -> None:
        """Called once with the initial server state (the flat shared vector, on its device and in its
        dtype), after :meth:`flatten_parameters` and before training or restoring a checkpoint.

        Create server-side state whose shape depends on the server state here, as buffers under
        ``server_only`` (then ``load_state_dict`` restores it on resume), e.g.
        ``self.register_buffer("velocity", torch.zeros_like(server))``.
        """

    def aggregate(self, server: torch.Tensor, updates: list[ClientUpdate],
                  ctx: RoundContext) -> tuple[torch.Tensor, dict[str, float]]:
        """The new server state and the scalars to log; FedAvg:
        :math:`w \\leftarrow \\sum_{i \\in S} n_i w_i / \\sum_{i \\in S} n_i`.

        Example:
            >>> m = FederatedMethod()
            >>> ups = [ClientUpdate(0, 1.0, torch.tensor([0.0, 4.0])), ClientUpdate(1, 3.0, torch.tensor([4.0, 0.0]))]
            >>> m.aggregate(torch.zeros(2), ups, RoundContext(1, 2, 2))
            (tensor([3., 1.]), {})
        """
        return weighted_mean([u.shared for u in updates], [u.weight for u in updates], server), {}

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

    def cold_start_diagnostics(self, unlabeled: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Diagnostics of how a new client is served, never a prediction: the evaluator loads the server
        state, calls this with the client's unlabeled inputs and its labelled local test split, and
        logs the mean of each value over the new clients as ``cold_start_<key>`` (e.g. FedCoE: does the
        gate route a new client, from its inputs alone, to the expert that fits its labels). A method
        overrides it only to add such columns."""
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


def check_reports(method: FederatedMethod, updates: list[ClientUpdate]) -> None:
    """Every client's report has the first one's keys, shapes and dtypes (several processes stack
    them; one process would otherwise hide a mismatch until it runs on two)."""
    if not updates:
        return
    want = {k: (tuple(v.shape), v.dtype) for k, v in updates[0].report.items()}
    for u in updates[1:]:
        got = {k: (tuple(v.shape), v.dtype) for k, v in u.report.items()}
        if got != want:
            diff = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
            raise MethodError(f"{type(method).__name__}.on_client_end reported {', '.join(diff)} differently for client "
                              f"{u.client} than for client {updates[0].client}; every client must report the same keys "
                              f"with the same shapes and dtypes (send a zero and a weight of 0 where a client has nothing)")


def overrides(method: FederatedMethod, hook: str) -> bool:
    """Whether ``method``'s class overrides the base class's ``hook``: where it does not, the loop and
    the evaluator may skip the hook's inputs or share its predictions between clients.

    Example:
        >>> class Quiet(FederatedMethod):
        ...     def on_client_end(self, x, ctx):
        ...         return {}
        >>> overrides(Quiet(), "on_client_end"), overrides(Quiet(), "on_client_validation")
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
