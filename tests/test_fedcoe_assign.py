"""FedCoE's specialization parts (issue 28): one lr is one step size, assignment by fit, balance across clients."""

from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn.functional as F

from fedcoe_bench.fedcoe import FedCoE, kmeans
from fedcoe_bench.method import ClientContext, ClientUpdate, RoundContext
from fedcoe_bench.models import mixture

DIMS = {"num_classes": 5, "in_channels": 1, "image_size": 8}


def tiny(**kwargs) -> FedCoE:
    torch.manual_seed(0)
    m = FedCoE(num_experts=4, **DIMS, **kwargs)
    m.flatten_parameters()
    return m


def set_gate(m: FedCoE, bias: list[float]) -> None:
    last = m.gate.net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor(bias))


def expert_multipliers(m: FedCoE, x, y) -> torch.Tensor:
    """m_k with d loss / d logits_k = m_k * (softmax - onehot) / B, every expert made identical, so that
    each expert's logit gradient is a multiple of a single model's cross-entropy gradient."""
    for expert in m.experts[1:]:
        expert.load_state_dict(m.experts[0].state_dict())
    outs = []

    def keep(module, args, out):
        out.retain_grad()
        outs.append(out)

    m.on_client_start(x, y, ClientContext(1, 10, 1, 1))  # (the assignment's own passes are not recorded)
    hooks = [e.register_forward_hook(keep) for e in m.experts]
    m.training_step((x, y), 0).backward()
    for h in hooks:
        h.remove()
    base = (outs[0].detach().softmax(-1) - F.one_hot(y, DIMS["num_classes"])) / len(y)
    return torch.stack([(o.grad * base).sum() / (base * base).sum() for o in outs[:4]])


@pytest.mark.parametrize("gate", [[0.0, 0.0, 0.0, 0.0], [30.0, 0.0, 0.0, 0.0]], ids=["uniform", "collapsed"])
@pytest.mark.parametrize("assignment", ["gate", "hard", "soft", "relative"])
def test_the_experts_gradient_multipliers_sum_to_at_most_one(gate, assignment):
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 5
    m = tiny(assignment=assignment, lambda_bal=0.0)
    set_gate(m, gate)
    total = float(expert_multipliers(m, x, y).sum())
    assert 0.2 < total <= 1.05, total
    if assignment == "gate":  # what the normalization removes: the loss's weights multiplied the step
        raw = tiny(assignment=assignment, lambda_bal=0.0, normalize_loss=False)
        set_gate(raw, gate)
        assert float(expert_multipliers(raw, x, y).sum()) > 4.0


