"""FedMix's switches against the paper (gate_scope) and its label-coverage diagnostic. 12x12 synthetic images, CPU."""

from __future__ import annotations

import pytest
import torch
from lightning.fabric import Fabric

from fedcoe_bench.baselines import FedMix
from fedcoe_bench.errors import ConfigError
from fedcoe_bench.loop import FederatedLoop
from fedcoe_bench.method import ClientContext, ClientUpdate, RoundContext
from fedcoe_bench.models import mixture

DIMS = {"num_classes": 10, "in_channels": 1, "image_size": 12}


def build(**kwargs) -> FedMix:
    torch.manual_seed(0)
    return FedMix(**DIMS, **kwargs)


def fit(method, fed, rounds=1):
    loop = FederatedLoop(rounds=rounds, clients_per_round=3, checkpoint_every=0, progress=False, channels_last=False)
    return loop.fit(Fabric(accelerator="cpu", devices=1), method, fed, 0)


def report(mass, cls_mass=None):
    out = {"gate_mass": torch.tensor(mass), "gate_entropy": torch.tensor(0.5)}
    if cls_mass is not None:
        out["class_mass"] = torch.tensor(cls_mass)
    return out


@pytest.mark.parametrize("kwargs", [{"gate_scope": "global"}, {"gate_scope": ""}, {"label_coverage": "yes"}])
def test_fedmix_refuses_unknown_switch_values(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        build(num_experts=2, **kwargs)


def test_fedmix_shared_gate_is_shared_state_averaged_by_client_size_and_serves_the_global_mixture():
    m = build(num_experts=3, gate_scope="shared")
    m.flatten_parameters()
    assert m.layout["personal"] == {}
    assert any(n.startswith("gate.") for n in m.layout["shared"])
    # a personal gate (the runs published before the shared default) stays off the shared vector
    p = build(num_experts=3, gate_scope="personal")
    p.flatten_parameters()
    assert all(n.startswith("gate.") for n in p.layout["personal"]) and p.layout["personal"]
    server = m.flat["shared"].clone()
    gen = torch.Generator().manual_seed(1)
    sent = [torch.randn(server.shape, generator=gen) for _ in range(2)]
    ups = [ClientUpdate(0, 10.0, sent[0], report([0.7, 0.3, 0.0])),
           ClientUpdate(1, 30.0, sent[1], report([0.2, 0.8, 0.0]))]
    new, _ = m.aggregate(server, ups, RoundContext(1, 6, 2))
    g = m.span("gate.")
    torch.testing.assert_close(new[g], (10 * sent[0][g] + 30 * sent[1][g]) / 40)  # n_i, not n_i * gate mass
    e0 = m.span("experts.0.")
    torch.testing.assert_close(new[e0], (7 * sent[0][e0] + 6 * sent[1][e0]) / 13)  # experts: n_i * m_ik as before
    # global and cold-start prediction: the shared gate's mixture, not the uniform one
    x = torch.randn(5, 1, 12, 12)
    with torch.no_grad():
        m.gate.net[-1].bias.copy_(torch.tensor([4.0, -4.0, 0.0]))  # a gate far from uniform
        gated = mixture(m.gate.log_weights(x), m.experts(x)).exp()
        uniform = sum(e(x).softmax(-1) for e in m.experts) / 3
    assert not torch.allclose(gated, uniform, atol=1e-3)
    torch.testing.assert_close(m.predict_global(x), gated)
    torch.testing.assert_close(m.predict_cold_start(x, x), gated)
    torch.testing.assert_close(m.predict_personal(x), gated)
    with torch.no_grad():
        p.gate.net[-1].bias.copy_(torch.tensor([4.0, -4.0, 0.0]))
    torch.testing.assert_close(p.predict_global(x), sum(e(x).softmax(-1) for e in p.experts) / 3)  # personal: uniform


def test_fedmix_shared_gate_trains_one_gate_for_all_clients(fed):
    m = build(num_experts=2, gate_scope="shared")
    result = fit(m, fed)
    assert not result.store.states or all(s.numel() == 0 for s in result.store.states.values())  # nothing personal
    init = build(num_experts=2, gate_scope="shared")
    init.flatten_parameters()
    g = init.span("gate.")
    assert not torch.equal(result.server[g], init.flat["shared"][g])  # the server's gate moved
    torch.testing.assert_close(torch.cat([p.detach().flatten() for p in m.gate.parameters()]), result.server[g])


def test_fedmix_label_coverage_is_a_diagnostic_only_it_trains_the_same_runs(fed):
    default = fit(build(num_experts=2, gate_scope="personal"), fed)  # as the runs published before the shared default
    explicit = fit(build(num_experts=2, gate_scope="personal", label_coverage=True), fed)
    assert torch.equal(default.server, explicit.server)
    assert default.store.states.keys() == explicit.store.states.keys()
    assert all(torch.equal(default.store.states[c], explicit.store.states[c]) for c in default.store.states)


def test_fedmix_label_coverage_reports_gate_mass_per_class_only_when_asked():
    x, y = torch.randn(6, 1, 12, 12), torch.tensor([0, 0, 1, 2, 2, 2])
    ctx = ClientContext(1, 6, 3, 1)
    m = build(num_experts=3, label_coverage=True)
    m.on_client_start(x, y, ctx)
    rep = m.on_client_end(x, ctx)
    g = m.gate(x).detach()
    assert rep["class_mass"].shape == (3, 10)
    for c in range(10):
        torch.testing.assert_close(rep["class_mass"][:, c], g[y == c].sum(0) / 6)
    torch.testing.assert_close(rep["class_mass"].sum(1), rep["gate_mass"])
    plain = build(num_experts=3)
    plain.on_client_start(x, y, ctx)
    assert set(plain.on_client_end(x, ctx)) == {"gate_mass", "gate_entropy"}  # label-free by default


@pytest.mark.parametrize("top_m", [0, 1])
def test_fedmix_label_shares_are_each_experts_aggregation_weight_per_class(top_m):
    torch.manual_seed(0)
    m = FedMix(num_experts=2, label_coverage=True, top_m=top_m, num_classes=3, in_channels=1, image_size=12)
    m.flatten_parameters()
    server = m.flat["shared"].clone()
    # client 0 (n=10) saw classes 0 and 1 and routes mostly to expert 0; client 1 (n=30) saw class 2, mostly expert 1
    c0 = [[0.5, 0.3, 0.0], [0.1, 0.1, 0.0]]  # rows: experts, columns: classes; sums to its gate mass [0.8, 0.2]
    c1 = [[0.0, 0.0, 0.3], [0.0, 0.0, 0.7]]  # gate mass [0.3, 0.7]
    ups = [ClientUpdate(0, 10.0, server.clone(), report([0.8, 0.2], c0)),
           ClientUpdate(1, 30.0, server.clone(), report([0.3, 0.7], c1))]
    _, scalars = m.aggregate(server, ups, RoundContext(1, 6, 2))
    if top_m == 0:  # W_0 = 10*[.5,.3,0] + 30*[0,0,.3] = [5, 3, 9]; W_1 = 10*[.1,.1,0] + 30*[0,0,.7] = [1, 1, 21]
        want = [[5 / 17, 3 / 17, 9 / 17], [1 / 23, 1 / 23, 21 / 23]]
    else:  # each client sends only its top expert: client 0 expert 0, client 1 expert 1
        want = [[5 / 8, 3 / 8, 0.0], [0.0, 0.0, 1.0]]
    for k in range(2):
        got = [scalars[f"label_share_{k}_{c}"] for c in range(3)]
        assert got == pytest.approx(want[k], abs=1e-6)
        eff = torch.special.entr(torch.tensor(want[k], dtype=torch.float64)).sum().exp().item()
        assert scalars[f"label_classes_{k}"] == pytest.approx(eff, abs=1e-6)
    # an expert nobody sent has no shares and no classes
    ups = [ClientUpdate(0, 10.0, server.clone(), report([1.0, 0.0], [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]))]
    _, scalars = m.aggregate(server, ups, RoundContext(1, 6, 1))
    assert [scalars[f"label_share_1_{c}"] for c in range(3)] == [0.0, 0.0, 0.0] and scalars["label_classes_1"] == 0.0
