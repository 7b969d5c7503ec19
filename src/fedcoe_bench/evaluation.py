"""The three numbers: global, personalized and cold-start accuracy (plus the label-prior adapter)."""

from __future__ import annotations

import csv
import math
from collections.abc import Collection

import numpy as np
import torch
from lightning.fabric.plugins import Precision
from torchmetrics.functional.classification import multiclass_accuracy

from fedcoe_bench.data import Client, Federation
from fedcoe_bench.method import FederatedMethod


def em_label_prior(probs: torch.Tensor, train_prior: torch.Tensor, iters: int = 50, tol: float = 1e-6,
                   group: torch.Tensor | None = None) -> torch.Tensor:
    """Estimate a new client's label prior from unlabeled posteriors (Saerens, Latinne & Decaestecker, 2002).

    EM on :math:`\\pi`: E-step :math:`p'(y|x) \\propto p(y|x)\\, \\pi_y / \\pi^{train}_y`;
    M-step :math:`\\pi_y = \\frac{1}{n} \\sum_x p'(y|x)`; stops when no entry moves by ``tol``.

    With ``group`` (a client index per row, ``0..G-1``, every client present) the EMs of G clients
    run side by side, each stopping on its own, and the result is ``[G, classes]``: one tensor
    program per iteration for all clients instead of a Python loop over them.

    Example:
        >>> p = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4]])
        >>> em_label_prior(p, torch.tensor([0.5, 0.5]))[0] > p[:, 0].mean()
        tensor(True)
        >>> both = em_label_prior(torch.cat([p, p.flip(1)]), torch.tensor([0.5, 0.5]), group=torch.tensor([0, 0, 0, 1, 1, 1]))
        >>> torch.allclose(both[1], both[0].flip(0))
        True
    """
    count = None if group is None else torch.bincount(group)[:, None].to(probs.dtype)
    prior = train_prior.expand(1 if count is None else len(count), -1).clone()
    done = torch.zeros(len(prior), dtype=torch.bool, device=probs.device)
    for _ in range(iters):
        if count is None:  # one client: the plain mean, as the single-client EM always computed it
            new = prior_adjust(probs, prior, train_prior).mean(0, keepdim=True)
        else:
            new = torch.zeros_like(prior).index_add_(0, group, prior_adjust(probs, prior[group], train_prior)) / count
        converged = (new - prior).abs().amax(1) < tol
        prior = torch.where(done[:, None], prior, new)  # a client that converged keeps its estimate
        done |= converged
        if bool(done.all()):
            break
    return prior[0] if group is None else prior


def prior_adjust(probs: torch.Tensor, prior: torch.Tensor, train_prior: torch.Tensor) -> torch.Tensor:
    """:math:`p'(y|x) \\propto p(y|x)\\, \\pi_y / \\pi^{train}_y`, renormalised per row (``prior``: one
    prior, or one per row)."""
    p = probs * (prior / train_prior.clamp_min(1e-12))
    return p / p.sum(1, keepdim=True).clamp_min(1e-12)


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


# The client counts an evaluation reports next to its accuracies.
COUNTS = ("clients_evaluated", "clients_trained", "clients_never_trained", "cold_start_clients_evaluated")


def _overrides(method: FederatedMethod, name: str) -> bool:
    return getattr(type(method), name) is not getattr(FederatedMethod, name)


