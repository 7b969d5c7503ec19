"""Batched clients: a round's clients trained side by side on one device (``loop.client_batch``).

A serial loop leaves an accelerator idle: one client's small batches cannot fill it. Here ``B``
clients train at once. Their state is stacked along a leading client dimension, one ``[B, numel]``
matrix per kind (shared, personal) whose rows are the loop's flat vectors, so a client goes in and
comes out as a row copy. Each parameter is a strided view of those rows, laid out in that
parameter's own memory order, so what a method computes from its flat vectors (FedProx's anchor,
read with ``view_like``) lines up with what it computes from its parameters.

One step of all clients is one call of the method's own ``training_step`` under
``torch.func.vmap(grad_and_value(...))`` through ``functional_call`` (public API only), then one
``torch.optim.SGD`` step over the stacked tensors: SGD with momentum and weight decay is
elementwise, so it is B independent optimizers.

What each client keeps, and how it matches :meth:`FederatedLoop._train_client`:

- **data order and augmentation**: each client draws its batches from ``fed.batches`` with its own
  generator, seeded by ``client_seed(seed, round, client)``, exactly as the sequential loop does;
  the batches of one step are stacked.
- **partial batches**: padded to ``batch_size`` with label ``-100``, the ``ignore_index`` of
  ``F.cross_entropy``, whose mean then runs over the real samples only, as the sequential partial
  batch's does. Padded inputs pass through the model, so no layer may mix samples: BatchNorm is
  refused (the built-in backbones use GroupNorm).
- **number of steps**: a client that has finished its steps is masked: its rows of the parameters
  and of the momentum buffers are put back after each SGD step (a zero gradient would still move
  it through momentum and weight decay).
- **optimizer state**: fresh per client and round, as in the sequential loop.
- **module randomness**: not followed. The sequential loop reseeds torch's global RNG per client,
  which vmap cannot do per client; a model with random operations (dropout) is refused by vmap
  (``randomness="error"``) and reported in one line. The built-in backbones have none, so for
  them batched training equals sequential training up to float rounding.
- **hooks**: ``on_client_start`` (and ``on_client_validation``) run once per client with its state
  loaded, before the batched steps; what they leave in the state is stacked. A method that
  overrides ``on_client_end`` gets its hooks replayed on the client's starting state right before
  it, so that what the report reads from ``on_client_start`` (FedPer's previous head) is that
  client's, and the personal state ``on_client_end`` leaves is what the client keeps. Server-only
  state is hidden throughout, as in the sequential loop. This is why a method must say it
  qualifies (``FederatedMethod.batchable``).

API: :func:`check` (once per fit: refuses, in one line, what cannot be batched) and
:func:`train_clients` (one group of clients; returns their updates and trained personal states).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from lightning.fabric import Fabric
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from fedcoe_bench.data import Client, Federation
from fedcoe_bench.errors import ConfigError
from fedcoe_bench.method import ClientContext, ClientUpdate, FederatedMethod, RoundContext, overrides
from fedcoe_bench.sampling import client_seed

IGNORE = -100  # F.cross_entropy's default ignore_index: a padded sample drops out of a mean loss
KINDS = ("shared", "personal")
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def check(method: FederatedMethod, fabric: Fabric, client_batch: int) -> None:
    """Refuse, in one line, a method, model, optimizer or precision the batched executor cannot train
    as the sequential loop would."""
    key, name = f"loop.client_batch={client_batch}", type(method).__name__
    if not vars(type(method)).get("batchable", False):  # a subclass's new hooks may keep per-client state
        raise ConfigError(f"{key} trains clients side by side, which {name} does not declare it supports (its class "
                          f"sets batchable = True when its local training is a plain training_step); use "
                          f"loop.client_batch 1")
    norm = next((n for n, m in method.named_modules() if isinstance(m, _BATCH_NORMS)), None)
    if norm is not None:
        raise ConfigError(f"{key} pads short batches, which {name}'s BatchNorm '{norm}' would count in its batch "
                          f"statistics; use loop.client_batch 1 or a model with GroupNorm")
    if type(method.configure_optimizers()) is not torch.optim.SGD:
        raise ConfigError(f"{key} stacks clients under one elementwise optimizer, so {name}.configure_optimizers must "
                          f"return torch.optim.SGD; use loop.client_batch 1")
    if fabric.strategy.precision.precision == "16-mixed":  # one loss scale for all clients would couple them
        raise ConfigError(f"{key} does not support --fabric.precision 16-mixed (loss scaling); use bf16-mixed or "
                          f"loop.client_batch 1")


class _Objective(nn.Module):
    """The method's ``training_step`` as a module's forward, so that ``functional_call`` can run it
    with one client's state in place of the method's own."""

    def __init__(self, method: FederatedMethod):
        super().__init__()
        self.method = method

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.method.training_step(batch, batch_idx)


def stacked_views(method: FederatedMethod, rows: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """Each ``kind`` tensor of the method as a ``[B, *shape]`` view of ``rows`` (``[B, numel]``, the
    clients' flat ``kind`` vectors), strided like the method's own tensor.

    Example:
        >>> m = FederatedMethod()
        >>> m.lin = torch.nn.Linear(2, 1)
        >>> m.flatten_parameters()
        >>> rows = torch.stack([m.flat["shared"], m.flat["shared"] + 1])
        >>> torch.equal(stacked_views(m, rows, "shared")["lin.weight"][1], m.lin.weight + 1)
        True
    """
    live = dict(method.named_state(kind))
    clients, numel = rows.shape
    return {name: rows.as_strided((clients, *live[name].shape), (numel, *live[name].stride()),
                                  rows.storage_offset() + span.start)
            for name, span in method.layout[kind].items()}


def _start(fabric: Fabric, method: FederatedMethod, fed: Federation, client: Client, server: torch.Tensor,
           personal: torch.Tensor, seed: int, ctx: ClientContext, fmt: torch.memory_format) -> torch.Tensor:
    """Load a client's starting state and run its hooks before training, as the sequential loop does;
    returns its prepared (un-augmented) train inputs."""
    method.flat["shared"].copy_(server)
    method.flat["personal"].copy_(personal)
    torch.manual_seed(seed)  # what the sequential loop seeds before the hooks
    convert = fabric.strategy.precision.convert_input
    inputs = convert(fed.prepare(fed.pool_x[client.train], memory_format=fmt))
    method.train()
    with fabric.autocast():
        method.on_client_start(inputs, fed.pool_y[client.train], ctx)
    if overrides(method, "on_client_validation"):
        method.eval()  # scoring, not training
        with fabric.autocast(), torch.no_grad():
            val_x = convert(fed.prepare(fed.pool_x[client.val], memory_format=fmt))
            method.on_client_validation(val_x, fed.pool_y[client.val], ctx)
        method.train()
    return inputs


def train_clients(fabric: Fabric, method: FederatedMethod, fed: Federation, clients: Sequence[Client],
                  server: torch.Tensor, personal: Sequence[torch.Tensor], *, seed: int, round_ctx: RoundContext,
                  local_epochs: int, batch_size: int,
                  memory_format: torch.memory_format = torch.contiguous_format) -> tuple[list[ClientUpdate], torch.Tensor]:
    """Train ``clients`` side by side from the ``server`` state, each from its ``personal`` state, for
    ``local_epochs`` passes over its local train split in batches of ``batch_size``, in the round of
    ``round_ctx``, their inputs in ``memory_format``.

    Returns their :class:`ClientUpdate` s (in ``clients`` order) and their trained personal states
    (``[B, numel]``, rows for the caller to store), those that ``FederatedLoop._train_client`` would
    give one client at a time, up to float rounding. The method is left holding some client's state:
    load the server state before using it.
    """
    seeds = [client_seed(seed, round_ctx.round - 1, c.id) for c in clients]
    sizes = [c.num_train for c in clients]
    steps = [local_epochs * math.ceil(n / batch_size) for n in sizes]
    ctxs = [ClientContext(round_ctx.round, round_ctx.num_clients, round_ctx.clients, n) for n in steps]
    with method.server_state_hidden():
        return _train(fabric, method, fed, clients, server, personal, seeds, sizes, steps, ctxs, local_epochs,
                      batch_size, memory_format)


def _train(fabric, method, fed, clients, server, personal, seeds, sizes, steps, ctxs, local_epochs, batch_size, fmt):
    rows: dict[str, list[torch.Tensor]] = {kind: [] for kind in KINDS}
    batches = []
    for i, client in enumerate(clients):
        _start(fabric, method, fed, client, server, personal[i], seeds[i], ctxs[i], fmt)
        for kind in KINDS:  # the state after the hooks: what the sequential client starts training from
            rows[kind].append(method.flat[kind].clone())
        g = torch.Generator(device=fed.device).manual_seed(seeds[i])  # its data order and augmentation
        batches.append(fed.batches(fed.pool_x[client.train], fed.pool_y[client.train], batch_size, steps[i], g,
                                   memory_format=fmt))
    state = {kind: torch.stack(rows[kind]) for kind in KINDS}
    views = {name: v for kind in KINDS for name, v in stacked_views(method, state[kind], kind).items()}

    optimizer = _optimizer(method, views)
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    trained_names = {id(v): name for name, v in views.items()}
    trainable = {trained_names[id(p)]: p for p in trained}
    fixed = {name: v for name, v in views.items() if name not in trainable}
    objective = _Objective(method)

    num_steps = torch.tensor(steps, device=fed.device)
    loss_sum = torch.zeros(len(clients), device=fed.device)
    convert = fabric.strategy.precision.convert_input
    method.train()
    for step in range(max(steps, default=0)):
        x, y = _stack_step(fed, batches, [step < n for n in steps], batch_size)
        active = step < num_steps

        def loss(trainable, fixed, x, y):
            state = {f"method.{name}": t for name, t in (*trainable.items(), *fixed.items())}
            return functional_call(objective, state, ((x, y), step), strict=False)

        try:
            with fabric.autocast():
                grads, losses = vmap(grad_and_value(loss), randomness="error")(trainable, fixed, convert(x), y)
        except RuntimeError as err:
            if "randomness" not in str(err):
                raise
            raise ConfigError(f"loop.client_batch > 1 cannot give each client its own random stream, and "
                              f"{type(method).__name__}'s model draws random numbers in training (dropout?); "
                              f"use loop.client_batch 1") from None
        for name, p in trainable.items():
            p.grad = grads[name]
        _masked_step(optimizer, state, active)
        loss_sum += torch.where(active, losses.detach().float(), 0.0)

    return _finish(fabric, method, fed, clients, server, personal, seeds, state, sizes, steps, loss_sum,
                   local_epochs, ctxs, fmt), state["personal"]


def _optimizer(method: FederatedMethod, views: dict[str, torch.Tensor]) -> torch.optim.SGD:
    """The method's local optimizer (its groups and settings) over the stacked views of its parameters."""
    template = method.configure_optimizers()
    name_of = {id(p): n for n, p in method.named_parameters()}
    groups = []
    for group in template.param_groups:
        settings = {k: v for k, v in group.items() if k != "params"}
        missing = [name_of[id(p)] for p in group["params"] if name_of[id(p)] not in views]
        if missing:
            raise ConfigError(f"{type(method).__name__} optimizes '{missing[0]}', which is neither shared nor personal "
                              f"state, so it cannot be stacked per client; use loop.client_batch 1")
        groups.append({**settings, "params": [views[name_of[id(p)]] for p in group["params"]]})
    return torch.optim.SGD(groups)


def _stack_step(fed: Federation, batches: list, drawing: list[bool], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's batches of all clients, ``[B, batch_size, ...]``: short ones padded with ignored
    samples; a client that has finished gets one dummy sample, whose update is thrown away."""
    drawn = [next(it) if d else None for it, d in zip(batches, drawing)]
    like = next(b for b in drawn if b is not None)
    x = like[0].new_zeros((len(drawn), batch_size, *like[0].shape[1:]))
    y = like[1].new_full((len(drawn), batch_size), IGNORE)
    for i, b in enumerate(drawn):
        if b is None:
            y[i, 0] = 0  # a finite loss: an all-ignored batch's mean is 0/0
        else:
            x[i, : len(b[1])], y[i, : len(b[1])] = b
    return x, y


@torch.no_grad()
def _masked_step(optimizer: torch.optim.SGD, state: dict[str, torch.Tensor], active: torch.Tensor) -> None:
    """One SGD step of the clients in ``active``; the others' parameters and momentum stay as they are."""
    if bool(active.all()):
        optimizer.step()
        return
    idle = (~active).nonzero().flatten()
    kept_state = {kind: rows[idle].clone() for kind, rows in state.items()}
    buffers = [s for s in optimizer.state.values() if s.get("momentum_buffer") is not None]
    kept_buffers = [s["momentum_buffer"][idle].clone() for s in buffers]
    optimizer.step()
    for kind, rows in state.items():
        rows[idle] = kept_state[kind]
    for s, kept in zip(buffers, kept_buffers):
        s["momentum_buffer"][idle] = kept


def _finish(fabric: Fabric, method: FederatedMethod, fed: Federation, clients: Sequence[Client], server: torch.Tensor,
            personal: Sequence[torch.Tensor], seeds: list[int], state: dict[str, torch.Tensor], sizes: list[int],
            steps: list[int], loss_sum: torch.Tensor, local_epochs: int, ctxs: list[ClientContext],
            fmt: torch.memory_format) -> list[ClientUpdate]:
    """Each client's update, made from its row of the stacked state as the sequential loop makes it (and
    its personal row, as its ``on_client_end`` leaves it)."""
    reports = overrides(method, "on_client_end")
    losses = loss_sum.tolist()
    updates = []
    for i, client in enumerate(clients):
        report = {}
        if reports:
            inputs = _start(fabric, method, fed, client, server, personal[i], seeds[i], ctxs[i], fmt)
            for kind in KINDS:
                method.flat[kind].copy_(state[kind][i])
            method.eval()
            with fabric.autocast():
                report = method.on_client_end(inputs, ctxs[i])
            state["personal"][i].copy_(method.flat["personal"])  # what on_client_end leaves is what it keeps
        updates.append(ClientUpdate(client.id, float(sizes[i]), state["shared"][i].clone(), report,
                                    loss=losses[i] / max(steps[i], 1), samples=sizes[i] * local_epochs))
    method.eval()
    return updates
