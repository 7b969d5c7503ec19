"""The round loop keeps cold-start clients out of training, and evaluation never hands a label or a
gradient to the cold-start predictor."""

from __future__ import annotations

import torch
from helpers import decode_indices

from fedcoe_bench.baselines.fedavg import FedAvg
from fedcoe_bench.evaluation import Evaluator, Snapshot
from fedcoe_bench.loop import FederatedLoop


def build(cls, fed):
    return cls(num_classes=fed.num_classes, in_channels=1, image_size=12)


class TrainSpy(FedAvg):
    """Records the pool indices of every sample that reaches local training or a client report."""

    def __init__(self, fed, **kwargs):
        super().__init__(**kwargs)
        self.fed = fed
        self.seen_training: list[int] = []
        self.seen_start: list[int] = []
        self.seen_report: list[int] = []

    def on_client_start(self, x, y, ctx):
        self.seen_start += decode_indices(self.fed, x)

    def training_step(self, batch, batch_idx):
        self.seen_training += decode_indices(self.fed, batch[0])
        return super().training_step(batch, batch_idx)

    def on_client_end(self, x, ctx):
        self.seen_report += decode_indices(self.fed, x)
        return {}


def test_cold_start_clients_are_never_trained(indexed_fed, fabric, monkeypatch):
    fed = indexed_fed
    new_ids = {c.id for c in fed.new_clients}
    assert new_ids, "the fixture must hold cold-start clients"
    trained: list[tuple[int, int]] = []  # (round, client id)
    original = FederatedLoop._train_client

    def spy(self, fabric, run, optimizer, client, round_ctx):
        trained.append((round_ctx.round, client.id))
        return original(self, fabric, run, optimizer, client, round_ctx)

    monkeypatch.setattr(FederatedLoop, "_train_client", spy)
    method = TrainSpy(fed, num_classes=fed.num_classes, in_channels=1, image_size=12)
    # 8 of 8 training clients per round: every client that *could* be trained is
    # (new clients' fine-tuning on their shots is evaluation, tested in test_finetune.py)
    loop = FederatedLoop(rounds=2, clients_per_round=8, batch_size=16, eval_every=1, progress=False, cold_start_steps=0)
    loop.fit(fabric, method, fed, seed=0)

    ids = [cid for _, cid in trained]
    assert len(trained) == 2 * 8
    assert not new_ids & set(ids), "a cold-start client was trained"
    assert set(ids) == {c.id for c in fed.clients}

    new_samples = set(torch.cat([torch.cat([c.train, c.test]) for c in fed.new_clients]).tolist())
    train_samples = set(torch.cat([c.train for c in fed.clients]).tolist())
    for seen in (method.seen_training, method.seen_start, method.seen_report):
        assert seen and not new_samples & set(seen), "a cold-start client's sample reached training"
        assert set(seen) <= train_samples, "training saw a sample outside the training clients' train splits"
    # one local epoch per round over every training client: each train sample exactly twice
    assert sorted(method.seen_training) == sorted(list(train_samples) * 2)


class ColdStartSpy(FedAvg):
    """Personal head (so that 'which state is loaded' matters); records what the cold-start predictor gets."""

    personal = ("net.head",)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls: list[dict] = []

    def predict_cold_start(self, x, unlabeled):  # deliberately not decorated with no_grad
        self.calls.append({
            "args": (x, unlabeled),
            "grad_enabled": torch.is_grad_enabled(),
            "training": self.training,
            "shared": self.flat["shared"].clone(),
            "personal": self.flat["personal"].clone(),
        })
        return self(x).softmax(-1)


