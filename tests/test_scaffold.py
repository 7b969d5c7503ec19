"""SCAFFOLD computes what its paper's algorithm box says (Karimireddy et al., 2020)."""

from __future__ import annotations

import torch
from lightning.fabric import Fabric

from helpers import build

from fedcoe_bench.baselines import FedAvg, SCAFFOLD
from fedcoe_bench.loop import FederatedLoop
from fedcoe_bench.method import ClientContext

SEED, PER_ROUND = 0, 3


def fit(method, fed, rounds):
    loop = FederatedLoop(rounds=rounds, clients_per_round=PER_ROUND, checkpoint_every=0, progress=False,
                         channels_last=False, cold_start_steps=0)
    return loop.fit(Fabric(accelerator="cpu", devices=1), method, fed, SEED)


def test_first_round_is_fedavg_and_the_server_control_is_the_mean_of_all_client_controls(fed):
    scaffold = build(SCAFFOLD)
    one = fit(scaffold, fed, rounds=1)
    avg = fit(build(FedAvg), fed, rounds=1)
    model = scaffold.span("net.")
    torch.testing.assert_close(one.server[model], avg.server, rtol=0, atol=0)  # c = c_i = 0: no correction yet

    result = fit(build(SCAFFOLD), fed, rounds=2)  # 3 of 6 clients a round: some clients never trained
    m = build(SCAFFOLD)
    m.flatten_parameters()  # the personal state is c_i alone; a client that never trained has c_i = 0
    personal = [result.store.get(c.id) for c in fed.clients]
    assert any(p is None for p in personal) and any(p is not None for p in personal)
    controls = torch.stack([m.client_control if p is None else p for p in personal])
    c = result.server[m.span("control")]
    assert c.abs().sum() > 0
    torch.testing.assert_close(c, controls.mean(0), rtol=1e-5, atol=1e-6)


def test_a_local_step_is_corrected_by_c_minus_ci_and_ci_follows_option_two(fed):
    client = fed.clients[0]
    x, y = fed.prepare(fed.pool_x[client.train][:8]), fed.pool_y[client.train][:8]
    steps = []
    for cls in (FedAvg, SCAFFOLD):
        m = build(cls, momentum=0.0, lr=0.1)
        m.flatten_parameters()
        if cls is SCAFFOLD:
            g = torch.Generator().manual_seed(1)
            m.control.copy_(torch.randn(m.control.shape, generator=g))
            m.client_control.copy_(torch.randn(m.control.shape, generator=g))
            c, ci = m.control.clone(), m.client_control.clone()
        ctx = ClientContext(1, 6, 3, steps=1)
        m.on_client_start(x, y, ctx)
        start = m.flat["shared"][m.span("net.")].clone() if cls is SCAFFOLD else m.flat["shared"].clone()
        opt = m.configure_optimizers()
        loss = m.training_step((x, y), 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        after = m.flat["shared"][m.span("net.")] if cls is SCAFFOLD else m.flat["shared"]
        steps.append((start, after.clone()))
        if cls is SCAFFOLD:
            report = m.on_client_end(x, ctx)
    (x0, y_avg), (x0s, y_scaffold) = steps
    torch.testing.assert_close(x0, x0s)
    torch.testing.assert_close(y_scaffold, y_avg - 0.1 * (c - ci), rtol=1e-5, atol=1e-6)
    want = ci - c + (x0s - y_scaffold) / (1 * 0.1)
    torch.testing.assert_close(m.client_control, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(report["control_delta"], want - ci, rtol=1e-5, atol=1e-5)


def test_with_momentum_the_client_control_is_the_gradient_under_a_constant_gradient(fed):
    """Option II's c_i is the mean gradient of the local path: under a constant gradient g it is g, for
    plain SGD as with momentum (whose K steps move further than K lr g)."""
    client = fed.clients[0]
    x, y = fed.prepare(fed.pool_x[client.train][:8]), fed.pool_y[client.train][:8]
    for momentum in (0.0, 0.9):
        m = build(SCAFFOLD, momentum=momentum, lr=0.05)
        m.flatten_parameters()
        ctx = ClientContext(1, 6, 3, steps=5)
        m.on_client_start(x, y, ctx)
        g = torch.randn(m.client_control.shape, generator=torch.Generator().manual_seed(2))
        params = list(m.net.parameters())  # the control's layout: the model's parameters in order
        grads = [part.view_as(p) for part, p in zip(g.split([p.numel() for p in params]), params)]
        opt = m.configure_optimizers()
        for _ in range(ctx.steps):
            for p, grad in zip(params, grads):
                p.grad = grad.clone()
            opt.step()
        m.on_client_end(x, ctx)
        torch.testing.assert_close(m.client_control, g, rtol=1e-4, atol=1e-4)
