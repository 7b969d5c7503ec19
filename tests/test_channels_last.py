"""Channels-last convolutions: the same training and metrics as the default format, with the flat
parameter buffers still holding the parameters."""

from __future__ import annotations

import pytest
import torch
from helpers import read_summary
from lightning.fabric import Fabric

from fedcoe_bench.baselines import FedAvg, FedProx
from fedcoe_bench.fedcoe import FedCoE
from fedcoe_bench.loop import FederatedLoop

METHODS = {"fedavg": (FedAvg, {}), "fedprox": (FedProx, {"mu": 0.5}), "fedcoe": (FedCoE, {"num_experts": 2})}


def train(fed, fabric, name: str, channels_last: bool):
    torch.manual_seed(0)
    cls, kwargs = METHODS[name]
    method = cls(**kwargs, num_classes=fed.num_classes, in_channels=1, image_size=12, lr=0.05)
    loop = FederatedLoop(rounds=2, clients_per_round=4, batch_size=16, eval_every=2, checkpoint_every=0,
                         progress=False, channels_last=channels_last)
    result = loop.fit(fabric, method, fed, seed=0)
    return method, loop, result.metrics


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedcoe"])
def test_channels_last_gives_the_default_formats_results(small_data, name):
    # float64: the two formats sum convolutions in different orders, and in float32 those roundings grow
    # through a few rounds of training (FedCoE's experts drift by 1e-4); in float64 they stay far below
    # the tolerance, while a layout error would still be of the order of the weights
    fabric = Fabric(accelerator="cpu", devices=1, precision="64-true")
    fed = small_data.setup(seed=0)
    default, _, m_default = train(fed, fabric, name, channels_last=False)
    cl, loop, m_cl = train(fed, fabric, name, channels_last=True)

    convs = [p for p in cl.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert any(not p.is_contiguous() for p in convs), "no weight was actually converted"
    assert all(p.is_contiguous() for p in default.parameters())
    # the parameters are still views of the flat buffers, in memory order
    for kind in ("shared", "personal"):
        for name_, p in cl.named_group(kind):
            assert torch.equal(cl.view_like(cl.flat[kind], name_, kind), p)
            assert p.untyped_storage().data_ptr() == cl.flat[kind].untyped_storage().data_ptr()
    assert fed.prepare(fed.pool_x[:4], memory_format=torch.channels_last).is_contiguous(memory_format=torch.channels_last)

    # same trained model and the same metrics, up to float rounding
    cl_state, default_state = cl.state_dict(), default.state_dict()
    for key, value in default_state.items():
        torch.testing.assert_close(cl_state[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert m_cl.keys() == m_default.keys()
    for key, value in m_default.items():
        assert m_cl[key] == pytest.approx(value, abs=1e-6), key


def test_flatten_parameters_keeps_a_channels_last_weight_a_view_in_memory_order():
    m = FedAvg(in_channels=3, image_size=8).to(memory_format=torch.channels_last)
    weight = m.net.body[3].weight.detach().clone()  # [64, 32, 5, 5]
    m.flatten_parameters()
    p = m.net.body[3].weight
    assert p.is_contiguous(memory_format=torch.channels_last) and torch.equal(p, weight)
    sl = m.layout["shared"]["net.body.3.weight"]
    assert torch.equal(m.flat["shared"][sl], weight.permute(0, 2, 3, 1).flatten())  # O, H, W, I order
    m.flat["shared"][sl] = 0.0  # the buffer writes through to the parameter
    assert not p.any()


def test_evaluating_a_channels_last_run_in_another_format_keeps_the_trained_format(tmp_path, fit_argv, run_cli):
    code, _, err = run_cli(fit_argv("trained", "--loop.channels_last", "true"))
    assert code == 0, err
    code, _, err = run_cli(["eval", str(tmp_path / "trained"), "--name", "other", "--loop.channels_last", "false",
                            "--run_dir", str(tmp_path / "evaluated")])
    assert code == 0, err
    trained, evaluated = read_summary(tmp_path / "trained"), read_summary(tmp_path / "evaluated")
    for key in ("global_acc", "personal_acc", "cold_start_acc", "cold_start_lp_acc"):
        assert evaluated[key] == trained[key], key


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_the_cnn_pools_before_its_relus_with_conv_relu_pools_exact_values_and_gradients(fmt):
    # The CNN applies each ReLU after its max-pooling (cheaper); McMahan et al.'s order is conv, ReLU,
    # pool. The two must agree bit for bit, forward and backward, in both memory formats.
    from torch import nn

    torch.manual_seed(0)
    ours = FedAvg(in_channels=1, image_size=12).net.to(memory_format=fmt)
    body = ours.body
    assert [type(m) for m in body[:3]] == [nn.Conv2d, nn.MaxPool2d, nn.ReLU]
    textbook = torch.nn.Sequential(
        nn.Sequential(body[0], nn.ReLU(), nn.MaxPool2d(2), body[3], nn.ReLU(), nn.MaxPool2d(2), *body[6:]), ours.head)
    x = torch.randn(16, 1, 12, 12).contiguous(memory_format=fmt)
    x[:, :, :6] = -1.0  # whole pooling windows below zero: ties at zero after a ReLU
    y = torch.randint(0, 10, (16,))
    grads = []
    for net in (ours, textbook):
        net.zero_grad()
        out = net(x)
        torch.nn.functional.cross_entropy(out, y).backward()
        grads.append((out.detach(), [p.grad.clone() for p in net.parameters()]))
    (out_a, g_a), (out_b, g_b) = grads
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(a, b) for a, b in zip(g_a, g_b))
