"""IFCA and FedEM compute what METHODS.md states: IFCA recovers rotation clusters and averages each model
over the clients that chose it; FedEM's EM update keeps pi a distribution and never lowers the
likelihood, its components are averaged by n, its personal prediction is the pi-mixture; both run by
short name (crash and resume: test_reliability.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import read_summary
from lightning.fabric import Fabric

from fedcoe_bench.baselines import IFCA, FedEM
from fedcoe_bench.data import DataSource, FederatedData, Images
from fedcoe_bench.errors import ConfigError
from fedcoe_bench.loop import FederatedLoop
from fedcoe_bench.method import ClientContext, ClientUpdate, RoundContext

DIMS = {"num_classes": 4, "in_channels": 1, "image_size": 8}


class Quadrants(DataSource):
    """Class k lights quadrant k of an 8x8 noise image. A rotation maps quadrants onto quadrants, so
    every cluster labels the same images differently: one model cannot serve two clusters."""

    num_classes, in_channels, image_size = 4, 1, 8

    def __init__(self, samples: int = 2400, test_samples: int = 200, seed: int = 0):
        self.samples, self.test_samples, self.seed = samples, test_samples, seed

    def load(self) -> Images:
        g = torch.Generator().manual_seed(self.seed)
        n = self.samples + self.test_samples
        y = torch.randint(0, 4, (n,), generator=g)
        x = torch.rand((n, 1, 8, 8), generator=g) * 80
        quadrant = torch.zeros(4, 1, 8, 8)
        for k in range(4):
            quadrant[k, 0, (k // 2) * 4 : (k // 2) * 4 + 4, (k % 2) * 4 : (k % 2) * 4 + 4] = 150
        x = (x + quadrant[y]).clamp(0, 255).to(torch.uint8)
        return Images(x[: self.samples], y[: self.samples], x[self.samples :], y[self.samples :])


def ctx(steps=1, finetune=False) -> ClientContext:
    return ClientContext(1, 3, 3, steps, finetune)


def batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


# ---------------------------------------------------------------------------------------- IFCA
def test_ifca_recovers_rotation_clusters(tmp_path):
    data = FederatedData(source=Quadrants(), alpha=100.0, num_clients=12, cold_start_fraction=0.0, min_size=10,
                         shift="rotate", clusters=2, cache_dir=str(tmp_path / "partitions"))
    fed = data.setup(seed=0)
    torch.manual_seed(0)
    method = IFCA(num_experts=2, lr=0.05, **DIMS)
    loop = FederatedLoop(rounds=8, clients_per_round=6, local_epochs=2, eval_every=8, checkpoint_every=0,
                         progress=False, cold_start_steps=0)
    result = loop.fit(Fabric(accelerator="cpu", devices=1), method, fed, 0)
    assert result.history[-1]["expert_cluster_nmi"] >= 0.9, [r["expert_cluster_nmi"] for r in result.history]
    assert result.history[0]["expert_usage_0"] + result.history[0]["expert_usage_1"] == pytest.approx(1.0)
    assert result.metrics["personal_acc"] >= 0.9  # each cluster's own model: labels that conflict across clusters


def test_ifca_picks_the_model_of_lowest_loss_and_trains_only_it():
    m = IFCA(num_experts=3, **DIMS)
    m.flatten_parameters()
    x, y = batch()
    with torch.no_grad():
        m.experts[1].head.bias.copy_(torch.tensor([9.0, 0, 0, 0]))
        m.experts[2].head.bias.copy_(torch.tensor([0, 0, 0, 9.0]))
    m.on_client_start(x, torch.full_like(y, 3), ctx())
    assert float(m.cluster) == 2 and m.start_finetune() == ("experts.2.",)
    m.training_step((x, y), 0).backward()
    trained = {n.split(".")[1] for n, p in m.named_parameters() if p.grad is not None}
    assert trained == {"2"}
    torch.testing.assert_close(m.on_client_end(x, ctx())["cluster"], torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(m.predict_personal(x), m.experts[2](x).softmax(-1))


def test_ifca_averages_each_model_over_the_clients_that_chose_it():
    m = IFCA(num_experts=3, **DIMS)
    m.flatten_parameters()
    server = torch.full_like(m.flat["shared"], 5.0)
    spans = [m.span(f"experts.{k}.") for k in range(3)]
    choices, n, value = [0, 0, 1], [1.0, 3.0, 2.0], [0.0, 4.0, 8.0]
    ups = [ClientUpdate(i, n[i], torch.full_like(server, value[i]), {"cluster": F.one_hot(torch.tensor(c), 3).float()})
           for i, c in enumerate(choices)]
    new, scalars = m.aggregate(server, ups, RoundContext(1, 3, 3))
    assert torch.allclose(new[spans[0]], torch.tensor(3.0))  # (1*0 + 3*4) / 4: clients 0 and 1 only
    assert torch.allclose(new[spans[1]], torch.tensor(8.0))  # client 2 alone
    assert torch.equal(new[spans[2]], server[spans[2]])  # nobody chose it: unchanged
    assert scalars == pytest.approx({"expert_usage_0": 2 / 3, "expert_usage_1": 1 / 3, "expert_usage_2": 0.0})
    assert {c: int(p.argmax()) for c, p in m.routing_profiles().items()} == {0: 0, 1: 0, 2: 1}


def test_ifca_global_and_cold_start_take_the_model_of_lowest_entropy():
    m = IFCA(num_experts=2, **DIMS)
    x, _ = batch()
    with torch.no_grad():
        m.experts[1].head.bias.copy_(torch.tensor([20.0, 0, 0, 0]))  # confident everywhere
    torch.testing.assert_close(m.predict_global(x), m.experts[1](x).softmax(-1))
    torch.testing.assert_close(m.predict_cold_start(x, x), m.experts[1](x).softmax(-1))
    torch.testing.assert_close(m.predict_personal(x), m.predict_global(x))  # no choice yet (cluster -1)


# ---------------------------------------------------------------------------------------- FedEM
def log_likelihood(m: FedEM, x, y) -> float:
    """:math:`\\sum_s \\log \\sum_k \\pi_k p_k(y_s|x_s)` with the client's pi."""
    with torch.no_grad():
        return float(m(x).gather(1, y[:, None]).sum())


