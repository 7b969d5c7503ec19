"""The fine-tuned cold start (``cold_start_ft_acc``): a new client fine-tunes what its method names on
its labelled shots only, from what it is served, deterministically, and nothing of it outlives scoring."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import decode_indices

from fedcoe_bench.baselines import FedAvg, FedMix, FedPer, Local, PFedMoE
from fedcoe_bench.data import DataError, FederatedData
from fedcoe_bench.errors import ConfigError
from fedcoe_bench.evaluation import Evaluator, Snapshot
from fedcoe_bench.fedcoe import FedCoE
from fedcoe_bench.loop import FederatedLoop

KW = {"in_channels": 1, "image_size": 12}


def fitted(cls, fed, fabric, steps=3, **kwargs):
    """``(method, result of a 2-round fit, the trained state as a Snapshot)``."""
    torch.manual_seed(0)
    method = cls(num_classes=fed.num_classes, **KW, **kwargs)
    start = copy.deepcopy(method)  # the initial personal state, as the loop takes it (default memory format)
    start.flatten_parameters()
    loop = FederatedLoop(rounds=2, clients_per_round=4, batch_size=16, eval_every=1, checkpoint_every=0,
                         progress=False, channels_last=False, cold_start_steps=steps)
    result = loop.fit(fabric, method, fed, seed=0)
    state = Snapshot(result.server, start.flat["personal"].clone(), result.store, result.trained_ids, loop.rounds)
    return method, result, state


def loader(method, state):
    def load(client=None):
        state.load(method, client)
    return load


def test_shots_are_a_few_per_present_class_of_the_local_train_split(indexed_fed):
    fed = indexed_fed
    for c in fed.new_clients:
        shots = fed.shots(c, seed=0)
        assert set(shots.tolist()) <= set(c.train.tolist())
        counts = torch.bincount(fed.pool_y[shots], minlength=fed.num_classes)
        present = torch.bincount(fed.pool_y[c.train], minlength=fed.num_classes)
        assert torch.equal(counts, present.clamp(max=fed.cold_start_shots))
        assert torch.equal(shots, fed.shots(c, seed=0)) and not torch.equal(shots, fed.shots(c, seed=1))


def test_finetuning_reads_the_shots_labels_only(indexed_fed, fabric):
    """What fine-tuning trains on is the shots; poisoning the new client's test and validation labels
    leaves the fine-tuned predictions bit for bit the same. (Drawing the shots per class reads its
    train labels: the client labels a few of each class it holds.)"""
    fed = indexed_fed
    method, _, state = fitted(FedAvg, fed, fabric)
    seen = []
    step = method.training_step
    method.training_step = lambda batch, i: seen.append((decode_indices(fed, batch[0]), batch[1].tolist())) or step(batch, i)
    evaluator = Evaluator(fed, finetune_steps=4, finetune_batch_size=8)
    client = fed.new_clients[0]
    with torch.no_grad():
        before = evaluator._finetune(method, loader(method, state), client, state.round)
    shots = set(fed.shots(client, 0).tolist())
    assert len(seen) == 4 and all(set(ids) <= shots and labels == fed.pool_y[ids].tolist() for ids, labels in seen)
    held_out = torch.cat([client.val, client.test])
    fed.pool_y[held_out] = (fed.pool_y[held_out] + 1) % fed.num_classes
    with torch.no_grad():
        after = evaluator._finetune(method, loader(method, state), client, state.round)
    assert torch.equal(before, after)


@pytest.mark.parametrize("cls, kwargs, tuned", [
    (FedAvg, {}, ("",)), (Local, {}, ("net.",)), (FedPer, {}, ("net.head.",)), (PFedMoE, {}, ("head.", "gate.", "local_expert.")),
    (FedMix, {"num_experts": 2}, ("gate.",)), (FedCoE, {"num_experts": 2}, ("local.", "fusion.")),
])
def test_only_the_named_parameters_change_and_training_state_is_untouched(indexed_fed, fabric, cls, kwargs, tuned):
    fed = indexed_fed
    method, result, trained = fitted(cls, fed, fabric, **kwargs)
    state = {k: v.clone() for k, v in method.state_dict().items() if isinstance(v, torch.Tensor)}
    store = {k: v.clone() for k, v in result.store.states.items()}
    snapshots = {}
    start, predict = method.start_finetune, method.predict_personal

    def snap(key):
        snapshots[key] = {n: p.detach().clone() for n, p in method.named_parameters()}

    def start_spy():
        out = start()
        snap("start")
        return out

    method.start_finetune = start_spy
    method.predict_personal = lambda x: snap("scored") or predict(x)
    with torch.no_grad():
        Evaluator(fed, finetune_steps=3, finetune_batch_size=8)._finetune(method, loader(method, trained), fed.new_clients[0],
                                                                          trained.round)
    changed = {n for n, p in snapshots["scored"].items() if not torch.equal(p, snapshots["start"][n])}
    assert changed and all(n.startswith(tuned) for n in changed), changed
    # nothing outlives scoring: the method's state (server-only included) and the client store are as before
    for k, v in method.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, state[k]), k
    assert result.store.states.keys() == store.keys() and all(torch.equal(result.store.states[k], v) for k, v in store.items())
    assert all(p.requires_grad == (not n.startswith(("local_ready", "label_counts", "head_weight")))
               for n, p in method.named_parameters()), "fine-tuning left a parameter frozen"
    assert sorted(start()) == sorted(tuned) or cls in (FedAvg, Local)  # (last: it loads the served head)


def test_fedper_fine_tunes_from_the_served_head(indexed_fed, fabric):
    method, _, state = fitted(FedPer, indexed_fed, fabric)
    loader(method, state)()
    method.start_finetune()
    torch.testing.assert_close(method.net.head.weight, method.eval_head.weight)
    assert not torch.equal(state.init_personal, method.flat["personal"])


@pytest.mark.parametrize("cls", [FedPer, FedCoE])
def test_training_is_the_same_with_and_without_the_fine_tuned_column(tmp_path, fabric, cls):
    def run(steps):
        fed = FederatedData(source="synthetic", num_clients=10, cache_dir=str(tmp_path), min_size=10).setup(0)
        method, result, _ = fitted(cls, fed, fabric, steps=steps)
        return result, {k: v for k, v in result.history[-1].items() if "acc" in k}

    (off, off_metrics), (on, on_metrics) = run(0), run(3)
    assert torch.equal(off.server, on.server)
    assert all(torch.equal(off.store.states[k], v) for k, v in on.store.states.items())
    assert "cold_start_ft_acc" in on_metrics and "cold_start_ft_acc" not in off_metrics
    assert {k: v for k, v in on_metrics.items() if "ft" not in k} == off_metrics


def test_fine_tuning_is_deterministic_per_client(indexed_fed, fabric):
    fed = indexed_fed
    method, _, state = fitted(FedAvg, fed, fabric)
    evaluator = Evaluator(fed, finetune_steps=3, finetune_batch_size=8)
    a, b = fed.new_clients[:2]
    with torch.no_grad():
        alone = evaluator._finetune(method, loader(method, state), b, state.round)
        evaluator._finetune(method, loader(method, state), a, state.round)
        torch.manual_seed(123)  # whatever ran before, the client's own seed decides
        again = evaluator._finetune(method, loader(method, state), b, state.round)
    assert torch.equal(alone, again)


def test_bad_fine_tuning_settings_are_refused():
    with pytest.raises(ConfigError, match="loop.cold_start_steps must be >= 0"):
        FederatedLoop(cold_start_steps=-1)
    with pytest.raises(DataError, match="data.cold_start_shots must be >= 1"):
        FederatedData(source="synthetic", cold_start_shots=0)
