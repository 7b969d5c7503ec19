"""The three numbers: global, personalized and cold-start accuracy (plus the label-prior adapter)."""

from __future__ import annotations

import csv
import math

import torch
from lightning.fabric.plugins import Precision
from torchmetrics.functional.classification import multiclass_accuracy

from fedcoe_bench.data import Client, Federation
from fedcoe_bench.method import FederatedMethod


def em_label_prior(probs: torch.Tensor, train_prior: torch.Tensor, iters: int = 50, tol: float = 1e-6) -> torch.Tensor:
    """Estimate a new client's label prior from unlabeled posteriors (Saerens, Latinne & Decaestecker, 2002).

    EM on :math:`\\pi`: E-step :math:`p'(y|x) \\propto p(y|x)\\, \\pi_y / \\pi^{train}_y`;
    M-step :math:`\\pi_y = \\frac{1}{n} \\sum_x p'(y|x)`.

    Example:
        >>> p = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4]])
        >>> em_label_prior(p, torch.tensor([0.5, 0.5]))[0] > p[:, 0].mean()
        tensor(True)
    """
    prior = train_prior.clone()
    for _ in range(iters):
        adjusted = prior_adjust(probs, prior, train_prior)
        new = adjusted.mean(0)
        if (new - prior).abs().max() < tol:
            return new
        prior = new
    return prior


def prior_adjust(probs: torch.Tensor, prior: torch.Tensor, train_prior: torch.Tensor) -> torch.Tensor:
    """:math:`p'(y|x) \\propto p(y|x)\\, \\pi_y / \\pi^{train}_y`, renormalised per row."""
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


class Evaluator:
    """Runs the three predictors of a method over a federation.

    ``load(shared, personal)`` puts a state into the method; the evaluator never gives a predictor
    a label, and wraps every call in ``no_grad``. ``precision`` (the Fabric run's precision plugin)
    converts the inputs and runs each predictor in its context, as training does; probabilities
    come back in the default dtype.
    """

    def __init__(self, fed: Federation, batch_size: int = 2048, precision: Precision | None = None):
        self.fed, self.batch_size = fed, batch_size
        self.precision = precision or Precision()
        self.per_client: list[dict] = []  # the latest evaluation, one row per client (see write_per_client)
        counts = fed.label_histogram(fed.clients).sum(0).double()
        self.train_prior = (counts / counts.sum()).float().to(fed.device)

    def _batched(self, fn, x_uint8: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(x_uint8), self.batch_size):
            x = self.precision.convert_input(self.fed.prepare(x_uint8[i : i + self.batch_size]))
            with self.precision.forward_context():
                probs = fn(x)
            out.append(self.precision.convert_output(probs))  # outside the context: its default dtype may be half
        return torch.cat(out)

    @torch.no_grad()
    def __call__(self, method: FederatedMethod, load, personal_of, rank: int = 0, world: int = 1,
                 all_reduce=None) -> dict[str, float]:
        fed, c = self.fed, self.fed.num_classes
        was_training = method.training
        method.eval()
        load(None)
        out = self._over_clusters(method.predict_global, fed.test_x_by_cluster, fed.test_y, "global_acc")

        # Clients are split over ranks; per-client accuracies meet in one all-reduce.
        n_pers, n_cold = len(fed.clients), len(fed.new_clients)
        table = torch.zeros(3, n_pers + n_cold, dtype=torch.float64, device=fed.device)
        for j, client in list(enumerate(fed.clients))[rank::world]:
            load(personal_of(client.id))
            probs = self._batched(method.predict_personal, fed.pool_x[client.test])
            table[0, j], table[2, j] = _accuracy(probs, fed.pool_y[client.test], c)
        load(None)
        for j, client in list(enumerate(fed.new_clients))[rank::world]:
            table[:, n_pers + j] = torch.tensor(self._cold_start(method, client), dtype=torch.float64)
        if all_reduce is not None and world > 1:
            table = all_reduce(table)
        table = table.cpu()
        sizes = table[2].long().tolist()
        kinds = ["train"] * n_pers + ["cold_start"] * n_cold
        self.per_client = [{"client": cl.id, "kind": kind, "cluster": cl.cluster, "samples": sizes[j],
                            "acc": float(table[0, j]), "lp_acc": float(table[1, j]) if kind == "cold_start" else None}
                           for j, (cl, kind) in enumerate(zip(fed.clients + fed.new_clients, kinds))]
        out.update(summarize_clients(table[0, :n_pers].tolist(), sizes[:n_pers], "personal_acc"))
        if n_cold:
            out.update(summarize_clients(table[0, n_pers:].tolist(), sizes[n_pers:], "cold_start_acc"))
            out["cold_start_lp_acc"] = float(table[1, n_pers:].mean())
        new_domain = [n_pers + j for j, cl in enumerate(fed.new_clients) if cl.cluster in fed.held_out_clusters]
        if new_domain:  # cold-start clients of held-out clusters: a domain no training client has
            out["cold_start_acc_new_domain"] = float(table[0, new_domain].mean())
            out["cold_start_lp_acc_new_domain"] = float(table[1, new_domain].mean())
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

    def _cold_start(self, method: FederatedMethod, client: Client) -> tuple[float, float, int]:
        """Accuracy of the cold-start predictor, without and with the label-prior adapter."""
        fed = self.fed
        unlabeled = self.precision.convert_input(fed.prepare(fed.pool_x[client.train]))  # inputs only: no labels
        test_x = torch.cat([fed.pool_x[client.test], fed.pool_x[client.train]])
        probs = self._batched(lambda x: method.predict_cold_start(x, unlabeled), test_x)
        test_probs, adapt_probs = probs[: len(client.test)], probs[len(client.test) :]
        y = fed.pool_y[client.test]
        prior = em_label_prior(adapt_probs, self.train_prior)
        acc = _accuracy(test_probs, y, fed.num_classes)[0]
        acc_lp = _accuracy(prior_adjust(test_probs, prior, self.train_prior), y, fed.num_classes)[0]
        return acc, acc_lp, len(y)


def write_per_client(rows: list[dict], path) -> None:
    """``clients.csv``: client, kind (train / cold_start), cluster (feature shift; 0 without),
    samples (local test), acc (personal for training clients, cold-start for new ones), lp_acc
    (cold-start with the label-prior adapter)."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["client", "kind", "cluster", "samples", "acc", "lp_acc"])
        for r in rows:
            out.writerow([r["client"], r["kind"], r["cluster"], r["samples"], f"{r['acc']:.6f}",
                          "" if r["lp_acc"] is None else f"{r['lp_acc']:.6f}"])
