"""Feature-shift clusters: every image a client holds carries its cluster's transform, the global
test split is scored under every cluster, held-out clusters are new domains for cold start only,
and the routing diagnostics say whether a client's top expert follows its cluster."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from helpers import IndexedSynthetic, decode_indices

from fedcoe_bench.baselines.fedavg import FedAvg
from fedcoe_bench.data import DataError, FederatedData, Synthetic
from fedcoe_bench.data.partition import SERVER
from fedcoe_bench.data.shift import assign_clusters, noise
from fedcoe_bench.evaluation import Evaluator, Snapshot
from fedcoe_bench.routing import expert_cluster_agreement

SOURCE = dict(samples=400, test_samples=100, image_size=12)


def make(tmp_path, source=None, **kw) -> FederatedData:
    args = dict(alpha=0.5, num_clients=12, cold_start_fraction=0.25, min_size=10, shift="rotate", clusters=4,
                cache_dir=str(tmp_path / "partitions"))
    return FederatedData(source=source or Synthetic(**SOURCE), **{**args, **kw})


def everyone(fed):
    return fed.clients + fed.new_clients


# ---------------------------------------------------------------- the federation
@pytest.mark.parametrize("shift, expected", [
    ("rotate", lambda x, k: torch.rot90(x, k, dims=(2, 3))),  # 360 k / 4 degrees, counter-clockwise
    ("invert", lambda x, k: 255 - x if k % 2 else x),
])
def test_every_image_a_client_holds_carries_its_clusters_transform(tmp_path, shift, expected):
    data = make(tmp_path, shift=shift)
    fed = data.setup(seed=0)
    raw = data.source.load()
    assert {c.cluster for c in fed.new_clients} and len({c.cluster for c in everyone(fed)}) == 4
    for c in everyone(fed):  # a cold-start client's unlabeled inputs (its train split) included
        for split in ("train", "val", "test"):
            idx = getattr(c, split)
            assert torch.equal(fed.pool_x[idx], expected(raw.train_x[idx], c.cluster)), (c.id, c.cluster, split)
    server_val = torch.from_numpy(np.flatnonzero(data.split(raw.train_y.numpy(), 0, len(raw.test_y)).client == SERVER))
    assert torch.equal(fed.pool_x[server_val], raw.train_x[server_val]), "no client owns the server's split"
    for k in range(4):
        assert torch.equal(fed.test_x_by_cluster[k], expected(raw.test_x, k))
        assert torch.equal(fed.val_x_by_cluster[k], expected(raw.train_x[server_val], k))
    assert torch.equal(fed.test_x, raw.test_x), "the untransformed global test split is kept"


def test_a_concept_shift_moves_every_label_a_client_holds_and_the_global_labels_per_cluster(tmp_path):
    data = make(tmp_path, shift="relabel")
    original = data.source.load()
    fed, again = data.setup(seed=0), data.setup(seed=0)
    k_classes = fed.num_classes
    assert torch.equal(fed.pool_y, again.pool_y), "setting up twice moves labels once"
    assert torch.equal(data.source.load().train_y, original.train_y), "the source's labels are left as they were"
    assert torch.equal(fed.pool_x, original.train_x), "images stay as they are"
    moved = 0
    for c in everyone(fed):
        for split in ("train", "val", "test"):
            idx = getattr(c, split)
            assert torch.equal(fed.pool_y[idx], (original.train_y[idx] + c.cluster) % k_classes), (c.id, split)
            moved += int((fed.pool_y[idx] != original.train_y[idx]).sum())
    assert moved > 0
    server_val = torch.from_numpy(np.flatnonzero(data.split(original.train_y.numpy(), 0, len(original.test_y)).client == SERVER))
    assert torch.equal(fed.val_y, original.train_y[server_val]) and torch.equal(fed.test_y, original.test_y)
    for k in range(4):
        assert torch.equal(fed.test_y_by_cluster[k], (original.test_y + k) % k_classes)
        assert torch.equal(fed.val_y_by_cluster[k], (original.train_y[server_val] + k) % k_classes)


def test_a_users_label_transform_that_returns_bad_labels_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "my_concept.py").write_text(
        "class Overflow:\n"
        "    def __call__(self, x, cluster, clusters, seed):\n"
        "        return x\n"
        "    def labels(self, y, cluster, clusters, num_classes):\n"
        "        return y + num_classes * cluster\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(DataError, match=r"data.shift 'my_concept.Overflow'.labels returned .* in \[0, 10\)") as info:
        make(tmp_path, shift="my_concept.Overflow").setup(seed=0)
    assert "\n" not in str(info.value)


def test_clusters_are_balanced_seeded_and_come_after_the_label_skew(tmp_path):
    assert np.bincount(assign_clusters(14, 4, seed=0)).tolist() in ([4, 4, 3, 3],)
    assert not np.array_equal(assign_clusters(14, 4, seed=0), assign_clusters(14, 4, seed=1))
    shifted, plain = make(tmp_path).setup(seed=0), make(tmp_path, shift="none").setup(seed=0)
    assert [c.cluster for c in everyone(plain)] == [0] * 12 and plain.num_clusters == 1
    assert sorted(np.bincount([c.cluster for c in everyone(shifted)]).tolist()) == [3, 3, 3, 3]
    for a, b in zip(everyone(shifted), everyone(plain)):  # the same clients, only their images differ
        assert a.id == b.id and all(torch.equal(getattr(a, s), getattr(b, s)) for s in ("train", "val", "test"))


def test_noise_is_cluster_dependent_fixed_by_the_seed_and_stays_uint8(tmp_path):
    data = make(tmp_path, shift="noise")
    fed, again = data.setup(seed=0), data.setup(seed=0)
    raw = data.source.load().train_x.float()
    assert torch.equal(fed.pool_x, again.pool_x) and fed.pool_x.dtype == torch.uint8
    spread = []
    for k in range(4):
        idx = torch.cat([c.train for c in everyone(fed) if c.cluster == k])
        spread.append(float((fed.pool_x[idx].float() - raw[idx]).std()))
    assert spread[0] == 0 and spread[1] < spread[2] < spread[3], spread
    assert not torch.equal(noise(fed.test_x, 3, 4, seed=0), noise(fed.test_x, 3, 4, seed=1))


def test_a_users_transform_plugs_in_by_path(tmp_path, monkeypatch):
    (tmp_path / "my_shift.py").write_text(
        "import torch\n\n"
        "class Stamp:\n"
        "    def __call__(self, x, cluster, clusters, seed):\n"
        "        x = x.clone()\n"
        "        x[:, :, 0, 0] = 10 * cluster + clusters\n"
        "        return x\n\n"
        "def wrong(x, cluster, clusters, seed):\n"
        "    return x.float()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fed = make(tmp_path, shift="my_shift.Stamp", clusters=3).setup(seed=0)
    for c in everyone(fed):
        assert set(fed.pool_x[c.index[c.bounds[0]:c.bounds[3]], 0, 0, 0].tolist()) == {10 * c.cluster + 3}
    with pytest.raises(DataError, match="data.shift 'my_shift.wrong' returned torch.float32") as info:
        make(tmp_path, shift="my_shift.wrong").setup(seed=0)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kw, match", [
    (dict(shift="blur"), "unknown data.shift 'blur'"),
    (dict(shift="no_such_module.f"), "data.shift 'no_such_module.f' cannot be imported"),
    (dict(held_out_clusters=[4]), "names cluster 4, but data.clusters 4 has clusters 0 to 3"),
    (dict(held_out_clusters=[-1]), "names cluster -1"),
    (dict(held_out_clusters=[0, 1, 2, 3]), "holds out all 4 clusters"),
    (dict(shift="none", held_out_clusters=[1]), "data.held_out_clusters needs a feature shift"),
    (dict(clusters=13), "data.clusters must be in"),
])
def test_bad_shift_keys_end_in_one_line(tmp_path, kw, match):
    with pytest.raises(DataError, match=match) as info:
        make(tmp_path, **kw)
    assert "\n" not in str(info.value)


def test_the_cache_key_holds_the_clusters_only_with_a_shift(tmp_path):
    key = lambda **kw: make(tmp_path, **kw).key(0)
    assert key(shift="none", clusters=2) == key(shift="none", clusters=4), "clusters mean nothing without shift"
    assert len({key(shift="none"), key(clusters=2), key(clusters=4), key(held_out_clusters=[1])}) == 4
    assert key(shift="rotate") == key(shift="noise"), "the transform is applied after the (cached) partition"


# ---------------------------------------------------------------- held-out clusters
def test_a_held_out_cluster_never_trains_and_the_others_follow_cold_start_fraction(tmp_path):
    data = make(tmp_path, num_clients=20, cold_start_fraction=0.2, held_out_clusters=[1, 3])
    fed = data.setup(seed=0)
    held = [c for c in everyone(fed) if c.cluster in (1, 3)]
    assert len(held) == 10 and all(c in fed.new_clients for c in held)
    assert {c.cluster for c in fed.clients} == {0, 2}, "a held-out cluster among the training clients"
    others = [c for c in fed.new_clients if c.cluster not in (1, 3)]
    assert len(others) == round(0.2 * 10), "cold_start_fraction applies to the remaining clusters"
    assert fed.held_out_clusters == (1, 3)


def test_holding_out_what_leaves_no_training_client_is_one_line(tmp_path):
    with pytest.raises(DataError, match="no training clients left") as info:
        make(tmp_path, num_clients=4, min_size=2, cold_start_fraction=0.5, held_out_clusters=[0, 1, 2]).setup(0)
    assert "held_out_clusters" in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------- evaluation
class Oracle(FedAvg):
    """Predicts the true label of a global test image whose index pixels (IndexedSynthetic) are
    where cluster 0 keeps them, so it is right under cluster 0 and near chance under rotations;
    records what the cold-start predictor is given."""

    def __init__(self, fed, **kw):
        super().__init__(num_classes=fed.num_classes, in_channels=1, image_size=12, **kw)
        self.fed, self.unlabeled = fed, []
        self.flatten_parameters()  # as the loop leaves a method before evaluating it

    def predict_global(self, x):
        idx = torch.tensor(decode_indices(self.fed, x)) % len(self.fed.test_y)
        return torch.nn.functional.one_hot(self.fed.test_y[idx], self.fed.num_classes).float()

    def predict_cold_start(self, x, unlabeled):
        self.unlabeled.append(unlabeled.clone())
        return super().predict_cold_start(x, unlabeled)


def as_is(method) -> Snapshot:
    """The state ``method`` holds, as a snapshot: loading it changes nothing."""
    return Snapshot(method.flat["shared"].clone(), method.flat["personal"].clone())


def test_the_global_test_is_scored_under_every_cluster_and_new_domains_get_their_own_number(tmp_path):
    data = make(tmp_path, source=IndexedSynthetic(**SOURCE), held_out_clusters=[2])
    fed = data.setup(seed=0)
    raw = data.source.load()
    method = Oracle(fed)
    evaluator = Evaluator(fed)
    out = evaluator(method, as_is(method))
    per_cluster = [out[f"global_acc_cluster_{k}"] for k in range(4)]
    assert per_cluster[0] == 1.0 and max(per_cluster[1:]) < 0.5, per_cluster
    assert out["global_acc"] == pytest.approx(sum(per_cluster) / 4)
    for c, given in zip(fed.new_clients, method.unlabeled):  # unlabeled inputs as the client holds them
        torch.testing.assert_close(given, fed.prepare(torch.rot90(raw.train_x[c.train], c.cluster, dims=(2, 3))))
    rows = [r for r in evaluator.per_client if r["kind"] == "cold_start"]
    new = [r for r in rows if r["cluster"] == 2]
    assert new and len(new) < len(rows)
    assert out["cold_start_acc_new_domain"] == pytest.approx(sum(r["acc"] for r in new) / len(new))
    assert out["cold_start_lp_acc_new_domain"] == pytest.approx(sum(r["lp_acc"] for r in new) / len(new))


def test_under_a_concept_shift_each_cluster_is_scored_against_its_own_labels(tmp_path):
    fed = make(tmp_path, source=IndexedSynthetic(**SOURCE), shift="relabel").setup(seed=0)
    method = Oracle(fed)  # the original label of every test image: right in cluster 0 only
    out = Evaluator(fed)(method, as_is(method))
    assert [out[f"global_acc_cluster_{k}"] for k in range(4)] == [1.0, 0.0, 0.0, 0.0]


def test_without_clusters_there_is_one_global_number(indexed_fed):
    method = Oracle(indexed_fed)
    out = Evaluator(indexed_fed)(method, as_is(method))
    assert out["global_acc"] == 1.0 and not [k for k in out if "cluster" in k or "new_domain" in k]


# ---------------------------------------------------------------- routing diagnostics
def test_nmi_and_purity_match_a_hand_computation():
    top, cluster = torch.tensor([0, 0, 1, 1, 1, 1]), torch.tensor([0, 0, 0, 1, 1, 1])
    h_e = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))
    h_c = math.log(2)
    mi = 1 / 3 * math.log((1 / 3) / (1 / 3 * 1 / 2)) + 1 / 6 * math.log((1 / 6) / (2 / 3 * 1 / 2)) \
        + 1 / 2 * math.log((1 / 2) / (2 / 3 * 1 / 2))
    got = expert_cluster_agreement(top, cluster)
    assert got["expert_cluster_nmi"] == pytest.approx(mi / ((h_e + h_c) / 2), abs=1e-5)
    assert got["expert_cluster_purity"] == pytest.approx(5 / 6)  # expert 0: 2 of cluster 0; expert 1: 3 of 1
    renamed = expert_cluster_agreement(torch.tensor([3, 3, 1, 1]), torch.tensor([0, 0, 1, 1]))
    assert renamed == pytest.approx({"expert_cluster_nmi": 1.0, "expert_cluster_purity": 1.0})
    one_expert = expert_cluster_agreement(torch.zeros(4, dtype=torch.long), torch.tensor([0, 0, 1, 1]))
    assert one_expert == pytest.approx({"expert_cluster_nmi": 0.0, "expert_cluster_purity": 0.5})


@pytest.fixture(scope="module")
def shifted_runs(tmp_path_factory):
    """FedCoE and FedMix, 2 rounds on synthetic data rotated over 4 clusters, cluster 3 held out."""
    from fedcoe_bench.cli import main

    root = tmp_path_factory.mktemp("shift")
    for method in ("fedcoe", "fedmix"):
        argv = ["fit", "--data.source", "synthetic", "--data.source.samples", "400", "--data.source.test_samples",
                "100", "--data.num_clients", "12", "--loop.rounds", "2", "--loop.clients_per_round", "4",
                "--loop.eval_every", "1", "--loop.progress", "false", "--fabric.accelerator", "cpu",
                "--data.shift", "rotate", "--data.clusters", "4", "--data.held_out_clusters", "[3]",
                "--method", method, "--method.init_args.num_experts", "2",
                "--data.cache_dir", str(root / "partitions"), "--run_dir", str(root / "runs" / method)]
        assert main(argv) == 0
    return root / "runs"


@pytest.mark.parametrize("method", ["fedcoe", "fedmix"])
def test_a_shifted_fit_logs_agreement_each_round_and_writes_the_cluster_column(shifted_runs, method):
    run = shifted_runs / method
    with open(run / "clients.csv", newline="") as f:
        cluster_of = {int(r["client"]): int(r["cluster"]) for r in csv.DictReader(f)}
    with open(run / "routing.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:2] == ["client", "cluster"] and len(rows) >= 4
    assert all(int(r["cluster"]) == cluster_of[int(r["client"])] for r in rows)
    assert all(int(r["cluster"]) != 3 for r in rows), "a held-out cluster's client was trained"
    with open(run / "metrics.csv", newline="") as f:
        metrics = list(csv.DictReader(f))
    assert len(metrics) == 2 and all(0 <= float(m["expert_cluster_nmi"]) <= 1 for m in metrics)
    assert all(1 / 3 <= float(m["expert_cluster_purity"]) <= 1 for m in metrics)
    summary = json.loads((run / "summary.json").read_text())
    assert {"global_acc_cluster_3", "cold_start_acc_new_domain"} <= set(summary["metrics"])


def test_shifted_runs_get_their_own_folder_and_table_group(shifted_runs):
    from fedcoe_bench.cli import build_parser
    from fedcoe_bench.experiment import default_run_dir
    from fedcoe_bench.results import load_runs

    runs = load_runs(shifted_runs)
    assert {r.group for r in runs} == {("synthetic rotate4-held3", "dirichlet", 0.3, 2)}
    cfg = build_parser().parse_args(["fit", "--data.shift", "rotate", "--data.held_out_clusters", "[3]"]).fit
    assert default_run_dir(cfg).split("/")[2] == "dirichlet0.3-rotate4-held3"


# ---------------------------------------------------------------- what a user sees
def test_partition_shows_each_cluster_with_its_sizes(tmp_path, run_cli):
    rc, out, err = run_cli(["partition", "--data.source", "synthetic", "--data.source.samples", "400",
                            "--data.num_clients", "12", "--data.cache_dir", str(tmp_path), "--data.shift", "invert",
                            "--data.clusters", "3", "--data.held_out_clusters", "[1]"])
    assert rc == 0, err
    header, cluster_columns, *lines = out.strip().splitlines()
    assert "shift invert over 3 clusters (held out: 1)" in header
    assert cluster_columns.split() == ["cluster", "clients", "training", "cold-start", "samples"]
    summary, columns, clients = lines[:3], lines[3], lines[4:]
    assert columns.split()[:3] == ["client", "kind", "cluster"] and len(clients) == 12
    per_client = [[int(v) if v.isdigit() else v for v in line.split()] for line in clients]
    for row in summary:
        k, n, training, cold, samples = (int(v) for v in row.split()[:5])
        members = [r for r in per_client if r[2] == k]
        assert n == len(members) == 4 and cold == sum(r[1] == "new" for r in members) and training == n - cold
        assert samples == sum(sum(r[-3:]) for r in members)
        assert row.endswith("held out") == (k == 1) and (training == 0) == (k == 1)


def test_plot_draws_cluster_samples_and_routing_by_cluster(shifted_runs, tmp_path, run_cli):
    pytest.importorskip("matplotlib")
    out = tmp_path / "figures"
    code, stdout, err = run_cli(["plot", str(shifted_runs), "--out", str(out)])
    assert code == 0, err
    slug = "synthetic-rotate4-held3_dirichlet0.3_2r"
    names = {p.name for p in out.iterdir()}
    assert {f"{slug}_clusters.png", f"{slug}_routing.png", f"{slug}_partition.png"} <= names
    for name in (f"{slug}_clusters.png", f"{slug}_routing.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
