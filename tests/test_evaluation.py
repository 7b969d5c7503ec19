"""The evaluator: batched passes give the client-by-client accuracies, the vectorised label-prior EM
gives the per-client EMs, and a sampled evaluation visits a fixed sample, counts trained clients only
and does the same work at any federation size."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from helpers import decode_indices, read_summary
from torch import nn

from fedcoe_bench.baselines import FedAvg, FedPer
from fedcoe_bench.data import FederatedData, Synthetic
from fedcoe_bench.errors import ConfigError
from fedcoe_bench.evaluation import COUNTS, Evaluator, Snapshot
from fedcoe_bench.priors import em_label_prior, prior_adjust
from fedcoe_bench.loop import FederatedLoop


class FedAvgClientByClient(FedAvg):
    """FedAvg's predictions, but with a personal parameter and its own predictors, so that nothing in
    the contract lets the evaluator batch clients: the reference the batched passes must equal."""

    personal = ("spare",)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.spare = nn.Parameter(torch.zeros(1))

    def predict_personal(self, x):
        return self.predict_global(x)

    def predict_cold_start(self, x, unlabeled):
        return self.predict_global(x)


class FedPerClientByClient(FedPer):
    """FedPer with its cold-start predictor written out, so that it is no longer the global pass's."""

    def predict_cold_start(self, x, unlabeled):
        return self.predict_global(x)


def trained_loop(fed, fabric, method, rounds=2, clients_per_round=4, **kwargs):
    """The result of a short fit."""
    loop = FederatedLoop(rounds=rounds, clients_per_round=clients_per_round, batch_size=16, eval_every=10**6, checkpoint_every=0, progress=False, channels_last=False, **kwargs)
    return loop.fit(fabric, method, fed, seed=0)


@dataclass
class CountingSnapshot(Snapshot):
    """A snapshot that records the client of every state it loads (None: the server and initial state)."""

    loads: list = field(default_factory=list)

    def load(self, method, client=None):
        self.loads.append(client)
        super().load(method, client)


def evaluate(fed, method, server, store, trained, **kwargs):
    """One evaluation of ``method`` at (server, personal states in ``store``); returns (metrics, per-client
    rows, loads)."""
    init = method.flat["personal"].clone()
    state = CountingSnapshot(server, init, store, trained)
    evaluator = Evaluator(fed, batch_size=64, **kwargs)
    metrics = evaluator(method, state)
    method.flat["personal"].copy_(init)
    return metrics, evaluator.per_client, state.loads


@pytest.mark.parametrize("batched, reference", [(FedAvg, FedAvgClientByClient), (FedPer, FedPerClientByClient)])
def test_batched_evaluation_equals_client_by_client(indexed_fed, fabric, batched, reference):
    fed = indexed_fed
    kw = {"num_classes": fed.num_classes, "in_channels": 1, "image_size": 12}
    torch.manual_seed(0)
    method = batched(**kw)
    result = trained_loop(fed, fabric, method)
    ref = reference(**kw)
    ref.load_state_dict(method.state_dict(), strict=False)
    ref.flatten_parameters()
    if batched is FedAvg:
        ref.flat["shared"].copy_(result.server)
        server, states = result.server, None
    else:  # same parameter layout: the states carry over
        server, states = result.server, result.store
    got, rows, loads = evaluate(fed, method, result.server, result.store, result.trained_ids)
    want, ref_rows, ref_loads = evaluate(fed, ref, server, states, result.trained_ids)

    assert rows == ref_rows  # every client's accuracy, label-prior accuracy and size
    assert got == pytest.approx(want, abs=1e-9)
    assert {r["kind"] for r in rows} == {"train", "cold_start"}
    if batched is FedAvg:  # one model for everyone: no client's state is ever loaded
        assert all(s is None for s in loads) and len(loads) < len(ref_loads)


