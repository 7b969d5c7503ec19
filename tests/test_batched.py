"""Batched clients (``loop.client_batch > 1``) give the updates of the sequential loop: per client (shared
vector, personal state, report, loss), for clients of different sizes over 2 local epochs, and whole fits;
and whatever cannot be batched is refused in one line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fedcoe_bench.baselines.fedavg import FedAvg
from fedcoe_bench.baselines.fedmix import FedMix
from fedcoe_bench.baselines.fedper import FedPer
from fedcoe_bench.baselines.fedprox import FedProx
from fedcoe_bench.baselines.fedrep import FedRep
from fedcoe_bench import batched
from fedcoe_bench.errors import ConfigError
from fedcoe_bench.loop import FederatedLoop
from fedcoe_bench.method import RoundContext

BATCH = 8  # the fixture's clients hold ~20-50 train samples: partial last batches, different step counts


def recording(cls):
    """``cls`` that keeps a copy of every update it aggregates (whatever the aggregate signature)."""

    class Recording(cls):
        batchable = vars(cls).get("batchable", False)  # recording aggregates keeps no per-client state

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.seen: list[list] = []

        def aggregate(self, server, updates, *args, **kwargs):
            self.seen.append([(u.client, u.weight, u.samples, u.loss, u.shared.clone(),
                               {k: v.clone() for k, v in u.report.items()}) for u in updates])
            return super().aggregate(server, updates, *args, **kwargs)

    Recording.__name__ = cls.__name__
    return Recording


def fit(cls, fed, fabric, client_batch, rounds=1, clients=8, **kwargs):
    torch.manual_seed(0)  # the same initial model for every fit
    method = recording(cls)(num_classes=fed.num_classes, in_channels=1, image_size=12, **kwargs)
    loop = FederatedLoop(rounds=rounds, clients_per_round=clients, local_epochs=2, batch_size=BATCH,
                         eval_every=rounds, checkpoint_every=0, progress=False, cold_start_steps=0,
                         client_batch=client_batch)
    result = loop.fit(fabric, method, fed, seed=3)
    return method, result, result.metrics


def test_fixture_has_partial_batches_and_different_step_counts(indexed_fed):
    sizes = [c.num_train for c in indexed_fed.clients]
    assert any(n % BATCH for n in sizes), sizes
    assert len({math.ceil(n / BATCH) for n in sizes}) > 1, sizes


@pytest.mark.parametrize("cls", [FedAvg, FedPer, FedProx], ids=lambda c: c.__name__)
@pytest.mark.parametrize("client_batch", [8, 3])  # 3: the round's 8 clients in groups of 3, 3 and 2
def test_batched_updates_equal_sequential(indexed_fed, fabric, cls, client_batch):
    kwargs = {"mu": 0.1} if cls is FedProx else {}
    seq, seq_loop, _ = fit(cls, indexed_fed, fabric, 1, **kwargs)
    bat, bat_loop, _ = fit(cls, indexed_fed, fabric, client_batch, **kwargs)
    (ups_seq,), (ups_bat,) = seq.seen, bat.seen
    assert [u[:3] for u in ups_bat] == [u[:3] for u in ups_seq]  # clients, weights n_i, samples
    moved = 0.0
    for (cid, *_, loss_s, shared_s, report_s), (_, *_, loss_b, shared_b, report_b) in zip(ups_seq, ups_bat):
        assert loss_b == pytest.approx(loss_s, rel=1e-5), cid
        torch.testing.assert_close(shared_b, shared_s, rtol=1e-4, atol=1e-5, msg=f"client {cid} shared")
        assert report_b.keys() == report_s.keys()
        for key in report_s:
            torch.testing.assert_close(report_b[key], report_s[key], rtol=1e-4, atol=1e-5, msg=f"{cid} {key}")
        personal_s, personal_b = seq_loop.store.get(cid), bat_loop.store.get(cid)
        if personal_s is not None:  # FedPer: the trained head and head_weight, written back per client
            torch.testing.assert_close(personal_b, personal_s, rtol=1e-4, atol=1e-5, msg=f"client {cid} personal")
            moved = max(moved, float((personal_s - bat.flat["personal"]).abs().max()))  # fit leaves the initial one
        moved = max(moved, float((shared_s - bat_loop.server).abs().max()))
    assert moved > 1e-3, "the clients must have trained for the comparison to mean anything"
    if cls is FedPer:
        assert all(seq_loop.store.get(u[0]) is not None for u in ups_seq)


def test_masked_clients_do_not_move(indexed_fed, fabric):
    """A client with fewer steps keeps its parameters, momentum and weight decay still while the others
    go on: its update equals the one it gets trained alone."""
    fed = indexed_fed
    small, large = sorted(fed.clients, key=lambda c: c.num_train)[0], sorted(fed.clients, key=lambda c: c.num_train)[-1]
    assert math.ceil(small.num_train / BATCH) < math.ceil(large.num_train / BATCH)
    torch.manual_seed(0)
    method = FedAvg(num_classes=fed.num_classes, in_channels=1, image_size=12, weight_decay=0.01)
    method.flatten_parameters()
    server, personal = method.flat["shared"].clone(), method.flat["personal"].clone()
    run = lambda clients: batched.train_clients(fabric, method, fed, clients, server, [personal] * len(clients),
                                                seed=0, round_ctx=RoundContext(1, len(fed.clients), len(clients)),
                                                local_epochs=2, batch_size=BATCH)[0]
    alone = run([small])[0]
    together = run([small, large])[0]
    torch.testing.assert_close(together.shared, alone.shared, rtol=1e-5, atol=1e-6)
    assert together.loss == pytest.approx(alone.loss, rel=1e-6)


def test_fit_with_client_batch_4_equals_client_batch_1(indexed_fed, fabric):
    _, one, sequential = fit(FedPer, indexed_fed, fabric, 1, rounds=3, clients=4)
    _, four, together = fit(FedPer, indexed_fed, fabric, 4, rounds=3, clients=4)
    assert together.keys() == sequential.keys()
    for key, value in sequential.items():
        assert together[key] == pytest.approx(value, abs=1e-6), key  # accuracies: a flipped prediction shows
    loss = lambda loop: [row["train_loss"] for row in loop.history]
    assert loss(four) == pytest.approx(loss(one), rel=1e-5)
    torch.testing.assert_close(four.server, one.server, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [FedMix, FedRep])  # FedRep inherits FedPer's declaration: not its own
def test_refuses_a_method_that_does_not_qualify(indexed_fed, fabric, cls):
    method = cls(num_classes=indexed_fed.num_classes, in_channels=1, image_size=12)
    loop = FederatedLoop(rounds=1, clients_per_round=2, progress=False, client_batch=2)
    with pytest.raises(ConfigError) as err:
        loop.fit(fabric, method, indexed_fed, seed=0)
    message = str(err.value)
    assert "\n" not in message and "loop.client_batch" in message and cls.__name__ in message


def test_refuses_in_one_line_from_the_cli(fit_argv, run_cli):
    rc, _, err = run_cli(fit_argv("run", "--method", "fedmix", "--loop.client_batch", "4"))
    lines = err.strip().splitlines()
    assert rc != 0 and len(lines) == 1 and "loop.client_batch" in lines[0] and "FedMix" in lines[0], err


def test_client_batch_must_be_positive():
    with pytest.raises(ConfigError, match="loop.client_batch"):
        FederatedLoop(client_batch=0)


class WithDropout(FedAvg):
    batchable = True  # declared, so that what is refused is the dropout

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.net.body.append(nn.Dropout(0.5))


class WithBatchNorm(FedAvg):
    batchable = True  # declared, so that what is refused is the BatchNorm

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.net.body.append(nn.BatchNorm1d(512))


@pytest.mark.parametrize("cls, words", [(WithDropout, "random"), (WithBatchNorm, "BatchNorm")],
                         ids=["dropout", "batchnorm"])
def test_refuses_what_would_differ_from_sequential(indexed_fed, fabric, cls, words):
    method = cls(num_classes=indexed_fed.num_classes, in_channels=1, image_size=12)
    loop = FederatedLoop(rounds=1, clients_per_round=2, progress=False, cold_start_steps=0, client_batch=2)
    with pytest.raises(ConfigError, match=words) as err:
        loop.fit(fabric, method, indexed_fed, seed=0)
    assert "\n" not in str(err.value) and "loop.client_batch" in str(err.value)


def test_gpu_script_quick_mode_on_cpu(tmp_path):
    """The prepared GPU measurement (benchmarks/perf/gpu.py) runs end to end in --quick mode on CPU."""
    script = Path(__file__).parents[1] / "benchmarks" / "perf" / "gpu.py"
    out = tmp_path / "gpu.json"
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, str(script), "--quick", "--device", "cpu", "--json", str(out)],
                   check=True, env=env, timeout=300, capture_output=True)
    result = json.loads(out.read_text())
    assert {"device", "torch", "quick", "throughput", "equality", "cifar100_config"} <= result.keys()
    row = result["throughput"][0]
    assert {"model", "precision", "client_batch", "rounds_per_s", "ratio_to_sequential"} <= row.keys()
    assert {r["client_batch"] for r in result["throughput"]} >= {1, 10}
    assert all(e["max_abs_diff"] < 1e-3 for e in result["equality"] if e["precision"] == "32-true")
    assert {"round_time_s", "eval_time_s", "rounds", "extrapolated_wall_time_h"} <= result["cifar100_config"].keys()
