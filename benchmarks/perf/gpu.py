"""Batched clients on an accelerator, measured in one run (issue #30): about five minutes on one GPU.

    python benchmarks/perf/gpu.py --json gpu.json            # on a GPU machine
    python benchmarks/perf/gpu.py --quick --device cpu       # tiny sizes, seconds: checks the script itself

1. **throughput**: rounds/s of the default benchmark's CNN on MNIST-10k (its data and local training,
   with 100 clients so that a round can sample 50) and of the CIFAR-shape ResNet-18 on synthetic
   3x32x32 images, 50 clients a round, trained one after another (``client_batch`` 1) and 10 and 50
   side by side, in ``32-true`` and ``bf16-mixed``; each ratio batched/sequential is measured in
   this run on this device; mean GPU utilisation (``nvidia-smi``, sampled in a thread) per row.
2. **equality**: on the device, the largest absolute difference between the batched and the
   sequential updates (shared vectors, losses) of the first round's clients.
3. **cifar100_config**: ``benchmarks/cifar100_dir0.3.yaml``'s method, federation and local
   training on synthetic images of CIFAR-100's shapes and sizes (the machine needs no data): the
   time of a round and of an evaluation, and the wall time its 2,000 rounds extrapolate to.

Prints the table and ratios; ``--json PATH`` writes everything.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml
from lightning.fabric import Fabric

from fedcoe_bench.baselines.fedavg import FedAvg
from fedcoe_bench.data import FederatedData, MNIST10k, Synthetic
from fedcoe_bench.loop import FederatedLoop
from fedcoe_bench.models.backbones import ResNet18

ROOT = Path(__file__).resolve().parents[2]
CIFAR100_CONFIG = ROOT / "benchmarks" / "cifar100_dir0.3.yaml"
# This repository's CPU (2 shared cores) on the CIFAR-100 config: a ResNet-18 round, one evaluation (issue #30)
CPU_REFERENCE = {"round_time_s": [118, 136], "eval_time_s": 359}


class Utilisation:
    """Mean GPU utilisation (%) over a ``with`` block, from ``nvidia-smi`` sampled in a thread (None
    without a GPU or the tool)."""

    def __init__(self, device: torch.device, period_s: float = 0.25):
        self.enabled = device.type == "cuda" and shutil.which("nvidia-smi") is not None
        self.index = device.index or 0
        self.period_s, self.samples, self.mean = period_s, [], None

    def _sample(self, stop: threading.Event) -> None:
        query = ["nvidia-smi", f"--id={self.index}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not stop.wait(self.period_s):
            try:
                self.samples.append(float(subprocess.run(query, capture_output=True, text=True, timeout=5).stdout))
            except (ValueError, OSError, subprocess.SubprocessError):  # a missed sample is not worth a failed run
                pass

    def __enter__(self) -> Utilisation:
        if self.enabled:
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._sample, args=(self.stop,), daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.stop.set()
            self.thread.join()
            self.mean = statistics.fmean(self.samples) if self.samples else None


class NarrowResNet18(ResNet18):
    """ResNet-18 at width 8 (of 64), for ``--quick``: the script's path through the model, in seconds on a CPU."""

    def __init__(self, **kwargs):
        super().__init__(width=8, **kwargs)


QUICK_RESNET = f"{__name__}.NarrowResNet18"  # a class path build_backbone imports (this module, run as a script)


class Recording(FedAvg):
    """FedAvg that keeps the first round's first ``keep`` updates on the device, to compare runs."""

    keep = 10
    batchable = True  # it records what aggregate receives, no per-client state

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.first: list | None = None

    def aggregate(self, server, updates, *args, **kwargs):
        if self.first is None:
            self.first = [(u.client, u.loss, u.shared.clone()) for u in updates[: self.keep]]
        return super().aggregate(server, updates, *args, **kwargs)