class NoisyOracle(FedAvg):
    """Posteriors that know the label a little (read from the pool index the image encodes), so that the
    label-prior adapter changes predictions and a client served another client's prior scores differently."""

    def __init__(self, fed, **kwargs):
        super().__init__(**kwargs)
        self.fed = fed
        self.noise = 1.5 * torch.randn(len(fed.pool_y), fed.num_classes, generator=torch.Generator().manual_seed(0))

    def predict_global(self, x):
        i = torch.tensor(decode_indices(self.fed, x)) % len(self.fed.pool_y)  # global test images: any row
        return (2.0 * F.one_hot(self.fed.pool_y[i], self.fed.num_classes) + self.noise[i]).softmax(-1)


def test_each_new_client_gets_the_label_prior_of_its_own_em(indexed_fed):
    fed = indexed_fed
    method = NoisyOracle(fed, num_classes=fed.num_classes, in_channels=1, image_size=12)
    method.flatten_parameters()
    _, rows, _ = evaluate(fed, method, method.flat["shared"].clone(), None, None)
    counts = torch.bincount(fed.pool_y[torch.cat([c.train for c in fed.clients])], minlength=fed.num_classes)
    train_prior = counts / counts.sum()
    cold = [r for r in rows if r["kind"] == "cold_start"]
    assert len(cold) == len(fed.new_clients) >= 2
    for row in cold:
        client = next(c for c in fed.new_clients if c.id == row["client"])
        test, unlabeled = (method.predict_global(fed.prepare(fed.pool_x[i])) for i in (client.test, client.train))
        prior = em_label_prior(unlabeled, train_prior)
        correct = prior_adjust(test, prior, train_prior).argmax(1) == fed.pool_y[client.test]
        assert row["lp_acc"] == pytest.approx(float(correct.double().mean()), abs=1e-6)
    assert any(r["lp_acc"] != r["acc"] for r in cold), "the adapter must matter for this test to mean anything"


def test_vectorised_em_equals_one_em_per_client():
    g = torch.Generator().manual_seed(0)
    sizes = [5, 40, 1, 17]
    probs = [torch.softmax(3 * torch.randn(n, 4, generator=g), 1) for n in sizes]
    train_prior = torch.tensor([0.1, 0.2, 0.3, 0.4])
    group = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    together = em_label_prior(torch.cat(probs), train_prior, group=group)
    alone = torch.stack([em_label_prior(p, train_prior) for p in probs])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(alone[0], alone[1], atol=1e-3), "clients this different must get different priors"


def read_clients(run) -> list[tuple[str, str, str, str]]:
    with open(run / "clients.csv", newline="") as f:
        return [tuple(r.values()) for r in csv.DictReader(f)]


def test_sampled_evaluation_is_one_sample_every_evaluation_and_across_resume(tmp_path, fit_argv, run_cli, monkeypatch):
    seen: list[list[int]] = []  # the clients each evaluation sampled
    original = Evaluator.__call__

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        seen.append([c.id for c in self.train_clients + self.cold_clients])
        assert {r["client"] for r in self.per_client} <= set(seen[-1])
        return out

    monkeypatch.setattr(Evaluator, "__call__", spy)
    sampled = ("--loop.eval_clients", "3", "--loop.eval_every", "1", "--loop.rounds", "3", "--loop.checkpoint_every", "1")
    code, _, err = run_cli(fit_argv("whole", *sampled))
    assert code == 0, err
    assert len(seen) == 3 and all(ids == seen[0] for ids in seen), seen
    assert len(seen[0]) == 3 + 2  # 3 of 8 training clients, both cold-start clients

    code, _, err = run_cli(fit_argv("resumed", *sampled, "--loop.rounds", "1"))
    assert code == 0, err
    (tmp_path / "resumed" / "summary.json").unlink()  # as if killed after the round-1 checkpoint
    code, _, err = run_cli(fit_argv("resumed", *sampled))
    assert code == 0, err
    assert seen[-1] == seen[0]
    # the same clients, and the same trained ones among them (3 per round: not all have trained)
    assert read_clients(tmp_path / "resumed") == read_clients(tmp_path / "whole")
    counts = [{k: read_summary(tmp_path / run)["metrics"][k] for k in COUNTS} for run in ("whole", "resumed")]
    assert counts[0] == counts[1] and counts[0]["clients_evaluated"] == 3 and counts[0]["cold_start_clients_evaluated"] == 2