def test_in_the_warm_up_expert_0_takes_the_step_of_one_model_and_no_other_expert_any():
    """As a single model's: at most one (under one when the fusion gate gives the local expert a share)."""
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 5
    m = tiny(assignment="relative", lambda_bal=0.0, warmup_rounds=1)  # expert_multipliers trains in round 1
    step = expert_multipliers(m, x, y)
    assert 0.5 < float(step[0]) <= 1.05 and not step[1:].any()
    off = tiny(assignment="relative", lambda_bal=0.0, local_level=False, warmup_rounds=1)
    torch.testing.assert_close(expert_multipliers(off, x, y), torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_hard_assignment_picks_the_expert_of_lowest_loss_and_the_bias_moves_the_choice():
    m = tiny(assignment="hard")
    x, y = torch.randn(32, 1, 8, 8), torch.arange(32) % 5
    losses = torch.stack([F.cross_entropy(e(x), y) for e in m.experts])
    a = m.assign(x, y)
    assert a.sum() == 1 and int(a.argmax()) == int(losses.argmin())
    with torch.no_grad():
        m.assign_bias[losses.argmin()] = 10.0  # an expert that took too many clients is dearer to choose
    assert int(m.assign(x, y).argmax()) != int(losses.argmin())
    soft = tiny(assignment="soft").assign(x, y)
    torch.testing.assert_close(soft, (-losses).softmax(0))


def set_expert_loss(m: FedCoE, k: int, label: int, loss: float) -> None:
    """Expert k predicts the same distribution for every input, of cross-entropy ``loss`` on ``label``."""
    p = torch.full((DIMS["num_classes"],), (1 - math.exp(-loss)) / (DIMS["num_classes"] - 1))
    p[label] = math.exp(-loss)
    with torch.no_grad():
        m.experts[k].head.weight.zero_()
        m.experts[k].head.bias.copy_(p.log())


def test_relative_assignment_compares_loss_ratios_so_it_does_not_flatten_as_every_expert_improves():
    x, y = torch.randn(8, 1, 8, 8), torch.full((8,), 2)
    losses = torch.tensor([0.2, 0.3, 0.6, 0.9])

    def assignment(kind, scale):
        m = tiny(assignment=kind, sharpness=3.0)
        for k, loss in enumerate(losses * scale):
            set_expert_loss(m, k, 2, float(loss))
        return m.assign(x, y)

    early, late = assignment("relative", 1.0), assignment("relative", 0.1)  # every loss ten times smaller
    torch.testing.assert_close(early, late)
    torch.testing.assert_close(early, losses ** -3.0 / (losses ** -3.0).sum())
    assert int(early.argmax()) == int(assignment("hard", 1.0).argmax()) == 0
    soft_early, soft_late = assignment("soft", 1.0), assignment("soft", 0.1)
    assert soft_late.max() < soft_early.max() < early.max()  # a fixed temperature flattens the assignment


def test_assignment_aggregation_weights_experts_by_assignment_and_balances_across_clients():
    m = tiny(assignment="hard", assignment_balance=0.5)
    server = m.flat["shared"].clone()
    k0, k1, bias = m.span("experts.0."), m.span("experts.1."), m.span("assign_bias")

    def update(cid, n, expert, value):
        shared = server.clone()
        shared[m.span(f"experts.{expert}.")] = value
        report = {"routing": torch.full((4,), 0.25), "gate_entropy": torch.tensor(1.0),
                  "fusion_h": torch.tensor(0.5), "assignment": F.one_hot(torch.tensor(expert), 4).float(),
                  "calibration": torch.zeros(len(m.beta_grid)), "calibration_weight": torch.tensor(0.0)}
        return ClientUpdate(cid, float(n), shared, report)

    new, scalars = m.aggregate(server, [update(0, 1, 0, 1.0), update(1, 3, 0, 5.0), update(2, 2, 1, 7.0)],
                               RoundContext(1, 10, 3))
    torch.testing.assert_close(new[k0], torch.full_like(new[k0], (1 * 1.0 + 3 * 5.0) / 4))  # only its own clients
    torch.testing.assert_close(new[k1], torch.full_like(new[k1], 7.0))
    torch.testing.assert_close(new[m.span("experts.2.")], server[m.span("experts.2.")])  # nobody chose it
    load = torch.tensor([4 / 6, 2 / 6, 0.0, 0.0])  # expert 0 is over twice its share, the others under
    torch.testing.assert_close(new[bias], (server[bias] + 0.5 * (4 * load - m.capacity)).clamp_min(0))
    assert new[bias][0] > 0 and (new[bias][1:] == 0).all()
    assert scalars["gate_assignment_agreement"] == pytest.approx(2 / 3)  # a uniform gate's argmax is expert 0


def test_the_route_term_teaches_the_gate_the_assignment():
    m = tiny(assignment="hard")
    x, y = torch.randn(32, 1, 8, 8), torch.arange(32) % 5
    m.on_client_start(x, y, ClientContext(1, 10, 1, 20))
    target = int(m._assignment.argmax())
    share = lambda: float(m.gate(x)[:, target].mean().detach())  # noqa: E731
    before = share()
    opt = torch.optim.SGD(m.gate.parameters(), lr=0.5)
    for step in range(20):
        opt.zero_grad()
        m.training_step((x, y), step).backward()
        opt.step()
    assert share() > max(before, 0.5)


def make_expert_fit(m: FedCoE, k: int, y: torch.Tensor) -> None:
    """Expert k predicts the labels ``y`` of every input (a constant class); the others stay random."""
    last = m.experts[k].head
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(F.one_hot(y[0], DIMS["num_classes"]).float() * 30.0)


@pytest.mark.parametrize("assignment", ["gate", "hard"])
@pytest.mark.parametrize("routed", [1, 2])
def test_a_new_clients_gate_agreement_is_whether_its_inputs_route_it_where_its_labels_assign_it(assignment, routed):
    m = tiny(assignment=assignment)
    x, y = torch.randn(16, 1, 8, 8), torch.full((16,), 3)
    make_expert_fit(m, 2, y)  # the labels assign this client to expert 2
    bias = [0.0] * 4
    bias[routed] = 30.0
    set_gate(m, bias)  # its inputs route it to `routed`
    agree = m.cold_start_diagnostics(torch.randn(8, 1, 8, 8), x, y)["gate_assignment_agreement"]
    assert agree == float(routed == 2)


def test_the_evaluator_averages_a_methods_cold_start_diagnostics_over_new_clients_and_no_other_method_gets_the_column(fed):
    from fedcoe_bench.baselines.fedavg import FedAvg
    from fedcoe_bench.evaluation import Evaluator, Snapshot

    calls = []

    class Probe(FedAvg):
        def cold_start_diagnostics(self, unlabeled, x, y):
            calls.append((len(unlabeled), len(x), len(y)))
            return {"probe": float(len(calls) % 2)}  # 1, 0, 1, ...

    for cls in (Probe, FedAvg):
        torch.manual_seed(0)
        m = cls(num_classes=fed.num_classes, in_channels=1, image_size=12)
        m.flatten_parameters()
        metrics = Evaluator(fed, batch_size=64)(m, Snapshot(m.flat["shared"].clone(), m.flat["personal"].clone()))
        if cls is Probe:
            n = len(fed.new_clients)
            assert [c[0] for c in calls] == [len(c.train) for c in fed.new_clients]  # unlabeled: the local train split
            assert all(c[1] == c[2] for c in calls)
            assert metrics["cold_start_probe"] == pytest.approx(sum(i % 2 for i in range(1, n + 1)) / n)
        else:
            assert not [k for k in metrics if k.startswith("cold_start_probe")]


@pytest.mark.parametrize("assignment", ["gate", "hard"])
def test_the_normalization_leaves_the_local_level_a_single_models_whole_step(assignment):
    """Only the personal mixture's cross-entropy trains the local expert and the fusion gate: their
    gradient is that term's, undivided, while the experts' is divided (the test above)."""
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 5
    m = tiny(assignment=assignment, lambda_bal=0.0)
    m.on_client_start(x, y, ClientContext(1, 10, 1, 1))
    local = [p for n, p in m.named_parameters() if n.startswith(("local.", "fusion."))]
    got = torch.autograd.grad(m.training_step((x, y), 0), local)
    log_w = m.gate.log_weights(x) if assignment == "gate" else m._assignment.clamp_min(0).log().expand(len(x), -1)
    alone = F.nll_loss(m.log_personal(x, mixture(log_w, m.experts(x))), y)
    for g, want in zip(got, torch.autograd.grad(alone, local)):
        torch.testing.assert_close(g, want)



def test_the_assignment_bias_grows_only_over_capacity_and_falls_back_to_zero():
    """Collapse (every client on one expert) makes that expert dearer round after round; three clusters
    on four experts (a third each, under twice the share) leave every bias at 0, so no cluster is split
    to fill the fourth expert; once the load is back under capacity the bias decays to 0."""
    m = tiny(assignment="hard", assignment_balance=0.1)
    bias = m.span("assign_bias")

    def round_with(experts, server):
        report = lambda k: {"routing": torch.full((4,), 0.25), "gate_entropy": torch.tensor(1.0),  # noqa: E731
                            "fusion_h": torch.tensor(0.5), "assignment": F.one_hot(torch.tensor(k), 4).float(),
                            "calibration": torch.zeros(len(m.beta_grid)), "calibration_weight": torch.tensor(0.0)}
        updates = [ClientUpdate(i, 1.0, server.clone(), report(k)) for i, k in enumerate(experts)]
        return m.aggregate(server, updates, RoundContext(1, 10, len(experts)))[0]

    server = m.flat["shared"].clone()
    for _ in range(3):
        server = round_with([0] * 9, server)
    assert float(server[bias][0]) == pytest.approx(3 * 0.1 * (4 - 2)) and (server[bias][1:] == 0).all()
    for _ in range(20):
        server = round_with([0, 0, 0, 1, 1, 1, 2, 2, 2], server)
    assert (server[bias] == 0).all()


def test_an_assigned_client_predicts_with_the_experts_it_was_assigned_a_new_one_with_the_gate():
    m = tiny(assignment="hard")
    x, y = torch.randn(16, 1, 8, 8), torch.full((16,), 3)
    m.eval()
    by_gate = m.predict_personal(x)  # never assigned: the gate routes
    torch.testing.assert_close(by_gate, m.log_personal(x, m.log_global(x)).exp())
    make_expert_fit(m, 2, y)
    m.on_client_start(x, y, ClientContext(1, 10, 1, 1))
    assert int(m.client_assignment.argmax()) == 2 and "client_assignment" in m.personal
    only_2 = m.log_personal(x, m.experts[2](x).log_softmax(-1)).exp()
    torch.testing.assert_close(m.predict_personal(x), only_2)
    assert not torch.allclose(m.predict_global(x), m.experts[2](x).softmax(-1))  # the server routes by the gate
    m.flat["personal"].zero_()  # what a new client is served: no assignment, the gate again
    torch.testing.assert_close(m.predict_personal(x), m.log_personal(x, m.log_global(x)).exp())


def test_class_balanced_route_term_weighs_each_class_a_client_holds_alike():
    """The gate learns only from the route term under an assignment by fit; balanced, a class of 2
    inputs teaches it as much as a class of 30 (the mean over classes of each class's mean fit)."""
    x, y = torch.randn(32, 1, 8, 8), torch.cat([torch.zeros(30, dtype=torch.long), torch.ones(2, dtype=torch.long)])

    def gate_grad(balanced: bool) -> tuple[torch.Tensor, FedCoE]:
        m = tiny(assignment="hard", route_class_balanced=balanced)
        m.on_client_start(x, y, ClientContext(1, 10, 1, 32))
        m.training_step((x, y), 0).backward()
        return torch.cat([p.grad.flatten() for p in m.gate.parameters()]), m

    balanced, m = gate_grad(True)
    m.zero_grad()
    fit = (m.gate.log_weights(x) * m._assignment).sum(1)
    (-m.lambda_route * (fit[y == 0].mean() + fit[y == 1].mean()) / 2).backward()
    torch.testing.assert_close(balanced, torch.cat([p.grad.flatten() for p in m.gate.parameters()]))
    plain, m = gate_grad(False)
    assert not torch.allclose(plain, balanced)


def split_round(m: FedCoE, server: torch.Tensor, moves: list[tuple[int, float, torch.Tensor]], round: int = 20):
    """Aggregation ``round`` (of 10 training clients) of clients ``(expert, n, direction)``: each is
    assigned to its expert alone and moves that expert from the server state by ``direction``."""
    updates = []
    for cid, (k, n, direction) in enumerate(moves):
        shared = server.clone()
        shared[m.span(f"experts.{k}.")] += direction
        assignment = 0.1 * torch.full((4,), 0.25) + 0.9 * F.one_hot(torch.tensor(k), 4).to(server.dtype)
        report = {"routing": torch.full((4,), 0.25), "gate_entropy": torch.tensor(1.0),
                  "fusion_h": torch.tensor(0.5), "assignment": assignment,
                  "calibration": torch.zeros(len(m.beta_grid)), "calibration_weight": torch.tensor(0.0)}
        updates.append(ClientUpdate(cid, n, shared, report))
    return m.aggregate(server, updates, RoundContext(round, 10, len(updates)))


def test_an_overloaded_expert_is_split_into_the_idle_one_by_its_clients_update_directions():
    """Two clusters on expert 0 (clients 0-3 move it one way, 4-5 another), expert 3 nobody's: 0 keeps
    the larger side's average, 3 takes the other's, the gate gives 0 and 3 alike and together what it
    gave 0 against every other expert, and R moves the smaller side's clients to 3."""
    m = tiny(assignment="relative", split=True)
    server = m.flat["shared"].clone()
    span = m.span("experts.0.")
    size = span.stop - span.start
    a, b = torch.zeros(size), torch.zeros(size)
    a[: size // 2], b[size // 2:] = 1.0, 1.0
    noise = [0.01 * torch.randn(size) for _ in range(6)]
    moves = [(0, 1.0, a + e) for e in noise[:4]] + [(0, 1.0, b + e) for e in noise[4:]] + [(1, 1.0, a), (2, 1.0, b)]
    x = torch.randn(7, 1, 8, 8)
    before = m.gate(x)
    new, scalars = split_round(m, server, moves)
    assert scalars["expert_split"] == 1.0
    torch.testing.assert_close(new[span], server[span] + a + sum(noise[:4]) / 4)
    torch.testing.assert_close(new[m.span("experts.3.")], server[span] + b + sum(noise[4:]) / 2)
    m.flat["shared"].copy_(new)
    after = m.gate(x)
    torch.testing.assert_close(after[:, 0], after[:, 3])
    torch.testing.assert_close((after[:, 0] + after[:, 3])[:, None] / after[:, 1:3], before[:, :1] / before[:, 1:3])
    top = {c: int(r.argmax()) for c, r in m.routing_profiles().items()}
    assert top == {0: 0, 1: 0, 2: 0, 3: 0, 4: 3, 5: 3, 6: 1, 7: 2}
    torch.testing.assert_close(torch.stack(list(m.routing_profiles().values())).sum(1), torch.ones(8))
    # R's rows from before the split are stale until every client could have been sampled (10 / 8 rounds)
    assert split_round(m, new, moves, round=21)[1]["expert_split"] == 0.0
    assert split_round(m, new, moves, round=22)[1]["expert_split"] == 1.0


def test_a_split_runs_in_half_precision():
    m = tiny(assignment="relative", split=True).to(torch.bfloat16)
    m.flatten_parameters()
    server = m.flat["shared"].clone()
    size = m.span("experts.0.").stop - m.span("experts.0.").start
    moves = [(0, 1.0, torch.randn(size, dtype=torch.bfloat16)) for _ in range(6)] + [(1, 1.0, torch.zeros(size, dtype=torch.bfloat16))]
    new, scalars = split_round(m, server, moves)
    assert scalars["expert_split"] == 1.0 and new.dtype == torch.bfloat16


def test_no_split_while_every_expert_is_under_capacity_or_none_is_under_its_inverse():
    """Three clusters on four experts (a third each) are not split to fill the fourth; an expert over
    capacity (9 of 16 clients: 2.25 times its share) is not split while every other expert holds at
    least 1 / capacity of its share (2 of 16 clients: one half)."""
    m = tiny(assignment="relative", split=True)
    server = m.flat["shared"].clone()
    size = m.span("experts.0.").stop - m.span("experts.0.").start
    step = lambda: torch.randn(size)  # noqa: E731
    new, scalars = split_round(m, server, [(k, 1.0, step()) for k in (0, 0, 0, 1, 1, 1, 2, 2, 2)])
    assert scalars["expert_split"] == 0.0
    m = tiny(assignment="relative", split=True)
    new, scalars = split_round(m, server, [(k, 1.0, step()) for k in [0] * 9 + [1, 1, 2, 2, 3, 3, 3]])
    assert scalars["expert_split"] == 0.0
    m = tiny(assignment="relative", split=True)  # one client fewer on expert 1: under half its share
    new, scalars = split_round(m, server, [(k, 1.0, step()) for k in [0] * 10 + [1, 2, 2, 3, 3, 3]])
    assert scalars["expert_split"] == 1.0


@pytest.mark.parametrize("route_target", ["assignment", "posterior"])
def test_the_posterior_route_target_sends_each_input_to_the_expert_that_explains_its_label(route_target):
    """Experts 1 and 2 each predict one label; a client assigned alike to every expert holds both. The
    posterior target teaches the gate to route each input to its label's expert; the assignment's one
    target per client cannot tell the inputs apart."""
    m = tiny(assignment="relative", route_target=route_target)
    y = torch.arange(32) % 2
    x = torch.randn(32, 1, 8, 8) * 0.1 + (2.0 * y - 1)[:, None, None, None]  # the label shows in the input
    make_expert_fit(m, 1, torch.zeros(1, dtype=torch.long))
    make_expert_fit(m, 2, torch.ones(1, dtype=torch.long))
    m.on_client_start(x, y, ClientContext(1, 10, 1, 20))
    m._assignment = torch.full((4,), 0.25)
    opt = torch.optim.SGD(m.gate.parameters(), lr=0.5)
    for step in range(30):
        opt.zero_grad()
        m.training_step((x, y), step).backward()
        opt.step()
    g = m.gate(x).detach()
    routed = (g[y == 0, 1].mean() > 0.5) and (g[y == 1, 2].mean() > 0.5)
    assert routed == (route_target == "posterior")


def warm_round(m: FedCoE, server: torch.Tensor, moves: list[tuple[float, torch.Tensor]], round: int):
    """Aggregation ``round`` of clients ``(n, direction)`` in the warm-up: each trained expert 0 alone
    (its assignment one-hot on 0) and moved it from the server state by ``direction``."""
    updates = []
    for cid, (n, direction) in enumerate(moves):
        shared = server.clone()
        shared[m.span("experts.0.")] += direction
        report = {"routing": torch.full((4,), 0.25), "gate_entropy": torch.tensor(1.0),
                  "fusion_h": torch.tensor(0.5), "assignment": F.one_hot(torch.tensor(0), 4).to(server.dtype),
                  "calibration": torch.zeros(len(m.beta_grid)), "calibration_weight": torch.tensor(0.0)}
        updates.append(ClientUpdate(cid, n, shared, report))
    return m.aggregate(server, updates, RoundContext(round, 10, len(updates)))


def test_the_warm_up_trains_one_model_then_cuts_it_by_the_clients_update_directions():
    """Before its last round the experts are one model, every client's expert 0 averaged; at it each
    expert's body averages the clients of one cluster of body update directions (four pairs of clients
    move four parts of the body, while large moves of the head pair them otherwise) and its head every
    client's, and R records the clusters."""
    m = tiny(assignment="relative", warmup_rounds=2)
    server = m.flat["shared"].clone()
    spans = [m.span(f"experts.{k}.") for k in range(4)]
    assert all(torch.equal(server[s], server[spans[0]]) for s in spans)
    size, body = spans[0].stop - spans[0].start, m.span("experts.0.body.")
    quarter = (body.stop - body.start) // 4
    moves = []
    for cid in range(8):
        d = torch.zeros(size)
        d[cid // 2 * quarter: (cid // 2 + 1) * quarter] = 1.0
        d[body.stop - body.start:] = 100.0 * (-1) ** cid  # the head: odd clients one way, even the other
        moves.append((1.0 + cid, d))
    new, _ = warm_round(m, server, moves, round=1)
    one = server[spans[0]] + sum(n * d for n, d in moves) / sum(n for n, _ in moves)
    for s in spans:
        torch.testing.assert_close(new[s], one)
    assert all(int(r.argmax()) == 0 for r in m.routing_profiles().values())
    new, _ = warm_round(m, new, moves, round=2)
    top = [int(m.routing_profiles()[c].argmax()) for c in range(8)]
    assert sorted(top[::2]) == [0, 1, 2, 3] and top[::2] == top[1::2]
    head = slice(body.stop - body.start, size)
    everyone = sum(n * d for n, d in moves) / sum(n for n, _ in moves)
    for i in range(0, 8, 2):  # the body from the cluster's two clients, the head from all eight
        (n1, d1), (n2, d2) = moves[i], moves[i + 1]
        expected = one + (n1 * d1 + n2 * d2) / (n1 + n2)
        expected[head] = one[head] + everyone[head]
        torch.testing.assert_close(new[spans[top[i]]], expected)


def test_a_warm_up_client_trains_expert_0_alone_and_the_gate_not_at_all_then_chooses_by_fit():
    m = tiny(assignment="relative", warmup_rounds=3)
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 5
    m.on_client_start(x, y, ClientContext(3, 10, 1, 16))
    torch.testing.assert_close(m._assignment, F.one_hot(torch.tensor(0), 4).float())
    m.training_step((x, y), 0).backward()
    assert all(p.grad is None or not p.grad.any() for p in m.gate.parameters())
    assert all(p.grad is None or not p.grad.any() for e in m.experts[1:] for p in e.parameters())
    assert m.experts[0].head.weight.grad.abs().sum() > 0
    m.zero_grad()
    make_expert_fit(m, 2, torch.full((16,), 3))
    y = torch.full((16,), 3)
    m.on_client_start(x, y, ClientContext(4, 10, 1, 16))
    assert int(m._assignment.argmax()) == 2
    m.training_step((x, y), 0).backward()
    assert any(p.grad is not None and p.grad.any() for p in m.gate.parameters())


def test_a_warm_up_client_keeps_no_assignment_and_a_new_client_after_the_cut_chooses_by_fit():
    """A warm-up client's personal prediction is routed by the gate (its assignment to expert 0 names
    no cluster); a new client fine-tuning after round W, the cut, chooses by fit like a training
    client of round W + 1, not as a client of the warm-up."""
    m = tiny(assignment="relative", warmup_rounds=2)
    x, y = torch.randn(16, 1, 8, 8), torch.full((16,), 3)
    make_expert_fit(m, 2, y)
    m.on_client_start(x, y, ClientContext(2, 10, 1, 16))
    assert int(m._assignment.argmax()) == 0 and not m.client_assignment.any()
    m.on_client_start(x, y, ClientContext(2, 10, 1, 16, finetune=True))  # after rounds 1 and 2
    assert int(m._assignment.argmax()) == 2 and int(m.client_assignment.argmax()) == 2
    m.on_client_start(x, y, ClientContext(1, 10, 1, 16, finetune=True))  # after round 1: still one model
    assert int(m._assignment.argmax()) == 0


def test_the_warm_up_leaves_the_assignment_bias_alone_until_its_last_round():
    """Every warm-up client is on expert 0: that load must not make expert 0 dearer to choose later."""
    m = tiny(assignment="relative", warmup_rounds=2, assignment_balance=0.5)
    server = m.flat["shared"].clone()
    size = m.span("experts.0.").stop - m.span("experts.0.").start
    new, _ = warm_round(m, server, [(1.0, torch.randn(size)) for _ in range(4)], round=1)
    assert not new[m.span("assign_bias")].any()


def test_kmeans_recovers_separated_groups_and_is_seeded_by_its_argument():
    torch.manual_seed(1)
    centers = torch.randn(3, 50) * 10
    x = torch.cat([c + torch.randn(7, 50) for c in centers])
    labels = kmeans(x, 3, seed=5)
    assert len(set(labels.tolist())) == 3
    assert all(len(set(labels[7 * i: 7 * i + 7].tolist())) == 1 for i in range(3))
    state = torch.random.get_rng_state()
    assert torch.equal(kmeans(x, 3, seed=5), labels)
    assert torch.equal(torch.random.get_rng_state(), state)  # draws nothing from the run's streams
    assert len(set(kmeans(x[:2], 3).tolist())) == 2  # fewer rows than clusters


def test_a_run_with_a_warm_up_cuts_the_model_into_experts_at_its_last_round(tmp_path, fit_argv, run_cli):
    """Through the loop: after round 1 of a warm-up of 2 the experts are one model; after round 2 they
    share one head and not one body, and R holds the round's clients on distinct experts (3 clients
    a round, so k-means makes 3 clusters of one)."""
    def run(rounds: int) -> tuple[dict, list[dict]]:
        argv = fit_argv(f"run{rounds}", "--method", "fedcoe", "--method.init_args.assignment", "relative",
                        "--method.init_args.warmup_rounds", "2", "--loop.rounds", str(rounds))
        assert run_cli(argv)[0] == 0
        state = torch.load(tmp_path / f"run{rounds}" / "checkpoint.pt", weights_only=True)["method"]
        return state, list(csv.DictReader(open(tmp_path / f"run{rounds}" / "routing.csv")))

    def part(state: dict, expert: int, prefix: str) -> torch.Tensor:
        return torch.cat([v.flatten() for k, v in state.items() if k.startswith(f"experts.{expert}.{prefix}")])

    warm, _ = run(1)
    assert all(torch.equal(part(warm, e, ""), part(warm, 0, "")) for e in range(4))
    cut, rows = run(2)
    assert all(torch.equal(part(cut, e, "head."), part(cut, 0, "head.")) for e in range(4))
    assert len({tuple(part(cut, e, "body.").tolist()) for e in range(4)}) >= 3
    tops = {max(range(4), key=lambda k: float(r[f"expert_{k}"])) for r in rows}
    assert len(tops) >= 3  # the round-2 clients, one to a cluster (the others' rows: expert 0, one model)
