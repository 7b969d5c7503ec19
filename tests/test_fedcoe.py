"""FedCoE: coordinated aggregation, the two levels, and the cold-start path, with the gate's assignment
(every input trains every expert by the gate); assignment by fit is tests/test_fedcoe_assign.py's."""

import inspect
import math

import pytest
import torch

from fedcoe_bench.errors import ConfigError
from fedcoe_bench.fedcoe import FedCoE
from fedcoe_bench.method import ClientContext, ClientUpdate, RoundContext


def tiny(**kw) -> FedCoE:
    torch.manual_seed(0)
    m = FedCoE(num_experts=3, num_classes=4, in_channels=1, image_size=8, **{"assignment": "gate", **kw})
    m.flatten_parameters()
    return m


def ctx(clients: int = 2) -> RoundContext:
    """Round 1 of a 10-client federation, ``clients`` of them sampled."""
    return RoundContext(1, 10, clients)


def client_ctx() -> ClientContext:
    return ClientContext(1, 10, 2, 1)


def updates_for(m: FedCoE, routing):
    torch.manual_seed(1)
    n = m.flat["shared"].numel()
    return [ClientUpdate(i, w, torch.randn(n), {"routing": torch.tensor(r), "gate_entropy": torch.tensor(0.5)})
            for i, (w, r) in enumerate(routing)]


def test_coordinated_aggregation_matches_hand_computation():
    m = tiny(local_level=False)
    server = torch.randn(m.flat["shared"].numel())
    ups = updates_for(m, [(2.0, [0.5, 0.5, 0.0]), (1.0, [0.2, 0.8, 0.0])])
    new, scalars = m.aggregate(server, ups, ctx())
    a, b = ups[0].shared, ups[1].shared
    for k, (wa, wb) in enumerate([(2 * 0.5, 1 * 0.2), (2 * 0.5, 1 * 0.8)]):
        s = m.span(f"experts.{k}.")
        torch.testing.assert_close(new[s], (wa * a[s] + wb * b[s]) / (wa + wb))
    s2 = m.span("experts.2.")
    torch.testing.assert_close(new[s2], server[s2])  # no client routes to expert 2: kept
    g = m.span("gate.")
    torch.testing.assert_close(new[g], (2 * a[g] + b[g]) / 3)  # the shared gate: FedAvg
    assert m.routing[1].tolist() == pytest.approx([0.2, 0.8, 0.0])
    assert scalars["expert_usage_1"] == pytest.approx(1.3)


def test_uncoordinated_is_plain_weighted_average():
    m = tiny(local_level=False, coordinated=False)
    server = torch.randn(m.flat["shared"].numel())
    ups = updates_for(m, [(2.0, [1.0, 0.0, 0.0]), (1.0, [0.0, 1.0, 0.0])])
    torch.testing.assert_close(m.aggregate(server, ups, ctx())[0], (2 * ups[0].shared + ups[1].shared) / 3)


def test_softened_aggregation_uses_eps_plus_routing():
    m = tiny(local_level=False, coordination_eps=0.25)
    server = torch.zeros(m.flat["shared"].numel())
    ups = updates_for(m, [(1.0, [1.0, 0.0, 0.0]), (1.0, [0.0, 1.0, 0.0])])
    s = m.span("experts.1.")
    want = (0.25 * ups[0].shared[s] + 1.25 * ups[1].shared[s]) / 1.5
    torch.testing.assert_close(m.aggregate(server, ups, ctx())[0][s], want)


def test_personal_parameters_never_shared():
    m = tiny()
    shared = m.layout["shared"]
    assert not any(n.startswith(("local.", "fusion.", "local_ready")) for n in shared)
    assert any(n.startswith("local.") for n in m.layout["personal"])
    m2 = tiny(shared_gate=False)
    assert not any(n.startswith("gate.") for n in m2.layout["shared"])
    assert any(n.startswith("gate.") for n in m2.layout["personal"])


