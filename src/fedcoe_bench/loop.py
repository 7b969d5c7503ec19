"""FederatedLoop: the one round loop, on Lightning Fabric.

Per round t: sample S_t of the training clients (seeded by t); each rank trains its share of S_t
one client after another in one model instance (server shared state + the client's personal state
copied into flat parameter buffers); the updates meet in one all-gather; ``method.aggregate``
makes the new server state; every ``eval_every`` rounds the three accuracies are measured.
Personal states live in a client-state store (``fedcoe_bench.store``) off the accelerator: a
client's is read when it trains or is evaluated and written back, by the rank that trained it,
when it has trained; a checkpoint records the store's position, not the states.

The model is cast by Fabric's precision plugin and placed by Fabric but not wrapped for data
parallelism: ranks train *different* clients, so gradients must not be averaged across them. As in
a Fabric-wrapped module, every input reaches the model converted by the plugin and every forward
pass runs in its context (autocast for ``*-mixed``, the half dtype for ``*-true``). Ranks meet only
in the collectives below (all-gather of updates, all-reduce of evaluation counts);
personal states never travel between them.

(Over 400 lines: the loop reads top to bottom in one file, each step a named method, as Lightning's
own trainer example does.)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from lightning.fabric import Fabric
from tqdm.auto import tqdm

from fedcoe_bench import batched
from fedcoe_bench.cost import method_cost, report_bytes
from fedcoe_bench.data import Client, Federation
from fedcoe_bench.errors import ConfigError, RunError, TrainingDiverged
from fedcoe_bench.evaluation import COUNTS, Evaluator, Snapshot
from fedcoe_bench.method import ClientContext, ClientUpdate, FederatedMethod, RoundContext, check_reports, overrides
from fedcoe_bench.routing import routing_diagnostics
from fedcoe_bench.runs import RunDir
from fedcoe_bench.sampling import client_seed, sample_clients
from fedcoe_bench.store import DTYPES, ClientStore, open_store


def trained_clients(seed: int, rounds: int, clients: list[Client], k: int) -> set[int]:
    """Ids of the clients sampled in the first ``rounds`` rounds: the ones that have trained."""
    return {clients[i].id for rnd in range(rounds) for i in sample_clients(seed, rnd, len(clients), k)}


@dataclass
class FitResult:
    """What a fit (or an evaluation of a trained state) leaves: the final metrics, one log row per
    round, the final server state, the ids of the clients that have trained, the final
    evaluation's per-client rows and the wall time (over every resumed part)."""

    metrics: dict
    history: list[dict]
    server: torch.Tensor
    trained_ids: set[int]
    per_client: list[dict]
    wall_time_s: float
    store: ClientStore
    cost: dict = field(default_factory=dict)  # fedcoe_bench.cost.method_cost


@dataclass
class _Run:
    """The state of one fit while it runs (the loop itself is configuration)."""

    method: FederatedMethod
    fed: Federation
    seed: int
    server: torch.Tensor
    init_personal: torch.Tensor
    store: ClientStore
    evaluator: Evaluator
    precision: str
    memory_format: torch.memory_format
    trained_ids: set[int] = field(default_factory=set)
    history: list[dict] = field(default_factory=list)
    report_bytes: int = 0

    def snapshot(self, rnd: int) -> Snapshot:
        return Snapshot(self.server, self.init_personal, self.store, self.trained_ids, rnd)

    def load(self, client: int | None = None) -> None:
        """Put the server state and ``client``'s personal state (None: the initial one) into the method."""
        self.snapshot(0).load(self.method, client)


