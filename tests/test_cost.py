"""What a method costs (issue #29): parameters, bytes per round and the FLOPs of one prediction, by hand."""

from __future__ import annotations

import pytest
import torch
from lightning.fabric import Fabric

from fedcoe_bench.baselines import FedAvg, SCAFFOLD
from fedcoe_bench.cost import method_cost
from fedcoe_bench.fedcoe import FedCoE
from fedcoe_bench.loop import FederatedLoop
from fedcoe_bench.results import Run
from fedcoe_bench.tables import build_tables, render_md

DIMS = {"num_classes": 10, "in_channels": 1, "image_size": 28}
# McMahan et al.'s CNN on 1x28x28: conv 5x5 1->32, conv 5x5 32->64, fc 64*7*7->512, fc 512->10
CNN = (1 * 32 * 25 + 32) + (32 * 64 * 25 + 64) + (64 * 7 * 7 * 512 + 512) + (512 * 10 + 10)
GATE = lambda k: (49 * 64 + 64) + (64 * k + k)  # noqa: E731  the light gate: 7x7 pooled input, 64 hidden
GATE_FLOPS = lambda k: 2 * (49 * 64 + 64 * k)  # noqa: E731  its two matrix products (torch counts no pooling)
# multiply-adds x 2 of one 28x28 image through the CNN
CNN_FLOPS = 2 * (28 * 28 * 32 * 25 + 14 * 14 * 64 * 32 * 25 + 3136 * 512 + 512 * 10)


def cost(method, report=0):
    method.flatten_parameters()
    return method_cost(method, torch.zeros(1, 1, 28, 28), report)


def test_fedavg_costs_one_cnn_each_way():
    c = cost(FedAvg(**DIMS))
    assert c["server_params"] == c["client_params"] == CNN == 1_663_370
    assert c["bytes_received"] == c["bytes_sent"] == 4 * CNN
    assert c["global_prediction_flops"] == c["personal_prediction_flops"] == CNN_FLOPS


def test_fedcoe_costs_four_experts_a_gate_and_a_local_level():
    c = cost(FedCoE(num_experts=4, **DIMS), report=100)
    shared = 4 * CNN + GATE(4) + 4  # + the assignment's bias
    personal = CNN + GATE(2) + 1 + 10 + 4  # local expert, fusion gate, local_ready, label counts, its assignment
    assert c["server_params"] == shared + 2 * len(FedCoE.beta_grid)  # + the calibration statistics
    assert c["client_params"] == shared + personal
    assert c["bytes_received"] == 4 * shared and c["bytes_sent"] == 4 * (shared - 4) + 100  # the bias is received only
    # a global prediction runs the four experts and the gate; a personal one also the local expert and the fusion gate
    assert c["global_prediction_flops"] == 4 * CNN_FLOPS + GATE_FLOPS(4)
    assert c["personal_prediction_flops"] == 5 * CNN_FLOPS + GATE_FLOPS(4) + GATE_FLOPS(2)


def test_scaffold_sends_its_control_variate_too():
    c = cost(SCAFFOLD(**DIMS), report=4 * CNN)  # its report: the change of c_i
    assert c["bytes_received"] == 4 * 2 * CNN and c["client_params"] == 3 * CNN  # x and c; c_i personal
    assert c["bytes_sent"] == 4 * 2 * CNN  # y and the change of c_i (the paper's), not c again


@pytest.mark.parametrize(("cls", "kwargs"), [(SCAFFOLD, {}), (FedCoE, {"capacity": 1.0}),
                                             (FedCoE, {"assignment": "gate", "balance_rate": 0.1})])
def test_what_is_received_only_comes_back_as_it_was_sent(fed, cls, kwargs):
    """``received_only`` state is left out of the bytes sent: a client must not change it."""
    seen = []

    class Recording(cls):
        def aggregate(self, server, updates, ctx):
            seen.append((server.clone(), [u.shared.clone() for u in updates]))
            return super().aggregate(server, updates, ctx)

    method = Recording(**{"num_classes": fed.num_classes, "in_channels": 1, "image_size": 12, **kwargs})
    loop = FederatedLoop(rounds=2, clients_per_round=3, checkpoint_every=0, progress=False, cold_start_steps=0)
    loop.fit(Fabric(accelerator="cpu", devices=1), method, fed, 0)
    spans = [method.span(name) for name, _ in method.named_state("shared") if name.startswith(method.received_only)]
    assert spans and len(seen) == 2
    for server, shared in seen:
        for span in spans:
            assert all(torch.equal(u[span], server[span]) for u in shared)
    assert any(not torch.equal(server[span], torch.zeros_like(server[span])) for server, _ in seen[1:] for span in spans)


def test_tables_show_cost_and_round_time_relative_to_fedavg():
    def run(method, seed, time, params):
        return Run(path=f"{method}/{seed}", method=method, dataset="d", scheme="dirichlet", alpha=0.1, rounds=5,
                   seed=seed, metrics={"global_acc": 0.5, "personal_acc": 0.5, "cold_start_acc": 0.5},
                   cost={"server_params": params, "client_params": params, "bytes_sent": 4 * params + 8,
                         "bytes_received": 4 * params,
                         "personal_prediction_flops": 1e6, "round_time_s": time})

    runs = [run("fedavg", 0, 1.0, 1e6), run("fedavg", 1, 3.0, 1e6), run("fedcoe", 0, 9.0, 4e6), run("fedcoe", 1, 7.0, 4e6)]
    from fedcoe_bench.results import assign_labels

    [table] = build_tables(assign_labels(runs))
    costs = {r.label: r.cost for r in table.rows}
    assert costs["fedcoe"]["round_time_x"] == pytest.approx(4.0)  # mean 8 s against FedAvg's mean 2 s
    assert costs["fedavg"]["round_time_x"] == pytest.approx(1.0)
    text = render_md([table])
    assert "| fedcoe | 4.00 | 4.00 | 16.0 | 16.0 | 4.00 | 1.0 |" in text  # server, client, sent, received, time, FLOPs

    # runs named by their setting (a sweep's): FedAvg is found by method, its named rows averaged
    named = [Run(**{**vars(r), "name": f"{r.method}-lr{lr}", "path": f"{r.path}-{lr}"}) for r in runs for lr in (0.1, 0.3)
             if r.method == "fedavg" or lr == 0.1]
    named[2].cost = {**named[2].cost, "round_time_s": 5.0}  # fedavg-lr0.1 seed 1: its rows' means are 3 and 2
    [table] = build_tables(assign_labels(named))
    costs = {r.label: r.cost for r in table.rows}
    assert costs["fedcoe-lr0.1"]["round_time_x"] == pytest.approx(8.0 / 2.5)