def test_outputs_are_distributions_and_local_level_off_is_global():
    x = torch.randn(6, 1, 8, 8)
    m = tiny()
    for p in (m.predict_global(x), m.predict_personal(x), m.predict_cold_start(x, x)):
        assert (p >= 0).all() and torch.allclose(p.sum(1), torch.ones(6))
    off = tiny(local_level=False)
    torch.testing.assert_close(off.predict_personal(x), off.predict_global(x))
    assert not torch.allclose(m.predict_personal(x), m.predict_global(x))


def test_cold_start_reads_no_labels_changes_nothing_and_prior_off_is_global():
    assert list(inspect.signature(FedCoE.predict_cold_start).parameters) == ["self", "x", "unlabeled"]
    m = tiny(cold_start_prior=False)
    x, u = torch.randn(5, 1, 8, 8), torch.randn(9, 1, 8, 8)
    before = {k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}
    torch.testing.assert_close(m.predict_cold_start(x, u), m.predict_global(x))
    on = tiny()
    on.predict_cold_start(x, u)
    for k, v in on.state_dict().items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(v, before[k])


def test_routing_prior_sharpens_with_a_confident_profile():
    m = tiny(local_level=False)
    log_w = torch.log_softmax(torch.zeros(2, 3), 1)  # G uniform
    flat = m._routing_prior(log_w, torch.full((3,), 1 / 3), "adaptive")
    torch.testing.assert_close(flat.exp(), torch.full((2, 3), 1 / 3))  # H(r) = log K -> beta = 0
    sharp = m._routing_prior(log_w, torch.tensor([0.9, 0.05, 0.05]), "adaptive").exp()
    assert sharp[0, 0] > 0.5
    fixed = m._routing_prior(log_w, torch.tensor([0.5, 0.25, 0.25]), 1.0).exp()
    torch.testing.assert_close(fixed[0], torch.tensor([0.5, 0.25, 0.25]))


def test_calibrated_setting_follows_client_scores(tmp_path):
    m = tiny(local_level=False, beta="calibrated")
    assert m.cold_start_setting() == "adaptive"  # nothing reported yet
    scores = torch.zeros(len(FedCoE.beta_grid))
    scores[2] = 0.9  # beta = 1.0 is best
    ups = updates_for(m, [(1.0, [0.3, 0.3, 0.4]), (1.0, [0.3, 0.3, 0.4])])
    for u in ups:
        u.report["calibration"], u.report["calibration_weight"] = scores, torch.tensor(1.0)
    m.aggregate(torch.zeros(m.flat["shared"].numel()), ups, ctx())
    assert m.cold_start_setting() == 1.0
    # the choice is logged: calibration.csv has every setting's mean score, the served one marked
    import csv
    m.save_artifacts(tmp_path)
    rows = list(csv.DictReader((tmp_path / "calibration.csv").read_text().splitlines()))
    assert len(rows) == len(FedCoE.beta_grid)
    assert [r["beta"] for r in rows if r["served"] == "1"] == ["1.0"]
    assert sorted(float(r["mean_self_accuracy"]) for r in rows)[-2:] == [0.0, pytest.approx(0.9)]
    assert {r["weight"] for r in rows} == {"1.0000"}  # one round of scores behind every setting


def report_round(m: FedCoE, per_client_scores: list[torch.Tensor]) -> dict[str, float]:
    """One aggregation in which each update carries the given calibration scores; returns its scalars."""
    ups = updates_for(m, [(1.0, [0.3, 0.3, 0.4])] * len(per_client_scores))
    for u, sc in zip(ups, per_client_scores):
        u.report["calibration"], u.report["calibration_weight"] = sc, torch.tensor(1.0)
    return m.aggregate(torch.zeros(m.flat["shared"].numel()), ups, ctx(len(ups)))[1]


def scores_with(entries: dict) -> torch.Tensor:
    """Self-scores by beta index."""
    out = torch.zeros(len(FedCoE.beta_grid))
    for b, v in entries.items():
        out[b] = v
    return out