class Evaluator:
    """Runs the three predictors of a method over a federation.

    ``load(personal)`` puts the server state and a client's personal state (None: the initial one)
    into the method; the evaluator never gives a predictor a label, and wraps every call in
    ``no_grad``. ``precision`` (the Fabric run's precision plugin) converts the inputs and runs each
    predictor in its context, as training does; probabilities come back in the default dtype.

    Work is shared where the method's contract makes predictions equal, never by the method's
    name: without personal parameters every client is served the same model, so the personal
    predictions of all clients come from one pass; a predictor the method does not override is
    ``predict_global``, so the global test split, those clients' test splits and the cold-start
    clients' inputs go through ``predict_global`` in one pass (FedAvg, FedProx; the cold-start
    clients of FedPer, FedMix, pFedMoE, Local). Everything else runs client by client. The label-prior
    EM of all cold-start clients runs as one vectorised EM.

    Args:
        fed: the federation.
        batch_size: images per forward pass.
        clients: visit at most this many training clients and this many cold-start clients, a sample
            fixed by ``seed`` (None: all). ``personal_acc`` averages the visited clients that have
            trained (all, when the caller passes no ``trained``).
        seed: seeds the sample.
        precision: the run's Fabric precision plugin (default: 32-bit).
    """

    def __init__(self, fed: Federation, batch_size: int = 256, clients: int | None = None, seed: int = 0,
                 precision: Precision | None = None):
        self.fed, self.batch_size = fed, batch_size
        self.precision = precision or Precision()
        self.train_clients = [fed.clients[i] for i in eval_sample(seed, len(fed.clients), clients, 0)]
        self.cold_clients = [fed.new_clients[i] for i in eval_sample(seed, len(fed.new_clients), clients, 1)]
        self.per_client: list[dict] = []  # the latest evaluation, one row per client (see write_per_client)
        counts = torch.bincount(fed.pool_y[torch.cat([c.train for c in fed.clients])], minlength=fed.num_classes)
        self.train_prior = (counts.double() / counts.sum()).float()

    def _batched(self, fn, x_uint8: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(x_uint8), self.batch_size):
            x = self.precision.convert_input(self.fed.prepare(x_uint8[i : i + self.batch_size]))
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
    def __call__(self, method: FederatedMethod, load, personal_of, rank: int = 0, world: int = 1,
                 all_reduce=None, trained: Collection[int] | None = None) -> dict[str, float]:
        """The accuracies (and :data:`COUNTS`) of the state ``load`` puts in ``method``; ``trained``: the
        ids of the clients that have trained (None: all)."""
        fed, c = self.fed, self.fed.num_classes
        was_training = method.training
        method.eval()
        pers = [cl for cl in self.train_clients if trained is None or cl.id in trained]
        # Clients are split over ranks; per-client accuracies meet in one all-reduce.
        my_pers, my_cold = list(range(len(pers)))[rank::world], list(range(len(self.cold_clients)))[rank::world]
        one_model = method.flat["personal"].numel() == 0
        personal_is_global = one_model and not _overrides(method, "predict_personal")
        cold_is_global = not _overrides(method, "predict_cold_start")
        tests = [pers[j].test for j in my_pers]
        colds = [torch.cat([self.cold_clients[j].test, self.cold_clients[j].train]) for j in my_cold]

        load(None)  # the server state: the global model, and every cold-start client's starting point
        out = self._over_clusters(method.predict_global, fed.test_x_by_cluster, fed.test_y, "global_acc")
        shared = self._pooled(method.predict_global, (tests if personal_is_global else []) + (colds if cold_is_global else []))
        cold_probs = shared[len(shared) - len(colds):] if cold_is_global else [
            self._cold_start(method, self.cold_clients[j]) for j in my_cold]
        if personal_is_global:
            pers_probs = shared[: len(tests)]
        elif one_model:
            pers_probs = self._pooled(method.predict_personal, tests)
        else:
            pers_probs = []
            for j in my_pers:
                load(personal_of(pers[j].id))
                pers_probs.append(self._batched(method.predict_personal, fed.pool_x[pers[j].test]))
            load(None)

        table = torch.zeros(3, len(pers) + len(self.cold_clients), dtype=torch.float64)  # acc, lp_acc, samples
        for j, probs in zip(my_pers, pers_probs):
            table[0, j], table[2, j] = _accuracy(probs, fed.pool_y[pers[j].test], c)
        if my_cold:
            sizes = [len(self.cold_clients[j].test) for j in my_cold]
            adapt = torch.cat([p[n:] for p, n in zip(cold_probs, sizes)])
            group = torch.repeat_interleave(torch.arange(len(my_cold), device=adapt.device),
                                            torch.tensor([len(p) - n for p, n in zip(cold_probs, sizes)], device=adapt.device))
            train_prior = self.train_prior.to(adapt.device)
            priors = em_label_prior(adapt, train_prior, group=group)
            for i, (j, probs, n) in enumerate(zip(my_cold, cold_probs, sizes)):
                y = fed.pool_y[self.cold_clients[j].test]
                acc = _accuracy(probs[:n], y, c)[0]
                lp_acc = _accuracy(prior_adjust(probs[:n], priors[i], train_prior), y, c)[0]
                table[:, len(pers) + j] = torch.tensor([acc, lp_acc, n], dtype=torch.float64)
        if all_reduce is not None and world > 1:
            table = all_reduce(table.to(fed.device)).cpu()
        sizes = table[2].long().tolist()
        n_pers = len(pers)
        self.per_client = ([{"client": cl.id, "kind": "train", "cluster": cl.cluster, "samples": sizes[j],
                             "acc": float(table[0, j]), "lp_acc": None} for j, cl in enumerate(pers)]
                           + [{"client": cl.id, "kind": "cold_start", "cluster": cl.cluster, "samples": sizes[n_pers + j],
                               "acc": float(table[0, n_pers + j]), "lp_acc": float(table[1, n_pers + j])}
                              for j, cl in enumerate(self.cold_clients)])
        if pers:
            out.update(summarize_clients(table[0, :n_pers].tolist(), sizes[:n_pers], "personal_acc"))
        if self.cold_clients:
            out.update(summarize_clients(table[0, n_pers:].tolist(), sizes[n_pers:], "cold_start_acc"))
            out["cold_start_lp_acc"] = float(table[1, n_pers:].mean())
        new_domain = [n_pers + j for j, cl in enumerate(self.cold_clients) if cl.cluster in fed.held_out_clusters]
        if new_domain:  # cold-start clients of held-out clusters: a domain no training client has
            out["cold_start_acc_new_domain"] = float(table[0, new_domain].mean())
            out["cold_start_lp_acc_new_domain"] = float(table[1, new_domain].mean())
        out.update(dict(zip(COUNTS, (len(self.train_clients), n_pers, len(self.train_clients) - n_pers,
                                     len(self.cold_clients)))))
        method.train(was_training)
        return out

    def _over_clusters(self, fn, views: list[torch.Tensor], y: torch.Tensor, name: str) -> dict[str, float]:
        """Accuracy of ``fn`` on one split seen under every cluster's transform (``views``): ``name``
        is the mean over clusters, ``name_cluster_k`` each cluster's (with more than one)."""
        accs = [_accuracy(self._batched(fn, x), y, self.fed.num_classes)[0] for x in views]
        out = {name: sum(accs) / len(accs)}
        if len(accs) > 1:
            out.update({f"{name}_cluster_{k}": a for k, a in enumerate(accs)})
        return out

    def _cold_start(self, method: FederatedMethod, client: Client) -> torch.Tensor:
        """Cold-start probabilities of a client's local test split, then of its local train split (the
        label-prior adapter's unlabeled inputs)."""
        fed = self.fed
        unlabeled = self.precision.convert_input(fed.prepare(fed.pool_x[client.train]))  # inputs only: no labels
        test_x = torch.cat([fed.pool_x[client.test], fed.pool_x[client.train]])
        return self._batched(lambda x: method.predict_cold_start(x, unlabeled), test_x)


def write_per_client(rows: list[dict], path) -> None:
    """``clients.csv``, one row per client the latest evaluation scored (the trained training clients
    and the cold-start clients of its sample): client, kind (train / cold_start), cluster (feature
    shift; 0 without), samples (local test), acc (personal for training clients, cold-start for new
    ones), lp_acc (cold-start with the label-prior adapter)."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["client", "kind", "cluster", "samples", "acc", "lp_acc"])
        for r in rows:
            out.writerow([r["client"], r["kind"], r["cluster"], r["samples"], f"{r['acc']:.6f}",
                          "" if r["lp_acc"] is None else f"{r['lp_acc']:.6f}"])
