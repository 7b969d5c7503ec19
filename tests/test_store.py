"""The client-state store returns what was put; a run killed inside a round resumes to the uninterrupted
run with the disk store; 2 gloo processes give the numbers of 1 for every method, and each process
writes only the states of the clients it trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedcoe_bench.cli import main
from fedcoe_bench.errors import ConfigError, RunError
from fedcoe_bench.loop import FederatedLoop, sample_clients
from fedcoe_bench.store import DiskStore, MemoryStore, open_store

METRICS = ("global_acc", "personal_acc", "cold_start_acc", "cold_start_lp_acc")


def make_store(kind: str, path: Path, dtype: str, numel: int = 257):
    return open_store(kind, path / "clients", numel, dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_store_returns_what_was_put_and_restores_the_flushed_states(tmp_path, kind, dtype):
    gen = torch.Generator().manual_seed(0)
    states = {c: torch.randn(257, generator=gen) * 3 for c in range(0, 60, 3)}
    store = make_store(kind, tmp_path, dtype)
    for c, s in states.items():
        store.put(c, s.double())  # any dtype in, the storage dtype out
    store.put(3, torch.zeros(257))  # put twice before a flush: the latest wins
    states[3] = torch.zeros(257)
    position = store.flush()

    def check(s):
        for c in range(60):
            got = s.get(c)
            if c not in states:
                assert got is None, c
                continue
            assert got.device.type == "cpu" and got.dtype == getattr(torch, dtype)
            # float32 exactly; bfloat16 exactly the rounded value (within 2^-8 relative)
            assert torch.equal(got, states[c].to(got.dtype)), c
            torch.testing.assert_close(got.float(), states[c], rtol=2**-8, atol=0)

    check(store)
    # a round that was never flushed: its states are visible now and gone after restore
    for c in (0, 6, 59):
        store.put(c, torch.full((257,), 7.0))
    assert torch.equal(store.get(59).float(), torch.full((257,), 7.0))
    store.restore(position)
    check(store)
    fresh = make_store(kind, tmp_path, dtype)  # a new process: only the position is known
    fresh.restore(position)
    check(fresh)
    # after a restore, what is put and flushed again is read back, the restored rest unchanged
    fresh.put(6, torch.ones(257))
    states[6] = torch.ones(257)
    again = make_store(kind, tmp_path, dtype)
    again.restore(fresh.flush())
    check(again)


def test_disk_store_keeps_no_state_in_memory_and_reads_one_client_at_a_time(tmp_path):
    store = make_store("disk", tmp_path, "float32")
    for c in range(5):
        store.put(c, torch.full((257,), float(c)))
    assert not any(isinstance(v, torch.Tensor) for v in vars(store).values())
    assert sorted(p.name for p in (tmp_path / "clients").iterdir()) == [f"{c}.0" for c in range(5)]
    assert store.disk_bytes() >= 5 * 257 * 4


def test_a_store_of_another_kind_or_dtype_is_refused_on_restore(tmp_path):
    position = make_store("disk", tmp_path, "bfloat16").flush()
    with pytest.raises(RunError, match="--loop.client_store disk --loop.client_state_dtype bfloat16"):
        make_store("disk", tmp_path, "float32").restore(position)
    with pytest.raises(RunError, match="--loop.client_store disk"):
        make_store("memory", tmp_path, "bfloat16").restore(position)


def test_memory_store_under_several_processes_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="loop.client_store=memory .* use --loop.client_store disk"):
        open_store("memory", numel=10, world_size=2)
    assert isinstance(open_store("memory", numel=0, world_size=2), MemoryStore)  # nothing to keep: fine
    with pytest.raises(ConfigError, match="loop.client_store must be memory or disk"):
        FederatedLoop(client_store="ram")
    with pytest.raises(ConfigError, match="loop.client_state_dtype must be float32 or bfloat16"):
        FederatedLoop(client_state_dtype="float16")


@pytest.mark.parametrize("method", ["fedper", "fedem"])
def test_a_rounding_store_is_refused_where_the_server_keeps_running_sums_of_client_states(method, fit_argv, run_cli):
    """FedPer's evaluation head and FedEM's mean pi replace each client's earlier contribution, read back from
    its stored state: a bfloat16 store would return another number than the one added (347 reads 348)."""
    assert float(torch.tensor(347.0).to(torch.bfloat16)) != 347.0
    rc, _, err = run_cli(fit_argv("run", "--method", method, "--loop.client_state_dtype", "bfloat16"))
    assert rc == 1 and err.count("\n") == 1 and "--loop.client_state_dtype float32" in err


# ------------------------------------------------------------------ SIGKILL inside a round
KILLER = """
import os, signal, sys
from fedcoe_bench import store
from fedcoe_bench.cli import main