def test_fedem_em_update_keeps_pi_a_distribution_and_never_lowers_the_likelihood():
    torch.manual_seed(0)
    m = FedEM(num_experts=3, **DIMS)
    m.flatten_parameters()
    x, y = batch(64)
    with torch.no_grad():  # components that fit the data differently, so that pi has somewhere to go
        m.experts[0].head.bias.copy_(torch.tensor([3.0, 0, 0, 0]))
        m.experts[2].head.bias.copy_(torch.tensor([0, 0, 3.0, 0]))
    y = torch.where(torch.arange(64) % 4 == 0, 2, 0)
    likelihoods = [log_likelihood(m, x, y)]
    for _ in range(4):
        m.on_client_start(x, y, ctx())
        assert bool((m.pi >= 0).all()) and float(m.pi.sum()) == pytest.approx(1.0, abs=1e-6)
        likelihoods.append(log_likelihood(m, x, y))
    assert all(b >= a - 1e-4 for a, b in zip(likelihoods, likelihoods[1:])), likelihoods
    assert likelihoods[-1] > likelihoods[0] + 1.0
    assert int(m.pi.argmax()) == 0 and float(m.pi[1]) < 0.1  # the component that fits least loses weight


def test_fedem_m_step_weights_each_sample_by_its_e_step_posterior():
    """The M-step's weights are the E-step's posteriors, from the pi the round started with (q_t from
    pi_{t-1}), not from the pi the E-step has just computed from the same data."""
    torch.manual_seed(0)
    m = FedEM(num_experts=2, **DIMS)
    m.flatten_parameters()
    x, y = batch()
    with torch.no_grad():
        for p in m.experts[1].parameters():
            p.mul_(4.0)  # confident and mostly wrong: the components' losses differ, so the E-step moves pi
        m.pi.copy_(torch.tensor([0.2, 0.8]))
        m.on_client_start(x, y, ClientContext(1, 6, 3, steps=1))
    ce = torch.stack([F.cross_entropy(e(x), y, reduction="none") for e in m.experts])
    loss = {}
    for when, pi in (("before", torch.tensor([0.2, 0.8])), ("after", m.pi.clone())):
        q = (pi.log()[:, None] - ce).softmax(0)
        loss[when] = (q * ce).sum(0).mean()
    assert abs(loss["before"] - loss["after"]) > 1e-2  # the two readings differ
    torch.testing.assert_close(m.training_step((x, y), 0), loss["before"])