def test_calibration_is_a_decayed_average_of_per_round_means():
    """Three rounds, two clients each; by hand: m_t is the round's client mean and
    s = (m_3 + d m_2 + d^2 m_1) / (1 + d + d^2)."""
    rounds = [[0.2, 0.4], [0.5, 0.7], [0.9, 0.9]]  # beta index 1's score per client
    means = [0.3, 0.6, 0.9]
    for d in (0.5, 1.0):
        m = tiny(local_level=False, calibration_decay=d)
        for r in rounds:
            report_round(m, [scores_with({1: v}) for v in r])
        want = (means[2] + d * means[1] + d * d * means[0]) / (1 + d + d * d)
        assert float(m.self_scores()[1]) == pytest.approx(want)
    assert want == pytest.approx(0.6)  # d = 1: the plain average over rounds


def test_recent_rounds_decide_the_served_setting_and_each_round_logs_it():
    """Setting A (beta 0) wins the first three rounds by 0.3, setting B (beta 2) the last two by 0.2: the
    all-rounds average keeps A, a decay of 0.5 follows B; diagnostics show the switch. No label-prior
    correction is ever served (that is the cold_start_lp_acc column, the same for every method)."""
    a, b = 0, 3
    history = [{a: 0.6, b: 0.3}] * 3 + [{a: 0.5, b: 0.7}] * 2
    served = {}
    for d in (1.0, 0.5):
        m = tiny(local_level=False, calibration_decay=d)
        served[d] = []
        for entries in history:
            diag = report_round(m, [scores_with(entries)] * 2)
            served[d].append(int(diag["cold_start_beta_index"]))
            assert "cold_start_label_prior" not in diag
            assert diag["cold_start_self_score"] == pytest.approx(float(m.self_scores()[served[d][-1]]))
        assert m.cold_start_setting() == FedCoE.beta_grid[served[d][-1]]
    assert served[1.0] == [a] * 5  # (3 * 0.3 + 2 * -0.2) / 5 > 0: A stays
    # d = 0.5 (decayed sums; the weights are common): after round 4, A 0.6 * 0.875 + 0.5 = 1.025 vs
    # B 0.3 * 0.875 + 0.7 = 0.9625; after round 5, A 0.6 * 0.4375 + 0.5 * 1.5 = 1.0125 vs B 0.3 * 0.4375 + 0.7 * 1.5 = 1.18125
    assert served[0.5] == [a] * 4 + [b]
    assert "cold_start_beta_index" not in report_round(tiny(local_level=False, beta=1.0), [scores_with({a: 0.6})] * 2)


def test_bad_calibration_decay_is_refused():
    for d in (0.0, 1.5):
        with pytest.raises(ValueError, match="calibration_decay"):
            FedCoE(calibration_decay=d)


def test_top_m_routing_is_sparse():
    m = tiny(top_m=2)
    w = m.gate(torch.randn(7, 1, 8, 8))
    assert ((w > 0).sum(1) <= 2).all() and torch.allclose(w.sum(1), torch.ones(7))


def test_balance_loss_prefers_balanced_routing():
    m = tiny(local_level=False, lambda_bal=1.0)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))
    base = m.training_step((x, y), 0)
    with torch.no_grad():  # push the gate onto one expert: the balance term must grow
        m.gate.net[-1].bias.copy_(torch.tensor([10.0, 0.0, 0.0]))
    collapsed = m.training_step((x, y), 0)
    unbalanced = FedCoE(num_experts=3, num_classes=4, in_channels=1, image_size=8, local_level=False, lambda_bal=0.0,
                        assignment="gate")
    unbalanced.load_state_dict(m.state_dict())
    assert float((collapsed - unbalanced.training_step((x, y), 0)).detach()) == pytest.approx(3.0, abs=1e-3)  # K * f_0 * P_0
    assert math.isfinite(float(base.detach()))


def test_balanced_routing_moves_the_bias_against_the_load():
    """b_k <- b_k - gamma (K u_k - 1), u the n-weighted mean routing profile: the over-used expert's
    bias falls, the others' rise, a balanced load leaves it; the gate routes through it."""
    m = tiny(local_level=False, balance_rate=0.5)
    server = torch.zeros(m.flat["shared"].numel())
    bias = m.span("gate.route_bias")
    ups = updates_for(m, [(3.0, [0.9, 0.1, 0.0]), (1.0, [0.6, 0.2, 0.2])])  # u = [0.825, 0.125, 0.05]
    new, _ = m.aggregate(server, ups, ctx())
    load = torch.tensor([0.825, 0.125, 0.05])
    torch.testing.assert_close(new[bias], -0.5 * (3 * load - 1))
    torch.testing.assert_close(m.aggregate(new, updates_for(m, [(1.0, [1 / 3] * 3)]), ctx(1))[0][bias], new[bias])
    x = torch.randn(5, 1, 8, 8)
    m.flat["shared"].copy_(new)
    logits = m.gate.net(x) + new[bias]
    torch.testing.assert_close(m.gate(x), logits.softmax(1))
    assert tiny(local_level=False).gate.route_bias is None  # off: no state, the old layout


