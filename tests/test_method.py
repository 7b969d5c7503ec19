"""The FederatedMethod contract: FedAvg aggregation and the flat parameter buffers the loop moves."""

from __future__ import annotations

import torch

from fedcoe_bench.baselines.fedavg import FedAvg
from fedcoe_bench.method import ClientUpdate, FederatedMethod, RoundContext, weighted_mean


def tiny(cls=FedAvg, **kwargs):
    return cls(num_classes=3, in_channels=1, image_size=8, **kwargs)


def agg(method, server, updates):
    """The new server state of ``method.aggregate`` (a round of a 10-client federation)."""
    new, _ = method.aggregate(server, updates, RoundContext(1, 10, len(updates)))
    return new


class HeadPersonal(FedAvg):
    """FedPer-like split: the head stays with the client."""

    personal = ("net.head",)


# ---------------------------------------------------------------- aggregation (FedAvg)
def test_fedavg_aggregate_is_the_sample_weighted_mean():
    ups = [
        ClientUpdate(0, 2.0, torch.tensor([1.0, 2.0, 3.0])),
        ClientUpdate(3, 3.0, torch.tensor([4.0, 5.0, 6.0])),
        ClientUpdate(7, 5.0, torch.tensor([-1.0, 0.0, 10.0])),
    ]
    server = torch.tensor([100.0, 100.0, 100.0])  # must not enter the mean
    # by hand: (2*[1,2,3] + 3*[4,5,6] + 5*[-1,0,10]) / 10 = [9, 19, 74] / 10
    expected = torch.tensor([0.9, 1.9, 7.4])
    for method in (tiny(), FederatedMethod()):
        out = agg(method, server, ups)
        torch.testing.assert_close(out, expected)
        # the order in which the updates arrive does not matter
        torch.testing.assert_close(agg(method, server, ups[::-1]), expected)
    # an unweighted mean would give [4/3, 7/3, 19/3]; make sure weights really matter
    assert not torch.allclose(out, torch.stack([u.shared for u in ups]).mean(0))


def test_fedavg_aggregate_ignores_zero_weight_clients_and_keeps_a_single_update():
    server = torch.zeros(2)
    one = ClientUpdate(1, 4.0, torch.tensor([3.0, -2.0]))
    torch.testing.assert_close(agg(tiny(), server, [one]), one.shared)
    empty_client = ClientUpdate(2, 0.0, torch.tensor([1e6, 1e6]))
    torch.testing.assert_close(agg(tiny(), server, [one, empty_client]), one.shared)


def test_zero_total_weight_returns_the_server_state_unchanged():
    server = torch.tensor([0.5, -1.5, 2.0])
    ups = [ClientUpdate(0, 0.0, torch.tensor([9.0, 9.0, 9.0])), ClientUpdate(1, 0.0, torch.tensor([-9.0, 1.0, 3.0]))]
    out = agg(tiny(), server, ups)
    assert torch.equal(out, server)
    assert torch.equal(server, torch.tensor([0.5, -1.5, 2.0]))  # the input is not modified either
    # weighted_mean itself: weights summing to 0 fall back, positive ones do not
    stacked = torch.tensor([[1.0, 1.0], [3.0, 5.0]])
    assert torch.equal(weighted_mean(stacked, [0.0, 0.0], torch.tensor([7.0, 8.0])), torch.tensor([7.0, 8.0]))
    torch.testing.assert_close(weighted_mean(stacked, [1.0, 1.0], torch.tensor([7.0, 8.0])), torch.tensor([2.0, 3.0]))


# ---------------------------------------------------------------- flat parameter buffers
def test_flatten_parameters_makes_parameters_views_of_the_flat_buffer():
    m = tiny()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    m.flatten_parameters()
    params = dict(m.named_parameters())
    flat = m.flat["shared"]
    assert flat.numel() == sum(p.numel() for p in params.values())
    assert m.flat["personal"].numel() == 0  # FedAvg shares everything
    for name, p in params.items():
        assert torch.equal(p, before[name]), f"{name} changed value when flattened"
        assert torch.equal(flat[m.layout["shared"][name]], p.detach().flatten())

    # writing into the flat buffer changes the parameters ...
    original = flat.clone()
    for name, p in params.items():
        sl = m.layout["shared"][name]
        flat[sl] = torch.arange(sl.stop - sl.start, dtype=flat.dtype)
        assert torch.equal(p.detach().flatten(), torch.arange(p.numel(), dtype=p.dtype)), name
    # ... and an optimizer step on the parameters shows in the flat buffer
    flat.copy_(original)
    assert all(torch.equal(p, before[n]) for n, p in params.items())
    snapshot = flat.clone()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(torch.randn(4, 1, 8, 8)).square().mean().backward()
    opt.step()
    assert not torch.equal(flat, snapshot)
    for name, p in params.items():
        assert torch.equal(flat[m.layout["shared"][name]], p.detach().flatten()), name


def test_personal_parameters_get_their_own_buffer():
    m = tiny(HeadPersonal)
    m.flatten_parameters()
    personal = dict(m.named_group("personal"))
    shared = dict(m.named_group("shared"))
    assert set(personal) == {"net.head.weight", "net.head.bias"}
    assert not set(personal) & set(shared)
    assert set(personal) | set(shared) == {n for n, _ in m.named_parameters()}
    assert m.flat["personal"].numel() == sum(p.numel() for p in personal.values())
    assert m.flat["shared"].numel() == sum(p.numel() for p in shared.values())
    assert m.span("net.head", "personal") == slice(0, m.flat["personal"].numel())
    m.flat["personal"].fill_(3.0)
    assert all(bool((p == 3.0).all()) for p in personal.values())
    assert not any(bool((p == 3.0).all()) for p in shared.values())