def test_fedem_averages_each_component_by_client_size_and_tracks_the_clients_pi():
    m = FedEM(num_experts=2, **DIMS)
    m.flatten_parameters()
    server = torch.zeros_like(m.flat["shared"])
    pis = [torch.tensor([0.9, 0.1]), torch.tensor([0.3, 0.7])]
    ups = [ClientUpdate(i, n, torch.full_like(server, v), {"pi": p, "previous_pi": torch.tensor([0.5, 0.5]),
                                                           "previous_weight": torch.tensor(0.0)})
           for i, (n, v, p) in enumerate(zip([1.0, 3.0], [0.0, 4.0], pis))]
    new, scalars = m.aggregate(server, ups, RoundContext(1, 2, 2))
    for k in range(2):  # both components, whatever the pi: n-weighted, (1*0 + 3*4) / 4
        assert torch.allclose(new[m.span(f"experts.{k}.")], torch.tensor(3.0))
    torch.testing.assert_close(m.served_pi(), torch.tensor([0.45, 0.55]))  # (0.9 + 3*0.3) / 4
    assert scalars["expert_usage_0"] == pytest.approx(0.6)
    # client 1 again, with a new pi: its old contribution is replaced, not added to
    again = [ClientUpdate(1, 3.0, server, {"pi": torch.tensor([0.5, 0.5]), "previous_pi": pis[1],
                                           "previous_weight": torch.tensor(3.0)})]
    m.aggregate(server, again, RoundContext(2, 2, 1))
    torch.testing.assert_close(m.served_pi(), torch.tensor([0.6, 0.4]))  # (0.9 + 3*0.5) / 4


def test_fedem_personal_prediction_is_the_pi_mixture_of_the_components():
    torch.manual_seed(0)
    m = FedEM(num_experts=3, **DIMS)
    m.flatten_parameters()
    x, _ = batch()
    pi = torch.tensor([0.6, 0.1, 0.3])
    with torch.no_grad():
        m.pi.copy_(pi)
    by_hand = sum(pi[k] * m.experts[k](x).softmax(-1) for k in range(3))
    torch.testing.assert_close(m.predict_personal(x), by_hand)
    uniform = sum(m.experts[k](x).softmax(-1) for k in range(3)) / 3  # nothing reported yet
    torch.testing.assert_close(m.predict_global(x), uniform)


def test_fedem_new_client_learns_only_pi_by_em_on_its_shots():
    torch.manual_seed(0)
    m = FedEM(num_experts=2, **DIMS)
    m.flatten_parameters()
    x, y = batch()
    with torch.no_grad():
        m.experts[1].head.bias.copy_(torch.tensor([5.0, 0, 0, 0]))
    shared = m.flat["shared"].clone()
    m.on_client_start(x, torch.zeros_like(y), ctx(steps=10, finetune=True))
    once = FedEM(num_experts=2, **DIMS)
    once.load_state_dict(m.state_dict() | {"pi": torch.full((2,), 0.5)})
    once.on_client_start(x, torch.zeros_like(y), ctx())
    assert float(m.pi[1]) > float(once.pi[1]) > 0.5  # several EM updates went further than one
    assert m.start_finetune() == () and torch.equal(m.flat["shared"], shared)


@pytest.mark.parametrize("cls", [IFCA, FedEM])
def test_bad_num_experts_is_one_line_naming_the_setting(cls):
    with pytest.raises(ConfigError, match=r"^method\.init_args\.num_experts must be >= 1 \(got 0\)$"):
        cls(num_experts=0, **DIMS)


# ---------------------------------------------------------------------------------------- by short name
@pytest.mark.parametrize("method", ["ifca", "fedem"])
def test_runs_by_short_name(tmp_path, fit_argv, run_cli, method):
    """(Crash and resume: tests/test_reliability.py, every method.)"""
    code, _, err = run_cli(fit_argv("whole", "--method", method, "--method.init_args.num_experts", "2"))
    assert code == 0, err
    whole = read_summary(tmp_path / "whole")
    assert whole["method"] == method and whole["global_model"] == "convention"