def test_balanced_routing_needs_a_shared_gate_and_a_rate_of_at_least_zero():
    for kw in ({"balance_rate": -0.1}, {"balance_rate": 0.1, "shared_gate": False}):
        with pytest.raises(ConfigError, match="balance_rate"):
            tiny(**kw)


@pytest.mark.parametrize("kw, name", [({"assignment": "sometimes"}, "assignment"), ({"sharpness": 0.0}, "sharpness"),
                                      ({"capacity": 0.5}, "capacity"), ({"assignment_balance": -1.0}, "assignment_balance"),
                                      ({"split": True, "assignment": "gate"}, "split"),
                                      ({"split": True, "assignment": "soft", "shared_gate": False}, "split"),
                                      ({"route_target": "labels"}, "route_target"),
                                      ({"warmup_rounds": 5, "assignment": "gate"}, "warmup_rounds"),
                                      ({"warmup_rounds": 5, "assignment": "soft", "coordinated": False}, "warmup_rounds"),
                                      ({"warmup_rounds": -1, "assignment": "soft"}, "warmup_rounds"),
                                      ({"warmup_rounds": 5, "assignment": "soft", "split": True}, "warmup_rounds")])
def test_bad_assignment_settings_are_refused_by_name(kw, name):
    with pytest.raises(ConfigError, match=f"method.init_args.{name} must"):
        FedCoE(**kw)


def test_bad_beta_is_refused():
    with pytest.raises(ValueError, match="beta"):
        FedCoE(beta="sometimes")


def test_calibration_scores_the_validation_split_not_the_training_data():
    """The self-scores are the validation split's: poisoning the training labels leaves them as they
    are, poisoning the validation labels moves them; a client without validation data reports weight 0."""
    m = tiny(local_level=False)
    torch.manual_seed(3)
    x_tr, y_tr = torch.randn(20, 1, 8, 8), torch.randint(0, 4, (20,))
    x_val = torch.randn(12, 1, 8, 8)
    y_val = m.predict_global(x_val).argmax(1)  # the server model gets every validation label right

    def report(y_train, y_valid, x_valid=x_val):
        m.on_client_start(x_tr, y_train, client_ctx())
        m.on_client_validation(x_valid, y_valid, client_ctx())
        return m.on_client_end(x_tr, client_ctx())

    clean = report(y_tr, y_val)
    assert float(clean["calibration_weight"]) == 1.0 and float(clean["calibration"][0]) == 1.0  # beta 0: G alone
    torch.testing.assert_close(report((y_tr + 1) % 4, y_val)["calibration"], clean["calibration"])
    assert not torch.equal(report(y_tr, (y_val + 1) % 4)["calibration"], clean["calibration"])
    empty = report(y_tr, y_val[:0], x_val[:0])
    assert float(empty["calibration_weight"]) == 0.0
    # only clients that scored count: an aggregation with one empty and one scored client takes the scored one
    ups = updates_for(m, [(1.0, [0.3, 0.3, 0.4]), (1.0, [0.3, 0.3, 0.4])])
    for u, r in zip(ups, (clean, empty)):
        u.report.update(calibration=r["calibration"], calibration_weight=r["calibration_weight"])
    m.aggregate(torch.zeros(m.flat["shared"].numel()), ups, ctx())
    torch.testing.assert_close(m.self_scores(), clean["calibration"])


def test_finetune_names_the_local_level():
    assert tiny().start_finetune() == ("local.", "fusion.")
    assert tiny(local_level=False).start_finetune() == ("gate.",)