@dataclass
class FederatedLoop:
    """Round loop settings.

    Args:
        rounds: communication rounds.
        clients_per_round: clients sampled per round (uniformly, without replacement).
        local_epochs: passes over a client's local train split per round.
        batch_size: local mini-batch size.
        eval_every: evaluate the three metrics every this many rounds (and after the last).
        checkpoint_every: save a checkpoint every this many rounds (0: never).
        eval_batch_size: batch size of evaluation passes.
        eval_clients: evaluate at most this many training clients and this many cold-start clients,
            the same seeded sample at every evaluation (None: all), so that an evaluation costs the
            same at any federation size. ``personal_acc`` averages the sampled clients that have
            trained; the metrics count the sampled, trained and never-trained clients.
        channels_last: run convolutional models and their batches in ``torch.channels_last``
            (None: where it measured faster, i.e. on CPU). Same results up to float rounding; a
            resumed or evaluated run keeps the format it was trained in, since the flat state
            vectors are stored in the parameters' memory order.
        progress: show a progress bar over rounds (off under CI and when not a terminal).
        client_store: where clients' personal states live between rounds: ``memory`` (host RAM; each
            checkpoint holds them all) or ``disk`` (a file per client, read and written per client; a
            checkpoint records only which version of each is current). Several processes need ``disk``.
        client_store_dir: directory of the ``disk`` store (default ``RUN_DIR/clients``), one run's only;
            processes on several nodes need one they all reach.
        client_state_dtype: ``float32`` or ``bfloat16``, how personal states are stored (training and
            evaluation compute in the method's dtype); a method whose server keeps running sums of
            its clients' states (``exact_personal_state``: FedPer, FedRep, pFedMoE, FedEM) refuses ``bfloat16``.
        cold_start_steps: local steps (mini-batches of ``batch_size``) a new client fine-tunes on its
            labelled shots (``data.cold_start_shots``) for the ``cold_start_ft_acc`` column, measured at the
            last evaluation only (fine-tuning every new client costs a few rounds' time); 0: no
            column.
        cold_start_lr: the fine-tuning step size (None: the method's training ``lr``), or a list of them:
            the column is then the one of best mean validation accuracy over the new clients (logged as
            ``cold_start_ft_lr``), one rule for every method. Training never reads it, so ``fedbench
            eval`` may change it on a trained run.
        client_batch: train this many of a rank's clients at once, side by side on its device
            (:mod:`fedcoe_bench.batched`; same updates up to float rounding; methods with
            ``batchable``). 1: one after another, the default (on CPU batching measured slower;
            unmeasured on GPUs so far).
    """

    rounds: int = 30
    clients_per_round: int = 10
    local_epochs: int = 1
    batch_size: int = 32
    eval_every: int = 10
    checkpoint_every: int = 10
    eval_batch_size: int = 256  # larger batches' activations outgrow the CPU caches (benchmarks/perf/RESULTS.md)
    eval_clients: int | None = None
    channels_last: bool | None = None
    progress: bool = True
    client_store: str = "memory"
    client_store_dir: str | None = None
    client_state_dtype: str = "float32"
    cold_start_steps: int = 10
    cold_start_lr: float | list[float] | None = None
    client_batch: int = 1

    def __post_init__(self):
        for key in ("rounds", "clients_per_round", "local_epochs", "batch_size", "eval_every", "eval_batch_size",
                    "client_batch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"loop.{key} must be >= 1 (got {getattr(self, key)})")
        lrs = self.cold_start_lr if isinstance(self.cold_start_lr, list) else [self.cold_start_lr]
        if not lrs or any(lr is not None and not lr > 0 for lr in lrs) or (None in lrs and len(lrs) > 1):
            raise ConfigError(f"loop.cold_start_lr must be a step size > 0, a list of them to choose from on "
                              f"validation, or null for the method's lr (got {self.cold_start_lr})")
        if self.cold_start_steps < 0:
            raise ConfigError(f"loop.cold_start_steps must be >= 0 (got {self.cold_start_steps}); 0 turns cold_start_ft_acc off")
        if self.checkpoint_every < 0:
            raise ConfigError(f"loop.checkpoint_every must be >= 0 (got {self.checkpoint_every})")
        if self.client_store not in ("memory", "disk"):
            raise ConfigError(f"loop.client_store must be memory or disk (got {self.client_store!r})")
        if self.client_state_dtype not in DTYPES:
            raise ConfigError(f"loop.client_state_dtype must be float32 or bfloat16 (got {self.client_state_dtype!r})")
        if self.eval_clients is not None and self.eval_clients < 1:
            raise ConfigError(f"loop.eval_clients must be >= 1 or null for all clients (got {self.eval_clients})")

    # ------------------------------------------------------------------ the loop
    def fit(self, fabric: Fabric, method: FederatedMethod, fed: Federation, seed: int,
            run_dir: RunDir | None = None, resume_state: dict | None = None,
            stop_requested: Callable[[], bool] | None = None) -> FitResult:
        """Train ``method`` on ``fed`` (from ``resume_state``, a checkpoint, if given), checkpointing into
        ``run_dir``, and return the result. ``stop_requested`` is asked after each round: True ends the
        run there, checkpointed (an interrupt)."""
        self._check(fabric, fed)
        run = self._setup(fabric, method, fed, seed, run_dir, resume_state)
        method = run.method
        if self.client_batch > 1:
            batched.check(method, fabric, self.client_batch)  # one-line ConfigError for what it cannot batch
        optimizer = fabric.setup_optimizers(method.configure_optimizers())
        start, t_start, prior_time = 0, time.perf_counter(), 0.0
        if resume_state is not None:
            start, prior_time = resume_state["round"], resume_state.get("wall_time_s", 0.0)
            run.history = resume_state["history"]
            for row in run.history:  # the CSV log is rewritten whole, so it matches an uninterrupted run
                fabric.log_dict(row, step=row["round"])
        run.trained_ids = trained_clients(seed, start, fed.clients, self.clients_per_round)

        metrics: dict = {}
        bar = tqdm(range(start, self.rounds), desc=type(method).__name__, initial=start, total=self.rounds,
                   disable=not (self.progress and fabric.is_global_zero), dynamic_ncols=True)
        for rnd in bar:
            run.server, row = self._round(fabric, run, optimizer, rnd)
            if (rnd + 1) % self.eval_every == 0 or rnd + 1 == self.rounds:
                t1 = time.perf_counter()
                metrics = self._measure(fabric, run, rnd + 1, finetune=rnd + 1 == self.rounds)
                row.update(metrics, eval_time=time.perf_counter() - t1)
                bar.set_postfix({k: f"{metrics[k]:.3f}" for k in ("global_acc", "personal_acc", "cold_start_acc") if k in metrics})
            run.history.append(row)
            fabric.log_dict(row, step=rnd + 1)
            stop = stop_requested is not None and stop_requested() and rnd + 1 < self.rounds
            if run_dir is not None and (stop or self.checkpoint_every and ((rnd + 1) % self.checkpoint_every == 0 or rnd + 1 == self.rounds)):
                self._checkpoint(fabric, run, run_dir, rnd + 1, prior_time + time.perf_counter() - t_start)
            if stop:
                break
        run.load()  # leave the method holding the server state
        if not metrics:  # resumed from the final checkpoint: the last evaluation is in the history
            metrics = {k: v for row in run.history for k, v in row.items()
                       if k.endswith("_acc") or "_acc_" in k or k in COUNTS}
        return FitResult(metrics, run.history, run.server, run.trained_ids, run.evaluator.per_client,
                         prior_time + time.perf_counter() - t_start, run.store, self._cost(fabric, run))

    def _cost(self, fabric: Fabric, run: _Run) -> dict:
        """The method's cost (:func:`~fedcoe_bench.cost.method_cost`), the server state loaded."""
        x = fabric.strategy.precision.convert_input(run.fed.prepare(run.fed.test_x[:1], memory_format=run.memory_format))
        with fabric.autocast():  # predictions run in the precision's context, as in evaluation
            return method_cost(run.method, x, run.report_bytes)

    def _check(self, fabric: Fabric, fed: Federation) -> None:
        if self.clients_per_round > len(fed.clients):
            raise ConfigError(
                f"loop.clients_per_round={self.clients_per_round} exceeds the {len(fed.clients)} training "
                f"clients; lower it or raise data.num_clients"
            )
        if fabric.world_size > self.clients_per_round:  # a rank with no client has no report to gather
            raise ConfigError(
                f"{fabric.world_size} processes but loop.clients_per_round={self.clients_per_round}; each process "
                f"trains its share of the round's clients, so use at most {self.clients_per_round} devices"
            )

    def _round(self, fabric: Fabric, run: _Run, optimizer, rnd: int) -> tuple[torch.Tensor, dict]:
        """One round: sample, train this rank's clients, gather, aggregate; returns the new server state
        and the round's log row."""
        t0 = time.perf_counter()
        fed, method = run.fed, run.method
        sampled = [fed.clients[i] for i in sample_clients(run.seed, rnd, len(fed.clients), self.clients_per_round)]
        run.trained_ids.update(c.id for c in sampled)
        ctx = RoundContext(rnd + 1, len(fed.clients), len(sampled))
        mine = sampled[fabric.global_rank :: fabric.world_size]
        if self.client_batch > 1:  # ---- batched clients (fedcoe_bench.batched): the same updates, side by side
            updates = self._train_batched(fabric, run, mine, ctx)
        else:
            updates = [self._train_client(fabric, run, optimizer, c, ctx) for c in mine]
        updates = self._gather(fabric, run, updates)
        for u in updates:
            if not math.isfinite(u.loss):
                raise TrainingDiverged(
                    f"round {rnd + 1}, client {u.client}: local loss is {u.loss}; lower method.init_args.lr"
                )
        check_reports(method, updates)
        run.report_bytes = run.report_bytes or report_bytes(updates)
        run.load()
        server, scalars = method.aggregate(run.server, updates, ctx)
        train_time = time.perf_counter() - t0
        samples = sum(u.samples for u in updates)
        return server, {
            "round": rnd + 1,
            "train_loss": sum(u.loss * u.samples for u in updates) / max(samples, 1),
            "round_time": train_time,
            "samples_per_s": samples / train_time,
            **scalars,
            **routing_diagnostics(method.routing_profiles(), fed),  # the loop knows the clusters, no method does
        }

    def _checkpoint(self, fabric: Fabric, run: _Run, run_dir: RunDir, rounds_done: int, wall_time_s: float) -> None:
        """Save the state after ``rounds_done`` rounds as one dict, once every rank's client states are
        durable; then Fabric's callbacks get ``on_checkpoint(rounds_done, seconds)`` (the store's flush
        and the write, e.g. for the perf harness)."""
        t0 = time.perf_counter()
        run.load()
        state = {"round": rounds_done, "server": run.server, "store": run.store.flush(),
                 "method": run.method.state_dict(), "history": run.history, "precision": run.precision,
                 "channels_last": run.memory_format == torch.channels_last, "wall_time_s": wall_time_s}
        fabric.barrier()  # every rank's client states are durable before the checkpoint names them
        run_dir.save_checkpoint(fabric, state)
        fabric.call("on_checkpoint", rounds_done=rounds_done, seconds=time.perf_counter() - t0)

    def evaluate(self, fabric: Fabric, method: FederatedMethod, fed: Federation, state: dict, seed: int,
                 trained_run: RunDir | None = None) -> FitResult:
        """The metrics of a trained ``state`` (a finished run's final checkpoint, from ``trained_run``,
        trained with ``seed``), without training.

        ``fedbench eval`` serves a trained run under other prediction-time settings this way; the
        result is what training again with those settings would give, when training never reads them.
        """
        run = self._setup(fabric, method, fed, seed, trained_run, state)
        run.trained_ids = trained_clients(seed, state["round"], fed.clients, self.clients_per_round)
        t0 = time.perf_counter()
        metrics = self._measure(fabric, run, state["round"])
        run.load()
        history = [{"round": state["round"], **metrics, "eval_time": time.perf_counter() - t0}]
        fabric.log_dict(history[0], step=state["round"])
        return FitResult(metrics, history, run.server, run.trained_ids, run.evaluator.per_client,
                         state.get("wall_time_s", 0.0), run.store, self._cost(fabric, run))

    def _setup(self, fabric: Fabric, method: FederatedMethod, fed: Federation, seed: int, run_dir: RunDir | None,
               state: dict | None) -> _Run:
        """Cast and place ``method`` through Fabric, choose its memory format, make its flat vectors, take
        the initial personal state and let the method size its server state, all before ``state`` (a
        checkpoint) is restored; then open the client store and restore."""
        precision = fabric.strategy.precision
        method = fabric.to_device(precision.convert_module(method))
        memory_format = self._format(method, state)
        method.to(memory_format=memory_format)
        method.flatten_parameters()
        server = method.flat["shared"].clone()
        init_personal = method.flat["personal"].clone()
        method.setup_server(server)
        method.check_state()
        evaluator = Evaluator(fed, self.eval_batch_size, self.eval_clients, seed, precision, memory_format,
                              finetune_steps=self.cold_start_steps, finetune_batch_size=self.batch_size,
                              finetune_lr=self.cold_start_lr)
        if method.exact_personal_state and self.client_state_dtype != "float32":
            raise ConfigError(f"{type(method).__name__} needs its clients' states stored exactly (its server replaces "
                              f"each client's earlier contribution to a running sum); use --loop.client_state_dtype float32")
        store = self._open_store(fabric, run_dir, init_personal.numel())
        run = _Run(method, fed, seed, server, init_personal, store, evaluator, precision.precision, memory_format)
        if state is not None:
            self._restore(run, state)
        return run

    def _open_store(self, fabric: Fabric, run: RunDir | None, numel: int) -> ClientStore:
        """The client-state store of ``client_store``, for states of ``numel`` values."""
        directory = self.client_store_dir or (run.path / "clients" if run is not None else None)
        if self.client_store == "disk" and directory is None:
            raise ConfigError("loop.client_store=disk needs a run directory or loop.client_store_dir")
        return open_store(self.client_store, directory, numel, self.client_state_dtype, fabric.world_size)

    def _format(self, method: FederatedMethod, state: dict | None) -> torch.memory_format:
        """The memory format of the model and its batches: a checkpoint's own choice, else
        ``channels_last``, else channels-last for a convolutional model on CPU."""
        if state is not None:  # checkpoints from before the choice existed were all in the default format
            channels_last = state.get("channels_last", False)
        elif self.channels_last is not None:
            channels_last = self.channels_last
        else:  # measured faster on CPU only (benchmarks/perf/RESULTS.md row 1c)
            channels_last = method.device.type == "cpu" and any(p.dim() == 4 for p in method.parameters())
        return torch.channels_last if channels_last else torch.contiguous_format

    def _restore(self, run: _Run, state: dict) -> None:
        """Load a checkpoint's method state, server state and store position into ``run``."""
        if state.get("precision", run.precision) != run.precision:
            raise RunError(f"the checkpoint was trained with --fabric.precision {state['precision']}, not "
                           f"{run.precision}; pass --fabric.precision {state['precision']}, or train a new run "
                           f"(another --run_dir) to change it")
        run.method.load_state_dict(state["method"])
        run.server = state["server"].to(run.method.flat["shared"].device)
        run.store.restore(state["store"])

    def _measure(self, fabric: Fabric, run: _Run, rnd: int, finetune: bool = True) -> dict:
        """The three accuracies after round ``rnd``, each rank evaluating its share of the clients
        (``finetune``: also the fine-tuned cold start)."""
        return run.evaluator(run.method, run.snapshot(rnd), fabric, finetune)

    # ------------------------------------------------------------------ one client
    def _train_client(self, fabric: Fabric, run: _Run, optimizer, client: Client, round_ctx: RoundContext) -> ClientUpdate:
        method, fed = run.method, run.fed
        run.load(client.id)
        optimizer.state.clear()  # a fresh local optimizer every round, as in FedAvg
        s = client_seed(run.seed, round_ctx.round - 1, client.id)
        torch.manual_seed(s)  # module-level randomness (dropout) follows the client too
        g = torch.Generator(device=fed.device).manual_seed(s)
        x_all, y_all = fed.pool_x[client.train], fed.pool_y[client.train]
        n = len(y_all)
        steps = self.local_epochs * math.ceil(n / self.batch_size)
        ctx = ClientContext(round_ctx.round, round_ctx.num_clients, round_ctx.clients, steps)
        method.train()
        convert, fmt = fabric.strategy.precision.convert_input, run.memory_format
        inputs = convert(fed.prepare(x_all, memory_format=fmt))  # un-augmented, for the hooks before and after training
        loss_sum = torch.zeros((), device=fed.device)
        with method.server_state_hidden():
            with fabric.autocast():
                method.on_client_start(inputs, y_all, ctx)
            if overrides(method, "on_client_validation"):  # preparing the inputs is wasted work otherwise
                method.eval()  # scoring, not training: BatchNorm statistics must not see the validation inputs
                with fabric.autocast(), torch.no_grad():
                    val_x = convert(fed.prepare(fed.pool_x[client.val], memory_format=fmt))
                    method.on_client_validation(val_x, fed.pool_y[client.val], ctx)
                method.train()
            for step, batch in enumerate(fed.batches(x_all, y_all, self.batch_size, steps, g, memory_format=fmt)):
                with fabric.autocast():
                    loss = method.training_step(convert(batch), step)
                optimizer.zero_grad(set_to_none=True)
                fabric.backward(loss)
                optimizer.step()
                loss_sum += loss.detach().float()
            method.eval()
            with fabric.autocast():
                report = method.on_client_end(inputs, ctx)
        if method.flat["personal"].numel():
            run.store.put(client.id, method.flat["personal"])
        return ClientUpdate(client.id, float(n), method.flat["shared"].clone(), report,
                            loss=float(loss_sum) / max(steps, 1), samples=n * self.local_epochs)

    # ------------------------------------------------------------------ batched clients (fedcoe_bench.batched)
    def _train_batched(self, fabric: Fabric, run: _Run, clients: list[Client], round_ctx: RoundContext) -> list[ClientUpdate]:
        """:meth:`_train_client`'s updates for ``clients``, trained ``client_batch`` at a time side by side;
        their personal states written to the store as there."""
        updates = []
        for start in range(0, len(clients), self.client_batch):
            group = clients[start : start + self.client_batch]
            personal = [run.store.get(c.id) for c in group]
            personal = [run.init_personal if p is None else p for p in personal]
            ups, trained = batched.train_clients(fabric, run.method, run.fed, group, run.server, personal,
                                                 seed=run.seed, round_ctx=round_ctx, local_epochs=self.local_epochs,
                                                 batch_size=self.batch_size, memory_format=run.memory_format)
            if trained.shape[1]:
                for c, state in zip(group, trained):
                    run.store.put(c.id, state)
            updates += ups
        return updates

    # ------------------------------------------------------------------ ranks meet
    def _gather(self, fabric: Fabric, run: _Run, updates: list[ClientUpdate]) -> list[ClientUpdate]:
        """All ranks get every update (in client order); personal states stay in the store, where the
        rank that trained a client wrote it."""
        if fabric.world_size == 1:
            return updates
        m = math.ceil(self.clients_per_round / fabric.world_size)
        pad = m - len(updates)
        server = run.server
        dev = server.device
        ids = torch.tensor([u.client for u in updates] + [-1] * pad, device=dev)
        scalars = torch.tensor([[u.weight, u.loss, u.samples] for u in updates] + [[0.0, 0.0, 0.0]] * pad,
                               dtype=torch.float64, device=dev)
        shared = torch.stack([u.shared for u in updates] + [torch.zeros_like(server)] * pad)
        keys = sorted(updates[0].report) if updates else []
        reports = {k: torch.stack([u.report[k] for u in updates] + [torch.zeros_like(updates[0].report[k])] * pad)
                   for k in keys}
        g = fabric.all_gather({"ids": ids, "scalars": scalars, "shared": shared, **reports})
        g = {k: v.flatten(0, 1) for k, v in g.items()}  # [ranks, m, ...] -> [ranks * m, ...]
        out = []
        for j in torch.argsort(g["ids"]).tolist():
            cid = int(g["ids"][j])
            if cid < 0:
                continue
            w, loss, samples = g["scalars"][j].tolist()
            out.append(ClientUpdate(cid, w, g["shared"][j], {k: g[k][j] for k in keys}, loss=loss, samples=int(samples)))
        if run.init_personal.numel():
            run.store.mark_put([u.client for u in out])
        return out

