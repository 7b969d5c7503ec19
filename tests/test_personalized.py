"""Ditto, FedRep and the equal-size Ensemble compute what METHODS.md states and run by short name (crash and
resume: test_reliability.py). Kept fast: 12x12 synthetic images, 1-2 rounds on CPU."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import build, read_summary

from fedcoe_bench.baselines import Ditto, Ensemble, FedAvg, FedRep, Local
from fedcoe_bench.loop import FederatedLoop, FitResult
from fedcoe_bench.method import ClientContext

SEED = 0
PER_ROUND = 3


def fit(fabric, method, fed, rounds=1) -> FitResult:
    # the default memory format, so that flat vectors compare with ones built here by flatten_parameters
    loop = FederatedLoop(rounds=rounds, clients_per_round=PER_ROUND, checkpoint_every=0, progress=False,
                         channels_last=False, cold_start_steps=0)
    return loop.fit(fabric, method, fed, SEED)


def initial(method) -> dict[str, torch.Tensor]:
    """The flat shared and personal state a method starts from, as the loop takes it."""
    m = copy.deepcopy(method)
    m.flatten_parameters()
    return {k: v.clone() for k, v in m.flat.items()}


def client_batches(fed, steps=8, size=16):
    client = fed.clients[0]
    x, y = fed.prepare(fed.pool_x[client.train]), fed.pool_y[client.train]
    g = torch.Generator().manual_seed(1)
    return x, y, [(x[i], y[i]) for i in (torch.randint(len(y), (size,), generator=g) for _ in range(steps))]


def train(method, x, y, batches, finetune=False):
    """One client's local training as the loop runs it (state already loaded)."""
    method.train()
    method.on_client_start(x, y, ClientContext(1, 6, PER_ROUND, len(batches), finetune))
    opt = method.configure_optimizers()
    for i, batch in enumerate(batches):
        loss = method.training_step(batch, i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    method.eval()


# ---------------------------------------------------------------------------------------- Ditto
def test_ditto_with_lam_zero_trains_v_as_local_and_w_as_fedavg(fabric, fed):
    ditto, local, avg = build(Ditto, lam=0.0), build(Local), build(FedAvg)
    start = initial(ditto)
    assert torch.equal(start["personal"], start["shared"]) and torch.equal(start["shared"], initial(avg)["shared"])
    d, lo, a = (fit(fabric, m, fed, rounds=2) for m in (ditto, local, avg))
    assert torch.equal(d.server, a.server) and not torch.equal(d.server, start["shared"])
    assert d.store.states.keys() == lo.store.states.keys() and len(d.store.states) > PER_ROUND  # some trained twice
    for c in d.store.states:
        assert torch.equal(d.store.get(c), lo.store.get(c)), c
        assert not torch.equal(d.store.get(c), start["personal"])
    pulled = fit(fabric, build(Ditto, lam=1.0), fed, rounds=2)  # the test can fail: lam > 0 is not Local
    assert torch.equal(pulled.server, a.server)  # w never sees lam
    assert not any(torch.equal(pulled.store.get(c), lo.store.get(c)) for c in d.store.states)


def test_ditto_loss_is_both_cross_entropies_plus_half_lam_squared_distance_to_the_received_model():
    m = build(Ditto, lam=0.3)
    m.flatten_parameters()
    x, y = torch.randn(4, 1, 12, 12), torch.tensor([0, 1, 2, 3])
    m.on_client_start(x, y, ClientContext(1, 6, PER_ROUND, 1))
    delta = 0.01 * torch.randn(m.flat["personal"].shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m.flat["personal"].add_(delta)
        m.flat["shared"].add_(1.0)  # w moves during the round; the anchor is w as received
    expected = F.cross_entropy(m.net(x), y) + F.cross_entropy(m.personal_net(x), y) + 0.5 * 0.3 * delta.pow(2).sum()
    torch.testing.assert_close(m.training_step((x, y), 0), expected, rtol=1e-4, atol=1e-5)


def test_ditto_pulls_the_personal_model_towards_the_received_global_model(fed):
    x, y, batches = client_batches(fed)
    lr = 0.01
    distances, gaps = [], []
    for lam in (0.0, 1.0, 1 / lr):
        m = build(Ditto, lam=lam, lr=lr, momentum=0.0)
        m.flatten_parameters()
        received = m.flat["shared"].clone()
        m.eval()
        p_received = m.predict_global(x)
        train(m, x, y, batches)
        distances.append((m.flat["personal"] - received).norm().item())
        gaps.append((m.predict_personal(x) - p_received).abs().sum(1).mean().item())
    assert distances[0] > distances[1] > distances[2] > 0
    assert gaps[0] > gaps[1] > gaps[2]

    # lam = 1/lr, no momentum: a step lands v at w^t - lr * grad CE(v), wherever v and the moving w are
    m = build(Ditto, lam=1 / lr, lr=lr, momentum=0.0)
    m.flatten_parameters()
    received = m.flat["shared"].clone()
    train(m, x, y, batches[:-1])
    assert not torch.equal(m.flat["shared"], received)
    bx, by = batches[-1]
    g = torch.autograd.grad(F.cross_entropy(m.personal_net(bx), by), list(m.personal_net.parameters()))
    want = [a - lr * gi for (_, a), gi in zip(m.parameters_with(received), g)]
    opt = m.configure_optimizers()  # no momentum: a fresh optimizer steps as the loop's would
    opt.zero_grad(set_to_none=True)
    m.training_step((bx, by), len(batches) - 1).backward()
    opt.step()
    for v, w in zip(m.personal_net.parameters(), want):
        torch.testing.assert_close(v, w, rtol=1e-4, atol=1e-6)


def test_ditto_new_client_fine_tunes_v_from_the_served_global_model(fed):
    m = build(Ditto, lam=0.5)
    m.flatten_parameters()
    with torch.no_grad():
        m.flat["shared"].normal_()  # the served w differs from the initial v
    x, y, batches = client_batches(fed, steps=1)
    m.on_client_start(x, y, ClientContext(1, 6, 1, 1, finetune=True))
    assert m.start_finetune() == ("personal_net.",)
    assert torch.equal(m.flat["personal"], m.flat["shared"])
    bx, by = batches[0]
    # the global model is frozen there: its loss is not computed, v's objective is anchored at w
    torch.testing.assert_close(m.training_step((bx, by), 0), F.cross_entropy(m.personal_net(bx), by))


# ---------------------------------------------------------------------------------------- FedRep
def recording(method):
    """Wrap ``method.aggregate`` to keep what each round received: (server, updates, steps per client)."""
    seen, steps = [], []
    aggregate, start = method.aggregate, method.on_client_start
    method.aggregate = lambda server, updates, ctx: (seen.append((server.clone(), updates)),
                                                     aggregate(server, updates, ctx))[1]
    method.on_client_start = lambda x, y, ctx: (steps.append(ctx.steps), start(x, y, ctx))[1]
    return seen, steps


@pytest.mark.parametrize("share, body_moves, head_moves", [(1.0, False, True), (0.0, True, False), (0.5, True, True)])
def test_fedrep_trains_the_head_then_the_body_in_its_share_of_the_steps(fabric, fed, share, body_moves, head_moves):
    m = build(FedRep, head_share=share)
    start = initial(m)
    seen, steps = recording(m)
    result = fit(fabric, m, fed, rounds=1)
    assert min(steps) >= 2, "each client needs a step for each phase"
    (server, updates), = seen
    assert torch.equal(server, start["shared"])
    s = m.span("net.head.", "personal")
    for u in updates:
        assert torch.equal(u.shared, server) != body_moves  # bit for bit where frozen
        assert torch.equal(result.store.get(u.client)[s], start["personal"][s]) != head_moves


def test_fedrep_frozen_part_gets_no_gradient_in_each_phase(fed):
    m = build(FedRep, head_share=0.5)
    m.flatten_parameters()
    x, y, batches = client_batches(fed, steps=1)
    head, body = list(m.net.head.parameters()), list(m.net.body.parameters())

    def grads(step, finetune=False):
        m.on_client_start(x, y, ClientContext(1, 6, PER_ROUND, 4, finetune))
        g = torch.autograd.grad(m.training_step(batches[0], step), head + body, allow_unused=True)
        return [t is not None for t in g[: len(head)]], [t is not None for t in g[len(head):]]

    assert m.head_steps(4) == 2
    for step in (0, 1):
        assert grads(step) == ([True] * len(head), [False] * len(body))
    for step in (2, 3):
        assert grads(step) == ([False] * len(head), [True] * len(body))
    assert grads(3, finetune=True) == ([True] * len(head), [False] * len(body))  # a new client learns the head only


# ---------------------------------------------------------------------------------------- Ensemble
def test_ensemble_of_one_is_fedavg(fabric, fed):
    one, avg = build(Ensemble, num_experts=1), build(FedAvg)
    assert torch.equal(initial(one)["shared"], initial(avg)["shared"])  # the same draw, in the same order
    a, b = fit(fabric, one, fed, rounds=2), fit(fabric, avg, fed, rounds=2)
    assert torch.equal(a.server, b.server)
    x = fed.prepare(fed.test_x[:32])
    one.eval()
    avg.eval()
    assert torch.equal(one.predict_global(x), avg.predict_global(x))
    assert torch.equal(one.predict_personal(x), avg.predict_personal(x))
    assert torch.equal(one.predict_cold_start(x, x), avg.predict_cold_start(x, x))


def test_ensemble_members_train_as_separate_fedavg_runs_and_predict_their_mean_softmax(fabric, fed):
    ens = build(Ensemble, num_experts=4)
    start = initial(ens)
    result = fit(fabric, ens, fed, rounds=1)
    spans = [ens.span(f"experts.{k}.") for k in range(4)]
    assert sum(s.stop - s.start for s in spans) == result.server.numel()
    for i, j in itertools.combinations(spans, 2):
        assert (result.server[i] - result.server[j]).norm() > 0
    for s in spans:
        assert not torch.equal(result.server[s], start["shared"][s])
    # member 0 has FedAvg's initial weights and, the loss being a sum, FedAvg's gradients: FedAvg's run
    torch.testing.assert_close(result.server[spans[0]], fit(fabric, build(FedAvg), fed, rounds=1).server,
                               rtol=0, atol=1e-6)

    x = fed.prepare(fed.test_x[:32])
    ens.eval()
    mean = torch.stack([f(x).softmax(-1) for f in ens.experts]).mean(0)
    for p in (ens.predict_global(x), ens.predict_personal(x), ens.predict_cold_start(x, x)):
        torch.testing.assert_close(p, mean)
    assert not torch.allclose(mean, ens.experts[0](x).softmax(-1))


# ---------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("method", ["ditto", "fedrep", "ensemble"])
def test_runs_by_short_name(tmp_path, fit_argv, run_cli, method):
    """(Crash and resume: tests/test_reliability.py, every method.)"""
    code, _, err = run_cli(fit_argv("whole", "--method", method))
    assert code == 0, err
    whole = read_summary(tmp_path / "whole")
    assert whole["method"] == method and whole["rounds"] == 2
