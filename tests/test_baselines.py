"""The baselines compute what METHODS.md states. Kept fast: 12x12 synthetic images, 1-2 rounds on CPU."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from helpers import build

from fedcoe_bench.baselines import FedAvg, FedMix, FedPer, FedProx, Local, PFedMoE
from fedcoe_bench.loop import FederatedLoop, FitResult, sample_clients
from fedcoe_bench.method import ClientContext, ClientUpdate, RoundContext

SEED = 0
PER_ROUND = 3
ALL = [(FedAvg, {}), (FedProx, {"mu": 0.1}), (FedPer, {}), (FedMix, {"num_experts": 2}), (PFedMoE, {}), (Local, {})]
PERSONALIZED = [(FedPer, {}), (PFedMoE, {}), (FedMix, {"num_experts": 2, "gate_scope": "personal"}), (Local, {})]


def name(param):
    return param.__name__ if isinstance(param, type) else None


def fit(fabric, method, fed, rounds=1, resume=None) -> FitResult:
    # the default memory format, so that flat vectors compare with ones built here by flatten_parameters
    loop = FederatedLoop(rounds=rounds, clients_per_round=PER_ROUND, checkpoint_every=0, progress=False,
                         channels_last=False)
    return loop.fit(fabric, method, fed, SEED, resume_state=resume)


def ctx(clients=PER_ROUND, steps=1) -> ClientContext:
    """A client's context in round 1 of this federation (the unit tests call the hooks directly)."""
    return ClientContext(1, 6, clients, steps)


def round_ctx(clients=PER_ROUND) -> RoundContext:
    return RoundContext(1, 6, clients)


def sampled_in(fed, rnd):
    return [fed.clients[i] for i in sample_clients(SEED, rnd, len(fed.clients), PER_ROUND)]