@pytest.mark.parametrize("cls", [FedAvg, FedPer])
def test_personal_accuracy_counts_trained_clients_only(indexed_fed, fabric, cls):
    fed = indexed_fed
    loop = FederatedLoop(rounds=1, clients_per_round=2, batch_size=16, eval_every=1, checkpoint_every=0,
                         progress=False, eval_clients=6)
    torch.manual_seed(0)
    result = loop.fit(fabric, cls(num_classes=fed.num_classes, in_channels=1, image_size=12), fed, seed=0)
    metrics = result.metrics
    assert len(result.trained_ids) == 2
    sample = {c.id for c in Evaluator(fed, clients=loop.eval_clients, seed=0).train_clients}  # the loop's sample
    rows = [r for r in result.per_client if r["kind"] == "train"]
    assert len(sample) == 6 and {r["client"] for r in rows} == sample & result.trained_ids
    assert metrics["clients_evaluated"] == 6
    assert metrics["clients_trained"] == len(rows) and metrics["clients_never_trained"] == 6 - len(rows)
    assert metrics["cold_start_clients_evaluated"] == len(fed.new_clients)
    assert metrics["personal_acc"] == pytest.approx(sum(r["acc"] for r in rows) / len(rows))
    assert set(COUNTS) <= set(metrics)


def federation(tmp_path, clients: int):
    """``clients`` clients of 20 samples each (iid), the same global test split at every size."""
    src = Synthetic(samples=20 * clients, test_samples=50, image_size=12)
    return FederatedData(source=src, scheme="iid", num_clients=clients, cold_start_fraction=0.2, min_size=2,
                         cache_dir=str(tmp_path / "partitions")).setup(0)


@pytest.mark.parametrize("cls", [FedAvg, FedPer])
def test_a_sampled_evaluation_does_the_same_work_at_any_federation_size(tmp_path, cls):
    work = []
    for clients in (20, 400):
        fed = federation(tmp_path, clients)
        method = cls(num_classes=fed.num_classes, in_channels=1, image_size=12)
        method.flatten_parameters()
        images, loads = [], []
        for name in ("predict_global", "predict_personal", "predict_cold_start"):
            fn = getattr(method, name)
            setattr(method, name, lambda x, *a, fn=fn: images.append(len(x)) or fn(x, *a))
        server = method.flat["shared"].clone()
        state = CountingSnapshot(server, method.flat["personal"].clone(), loads=loads)
        # the server validation split is a share of the pool, so it grows with it: one batch holds it
        evaluator = Evaluator(fed, batch_size=1024, clients=4)
        metrics = evaluator(method, state)
        assert metrics["clients_evaluated"] == 4 and metrics["cold_start_clients_evaluated"] == 4
        # the global test and server validation splits and the sampled clients' data, nothing else
        sampled = sum(len(c.test) + len(c.val) for c in evaluator.train_clients) + sum(
            len(c.test) + len(c.val) + len(c.train) for c in evaluator.cold_clients)
        assert sum(images) == len(fed.test_y) + len(fed.val_y) + sampled
        work.append((len(images), len(loads)))
    assert work[0] == work[1]  # as many passes and state loads at 20 clients as at 400


def test_eval_clients_below_one_is_refused():
    with pytest.raises(ConfigError, match="loop.eval_clients must be >= 1"):
        FederatedLoop(eval_clients=0)