put, count, limit = store.DiskStore.put, [0], int(os.environ["KILL_AFTER_PUTS"])

def put_then_maybe_die(self, client, state):
    put(self, client, state)
    count[0] += 1
    if count[0] == limit:  # the state is on disk, the round is not finished
        os.kill(os.getpid(), signal.SIGKILL)

store.DiskStore.put = put_then_maybe_die
sys.exit(main(sys.argv[1:]))
"""

ROUNDS, PER_ROUND, TRAINING = 4, 4, 8  # 10 clients, 2 of them cold-start


def kill_argv(tmp_path: Path, run: str, method: str, seed: int) -> list[str]:
    return ["fit", "--method", method, "--seed", str(seed), "--data.source", "synthetic",
            "--data.source.samples", "400", "--data.source.test_samples", "100", "--data.num_clients", "10",
            "--loop.clients_per_round", str(PER_ROUND), "--loop.rounds", str(ROUNDS), "--loop.checkpoint_every", "2",
            "--loop.eval_every", "2", "--loop.progress", "false", "--loop.client_store", "disk",
            "--fabric.accelerator", "cpu", "--data.cache_dir", str(tmp_path / "cache"),
            "--run_dir", str(tmp_path / run)]


def kill_point() -> tuple[int, int]:
    """(seed, puts before the kill): the kill lands in the last round, right after writing a client whose
    state the round-2 checkpoint references, so an in-place write would corrupt the resumed run."""
    for seed in range(10):
        committed = set().union(*(sample_clients(seed, r, TRAINING, PER_ROUND) for r in range(2)))
        last = sample_clients(seed, ROUNDS - 1, TRAINING, PER_ROUND)
        hits = [j for j, c in enumerate(last) if c in committed]
        if hits:
            return seed, (ROUNDS - 1) * PER_ROUND + hits[0] + 1
    raise AssertionError("no seed puts a checkpointed client in the last round")


def stored_states(run: Path) -> dict[int, torch.Tensor]:
    position = torch.load(run / "checkpoint.pt", weights_only=True)["store"]
    store = DiskStore(run / "clients", position["numel"], position["dtype"])
    store.restore(position)
    return {c: store.get(c) for c in (position["versions"] >= 0).nonzero().flatten().tolist()}


@pytest.mark.parametrize("method", ["fedper", "fedcoe"])
def test_sigkill_inside_a_round_then_resume_equals_uninterrupted_with_the_disk_store(tmp_path, method):
    seed, puts = kill_point()
    assert main(kill_argv(tmp_path, "whole", method, seed)) == 0
    (tmp_path / "killer.py").write_text(KILLER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1", "KILL_AFTER_PUTS": str(puts)}
    proc = subprocess.run([sys.executable, str(tmp_path / "killer.py"), *kill_argv(tmp_path, "killed", method, seed)],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -9, proc.stderr
    killed = tmp_path / "killed"
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["round"] == 2
    assert not (killed / "summary.json").exists()

    assert main(kill_argv(tmp_path, "killed", method, seed)) == 0  # resumes by default
    whole, resumed = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("whole", "killed"))
    assert resumed["resumed_from_round"] == 2
    for key in METRICS:
        assert resumed[key] == whole[key], key
    ckpt = {run: torch.load(tmp_path / run / "checkpoint.pt", weights_only=True) for run in ("whole", "killed")}
    assert torch.equal(ckpt["whole"]["server"], ckpt["killed"]["server"])
    a, b = stored_states(tmp_path / "whole"), stored_states(killed)
    assert a.keys() == b.keys() and len(a) >= PER_ROUND
    for c in a:
        assert torch.equal(a[c], b[c]), c


# ------------------------------------------------------------------ 1 vs 2 gloo processes
DDP = """
import json, sys
import torch
from lightning.fabric import Fabric
from fedcoe_bench.baselines import (Ditto, Ensemble, FedAvg, FedEM, FedMix, FedPer, FedProx, FedRep, IFCA, Local,
                                    PFedMoE, SCAFFOLD)
