"""The three numbers: global, personalized and cold-start accuracy (plus the label-prior adapter and
the fine-tuned cold start), each on the test splits and, as ``val_*``, on the validation splits."""

from __future__ import annotations

import csv
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from lightning.fabric.plugins import Precision
from torchmetrics.functional.classification import multiclass_accuracy

from fedcoe_bench.data import Client, Federation
from fedcoe_bench.errors import ConfigError
from fedcoe_bench.method import ClientContext, FederatedMethod, overrides
from fedcoe_bench.priors import em_label_prior, prior_adjust
from fedcoe_bench.store import ClientStore


def _accuracy(probs: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[float, int]:
    acc = multiclass_accuracy(probs, y, num_classes=num_classes, average="micro")
    return float(acc), len(y)


def summarize_clients(accs: list[float], sizes: list[int], prefix: str) -> dict[str, float]:
    """Mean over clients (the pFL papers' convention), sample-weighted value and worst-10% mean.

    Example:
        >>> summarize_clients([1.0, 0.5], [1, 3], "personal_acc")["personal_acc_weighted"]
        0.625
    """
    t = torch.tensor(accs, dtype=torch.float64)
    n = torch.tensor(sizes, dtype=torch.float64)
    k = max(1, math.ceil(0.1 * len(accs)))
    return {
        prefix: float(t.mean()),
        f"{prefix}_weighted": float((t * n).sum() / n.sum()),
        f"{prefix}_worst10": float(t.sort().values[:k].mean()),
    }


def eval_sample(seed: int, n: int, k: int | None, stream: int) -> list[int]:
    """Positions of the ``k`` of ``n`` clients an evaluation visits (all when ``k`` is None or >= n):
    a function of (seed, n, k, stream) only, so every evaluation of a run, resumed or not, visits
    the same clients.

    Example:
        >>> eval_sample(0, 10, 3, 0) == eval_sample(0, 10, 3, 0), len(eval_sample(0, 10, None, 0))
        (True, 10)
    """
    if k is None or k >= n:
        return list(range(n))
    rng = np.random.default_rng([seed, stream, 0xE7A1])
    return sorted(rng.choice(n, k, replace=False).tolist())


# Rows of an evaluation's per-client table: test accuracy, with the label-prior adapter, fine-tuned, and
# test samples; then the same on validation (each accuracy row followed by its adapter and ft rows).
ROWS = ("acc", "lp_acc", "ft_acc", "n", "val_acc", "val_lp_acc", "val_ft_acc", "val_n")
ACC, LP_ACC, FT_ACC, N, VAL_ACC, VAL_LP_ACC, VAL_FT_ACC, VAL_N = range(len(ROWS))

# The client counts an evaluation reports next to its accuracies.
COUNTS = ("clients_evaluated", "clients_trained", "clients_never_trained", "cold_start_clients_evaluated")


@dataclass
class Snapshot:
    """A trained state as an evaluation reads it: the server's shared state, the initial personal
    state (every client's starting point, and what a new client is served), the store of the
    trained clients' personal states, the ids of the clients that have trained (None: all) and the
    number of rounds behind it."""

    server: torch.Tensor
    init_personal: torch.Tensor
    store: ClientStore | None = None
    trained_ids: Collection[int] | None = None
    round: int = 0

    def load(self, method: FederatedMethod, client: int | None = None) -> None:
        """Put the server state and ``client``'s personal state (None: the initial one) into ``method``."""
        personal = None if client is None or self.store is None else self.store.get(client)
        method.flat["shared"].copy_(self.server)
        method.flat["personal"].copy_(self.init_personal if personal is None else personal)


class Evaluator:
    """Runs the three predictors of a method over a federation.

    It reads a trained state through one :class:`Snapshot`; the evaluator never gives a predictor
    a label, and wraps every call in ``no_grad``. ``precision`` (the Fabric run's precision plugin)
    converts the inputs and runs each predictor in its context, as training does; probabilities
    come back in the default dtype.

    Adapters are columns, one code path for every method, never inside a method: ``personal_lp_acc``
    reweights each training client's personal predictions by its own label prior
    (:meth:`client_prior`), ``cold_start_lp_acc`` a new client's by the prior EM estimates from its
    unlabeled inputs (:func:`em_label_prior`); both against the pooled training label distribution
    (:func:`prior_adjust`). The plain columns are every method's own predictions.

    Work is shared where the method's contract makes predictions equal, never by the method's
    name: without personal parameters every client is served the same model, so the personal
    predictions of all clients come from one pass; a predictor the method does not override is
    ``predict_global``, so the global test split, those clients' test splits and the cold-start
    clients' inputs go through ``predict_global`` in one pass (FedAvg, FedProx; the cold-start
    clients of FedPer, FedMix, pFedMoE, Local). Everything else runs client by client. The label-prior
    EM of all cold-start clients runs as one vectorised EM.

    Every accuracy is also measured on validation, in the same passes: ``val_global_acc`` on the
    server's validation split (under every cluster's transform), ``val_personal_acc`` and
    ``val_cold_start_acc`` on the clients' local validation splits (a cold-start client's unlabeled
    inputs stay its local train split); clients with an empty validation split are left out of the
    ``val_*`` means, and a federation without validation has no ``val_*`` keys.

    ``cold_start_ft_acc`` (with ``finetune_steps``): each visited cold-start client, from the state a
    new client is served, fine-tunes what :meth:`~fedcoe_bench.method.FederatedMethod.start_finetune`
    names for ``finetune_steps`` mini-batches of ``finetune_batch_size`` on its labelled shots
    (:meth:`~fedcoe_bench.data.Federation.shots`; seeded per client), is scored with
    ``predict_personal`` on its local test (and validation) split, and the state is discarded. Given
    several step sizes, every new client fine-tunes at each, and the column is the step size of best
    mean ``val_cold_start_ft_acc`` (logged as ``cold_start_ft_lr``; on a tie the first listed): chosen
    on validation by one rule for every method, as training's own lr is.

    Args:
        fed: the federation.
        batch_size: images per forward pass.
        clients: visit at most this many training clients and this many cold-start clients, a sample
            fixed by ``seed`` (None: all). ``personal_acc`` averages the visited clients that have
            trained (all, when the caller passes no ``trained``).
        seed: seeds the sample.
        precision: the run's Fabric precision plugin (default: 32-bit).
        memory_format: the model's memory format, which its inputs take.
        finetune_steps: local steps of the fine-tuned cold start (0: no ``cold_start_ft_acc``).
        finetune_lr: its step size (None: the method's own, from ``configure_optimizers``), or several
            to choose from on validation.
        finetune_batch_size: its mini-batch size.
    """

    def __init__(self, fed: Federation, batch_size: int = 256, clients: int | None = None, seed: int = 0,
                 precision: Precision | None = None, memory_format: torch.memory_format = torch.contiguous_format,
                 finetune_steps: int = 0, finetune_batch_size: int = 32,
                 finetune_lr: float | Sequence[float] | None = None):
        self.fed, self.batch_size, self.seed, self.memory_format = fed, batch_size, seed, memory_format
        self.finetune_steps, self.finetune_batch_size = finetune_steps, finetune_batch_size
        self.finetune_lrs = list(finetune_lr) if isinstance(finetune_lr, Sequence) else [finetune_lr]
        if finetune_steps and len(self.finetune_lrs) > 1 and not len(fed.val_y):
            raise ConfigError(f"loop.cold_start_lr lists {len(self.finetune_lrs)} step sizes to choose from on "
                              f"validation, but the federation has none: set data.val_fraction > 0 or give one")
        self.precision = precision or Precision()
        self.train_clients = [fed.clients[i] for i in eval_sample(seed, len(fed.clients), clients, 0)]
        self.cold_clients = [fed.new_clients[i] for i in eval_sample(seed, len(fed.new_clients), clients, 1)]
        self.per_client: list[dict] = []  # the latest evaluation, one row per client (see write_per_client)
        counts = torch.bincount(fed.pool_y[torch.cat([c.train for c in fed.clients])], minlength=fed.num_classes)
        self.train_prior = (counts.double() / counts.sum()).float()

    def client_prior(self, client: Client) -> torch.Tensor:
        """A training client's own label prior, the add-one-smoothed label frequencies of its local train
        split: what the personal label-prior adapter (``personal_lp_acc``) reweights its predictions by."""
        counts = torch.bincount(self.fed.pool_y[client.train], minlength=self.fed.num_classes).double() + 1
        return (counts / counts.sum()).float()

    def _batched(self, fn, x_uint8: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(x_uint8), self.batch_size):
            x = self.precision.convert_input(self.fed.prepare(x_uint8[i : i + self.batch_size], memory_format=self.memory_format))
            with self.precision.forward_context():
                probs = fn(x)
            out.append(self.precision.convert_output(probs))  # outside the context: its default dtype may be half
        return torch.cat(out)

    def _pooled(self, fn, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """``fn`` over the pool images of every index tensor in ``parts`` in one batched pass, split back."""
        if not parts:
            return []
        return list(self._batched(fn, self.fed.pool_x[torch.cat(parts)]).split([len(p) for p in parts]))

    @torch.no_grad()
    def __call__(self, method: FederatedMethod, state: Snapshot, fabric=None, finetune: bool = True) -> dict[str, float]:
        """The accuracies (and :data:`COUNTS`) of ``state`` served by ``method``; with ``fabric``, each of its
        processes evaluates its share of the clients; ``finetune``: also ``cold_start_ft_acc`` (when
        ``finetune_steps`` > 0)."""
        fed, c = self.fed, self.fed.num_classes
        rank, world = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
        trained = state.trained_ids
        load = lambda client=None: state.load(method, client)  # noqa: E731
        tune = bool(self.finetune_steps and finetune)
        was_training = method.training
        method.eval()
        pers = [cl for cl in self.train_clients if trained is None or cl.id in trained]
        # Clients are split over ranks; per-client accuracies meet in one all-reduce.
        my_pers, my_cold = list(range(len(pers)))[rank::world], list(range(len(self.cold_clients)))[rank::world]
        one_model = method.flat["personal"].numel() == 0
        personal_is_global = one_model and not overrides(method, "predict_personal")
        cold_is_global = not overrides(method, "predict_cold_start")
        # One pass per model over a client's test, then validation (then, cold start: unlabeled) inputs.
        tests = [torch.cat([pers[j].test, pers[j].val]) for j in my_pers]
        colds = [torch.cat([cl.test, cl.val, cl.train]) for cl in (self.cold_clients[j] for j in my_cold)]

        load(None)  # the server state: the global model, and every cold-start client's starting point
        out = self._over_clusters(method.predict_global, fed.test_x_by_cluster, fed.test_y_by_cluster, "global_acc")
        if len(fed.val_y):
            out.update(self._over_clusters(method.predict_global, fed.val_x_by_cluster, fed.val_y_by_cluster,
                                           "val_global_acc"))
        shared = self._pooled(method.predict_global, (tests if personal_is_global else []) + (colds if cold_is_global else []))
        cold_probs = shared[len(shared) - len(colds):] if cold_is_global else [
            self._cold_start(method, self.cold_clients[j]) for j in my_cold]
        if personal_is_global:
            pers_probs = shared[: len(tests)]
        elif one_model:
            pers_probs = self._pooled(method.predict_personal, tests)
        else:
            pers_probs = []
            for j, idx in zip(my_pers, tests):
                load(pers[j].id)
                pers_probs.append(self._batched(method.predict_personal, fed.pool_x[idx]))
            load(None)

        # per client (columns: the trained clients, then the cold-start ones), rows ROWS; each rank fills its own
        table = torch.zeros(len(ROWS), len(pers) + len(self.cold_clients), dtype=torch.float64)
        ft = torch.zeros(2, len(self.finetune_lrs), table.shape[1], dtype=torch.float64)  # [test, val] x lr x client
        for j, probs in zip(my_pers, pers_probs):
            n, v = len(pers[j].test), len(pers[j].val)
            y = fed.pool_y[torch.cat([pers[j].test, pers[j].val])]
            adjusted = prior_adjust(probs, self.client_prior(pers[j]).to(probs), self.train_prior.to(probs))
            table[ACC, j], table[N, j] = _accuracy(probs[:n], y[:n], c)
            table[LP_ACC, j] = _accuracy(adjusted[:n], y[:n], c)[0]
            if v:
                table[VAL_ACC, j], table[VAL_N, j] = _accuracy(probs[n:], y[n:], c)
                table[VAL_LP_ACC, j] = _accuracy(adjusted[n:], y[n:], c)[0]
        diagnose = overrides(method, "cold_start_diagnostics")
        diagnostics: dict[str, torch.Tensor] = {}  # key -> [sum over this rank's new clients, count]
        if my_cold:
            clients = [self.cold_clients[j] for j in my_cold]
            labelled = [len(cl.test) + len(cl.val) for cl in clients]
            adapt = torch.cat([p[m:] for p, m in zip(cold_probs, labelled)])
            group = torch.repeat_interleave(torch.arange(len(my_cold), device=adapt.device),
                                            torch.tensor([len(cl.train) for cl in clients], device=adapt.device))
            train_prior = self.train_prior.to(adapt.device)
            priors = em_label_prior(adapt, train_prior, group=group)
            for i, (j, cl, probs) in enumerate(zip(my_cold, clients, cold_probs)):
                col, n, m = len(pers) + j, len(cl.test), labelled[i]
                y = fed.pool_y[torch.cat([cl.test, cl.val])]
                adjusted = prior_adjust(probs[:m], priors[i], train_prior)
                table[ACC, col], table[N, col] = _accuracy(probs[:n], y[:n], c)
                table[LP_ACC, col] = _accuracy(adjusted[:n], y[:n], c)[0]
                if m > n:
                    table[VAL_ACC, col], table[VAL_N, col] = _accuracy(probs[n:m], y[n:], c)
                    table[VAL_LP_ACC, col] = _accuracy(adjusted[n:], y[n:], c)[0]
                for key, value in (self._diagnose(method, cl) if diagnose else {}).items():
                    diagnostics.setdefault(key, torch.zeros(2, dtype=torch.float64)).add_(torch.tensor([value, 1.0]))
                for r, lr in enumerate(self.finetune_lrs if tune else ()):
                    tuned = self._finetune(method, load, cl, state.round, lr)
                    ft[0, r, col] = _accuracy(tuned[:n], y[:n], c)[0]
                    if m > n:
                        ft[1, r, col] = _accuracy(tuned[n:], y[n:], c)[0]
        if world > 1:
            table = fabric.all_reduce(table.to(fed.device), reduce_op="sum").cpu()
            ft = fabric.all_reduce(ft.to(fed.device), reduce_op="sum").cpu()
            # rank 0 scores the first new client, so it knows every key (or there is none)
            keys = fabric.broadcast(sorted(diagnostics), src=0) if diagnose else []
            diagnostics = {k: fabric.all_reduce(diagnostics.get(k, torch.zeros(2, dtype=torch.float64)).to(fed.device),
                                                reduce_op="sum").cpu() for k in keys}
        out.update({f"cold_start_{k}": float(total / count) for k, (total, count) in diagnostics.items() if count})
        if tune:  # the step size of best mean validation accuracy over the new clients that have a validation split
            with_val = table[VAL_N, len(pers):] > 0
            best = int(ft[1, :, len(pers):][:, with_val].mean(1).argmax()) if with_val.any() else 0
            table[FT_ACC], table[VAL_FT_ACC] = ft[0, best], ft[1, best]
            if len(self.finetune_lrs) > 1:
                out["cold_start_ft_lr"] = self.finetune_lrs[best]
        sizes = table[N].long().tolist()
        n_pers = len(pers)
        self.per_client = ([{"client": cl.id, "kind": "train", "cluster": cl.cluster, "samples": sizes[j],
                             "acc": float(table[ACC, j]), "lp_acc": float(table[LP_ACC, j])} for j, cl in enumerate(pers)]
                           + [{"client": cl.id, "kind": "cold_start", "cluster": cl.cluster, "samples": sizes[n_pers + j],
                               "acc": float(table[ACC, n_pers + j]), "lp_acc": float(table[LP_ACC, n_pers + j])}
                              for j, cl in enumerate(self.cold_clients)])
        trained_cols, cold_cols = list(range(n_pers)), list(range(n_pers, table.shape[1]))
        new_domain = [n_pers + j for j, cl in enumerate(self.cold_clients) if cl.cluster in fed.held_out_clusters]
        for prefix, acc, n in (("", ACC, N), ("val_", VAL_ACC, VAL_N)):
            has = lambda cols: [k for k in cols if table[n, k] > 0]  # noqa: E731 (the val means skip empty splits)
            if has(trained_cols):
                out.update(summarize_clients(table[acc, has(trained_cols)].tolist(), table[n, has(trained_cols)].tolist(),
                                             f"{prefix}personal_acc"))
                out[f"{prefix}personal_lp_acc"] = float(table[acc + 1, has(trained_cols)].mean())
            cold = has(cold_cols)
            if cold:
                out.update(summarize_clients(table[acc, cold].tolist(), table[n, cold].tolist(), f"{prefix}cold_start_acc"))
                out[f"{prefix}cold_start_lp_acc"] = float(table[acc + 1, cold].mean())
                if tune:
                    out[f"{prefix}cold_start_ft_acc"] = float(table[acc + 2, cold].mean())
            if has(new_domain):  # cold-start clients of held-out clusters: a domain no training client has
                out[f"{prefix}cold_start_acc_new_domain"] = float(table[acc, has(new_domain)].mean())
                out[f"{prefix}cold_start_lp_acc_new_domain"] = float(table[acc + 1, has(new_domain)].mean())
        out.update(dict(zip(COUNTS, (len(self.train_clients), n_pers, len(self.train_clients) - n_pers,
                                     len(self.cold_clients)))))
        method.train(was_training)
        return out

    def _over_clusters(self, fn, views: list[torch.Tensor], labels: list[torch.Tensor], name: str) -> dict[str, float]:
        """Accuracy of ``fn`` on one split seen under every cluster's transform (``views``, ``labels``):
        ``name`` is the mean over clusters, ``name_cluster_k`` each cluster's (with more than one)."""
        accs = [_accuracy(self._batched(fn, x), y, self.fed.num_classes)[0] for x, y in zip(views, labels)]
        out = {name: sum(accs) / len(accs)}
        if len(accs) > 1:
            out.update({f"{name}_cluster_{k}": a for k, a in enumerate(accs)})
        return out

    def _cold_start(self, method: FederatedMethod, client: Client) -> torch.Tensor:
        """Cold-start probabilities of a client's local test split, then validation split, then local
        train split (the label-prior adapter's unlabeled inputs)."""
        fed = self.fed
        unlabeled = self._inputs(client.train)  # inputs only
        x = fed.pool_x[torch.cat([client.test, client.val, client.train])]
        return self._batched(lambda x: method.predict_cold_start(x, unlabeled), x)

    def _diagnose(self, method: FederatedMethod, client: Client) -> dict[str, float]:
        """The method's :meth:`~fedcoe_bench.method.FederatedMethod.cold_start_diagnostics` of a new client
        (server state loaded): its unlabeled inputs, then its labelled local test split."""
        with self.precision.forward_context():
            return method.cold_start_diagnostics(self._inputs(client.train), self._inputs(client.test),
                                                 self.fed.pool_y[client.test])

    def _inputs(self, idx: torch.Tensor) -> torch.Tensor:
        """The pool images at ``idx`` as a predictor reads them (prepared, in the run's precision)."""
        return self.precision.convert_input(self.fed.prepare(self.fed.pool_x[idx], memory_format=self.memory_format))

    def _finetune(self, method: FederatedMethod, load, client: Client, rnd: int, lr: float | None = None) -> torch.Tensor:
        """Personal probabilities of a cold-start client's local test, then validation split, after it
        fine-tuned on its labelled shots at step size ``lr`` (None: the method's) from the state it is
        served; leaves the server state loaded.

        Reads labels of the shots only. The gradient step is plain ``backward`` and ``step``, not the
        precision plugin's: a mixed-precision plugin's loss scaler is training's and must not move.
        """
        fed, convert = self.fed, self.precision.convert_input
        load(None)
        shots = fed.shots(client, self.seed)
        x_all, y_all = fed.pool_x[shots], fed.pool_y[shots]
        s = int(np.random.SeedSequence([self.seed, client.id, 0xF17E]).generate_state(1)[0])
        torch.manual_seed(s)  # module-level randomness (dropout) follows the client, as in training
        g = torch.Generator(device=fed.device).manual_seed(s)
        method.train()
        frozen = []
        try:
            with torch.enable_grad():
                ctx = ClientContext(rnd, len(fed.clients), 1, self.finetune_steps, finetune=True)
                with self.precision.forward_context():
                    method.on_client_start(convert(fed.prepare(x_all, memory_format=self.memory_format)), y_all, ctx)
                prefixes = tuple(method.start_finetune())
                tuned = {id(p) for kind in ("shared", "personal") for n, p in method.named_group(kind)
                         if n.startswith(prefixes)}
                # frozen rather than masked: no gradient is computed for what does not change
                frozen = [p for p in method.parameters() if p.requires_grad and id(p) not in tuned]
                for p in frozen:
                    p.requires_grad_(False)
                if any(p.requires_grad for p in method.parameters()):
                    optimizer = method.configure_optimizers()  # the method's local settings, fresh state
                    for group in optimizer.param_groups if lr is not None else ():
                        group["lr"] = lr
                    batches = fed.batches(x_all, y_all, self.finetune_batch_size, self.finetune_steps, g,
                                          memory_format=self.memory_format)
                    for step, batch in enumerate(batches):
                        with self.precision.forward_context():
                            loss = method.training_step(convert(batch), step)
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
        finally:
            for p in frozen:
                p.requires_grad_(True)
        method.eval()
        probs = self._batched(method.predict_personal, fed.pool_x[torch.cat([client.test, client.val])])
        load(None)
        return probs


def write_per_client(rows: list[dict], path) -> None:
    """``clients.csv``, one row per client the latest evaluation scored (the trained training clients
    and the cold-start clients of its sample): client, kind (train / cold_start), cluster (feature
    shift; 0 without), samples (local test), acc (personal for training clients, cold-start for new
    ones), lp_acc (the same predictions after the label-prior adapter: the client's own label frequencies
    for a training client, the EM estimate from its unlabeled inputs for a cold-start one)."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["client", "kind", "cluster", "samples", "acc", "lp_acc"])
        for r in rows:
            out.writerow([r["client"], r["kind"], r["cluster"], r["samples"], f"{r['acc']:.6f}", f"{r['lp_acc']:.6f}"])