# ---------------------------------------------------------------------- validation metrics
class ValOracle(FedAvg):
    """Right exactly on the samples of a validation split (server's or a client's), wrong on every other
    pool sample: a validation metric that read a test or train sample drops below 1, a test metric that
    read a validation sample rises above 0."""

    def __init__(self, fed, **kwargs):
        super().__init__(**kwargs)
        self.fed = fed
        server_val = torch.tensor(decode_indices(fed, fed.prepare(fed.val_x)))  # pool samples no client holds
        val = torch.cat([server_val] + [c.val for c in fed.clients + fed.new_clients])
        self.is_val = torch.isin(torch.arange(len(fed.pool_y)), val)

    def predict_global(self, x):
        i = torch.tensor(decode_indices(self.fed, x))
        label = self.fed.pool_y[i]
        return F.one_hot(torch.where(self.is_val[i], label, (label + 1) % self.fed.num_classes), self.fed.num_classes).float()


class ValOracleClientByClient(ValOracle):
    """The same predictions through a personal parameter and its own predictors (the per-client paths)."""

    personal = ("spare",)

    def __init__(self, fed, **kwargs):
        super().__init__(fed, **kwargs)
        self.spare = nn.Parameter(torch.zeros(1))

    def predict_personal(self, x):
        return self.predict_global(x)

    def predict_cold_start(self, x, unlabeled):
        return self.predict_global(x)


@pytest.mark.parametrize("cls", [ValOracle, ValOracleClientByClient])
def test_validation_metrics_read_validation_samples_only(indexed_fed, cls):
    fed = indexed_fed
    method = cls(fed, num_classes=fed.num_classes, in_channels=1, image_size=12)
    method.flatten_parameters()
    assert len(fed.val_y) and all(len(c.val) for c in fed.clients + fed.new_clients), "every split must be non-empty"
    metrics, _, _ = evaluate(fed, method, method.flat["shared"].clone(), None, None, finetune_steps=1)
    for name in ("personal_acc", "cold_start_acc", "cold_start_ft_acc"):
        assert metrics[f"val_{name}"] == 1.0 and metrics[name] == 0.0, name
    assert metrics["val_global_acc"] == 1.0
    assert {"val_personal_acc_weighted", "val_personal_acc_worst10", "val_cold_start_lp_acc"} <= metrics.keys()


def test_clients_without_validation_data_are_left_out_of_the_validation_means(indexed_fed):
    fed = indexed_fed
    method = ValOracle(fed, num_classes=fed.num_classes, in_channels=1, image_size=12)
    method.flatten_parameters()
    empty = fed.clients[0]
    empty.bounds = (empty.bounds[0], empty.bounds[1], empty.bounds[1], empty.bounds[3])  # its val split: none
    metrics, _, _ = evaluate(fed, method, method.flat["shared"].clone(), None, None)
    assert metrics["val_personal_acc"] == 1.0  # an empty split counted as 0 would pull the mean down
    assert metrics["val_personal_acc_weighted"] == 1.0


def test_fit_writes_the_validation_and_fine_tuned_metrics(tmp_path, fit_argv, run_cli):
    code, _, err = run_cli(fit_argv("run", "--loop.eval_every", "1"))
    assert code == 0, err
    metrics = read_summary(tmp_path / "run")["metrics"]
    keys = ("val_global_acc", "val_personal_acc", "val_cold_start_acc", "val_cold_start_lp_acc",
            "cold_start_ft_acc", "val_cold_start_ft_acc")
    assert all(0.0 <= metrics[k] <= 1.0 for k in keys), metrics
    assert 0.0 <= read_summary(tmp_path / "run")["cold_start_ft_acc"] <= 1.0  # a column of its own
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("global_acc")]
    validation = [k for k in keys if "_ft_" not in k]
    assert len(rows) == 2 and all(r[k] != "" for r in rows for k in validation)  # logged at every evaluation
    # the fine-tuned cold start (about three rounds' work) at the last evaluation only
    assert [r["cold_start_ft_acc"] != "" for r in rows] == [False, True]