def workloads(quick: bool, cache: str) -> list[dict]:
    """The two models, their federations and local training (tiny with ``quick``)."""
    if quick:
        small = lambda **kw: Synthetic(samples=800, test_samples=100, **kw)
        cnn_data = FederatedData(source=small(image_size=12), num_clients=30, cold_start_fraction=0.2, cache_dir=cache)
        res_data = FederatedData(source=small(num_classes=100, image_size=8, in_channels=3), num_clients=30,
                                 cold_start_fraction=0.2, min_size=20, cache_dir=cache)
        return [
            {"model": "cnn/synthetic-12", "data": cnn_data, "method": {"backbone": "cnn", "lr": 0.01, "momentum": 0.9},
             "shape": (1, 12, 10), "batch_size": 8},
            {"model": "resnet18-width8/synthetic-3x8x8", "data": res_data,
             "method": {"backbone": QUICK_RESNET, "lr": 0.005, "momentum": 0.9}, "shape": (3, 8, 100), "batch_size": 10},
        ]
    cnn_data = FederatedData(source=MNIST10k(), scheme="dirichlet", alpha=0.3, num_clients=100, cold_start_fraction=0.2,
                             train_fraction=0.8, min_size=10, cache_dir=cache)  # the default benchmark's, 100 clients
    res_data = FederatedData(source=Synthetic(num_classes=100, samples=20000, test_samples=1000, image_size=32,
                                              in_channels=3), num_clients=100, cold_start_fraction=0.2, min_size=20,
                             cache_dir=cache)  # 200 images a client, CIFAR-100's shapes
    return [
        {"model": "cnn/mnist10k", "data": cnn_data, "method": {"backbone": "cnn", "lr": 0.01, "momentum": 0.9},
         "shape": (1, 28, 10), "batch_size": 32},
        {"model": "resnet18/synthetic-3x32x32", "data": res_data,
         "method": {"backbone": "resnet18", "lr": 0.005, "momentum": 0.9}, "shape": (3, 32, 100), "batch_size": 10},
    ]


def fabric_for(device: torch.device, precision: str) -> Fabric:
    return Fabric(accelerator="cuda" if device.type == "cuda" else "cpu", devices=1, precision=precision)


def timed_fit(fabric: Fabric, work: dict, fed, client_batch: int, clients: int, rounds: int, warmup: int,
              device: torch.device) -> tuple[dict, Recording]:
    """Rounds/s of ``rounds`` FedAvg rounds after ``warmup`` ones, from the loop's own round times."""
    channels, side, classes = work["shape"]
    torch.manual_seed(0)  # the same initial model in every run of a workload
    method = Recording(num_classes=classes, in_channels=channels, image_size=side, **work["method"])
    loop = FederatedLoop(rounds=warmup + rounds, clients_per_round=clients, local_epochs=1,
                         batch_size=work["batch_size"], eval_every=warmup + rounds, checkpoint_every=0,
                         eval_clients=1, progress=False, cold_start_steps=0, client_batch=client_batch)
    with Utilisation(device) as gpu:
        history = loop.fit(fabric, method, fed, seed=0).history
    times = [row["round_time"] for row in history[warmup:]]
    return {"rounds_per_s": 1 / statistics.median(times), "round_time_s": times, "gpu_util_pct": gpu.mean}, method


def difference(batched: Recording, sequential: Recording) -> dict:
    """Largest absolute differences of the first round's updates, batched vs sequential."""
    pairs = list(zip(batched.first, sequential.first))
    assert all(b[0] == s[0] for b, s in pairs), "the runs sampled different clients"
    shared = max(float((b[2].float() - s[2].float()).abs().max()) for b, s in pairs)
    scale = max(float(s[2].float().abs().max()) for _, s in pairs)
    return {"max_abs_diff": shared, "max_abs_value": scale, "max_loss_diff": max(abs(b[1] - s[1]) for b, s in pairs)}


def throughput(device: torch.device, quick: bool, cache: str, precisions: list[str], batches: list[int],
               rounds: int, warmup: int) -> tuple[list[dict], list[dict]]:
    rows, equality = [], []
    clients = max(batches)
    for work in workloads(quick, cache):
        fed = work["data"].setup(seed=0, device=device)
        for precision in precisions:
            fabric = fabric_for(device, precision)
            base, reference = None, None
            for client_batch in batches:
                row, method = timed_fit(fabric, work, fed, client_batch, clients, rounds, warmup, device)
                if client_batch == 1:
                    base, reference = row["rounds_per_s"], method
                row = {"model": work["model"], "precision": precision, "client_batch": client_batch,
                       "clients_per_round": clients, **row,
                       "ratio_to_sequential": row["rounds_per_s"] / base if base else None}
                rows.append(row)
                print(f"{row['model']:>28} {precision:>10} client_batch {client_batch:>3}: "
                      f"{row['rounds_per_s']:8.3f} rounds/s  {row['ratio_to_sequential'] or 0:5.2f}x sequential  "
                      f"GPU {row['gpu_util_pct'] if row['gpu_util_pct'] is not None else 'n/a'}%", flush=True)
                if client_batch > 1 and reference is not None:
                    diff = {"model": work["model"], "precision": precision, "client_batch": client_batch,
                            **difference(method, reference)}
                    equality.append(diff)
                    print(f"{'':>28} batched - sequential: max |update diff| {diff['max_abs_diff']:.2e} "
                          f"(of values up to {diff['max_abs_value']:.2e}), max |loss diff| {diff['max_loss_diff']:.2e}",
                          flush=True)
    return rows, equality


