"""Performance benchmark: ratios measured in one process and one run (``python -m fedcoe_bench.perf``).

1. loop / tight-loop training throughput for the FedAvg CNN on mnist10k, both in the default memory
   format (target >= 0.90); 1c. the loop in channels-last (the CPU default) vs a bare loop in the
   default format (target >= 1.10) and vs a bare channels-last loop (target >= 0.95), in full batches
   and in the clients' own batches;
2. evaluation cost relative to a training round (target <= 0.5) and the same at a bare inference
   loop's rate over its images, round time at 100, 1,000 and
   10,000 clients with the same samples per round (target: flat, <= 1.2x), and the time of an
   evaluation of 200 sampled clients at those sizes (target: flat);
3. bytes per stored client state for FedPer and FedCoE (what 10,000 clients cost);
4. FedCoE (K = 4) vs FedAvg training round time on mnist10k (target <= 6x);
5. with ``--ddp``: a FedAvg round with 20 sampled clients on 2 CPU processes vs 1;
6. start-up: seconds to ``fedbench --help`` and to the first round of the default benchmark
   (with ``--baseline DIR``, also another checkout's, alternated, and the ratios);
7. with ``--baseline DIR``: the whole default benchmark's wall time, this checkout / that one.

``--scale`` measures instead how memory and checkpoints grow with the federation (the ``disk``
client-state store; see :func:`scale`).

Timings on a shared 2-core machine are noisy: each figure is the median of several repeats.

Why one long module: every figure of ``benchmarks/perf/RESULTS.md`` is one function here, measured
against the same bare loops; split, each half would re-import and re-state them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric

from baselines import FedAvg, FedPer
from fedcoe_bench.data import FederatedData, Synthetic
from fedcoe_bench.fedcoe import FedCoE
from fedcoe_bench.loop import FederatedLoop, sample_clients
from fedcoe_bench.runs import RunDir, atomic_open
from fedcoe_bench.store import DiskStore


def _fabric(callbacks: list | None = None) -> Fabric:
    return Fabric(accelerator="cpu", devices=1, callbacks=callbacks)


def _cache() -> str:
    return tempfile.mkdtemp(prefix="fedbench-perf-")


def _tight(fed, batch_sizes: list[int], channels_last: bool = False) -> float:
    """Samples/s of a bare loop: one model, SGD with momentum, pre-normalised batches of these sizes
    (model and batches in ``torch.channels_last`` if asked)."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = FedAvg().to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = fed.prepare(fed.pool_x).contiguous(memory_format=fmt), fed.pool_y
    t0, i = time.perf_counter(), 0
    for b in batch_sizes:
        i = 0 if i + b > len(y) else i
        loss = F.cross_entropy(model(x[i : i + b]), y[i : i + b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        i += b
    return sum(batch_sizes) / (time.perf_counter() - t0)


def _loop_run(fed, rounds: int, channels_last: bool) -> tuple[float, list[int]]:
    """Training samples/s of one FedAvg run of the loop (round 1, the warm-up, left out) and the
    batch sizes its clients formed in the rounds measured."""
    loop = FederatedLoop(rounds=rounds, eval_every=10**6, checkpoint_every=0, progress=False,
                         channels_last=channels_last)
    torch.manual_seed(0)
    result = loop.fit(_fabric(), FedAvg(), fed, seed=0)
    rows = result.history[1:]
    sps = sum(r["samples_per_s"] * r["round_time"] for r in rows) / sum(r["round_time"] for r in rows)
    batches = [min(32, c.num_train - i) for r in range(1, rounds)
               for c in (fed.clients[j] for j in sample_clients(0, r, len(fed.clients), loop.clients_per_round))
               for i in range(0, c.num_train, 32)]
    return sps, batches


def loop_vs_tight(rounds: int, repeats: int) -> dict:
    """Samples/s of the federated loop (training only) over samples/s of a bare training loop that
    trains the same model on as many samples with the same optimizer, (a) in full batches of 32,
    (b) in the batches the clients actually form (each client's last batch is partial); both in the
    default memory format, so that the ratio is the loop's own cost."""
    fed = FederatedData(cache_dir=_cache()).setup(0)
    results = []
    for _ in range(repeats):
        loop_sps, client_batches = _loop_run(fed, rounds, channels_last=False)
        full = [32] * (sum(client_batches) // 32)
        results.append((loop_sps, _tight(fed, full), _tight(fed, client_batches)))
    med = lambda j: statistics.median(r[j] for r in results)
    return {"loop_samples_per_s": med(0), "tight_full_batches_samples_per_s": med(1),
            "tight_client_batches_samples_per_s": med(2),
            "ratio_full_batches": statistics.median(r[0] / r[1] for r in results),
            "ratio_client_batches": statistics.median(r[0] / r[2] for r in results)}


def channels_last_speedup(rounds: int, repeats: int) -> dict:
    """Samples/s of the loop in its CPU default, channels-last, over a bare loop in full batches of 32
    (a) in the default memory format (what channels-last gains), (b) in channels-last (what the loop
    costs on top), and (c) over a bare channels-last loop in the batches the clients form, whose last
    batch is partial: (b) without the protocol's partial batches, i.e. the loop's own cost. The four
    alternate ``repeats`` times; each ratio is the median over repeats."""
    fed = FederatedData(cache_dir=_cache()).setup(0)
    results = []
    for _ in range(repeats):
        loop_sps, client_batches = _loop_run(fed, rounds, channels_last=True)
        full = [32] * (sum(client_batches) // 32)
        results.append((loop_sps, _tight(fed, full), _tight(fed, full, channels_last=True),
                        _tight(fed, client_batches, channels_last=True)))
    med = lambda j: statistics.median(r[j] for r in results)
    return {"loop_channels_last_samples_per_s": med(0), "bare_default_samples_per_s": med(1),
            "bare_channels_last_samples_per_s": med(2), "bare_channels_last_client_batches_samples_per_s": med(3),
            "loop_vs_bare_default": statistics.median(r[0] / r[1] for r in results),
            "loop_vs_bare_channels_last": statistics.median(r[0] / r[2] for r in results),
            "loop_vs_bare_channels_last_client_batches": statistics.median(r[0] / r[3] for r in results)}


def _inference(fed, images: int, batch_size: int = 256) -> float:
    """Images/s of a bare inference loop: the FedAvg CNN in channels-last, ``no_grad``, softmax, over
    ``images`` pool images in batches of ``batch_size`` (the loop's ``eval_batch_size``)."""
    torch.manual_seed(0)
    model = FedAvg().to(memory_format=torch.channels_last).eval()
    x = fed.pool_x[torch.arange(images) % len(fed.pool_x)]
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, images, batch_size):
            model(fed.prepare(x[i : i + batch_size]).contiguous(memory_format=torch.channels_last)).softmax(-1)
    return images / (time.perf_counter() - t0)


def eval_images(fed) -> int:
    """Images one FedAvg evaluation predicts: the global test and server validation splits, every
    training client's local test and validation splits, and every cold-start client's test,
    validation and train split (the label-prior adapter's unlabeled inputs)."""
    local = sum(len(c.test) + len(c.val) for c in fed.clients)
    cold = sum(len(c.test) + len(c.val) + len(c.train) for c in fed.new_clients)
    return len(fed.test_y) + len(fed.val_y) + local + cold


def eval_cost(repeats: int) -> dict:
    """Seconds of one evaluation (all three metrics, as the loop runs it) over seconds of one training
    round, medians over one run of ``2 * repeats + 1`` rounds evaluated every 2 (round 1 left out).

    Also what an evaluation is made of: the images it predicts, its images/s over a bare inference
    loop's on as many images (run after each evaluation-bearing run; 1 means no overhead beyond the
    forward passes), and ``ratio_at_bare_inference``, the ratio an evaluation would have if it predicted
    its images at the bare loop's rate: what a faster evaluation of the same images could approach.
    """
    fed = FederatedData(cache_dir=_cache()).setup(0)
    images = eval_images(fed)
    loop = FederatedLoop(rounds=2 * repeats + 1, eval_every=2, checkpoint_every=0, progress=False,
                         cold_start_steps=0)  # the fine-tuned cold start runs at the last evaluation only
    result = loop.fit(_fabric(), FedAvg(), fed, seed=0)
    bare = statistics.median(_inference(fed, images) for _ in range(repeats))
    train = statistics.median(r["round_time"] for r in result.history[1:])
    train_samples = statistics.median(r["samples_per_s"] * r["round_time"] for r in result.history[1:])
    ev = statistics.median(r["eval_time"] for r in result.history if "eval_time" in r)
    return {"train_round_s": train, "eval_s": ev, "ratio": ev / train, "images_per_eval": images,
            "train_samples_per_round": train_samples, "eval_images_per_s": images / ev,
            "bare_inference_images_per_s": bare, "eval_vs_bare_inference": images / ev / bare,
            "ratio_at_bare_inference": images / bare / train}


def _scaled_fed(n: int, per_client: int, cold_start_fraction: float = 0.0):
    src = Synthetic(samples=n * per_client, test_samples=200, image_size=12)
    return FederatedData(source=src, scheme="iid", num_clients=n, cold_start_fraction=cold_start_fraction,
                         min_size=2, cache_dir=_cache()).setup(0)


def client_scaling(counts: list[int], per_client: int, rounds: int) -> dict:
    """Median training round time at each client count, with ``per_client`` samples per client and
    10 clients per round, so that every setting trains the same number of samples per round."""
    out = {}
    for n in counts:
        fed = _scaled_fed(n, per_client)
        loop = FederatedLoop(rounds=rounds, clients_per_round=10, eval_every=10**6, checkpoint_every=0, progress=False)
        result = loop.fit(_fabric(), FedPer(in_channels=1, image_size=12), fed, seed=0)
        out[n] = statistics.median(r["round_time"] for r in result.history[1:])
    base = out[counts[0]]
    return {"round_s": out, "ratio_to_first": {n: t / base for n, t in out.items()}}


def sampled_eval_scaling(counts: list[int], per_client: int, rounds: int, sample: int = 200) -> dict:
    """Median evaluation time with ``loop.eval_clients = sample`` at each client count large enough to
    fill the sample (FedPer, 20% cold-start clients, 10 clients per round, every round evaluated,
    round 1 left out): flat if evaluation visits the sample only."""
    out = {}
    for n in (n for n in counts if int(0.2 * n) >= sample):
        fed = _scaled_fed(n, per_client, cold_start_fraction=0.2)
        loop = FederatedLoop(rounds=rounds, clients_per_round=10, eval_every=1, checkpoint_every=0,
                             progress=False, eval_clients=sample)
        result = loop.fit(_fabric(), FedPer(in_channels=1, image_size=12), fed, seed=0)
        out[n] = statistics.median(r["eval_time"] for r in result.history[1:])
    base = out[min(out)] if out else float("nan")
    return {"eval_s": out, "ratio_to_first": {n: t / base for n, t in out.items()}}


def state_bytes(rounds: int) -> dict:
    """Bytes of the personal state the loop stores per client (FedPer's head; FedCoE's local
    expert and fusion gate), measured on the tensors actually stored."""
    fed = FederatedData(cache_dir=_cache()).setup(0)
    out = {}
    for name, method in (("fedper", FedPer()), ("fedcoe", FedCoE())):
        loop = FederatedLoop(rounds=rounds, eval_every=10**6, checkpoint_every=0, progress=False)
        result = loop.fit(_fabric(), method, fed, seed=0)
        sizes = [t.numel() * t.element_size() for t in result.store.states.values()]
        out[name] = {"clients_stored": len(sizes), "bytes_per_client": statistics.mean(sizes),
                     "for_10000_clients_MiB": statistics.mean(sizes) * 10_000 / 2**20}
    return out


def fedcoe_vs_fedavg(rounds: int, repeats: int) -> dict:
    """Wall time of a FedCoE run (K = 4) over a FedAvg run's: same clients, ``rounds`` rounds and one
    evaluation at the end, as the benchmark does every 10 rounds. The two runs alternate
    ``repeats`` times and the ratio is the median of the pairs, so that a change in the machine's
    load hits both methods alike."""
    fed = FederatedData(cache_dir=_cache()).setup(0)
    times: dict[str, list[float]] = {"fedavg": [], "fedcoe": []}
    for _ in range(repeats):
        for name, method in (("fedavg", FedAvg()), ("fedcoe", FedCoE())):
            loop = FederatedLoop(rounds=rounds, eval_every=rounds, checkpoint_every=0, progress=False)
            t0 = time.perf_counter()
            loop.fit(_fabric(), method, fed, seed=0)
            times[name].append(time.perf_counter() - t0)
    ratios = [c / a for a, c in zip(times["fedavg"], times["fedcoe"])]
    return {"fedavg_run_s": statistics.median(times["fedavg"]), "fedcoe_run_s": statistics.median(times["fedcoe"]),
            "ratio": statistics.median(ratios), "ratios": ratios}


def ddp_vs_single(rounds: int) -> dict:
    """Median training round time of FedAvg with 20 clients per round: 2 gloo processes vs 1."""
    times = {}
    for devices in (1, 2):
        run = tempfile.mkdtemp(prefix="fedbench-perf-ddp-")
        cmd = [sys.executable, "-m", "fedcoe_bench.cli", "fit", "--config",
               str(Path(__file__).parents[2] / "benchmarks" / "mnist10k_dir0.3.yaml"),
               "--loop.rounds", str(rounds), "--loop.clients_per_round", "20", "--loop.eval_every", "1000",
               "--loop.checkpoint_every", "0", "--loop.progress", "false", "--run_dir", run,
               "--fabric.accelerator", "cpu", "--fabric.devices", str(devices)]
        if devices > 1:
            cmd += ["--fabric.strategy", "ddp"]
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "CI": "1"})
        rows = [line.split(",") for line in (Path(run) / "metrics.csv").read_text().splitlines()]
        col = rows[0].index("round_time")
        times[devices] = statistics.median(float(r[col]) for r in rows[2:])
    return {"round_s_1proc": times[1], "round_s_2proc": times[2], "speedup_2proc": times[1] / times[2]}


SCALE_METHODS = {"fedavg": FedAvg, "fedper": FedPer, "fedcoe": FedCoE}
# Client states put in the store before training: FedPer every training client's, FedCoE up to 1,000.
SCALE_STORED = {"fedavg": 0, "fedper": 10**9, "fedcoe": 1000}


def _rss_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in KiB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
    return int(line.split()[1])


class CheckpointTimes:
    """A Fabric callback: the seconds of each checkpoint the loop saves (the store's flush and the write)."""

    def __init__(self):
        self.seconds: list[float] = []

    def on_checkpoint(self, rounds_done: int, seconds: float) -> None:
        self.seconds.append(seconds)


def scale_point(method: str, clients: int, rounds: int, workdir: str) -> dict:
    """One federation size, measured in this process (``scale`` starts a fresh one per size).

    ``clients`` clients (10% cold-start) of 10 synthetic 8x8 images each (100,000 clients: a pool of
    1,000,000 images, 64 MB, which the peak RSS includes), 10 per round, the ``disk`` store in
    ``workdir``, ``SCALE_STORED[method]`` client states put in it before round 1, a checkpoint every
    round (flush of the store + write; the median after the first) and one evaluation at the end
    with ``loop.eval_clients`` 200 (evaluating every client would time the federation, not the
    store). ``peak_rss_MiB`` is the process's peak; ``fit_peak_rss_MiB`` the peak from just
    before training on (the store, training, evaluation and checkpoints, not building the federation).
    """
    work = Path(workdir)
    fed = FederatedData(source=Synthetic(samples=clients * 10, test_samples=200, image_size=8), scheme="iid",
                        num_clients=clients, cold_start_fraction=0.1, min_size=2,
                        cache_dir=str(work / "cache")).setup(0)
    torch.manual_seed(0)
    model = SCALE_METHODS[method](in_channels=1, image_size=8)
    model.flatten_parameters()
    run = RunDir(work / "run")
    run.prepare()
    loop = FederatedLoop(rounds=rounds, clients_per_round=10, eval_every=rounds, checkpoint_every=1,
                         progress=False, client_store="disk", eval_clients=200)
    stored = min(SCALE_STORED[method], len(fed.clients)) if model.flat["personal"].numel() else 0
    resume = None
    if stored:  # a federation that already trained: states in the store, as a round-0 checkpoint
        store = DiskStore(run.path / "clients", model.flat["personal"].numel())
        gen = torch.Generator().manual_seed(1)
        for c in fed.clients[:stored]:
            store.put(c.id, model.flat["personal"] + 0.01 * torch.randn(model.flat["personal"].shape, generator=gen))
        store.unsynced.clear()  # filling needs no durability, and 100,000 fsyncs would dominate the run
        resume = {"round": 0, "server": model.flat["shared"].clone(), "method": model.state_dict(), "history": [],
                  "store": store.flush()}
    checkpoints = CheckpointTimes()
    os.sync()  # the partition cache and the filled store are written back now, not during a timed fsync
    before, setup_peak = _rss_kib("VmRSS"), _rss_kib("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (ru_maxrss follows it): the peak from here on
    result = loop.fit(_fabric(callbacks=[checkpoints]), model, fed, seed=0, run_dir=run, resume_state=resume)
    rows = result.history[1:]
    return {"clients": clients, "stored_states": stored,
            "peak_rss_MiB": max(setup_peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024,
            "rss_before_fit_MiB": before / 1024, "fit_peak_rss_MiB": _rss_kib("VmHWM") / 1024,
            "round_s": statistics.median(r["round_time"] for r in rows),
            "checkpoint_s": statistics.median(checkpoints.seconds[1:]),
            "eval_s": result.history[-1]["eval_time"],
            "checkpoint_bytes": run.checkpoint_path.stat().st_size,
            "store_bytes": DiskStore(run.path / "clients", 0).disk_bytes()}


def checkpoint_cost(clients: list[int], repeats: int = 40) -> dict:
    """Seconds of one checkpoint's own work with the ``disk`` store (10 client states put, the store
    flushed, a checkpoint of FedPer's size written atomically) when ``clients[0]`` vs each other
    size of federation has states in the store, alternated ``repeats`` times; median paired ratios.
    :func:`scale` times the same inside whole runs, where the write-back of the states filled before
    round 1 makes these few-millisecond fsyncs noisy."""
    work = Path(tempfile.mkdtemp(prefix="fedbench-perf-checkpoint-"))
    blob = {"server": torch.zeros(360_000), "history": [{"round": i, "train_loss": 0.1} for i in range(30)]}
    stores = {}
    for n in clients:
        stores[n] = DiskStore(work / str(n), 1_300)
        stores[n].pending.update({c: 0 for c in range(n)})  # every client has a state (no file needed to flush)
        stores[n].flush()
    times: dict[int, list[float]] = {n: [] for n in clients}
    state = torch.zeros(1_300)
    for rep in range(repeats):
        for n, store in stores.items():
            for c in range(10):
                store.put((rep * 10 + c) % n, state)
            t0 = time.perf_counter()
            position = store.flush()
            with atomic_open(work / f"checkpoint{n}.pt") as f:
                torch.save({**blob, "store": position}, f)
            times[n].append(time.perf_counter() - t0)
    base = times[clients[0]]
    return {"checkpoint_s": {n: statistics.median(t) for n, t in times.items()},
            "ratio_to_first": {n: statistics.median(a / b for a, b in zip(t, base)) for n, t in times.items()}}


def scale(methods: list[str], counts: list[int], rounds: int) -> dict:
    """Peak RSS, round, checkpoint and evaluation time at each federation size, relative to the first,
    and checkpoint and store bytes; each point in a fresh process (``ru_maxrss`` is per process)."""
    out: dict = {}
    for method in methods:
        points = {}
        for n in counts:
            with tempfile.TemporaryDirectory(prefix="fedbench-perf-scale-") as work:
                code = (f"import json; from fedcoe_bench.perf import scale_point; "
                        f"print(json.dumps(scale_point({method!r}, {n}, {rounds}, {work!r})))")
                res = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                                     env={**os.environ, "CI": "1"})
            points[n] = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"  {method} {n}: {json.dumps(points[n], default=lambda v: round(v, 4))}", flush=True)
        base = points[counts[0]]
        ratio = lambda key: {n: p[key] / base[key] if p[key] and base[key] else None for n, p in points.items()}
        out[method] = {"points": points, "peak_rss_ratio": ratio("peak_rss_MiB"),
                       "fit_peak_rss_ratio": ratio("fit_peak_rss_MiB"), "round_time_ratio": ratio("round_s"),
                       "checkpoint_time_ratio": ratio("checkpoint_s"), "eval_time_ratio": ratio("eval_s")}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 10000])
    p.add_argument("--ddp", action="store_true", help="also compare 2 gloo processes with 1")
    p.add_argument("--json", type=str, default=None, help="also write the results here")
    p.add_argument("--baseline", type=str, default=None,
                   help="root of another checkout (e.g. a git worktree of an older commit) to compare start-up and, "
                        "as row 7, the whole default benchmark with")
    p.add_argument("--scale", action="store_true", help="only: memory and checkpoint cost vs number of clients")
    p.add_argument("--scale-clients", type=int, nargs="+", default=[100, 1000, 10000, 100000])
    p.add_argument("--scale-methods", nargs="+", default=list(SCALE_METHODS), choices=list(SCALE_METHODS))
    args = p.parse_args(argv)
    results = {"machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"}
    print(results["machine"], flush=True)
    if args.scale:
        results["scale"] = scale(args.scale_methods, args.scale_clients, args.rounds)
        print(json.dumps(results["scale"], default=lambda v: round(v, 4)), flush=True)
        results["checkpoint_cost"] = checkpoint_cost(args.scale_clients)
        print("checkpoint alone:", json.dumps(results["checkpoint_cost"], default=lambda v: round(v, 4)), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=float))
        return
    steps = [("1. loop / tight loop (FedAvg CNN, mnist10k)", lambda: loop_vs_tight(args.rounds, args.repeats)),
             ("1c. channels-last loop / bare loops (FedAvg CNN, mnist10k)",
              lambda: channels_last_speedup(args.rounds, args.repeats)),
             ("2a. evaluation / training round", lambda: eval_cost(args.repeats)),
             ("2b. round time vs number of clients", lambda: client_scaling(args.clients, 20, args.rounds)),
             ("2c. evaluation of 200 sampled clients vs number of clients",
              lambda: sampled_eval_scaling(args.clients, 20, 3)),
             ("3. stored personal state per client", lambda: state_bytes(2)),
             ("4. FedCoE (K=4) / FedAvg run wall time", lambda: fedcoe_vs_fedavg(10, args.repeats))]
    if args.ddp:
        steps.append(("5. 2 processes vs 1 (20 clients per round)", lambda: ddp_vs_single(args.rounds)))
    steps.append(("6. start-up: fedbench --help, time to the first round", lambda: startup(args.repeats, args.baseline)))
    if args.baseline:
        steps.append(("7. the whole default benchmark, this / baseline", lambda: whole_benchmark(args.repeats, args.baseline)))
    for title, fn in steps:
        res = fn()
        results[title] = res
        print(f"{title}: {json.dumps(res, default=lambda v: round(v, 4))}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))


# Run in a fresh interpreter: stops `fedbench fit` where the loop starts, printing the seconds since
# the epoch at that moment (everything before is start-up: imports, parsing, data, method, Fabric).
# It replaces FederatedLoop.fit rather than listening to a callback because it also times the older
# checkouts a run compares against, which have no callbacks to listen to.
_UNTIL_FIRST_ROUND = """
import sys, time
from fedcoe_bench.loop import FederatedLoop
def first_round(self, *args, **kwargs):
    print(time.time(), flush=True)
    sys.exit(0)
FederatedLoop.fit = first_round
from fedcoe_bench.cli import main
main(sys.argv[1:])
"""


def _fedbench_seconds(root: str, argv: list[str], work: str, until_first_round: bool = False) -> float:
    """Wall seconds of one ``fedbench`` process of the checkout at ``root`` (cwd ``work``, so that neither
    checkout's ``baselines/`` shadows the other), to its exit or, with ``until_first_round``, to the
    start of the first round."""
    env = {**os.environ, "PYTHONPATH": f"{root}/src{os.pathsep}{root}", "CI": "1"}
    cmd = [sys.executable, "-c", _UNTIL_FIRST_ROUND, *argv] if until_first_round else \
        [sys.executable, "-m", "fedcoe_bench.cli", *argv]
    t0 = time.time()
    out = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, check=True).stdout
    return (float(out.strip().splitlines()[-1]) if until_first_round else time.time()) - t0