class PriorFedAvg(FedAvg):
    """FedAvg whose personal prediction already applies its client's label prior, as a method may do
    inside (FedCoE's ``local_prior``): the personal label-prior adapter's column, computed by the method."""

    personal = ("label_counts",)

    def __init__(self, train_prior: torch.Tensor, **kwargs):
        super().__init__(**kwargs)
        self.train_prior = train_prior
        self.register_buffer("label_counts", torch.zeros(self.num_classes))

    def on_client_start(self, x, y, ctx):
        self.label_counts.copy_(torch.bincount(y, minlength=self.num_classes))

    def predict_personal(self, x):
        prior = (self.label_counts + 1) / (self.label_counts + 1).sum()
        return prior_adjust(self.predict_global(x), prior, self.train_prior)


def test_the_personal_adapter_is_what_a_method_applying_the_prior_itself_scores(fed, fabric):
    """One code path for every method: FedAvg's adapted column equals, client by client, the plain column
    of the same model applying its client's prior itself (a test that means something only where the
    prior changes the plain column, checked last)."""
    train_prior = Evaluator(fed).train_prior
    torch.manual_seed(0)
    prior_fedavg = PriorFedAvg(train_prior, num_classes=fed.num_classes, in_channels=1, image_size=12)
    result = trained_loop(fed, fabric, prior_fedavg, rounds=2, clients_per_round=6)
    torch.manual_seed(0)
    fedavg = FedAvg(num_classes=fed.num_classes, in_channels=1, image_size=12)
    fedavg.flatten_parameters()
    plain, plain_rows, _ = evaluate(fed, fedavg, result.server, None, result.trained_ids)
    adapted_rows = [r for r in result.per_client if r["kind"] == "train"]
    by_client = {r["client"]: r for r in plain_rows if r["kind"] == "train"}
    assert len(adapted_rows) == 6
    for r in adapted_rows:
        assert r["acc"] == pytest.approx(by_client[r["client"]]["lp_acc"], abs=1e-6)
    assert result.metrics["personal_acc"] == pytest.approx(plain["personal_lp_acc"], abs=1e-6)
    assert plain["personal_acc"] != pytest.approx(plain["personal_lp_acc"], abs=1e-3), "the prior must matter here"


class EMColdStartFedAvg(FedAvg):
    """FedAvg whose served cold start already corrects its prediction by the EM label prior of the new
    client's unlabeled inputs, as a method may do inside: the cold-start adapter's column, computed by the method."""

    def __init__(self, train_prior: torch.Tensor, **kwargs):
        super().__init__(**kwargs)
        self.train_prior = train_prior

    def predict_cold_start(self, x, unlabeled):
        prior = em_label_prior(self.predict_global(unlabeled), self.train_prior)
        return prior_adjust(self.predict_global(x), prior, self.train_prior)


def test_the_cold_start_adapter_is_what_a_method_applying_the_em_prior_itself_scores(fed, fabric):
    """Issue #29: one code path for every method's cold start too: FedAvg's `cold-start + prior` column
    equals, client by client, the plain cold start of the same model correcting its prediction itself
    (and the correction must matter here, checked last)."""
    fedavg = FedAvg(num_classes=fed.num_classes, in_channels=1, image_size=12)
    result = trained_loop(fed, fabric, fedavg, rounds=2, clients_per_round=6)
    em = EMColdStartFedAvg(Evaluator(fed).train_prior, num_classes=fed.num_classes, in_channels=1, image_size=12)
    em.flatten_parameters()
    plain, plain_rows, _ = evaluate(fed, fedavg, result.server, None, result.trained_ids)
    corrected, corrected_rows, _ = evaluate(fed, em, result.server, None, result.trained_ids)
    cold = {r["client"]: r for r in plain_rows if r["kind"] == "cold_start"}
    mine = [r for r in corrected_rows if r["kind"] == "cold_start"]
    assert len(mine) == len(fed.new_clients) > 0
    for r in mine:
        assert r["acc"] == pytest.approx(cold[r["client"]]["lp_acc"], abs=1e-6)
    assert corrected["cold_start_acc"] == pytest.approx(plain["cold_start_lp_acc"], abs=1e-6)
    assert plain["cold_start_acc"] != pytest.approx(plain["cold_start_lp_acc"], abs=1e-3), "the prior must matter here"