def flat(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


# ---------------------------------------------------------------------------------------- FedProx
def test_fedprox_mu_zero_is_fedavg_exactly_and_mu_pulls_towards_the_server(fabric, fed):
    init = build(FedAvg)
    init.flatten_parameters()
    start = init.flat["shared"].clone()
    avg = fit(fabric, build(FedAvg), fed).server
    prox0 = fit(fabric, build(FedProx, mu=0.0), fed).server
    prox = fit(fabric, build(FedProx, mu=1.0), fed).server
    assert torch.equal(avg, prox0)
    assert not torch.allclose(avg, prox)
    # the proximal term shortens every client's step, hence the averaged one
    assert (prox - start).norm() < (avg - start).norm()


def test_fedprox_loss_is_cross_entropy_plus_half_mu_squared_distance_to_the_anchor():
    m = build(FedProx, mu=0.3)
    m.flatten_parameters()
    x, y = torch.randn(4, 1, 12, 12), torch.tensor([0, 1, 2, 3])
    m.on_client_start(x, y, ctx())
    delta = 0.01 * torch.randn(m.flat["shared"].shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m.flat["shared"].add_(delta)
    loss = m.training_step((x, y), 0)
    expected = F.cross_entropy(m(x), y) + 0.5 * 0.3 * delta.pow(2).sum()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    # the anchor is the state at client start, not re-read each step
    m.on_client_start(x, y, ctx())
    torch.testing.assert_close(m.training_step((x, y), 0), F.cross_entropy(m(x), y))


# ---------------------------------------------------------------------------------------- what is shared
@pytest.mark.parametrize("cls, kwargs, shared, personal", [
    (FedPer, {}, ("net.body.",), ("net.head.", "head_weight")),
    (PFedMoE, {}, ("global_expert.",), ("local_expert.", "gate.", "head.", "head_weight")),
    (FedMix, {"num_experts": 2, "gate_scope": "personal"}, ("experts.",), ("gate.",)),
    (FedMix, {"num_experts": 2}, ("experts.", "gate."), ()),  # the paper's shared gate, the default
    (Local, {}, (), ("net.",)),
], ids=name)
def test_personal_parameters_are_never_in_the_shared_vector(cls, kwargs, shared, personal):
    m = build(cls, **kwargs)
    m.flatten_parameters()
    assert all(n.startswith(shared) for n in m.layout["shared"])
    assert all(n.startswith(personal) for n in m.layout["personal"])
    for prefix in personal:  # every personal part exists and is personal
        assert any(n.startswith(prefix) for n in m.layout["personal"])
    # server-only evaluation heads travel in neither direction
    assert not any("eval_head" in n for kind in ("shared", "personal") for n in m.layout[kind])
    state = [*m.named_parameters(), *m.named_buffers()]  # floating buffers move like parameters
    total = sum(t.numel() for n, t in state if "eval_head" not in n and t.is_floating_point())
    assert m.flat["shared"].numel() + m.flat["personal"].numel() == total


@pytest.mark.parametrize("cls, kwargs", PERSONALIZED, ids=name)
def test_personal_state_stays_on_its_client(fabric, fed, cls, kwargs):
    m = build(cls, **kwargs)
    first = fit(fabric, m, fed, rounds=1)
    state = {"round": 1, "server": first.server.clone(), "history": [],
             "store": copy.deepcopy(first.store.flush()), "method": copy.deepcopy(m.state_dict())}
    personal = state["store"]["states"]
    second = {c.id for c in sampled_in(fed, 1)}
    idle = [c for c in personal if c not in second]
    busy = [c for c in personal if c in second]
    assert idle and busy, "the test needs a round-1 client that sits out round 2 and one that does not"

    plain = fit(fabric, m, fed, rounds=2, resume=copy.deepcopy(state))
    server_only = {k: v.clone() for k, v in m.state_dict().items() if k.startswith("eval_head")}
    for c in idle:  # not sampled: untouched
        assert torch.equal(plain.store.get(c), personal[c])
    for c in busy:  # sampled again: trained further
        assert not torch.equal(plain.store.get(c), personal[c])

    # Whatever an idle client holds, the server never sees it.
    poked = copy.deepcopy(state)
    for c in idle:
        poked["store"]["states"][c] += 1.0
    again = fit(fabric, m, fed, rounds=2, resume=poked)
    assert torch.equal(again.server, plain.server)
    for k, v in server_only.items():
        assert torch.equal(m.state_dict()[k], v)


# ---------------------------------------------------------------------------------------- FedPer, pFedMoE
@pytest.mark.parametrize("cls, head, features", [
    (FedPer, "net.head.", lambda m, x: m.net.body(x)),
    (PFedMoE, "head.", lambda m, x: m.global_expert(x)),
], ids=name)
def test_evaluation_head_is_the_weighted_average_of_the_latest_heads(fabric, fed, cls, head, features):
    m = build(cls)
    result = fit(fabric, m, fed, rounds=3)
    trained = [c for c in fed.clients if result.store.get(c.id) is not None]
    rounds = [{c.id for c in sampled_in(fed, r)} for r in range(3)]
    assert len(trained) > len(rounds[-1]) and rounds[0] & rounds[1], "needs clients outside the last round and one trained twice"
    s = m.span(head, "personal")
    n = torch.tensor([float(c.num_train) for c in trained])
    expected = n @ torch.stack([result.store.get(c.id)[s] for c in trained]) / n.sum()
    torch.testing.assert_close(flat(m.eval_head), expected)

    # global prediction = server features + evaluation head, whatever personal state is loaded
    x = fed.prepare(fed.test_x[:16])
    m.eval()
    want = m.eval_head(features(m, x)).softmax(-1)
    with torch.no_grad():
        m.flat["personal"].copy_(result.store.get(trained[0].id))
    torch.testing.assert_close(m.predict_global(x), want)
    torch.testing.assert_close(m.predict_cold_start(x, x), want)
    assert not torch.allclose(m.predict_personal(x), want)


@pytest.mark.parametrize("cls, head", [(FedPer, "net.head."), (PFedMoE, "head.")], ids=name)
def test_evaluation_head_replaces_a_retrained_clients_old_head(cls, head):
    """Hand computation over three rounds; client 0 trains in rounds 1 and 3 (its first head must
    leave the average), client 1 only in round 1, client 2 only in round 2."""
    m = build(cls)
    m.flatten_parameters()
    s = m.span(head, "personal")
    init_personal = m.flat["personal"].clone()
    personal, server, x = {}, m.flat["shared"].clone(), torch.zeros(2, 1, 12, 12)
    n = {0: 2, 1: 3, 2: 5}

    def train(cid, value):  # a client's turn as the loop runs it, local SGD replaced by setting its head
        m.flat["personal"].copy_(personal.get(cid, init_personal))
        m.on_client_start(x, torch.zeros(n[cid], dtype=torch.long), ctx())
        m.flat["personal"][s] = value
        update = ClientUpdate(cid, float(n[cid]), m.flat["shared"].clone(), m.on_client_end(x, ctx()))
        personal[cid] = m.flat["personal"].clone()
        return update

    h = {k: torch.full((s.stop - s.start,), float(k)) for k in (1, 2, 3, 4)}
    m.aggregate(server, [train(0, h[1]), train(1, h[2])], round_ctx(2))
    torch.testing.assert_close(flat(m.eval_head), (2 * h[1] + 3 * h[2]) / 5)
    m.aggregate(server, [train(2, h[3])], round_ctx(1))  # not only the latest round's client
    torch.testing.assert_close(flat(m.eval_head), (2 * h[1] + 3 * h[2] + 5 * h[3]) / 10)
    m.aggregate(server, [train(0, h[4])], round_ctx(1))  # client 0's first head is replaced, not added again
    torch.testing.assert_close(flat(m.eval_head), (2 * h[4] + 3 * h[2] + 5 * h[3]) / 10)
    # the server holds one head's worth of sums, whatever the number of clients
    assert m.eval_head_sum.numel() == s.stop - s.start and m.eval_head_weight.item() == 10.0


def test_pfedmoe_mixes_global_and_local_features_with_the_gate():
    m = build(PFedMoE)
    x = torch.randn(5, 1, 12, 12)
    a = m.gate(x)
    assert a.shape == (5, 2)
    z = a[:, :1] * m.global_expert(x) + a[:, 1:] * m.local_expert(x)
    torch.testing.assert_close(m(x), m.head(z))


# ---------------------------------------------------------------------------------------- FedMix
def test_fedmix_trains_on_the_mixture_nll_and_reports_mean_gate_mass():
    m = build(FedMix, num_experts=3, gate_scope="personal")  # a personal gate: the server serves the uniform mixture
    x, y = torch.randn(6, 1, 12, 12), torch.tensor([0, 1, 2, 3, 4, 5])
    g = m.gate(x)
    p = sum(g[:, k : k + 1] * e(x).softmax(-1) for k, e in enumerate(m.experts))
    torch.testing.assert_close(m.predict_personal(x), p)
    torch.testing.assert_close(m.training_step((x, y), 0), -p[torch.arange(6), y].log().mean())
    mass = m.on_client_end(x, ctx())["gate_mass"]
    torch.testing.assert_close(mass, g.mean(0))
    uniform = sum(e(x).softmax(-1) for e in m.experts) / 3
    torch.testing.assert_close(m.predict_global(x), uniform)
    torch.testing.assert_close(m.predict_cold_start(x, x), uniform)


def test_fedmix_with_one_expert_is_fedavg(fabric, fed):
    # K = 1: the gate is identically 1, the mixture NLL is cross-entropy, and the expert weight is n_i.
    avg = fit(fabric, build(FedAvg), fed).server
    for scope in ("personal", "shared"):  # a shared gate travels too, but with one expert it never moves
        method = build(FedMix, num_experts=1, gate_scope=scope)
        mix = fit(fabric, method, fed).server
        torch.testing.assert_close(mix[method.span("experts.")], avg, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("top_m, weights", [
    (0, [(10 * 0.7, 30 * 0.2), (10 * 0.3, 30 * 0.8)]),  # n_i * mean gate mass
    (2, [(10 * 0.7, 30 * 0.2), (10 * 0.3, 30 * 0.8)]),  # expert 2 is nobody's top-2 anyway
    (1, [(10 * 0.7, 0.0), (0.0, 30 * 0.8)]),  # each client sends only its top expert
])
def test_fedmix_averages_each_expert_with_n_times_gate_mass(top_m, weights):
    m = build(FedMix, num_experts=3, top_m=top_m, gate_scope="personal")  # the experts are all it shares
    m.flatten_parameters()
    server = m.flat["shared"].clone()
    gen = torch.Generator().manual_seed(1)
    sent = [torch.randn(server.shape, generator=gen) for _ in range(2)]
    entropy = torch.tensor(0.5)  # every FedMix report carries its gate entropy (logged, not aggregated)
    ups = [ClientUpdate(0, 10.0, sent[0], {"gate_mass": torch.tensor([0.7, 0.3, 0.0]), "gate_entropy": entropy}),
           ClientUpdate(1, 30.0, sent[1], {"gate_mass": torch.tensor([0.2, 0.8, 0.0]), "gate_entropy": entropy})]
    new, _ = m.aggregate(server, ups, round_ctx(2))
    spans = [m.span(f"experts.{k}.") for k in range(3)]
    assert sum(s.stop - s.start for s in spans) == server.numel()
    for s, (w0, w1) in zip(spans, weights):
        torch.testing.assert_close(new[s], (w0 * sent[0][s] + w1 * sent[1][s]) / (w0 + w1))
    assert torch.equal(new[spans[2]], server[spans[2]])  # nobody routes to expert 2: unchanged


# ---------------------------------------------------------------------------------------- Local
def test_local_never_aggregates(fabric, fed):
    m = build(Local)
    initial = copy.deepcopy(m).eval()
    start = copy.deepcopy(m)  # the initial personal state, as the loop takes it (default memory format)
    start.flatten_parameters()
    init_personal = start.flat["personal"].clone()
    result = fit(fabric, m, fed, rounds=2)
    assert result.server.numel() == 0
    assert m.aggregate(result.server, [ClientUpdate(0, 5.0, result.server.clone())], round_ctx(1))[0] is result.server
    states = list(result.store.states.values())
    assert len(states) >= 2
    assert all(not torch.equal(a, b) for a, b in itertools.combinations(states, 2))
    assert all(not torch.equal(s, init_personal) for s in states)
    x = fed.prepare(fed.test_x[:16])
    torch.testing.assert_close(m.predict_global(x), initial.predict_global(x))  # the untrained floor
    torch.testing.assert_close(m.predict_cold_start(x, x), initial.predict_global(x))


# ---------------------------------------------------------------------------------------- all methods
@pytest.mark.parametrize("cls, kwargs", ALL, ids=name)
def test_predictions_are_distributions(fabric, fed, cls, kwargs):
    m = build(cls, **kwargs)
    start = copy.deepcopy(m)  # the initial personal state, as the loop takes it (default memory format)
    start.flatten_parameters()
    init_personal = start.flat["personal"].clone()
    result = fit(fabric, m, fed, rounds=1)
    for key in ("global_acc", "personal_acc", "cold_start_acc"):
        assert 0.0 <= result.metrics[key] <= 1.0
    x = fed.prepare(fed.test_x[:32])
    unlabeled = fed.prepare(fed.pool_x[fed.new_clients[0].train])
    m.eval()
    outs = [m.predict_global(x), m.predict_cold_start(x, unlabeled)]
    client = sampled_in(fed, 0)[0].id
    with torch.no_grad():
        state = result.store.get(client)
        m.flat["personal"].copy_(init_personal if state is None else state)
    outs.append(m.predict_personal(x))
    for p in outs:
        assert p.shape == (32, 10)
        assert bool((p >= 0).all())
        torch.testing.assert_close(p.sum(1), torch.ones(32))