def cifar100_config(device: torch.device, quick: bool, cache: str, precision: str, batches: list[int]) -> dict:
    """The CIFAR-100 config's round and evaluation time on synthetic images of its shapes, and its extrapolated
    wall time: ``rounds`` rounds plus an evaluation every ``eval_every`` (the last with the fine-tuned cold start)."""
    config = yaml.safe_load(CIFAR100_CONFIG.read_text())
    data, loop_cfg, method_cfg = config["data"], config["loop"], config["method"]["init_args"]
    side, samples, test = (8, 800, 100) if quick else (32, 50000, 10000)
    source = Synthetic(num_classes=100, samples=samples, test_samples=test, image_size=side, in_channels=3)
    federation = FederatedData(source=source, scheme=data["scheme"], alpha=data["alpha"],
                               num_clients=data["num_clients"], cold_start_fraction=data["cold_start_fraction"],
                               min_size=data["min_size"] if not quick else 4, cache_dir=cache)
    fed = federation.setup(seed=config["seed"], device=device)
    fabric = fabric_for(device, precision)
    out = {"config": str(CIFAR100_CONFIG.relative_to(ROOT)), "precision": precision, "images": f"synthetic 3x{side}x{side}",
           "rounds": loop_cfg["rounds"], "eval_every": loop_cfg["eval_every"], "cpu_reference": CPU_REFERENCE, "runs": []}
    for client_batch in sorted({1, *[b for b in batches if b <= loop_cfg["clients_per_round"]]}):
        torch.manual_seed(0)
        method = FedAvg(num_classes=100, in_channels=3, image_size=side,
                        **{**method_cfg, **({"backbone": QUICK_RESNET} if quick else {})})
        loop = FederatedLoop(rounds=3, clients_per_round=loop_cfg["clients_per_round"], local_epochs=loop_cfg["local_epochs"],
                             batch_size=loop_cfg["batch_size"], eval_every=2, checkpoint_every=0, progress=False,
                             cold_start_steps=2 if quick else 10, client_batch=client_batch)
        history = loop.fit(fabric, method, fed, seed=config["seed"]).history
        round_time = statistics.median(row["round_time"] for row in history[1:])  # round 1 warms up
        evaluation, last = history[1]["eval_time"], history[2]["eval_time"]  # plain; with fine-tuning
        evaluations = loop_cfg["rounds"] // loop_cfg["eval_every"]
        wall = loop_cfg["rounds"] * round_time + evaluations * evaluation + (last - evaluation)
        run = {"client_batch": client_batch, "round_time_s": round_time, "eval_time_s": evaluation,
               "final_eval_time_s": last, "extrapolated_wall_time_h": wall / 3600}
        out["runs"].append(run)
        print(f"cifar100 config ({precision}, client_batch {client_batch}): round {round_time:.2f} s, evaluation "
              f"{evaluation:.2f} s (final, with fine-tuning, {last:.2f} s); {loop_cfg['rounds']} rounds ~ "
              f"{wall / 3600:.2f} h (CPU: rounds {CPU_REFERENCE['round_time_s']} s, evaluation "
              f"{CPU_REFERENCE['eval_time_s']} s)", flush=True)
    sequential = out["runs"][0]
    out.update({k: sequential[k] for k in ("round_time_s", "eval_time_s", "extrapolated_wall_time_h")})
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds, also on CPU): checks the script")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda where there is one)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per row (default 3; quick 1)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    batches = [1, 10] if args.quick else [1, 10, 50]
    precisions = ["32-true", "bf16-mixed"]
    rounds = args.rounds or (1 if args.quick else 3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedbench-gpu-") as cache:
        rows, equality = throughput(device, args.quick, cache, precisions, batches, rounds, warmup=1)
        config = cifar100_config(device, args.quick, cache, "bf16-mixed", batches)
    result = {"device": name, "torch": torch.__version__, "quick": args.quick, "throughput": rows,
              "equality": equality, "cifar100_config": config, "wall_time_s": time.perf_counter() - t0}
    print(f"done in {result['wall_time_s']:.0f} s", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