from fedcoe_bench import store
from fedcoe_bench.data import FederatedData, Synthetic
from fedcoe_bench.fedcoe import FedCoE
from fedcoe_bench.loop import FederatedLoop

devices, out = int(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)
fabric = Fabric(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto")
fabric.launch()
fed = FederatedData(source=Synthetic(samples=240, test_samples=40, image_size=8), alpha=0.5, num_clients=8,
                    cold_start_fraction=0.25, min_size=10, cache_dir=f"{out}/cache").setup(0)
log = {"trained": [], "puts": [], "gathered": []}
put, train = store.DiskStore.put, FederatedLoop._train_client
store.DiskStore.put = lambda self, c, s: (log["puts"].append(c), put(self, c, s))[1]
FederatedLoop._train_client = lambda self, *a: (log["trained"].append(a[3].id), train(self, *a))[1]  # (fabric, run, optimizer, client, ctx)
gather = fabric.all_gather
fabric.all_gather = lambda d: (log["gathered"].append(sum(v.numel() for v in d.values())), gather(d))[1]
results = {}
for cls in (FedAvg, FedProx, FedPer, FedMix, PFedMoE, Local, FedCoE, SCAFFOLD, Ditto, FedRep, Ensemble, IFCA, FedEM):
    name = cls.__name__
    log.update(trained=[], puts=[], gathered=[])
    torch.manual_seed(0)
    method = cls(num_classes=10, in_channels=1, image_size=8)
    loop = FederatedLoop(rounds=2, clients_per_round=4, batch_size=16, eval_every=2, progress=False,
                         client_store="disk", client_store_dir=f"{out}/{name}-{devices}")
    result = loop.fit(fabric, method, fed, seed=0)
    results[name] = {**{k: list(v) for k, v in log.items()}, "metrics": result.metrics,
                     "personal_numel": int(method.flat["personal"].numel())}
    if fabric.global_rank == 0:
        torch.save(result.server.cpu(), f"{out}/{name}-{devices}.pt")
with open(f"{out}/log-{devices}-{fabric.global_rank}.json", "w") as f:
    json.dump(results, f)
"""


def test_two_gloo_processes_match_one_for_every_method_and_write_only_their_own_clients(tmp_path):
    (tmp_path / "ddp.py").write_text(DDP)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}
    for devices in (1, 2):
        proc = subprocess.run([sys.executable, str(tmp_path / "ddp.py"), str(devices), str(tmp_path)], env=env,
                              capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "log-1-0.json").read_text())
    ranks = [json.loads((tmp_path / f"log-2-{r}.json").read_text()) for r in (0, 1)]
    assert len(one) == 13
    for name, single in one.items():
        for key in METRICS:
            assert ranks[0][name]["metrics"][key] == pytest.approx(single["metrics"][key], abs=1e-5), (name, key)
        torch.testing.assert_close(torch.load(tmp_path / f"{name}-2.pt"), torch.load(tmp_path / f"{name}-1.pt"),
                                   atol=1e-5, rtol=0, msg=name)
        trained = [set(r[name]["trained"]) for r in ranks]
        assert not trained[0] & trained[1] and sorted(trained[0] | trained[1]) == sorted(set(single["trained"]))
        numel = single["personal_numel"]
        for r in ranks:
            # each process writes exactly the states of the clients it trained, and no state crosses processes
            assert sorted(r[name]["puts"]) == (sorted(r[name]["trained"]) if numel else []), name
            if name == "Local":  # no shared part and no report: a personal state would dominate the all-gather
                assert max(r[name]["gathered"]) < numel, "personal states travel in the all-gather"


def test_eval_of_a_disk_store_run_reads_the_trained_runs_states(tmp_path, fit_argv, run_cli):
    code, _, err = run_cli(fit_argv("trained", "--method", "fedper", "--loop.client_store", "disk"))
    assert code == 0, err
    code, _, err = run_cli(["eval", str(tmp_path / "trained"), "--name", "again", "--run_dir", str(tmp_path / "again")])
    assert code == 0, err
    trained, again = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("trained", "again"))
    for key in METRICS:
        assert again[key] == trained[key], key
    assert not (tmp_path / "again" / "clients").exists()  # nothing written, nothing copied