def test_cold_start_predictor_sees_inputs_only_and_changes_nothing(indexed_fed, fabric):
    fed = indexed_fed
    method = build(ColdStartSpy, fed)
    initial = {n: t.detach().clone() for n, t in method.named_state("personal")}
    loop = FederatedLoop(rounds=2, clients_per_round=4, batch_size=16, eval_every=10, progress=False)
    result = loop.fit(fabric, method, fed, seed=0)
    assert result.store.states, "training clients should hold personal heads that differ from the initial one"
    assert method.calls, "the cold-start predictor was never called"

    # evaluate again, on a known state, and check the state after; fit leaves the method holding the
    # server state and the initial personal state (checked against the values before training)
    init_personal = method.flat["personal"].clone()
    assert all(torch.equal(method.view_like(init_personal, n, "personal"), t) for n, t in initial.items())
    state = Snapshot(result.server, init_personal, result.store)
    state.load(method)
    method.zero_grad(set_to_none=True)
    method.calls.clear()
    state_before = {k: v.clone() for k, v in method.state_dict().items()}
    server_before = result.server.clone()
    personal_before = {k: v.clone() for k, v in result.store.states.items()}
    metrics = Evaluator(fed, batch_size=64)(method, state)

    assert 0.0 <= metrics["cold_start_acc"] <= 1.0
    assert all(torch.equal(v, state_before[k]) for k, v in method.state_dict().items()), "evaluation changed a parameter"
    assert all(p.grad is None for p in method.parameters()), "evaluation computed a gradient"
    assert torch.equal(result.server, server_before)
    assert result.store.states.keys() == personal_before.keys()
    assert all(torch.equal(result.store.states[k], v) for k, v in personal_before.items())

    new_labels = [fed.pool_y[getattr(c, part)] for c in fed.new_clients for part in ("train", "val", "test")]
    unlabeled_seen = set()
    for call in method.calls:
        assert call["grad_enabled"] is False, "the cold-start predictor runs with gradients enabled"
        assert call["training"] is False, "the cold-start predictor runs in train mode"
        # the server state and the *initial* personal state are loaded, never a trained client's
        assert torch.equal(call["shared"], result.server)
        assert torch.equal(call["personal"], init_personal)
        for arg in call["args"]:
            assert isinstance(arg, torch.Tensor) and arg.is_floating_point(), "a non-input argument was passed"
            assert not any(arg.shape == y.shape and torch.equal(arg.long(), y) for y in new_labels)
            assert arg.shape[1:] == (1, 12, 12), "arguments must be image batches"
        x, unlabeled = call["args"]
        # the adaptation inputs are exactly one new client's local train inputs
        owner = [c for c in fed.new_clients if sorted(decode_indices(fed, unlabeled)) == c.train.tolist()]
        assert len(owner) == 1, "unlabeled inputs are not one new client's train split"
        own = set(torch.cat([owner[0].train, owner[0].val, owner[0].test]).tolist())
        assert set(decode_indices(fed, x)) <= own, "the predictor got another client's inputs"
        unlabeled_seen.add(owner[0].id)
    assert unlabeled_seen == {c.id for c in fed.new_clients}


def test_prepare_augments_by_crop_and_flip_only(indexed_fed):
    """The batched on-device augmentation returns, per image, a 4-pixel-padded crop, possibly flipped."""
    fed = indexed_fed
    fed.augment = True
    x = fed.pool_x[:6]
    base = fed.prepare(x)
    out = fed.prepare(x, torch.Generator().manual_seed(1))
    assert out.shape == base.shape
    padded = torch.nn.functional.pad(base, (4, 4, 4, 4))
    h = w = base.shape[-1]
    for i in range(len(x)):
        crops = [padded[i, :, dy : dy + h, dx : dx + w] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1)) for c in crops), i
    # without a generator (evaluation) there is no augmentation
    assert torch.equal(fed.prepare(x), base)


def test_more_processes_than_clients_per_round_is_refused_before_any_training(indexed_fed):
    """A rank left without a client would have nothing to all-gather; say so up front."""
    from types import SimpleNamespace

    import pytest

    from fedcoe_bench.errors import ConfigError

    fake = SimpleNamespace(world_size=4)  # fit must stop before it touches the fabric
    loop = FederatedLoop(rounds=1, clients_per_round=3, progress=False)
    with pytest.raises(ConfigError, match="4 processes but loop.clients_per_round=3.*at most 3 devices"):
        loop.fit(fake, build(FedAvg, indexed_fed), indexed_fed, seed=0)


class ValidationSpy(FedAvg):
    """Records what the validation hook gets: (pool indices, labels, train mode, gradients on)."""

    def __init__(self, fed, **kwargs):
        super().__init__(**kwargs)
        self.fed, self.calls = fed, []

    def on_client_validation(self, x, y, ctx):
        self.calls.append((decode_indices(self.fed, x) if len(x) else [], y.tolist(), self.training,
                           torch.is_grad_enabled()))


def test_each_training_client_hands_its_validation_split_to_the_hook(indexed_fed, fabric):
    fed = indexed_fed
    method = build(lambda **kw: ValidationSpy(fed, **kw), fed)
    loop = FederatedLoop(rounds=2, clients_per_round=8, batch_size=16, eval_every=10, progress=False, cold_start_steps=0)
    loop.fit(fabric, method, fed, seed=0)
    assert len(method.calls) == 2 * len(fed.clients)
    vals = {tuple(c.val.tolist()) for c in fed.clients}
    for ids, labels, training, grad in method.calls:
        assert tuple(ids) in vals and labels == fed.pool_y[ids].tolist()
        assert not training and not grad  # scoring: eval mode, no gradients