def _alternated(runs: dict[str, tuple[str, list[str], bool]], repeats: int, work: str) -> dict[str, list[float]]:
    """``runs``: name -> (checkout root, fedbench argv, until_first_round); each run once per repeat, in
    turn, after one pass that caches partitions and warms the file cache (not counted)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(repeats + 1):
        for name, (root, argv, first) in runs.items():
            seconds = _fedbench_seconds(root, [a.replace("{name}", name) for a in argv], work, first)
            if i:
                times[name].append(seconds)
    return times


def _default_fit(work: str) -> list[str]:
    config = Path(__file__).parents[2] / "benchmarks" / "mnist10k_dir0.3.yaml"
    return ["fit", "--config", str(config), "--data.cache_dir", os.path.join(work, "partitions"), "--overwrite", "true",
            "--run_dir", os.path.join(work, "{name}")]


def startup(repeats: int, baseline: str | None = None) -> dict:
    """Seconds from starting a process to (a) the end of ``fedbench --help`` and (b) the first round of
    ``fedbench fit`` on the default benchmark (``benchmarks/mnist10k_dir0.3.yaml``, partition cached),
    median of ``repeats``. With ``baseline`` (the root of another checkout, e.g. a ``git worktree``
    of an older commit) the same for it, alternated run by run, and the ratios this / baseline."""
    roots = {"this": str(Path(__file__).parents[2])} | ({"baseline": baseline} if baseline else {})
    work = tempfile.mkdtemp(prefix="fedbench-perf-startup-")
    runs = {}
    for name, root in roots.items():
        runs[f"{name}:help_s"] = (root, ["--help"], False)
        runs[f"{name}:first_round_s"] = (root, _default_fit(work), True)
    times = _alternated(runs, repeats, work)
    out = {name: {k: statistics.median(times[f"{name}:{k}"]) for k in ("help_s", "first_round_s")} for name in roots}
    if baseline:
        out["ratio"] = {k: statistics.median(a / b for a, b in zip(times[f"this:{k}"], times[f"baseline:{k}"]))
                        for k in ("help_s", "first_round_s")}
    return out


def whole_benchmark(repeats: int, baseline: str) -> dict:
    """Wall seconds of the whole default benchmark (``fedbench fit --config benchmarks/mnist10k_dir0.3.yaml``:
    process start to exit, 30 rounds and 3 evaluations) in this checkout and in ``baseline``,
    alternated, median of ``repeats``, and the median ratio this / baseline. This checkout also runs
    with ``--data.val_fraction 0``, which trains on the same share of each client's data as a
    checkout from before validation splits existed (the default sets 10% aside)."""
    this = str(Path(__file__).parents[2])
    work = tempfile.mkdtemp(prefix="fedbench-perf-whole-")
    fit = _default_fit(work)
    times = _alternated({"this": (this, fit, False), "this_val0": (this, [*fit, "--data.val_fraction", "0"], False),
                         "baseline": (baseline, fit, False)}, repeats, work)
    out = {name: statistics.median(t) for name, t in times.items()}
    for name in ("this", "this_val0"):
        out[f"ratio_{name}"] = statistics.median(a / b for a, b in zip(times[name], times["baseline"]))
    return out


if __name__ == "__main__":
    main()
