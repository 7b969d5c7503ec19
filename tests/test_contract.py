"""The method contract holds for a user's method: server state sized by ``setup_server`` survives a
SIGKILL, buffers follow the shared / personal / server-only rule, Fabric's precision reaches the
parameters and the inputs, and ``backbone`` takes a user's network."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.fabric import Fabric
from helpers import build, python_block, read_summary
from torch import nn

from fedcoe_bench.baselines import FedAvg, FedPer, PFedMoE
from fedcoe_bench.errors import ConfigError, MethodError
from fedcoe_bench.fedcoe import FedCoE
from fedcoe_bench.loop import FederatedLoop, FitResult, sample_clients
from fedcoe_bench.models import Backbone

REPO = Path(__file__).resolve().parents[1]
SEED, PER_ROUND = 0, 3
DIMS = {"num_classes": 10, "in_channels": 1, "image_size": 12}


class BNNet(Backbone):
    """conv -> BatchNorm -> ReLU -> pool: a user's backbone with running statistics."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, width: int = 8):
        body = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
        super().__init__(body, width, num_classes)


BN = f"{__name__}.BNNet"  # its class path


def fit(method, fed, rounds=1, precision="32-true") -> FitResult:
    # no fine-tuned cold start: its new clients would call the recording hooks below too (tests/test_finetune.py)
    loop = FederatedLoop(rounds=rounds, clients_per_round=PER_ROUND, checkpoint_every=0, progress=False,
                         cold_start_steps=0)
    return loop.fit(Fabric(accelerator="cpu", devices=1, precision=precision), method, fed, SEED)


def one_line_error(run_cli, argv) -> str:
    rc, _, err = run_cli(argv)
    lines = err.strip().splitlines()
    assert rc != 0 and len(lines) == 1 and lines[0].startswith("fedbench: error:") and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------- setup_server and the context: the README's FedDyn
KILLED_AFTER_FIRST_CHECKPOINT = """
import sys, time
from fedcoe_bench.cli import main
from fedcoe_bench.runs import RunDir

save = RunDir.save_checkpoint

def save_then_wait(self, fabric, state):  # a crash may come at any moment; this pins it between checkpoints
    save(self, fabric, state)
    time.sleep(120)

RunDir.save_checkpoint = save_then_wait
sys.exit(main(sys.argv[1:]))
"""


def test_readme_feddyn_resumes_after_sigkill_to_the_uninterrupted_result(tmp_path, fit_argv, run_cli, monkeypatch):
    (tmp_path / "my_method.py").write_text(python_block("my_method.py"))
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ("--method.class_path", "my_method.FedDyn", "--method.init_args.alpha", "0.1",
            "--loop.rounds", "3", "--loop.checkpoint_every", "1", "--loop.eval_every", "1")
    run = tmp_path / "parts"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO), str(tmp_path)])}
    log = tmp_path / "child.log"
    with log.open("wb") as out:
        child = subprocess.Popen([sys.executable, "-c", KILLED_AFTER_FIRST_CHECKPOINT, *fit_argv("parts", *args)],
                                 cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while not (run / "checkpoint.pt").exists():
                assert child.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "no checkpoint within 120 s"
                time.sleep(0.05)
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not (run / "summary.json").exists()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["round"] == 1

    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(fit_argv("parts", *args))  # the same command again
    assert rc == 0, err
    assert run_cli(fit_argv("whole", *args))[0] == 0
    parts, whole = read_summary(run), read_summary(tmp_path / "whole")
    assert parts["resumed_from_round"] == 1
    assert parts["metrics"] == whole["metrics"]
    a, b = (torch.load(tmp_path / r / "checkpoint.pt", weights_only=True) for r in ("parts", "whole"))
    assert torch.equal(a["server"], b["server"])
    assert torch.equal(a["method"]["h"], b["method"]["h"])
    assert a["method"]["h"].abs().sum() > 0, "the server's h took part"


class GrowsSharedState(FedAvg):
    def setup_server(self, server):
        self.register_buffer("velocity", torch.zeros_like(server))  # not under server_only


def test_state_added_by_setup_server_outside_server_only_is_refused_by_name(fed):
    with pytest.raises(ConfigError, match="GrowsSharedState.velocity .*server_only"):
        fit(GrowsSharedState(**DIMS), fed)


def test_the_initial_personal_state_is_taken_before_restore_in_fit_and_evaluate(fed):
    torch.manual_seed(0)
    m = FedPer(**DIMS)
    trained = fit(m, fed)
    state = {"round": 1, "server": trained.server, "store": trained.store.flush(), "history": [],
             "method": {k: v.clone() for k, v in m.state_dict().items()}}
    state["method"]["net.head.bias"] += 1.0  # a state_dict whose personal part is not the initial one
    for run in ("fit", "evaluate"):
        torch.manual_seed(0)
        fresh = FedPer(**DIMS)
        initial = torch.cat([p.detach().flatten() for _, p in fresh.named_state("personal")])
        loop = FederatedLoop(rounds=1, clients_per_round=PER_ROUND, checkpoint_every=0, progress=False)
        fabric = Fabric(accelerator="cpu", devices=1)
        if run == "fit":
            loop.fit(fabric, fresh, fed, SEED, resume_state=state)
        else:
            loop.evaluate(fabric, fresh, fed, state, SEED)
        # both leave the method holding the server state and the loop's initial personal state
        assert torch.equal(fresh.flat["personal"], initial), run


# ---------------------------------------------------------------- buffers: BatchNorm statistics
class Recorder:
    """Records the BatchNorm running mean when each client starts and when it reports."""

    def __init__(self, **kwargs):
        super().__init__(backbone=BN, **kwargs)
        self.starts, self.ends = [], []

    def stats(self) -> torch.Tensor:
        return self.net.body[1].running_mean.detach().clone()

    def on_client_start(self, x, y, ctx):
        self.starts.append(self.stats())
        super().on_client_start(x, y, ctx)

    def on_client_end(self, x, ctx):
        self.ends.append(self.stats())
        return super().on_client_end(x, ctx)


class BNFedAvg(Recorder, FedAvg):
    pass


class BNFedPer(Recorder, FedPer):
    personal = ("net.head", "net.body.1")  # the BatchNorm stays with its client too


def trained_in(fed, rounds):
    """Per round, the clients trained in it, in the order the loop trains them (one process)."""
    return [[fed.clients[i] for i in sample_clients(SEED, r, len(fed.clients), PER_ROUND)] for r in range(rounds)]


def test_shared_batchnorm_statistics_are_averaged_on_the_server(fed):
    torch.manual_seed(0)
    m = BNFedAvg(**DIMS)
    fit(m, fed, rounds=2)
    order = trained_in(fed, 2)
    starts, ends = m.starts, m.ends
    assert all(torch.equal(s, torch.zeros_like(s)) for s in starts[:PER_ROUND]), "round 1 starts from the initial model"
    for r in range(2):
        weights = torch.tensor([float(c.num_train) for c in order[r]])
        mean = (weights[:, None] * torch.stack(ends[r * PER_ROUND : (r + 1) * PER_ROUND])).sum(0) / weights.sum()
        server = starts[(r + 1) * PER_ROUND] if r == 0 else m.stats()  # round 2's start, or the final server
        torch.testing.assert_close(server, mean)
        assert not any(torch.allclose(server, e) for e in ends[r * PER_ROUND : (r + 1) * PER_ROUND])
    assert all(torch.equal(s, starts[PER_ROUND]) for s in starts[PER_ROUND:]), "every client starts from the server's"
    assert {"net.body.1.running_mean", "net.body.1.running_var"} <= set(m.layout["shared"])


def test_personal_batchnorm_statistics_stay_with_their_client(fed):
    torch.manual_seed(0)
    m = BNFedPer(**DIMS)
    result = fit(m, fed, rounds=3)
    last_end, returning, new = {}, 0, 0
    for client, start, end in zip([c for r in trained_in(fed, 3) for c in r], m.starts, m.ends):
        if client.id in last_end:  # trained before: starts from its own statistics
            assert torch.equal(start, last_end[client.id])
            returning += 1
        else:  # first time: the initial statistics, whatever other clients did
            assert torch.equal(start, torch.zeros_like(start))
            new += 1
        last_end[client.id] = end
    assert returning and new, "the test needs a client trained twice and one trained once"
    assert torch.equal(m.stats(), torch.zeros_like(m.stats())), "the server holds no client's statistics"
    for cid, end in last_end.items():
        stored = result.store.get(cid)[m.layout["personal"]["net.body.1.running_mean"]]
        assert torch.equal(stored, end)
    assert {"net.body.1.running_mean", "net.body.1.running_var", "net.body.1.weight"} <= set(m.layout["personal"])
    assert not any(n.startswith("net.body.1") for n in m.layout["shared"])


class IntBuffer(FedAvg):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))


class ServerIntBuffer(IntBuffer):
    server_only = ("steps",)


class CumulativeBN(FedAvg):
    def __init__(self, **kwargs):
        super().__init__(backbone=BN, **kwargs)
        self.net.body[1].momentum = None  # running averages weighted by num_batches_tracked


def test_integer_buffers_are_refused_by_name_unless_server_only_or_unread():
    with pytest.raises(ConfigError, match="'steps'"):
        IntBuffer(**DIMS).flatten_parameters()
    with pytest.raises(ConfigError, match="'net.body.1.num_batches_tracked'.*momentum"):
        CumulativeBN(**DIMS).flatten_parameters()
    ServerIntBuffer(**DIMS).flatten_parameters()
    m = FedAvg(backbone=BN, **DIMS)
    m.flatten_parameters()  # a BatchNorm with a momentum never reads its counter
    assert "net.body.1.num_batches_tracked" not in m.layout["shared"]


# ---------------------------------------------------------------- precision through Fabric
class Probe(FedAvg):
    """Records the dtypes of one training step: input, parameters, logits. With the small BatchNorm
    backbone, which also keeps float16 on CPU fast."""

    def __init__(self, **kwargs):
        super().__init__(backbone=BN, **kwargs)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.seen = {"input": x.dtype, "param": self.net.head.weight.dtype, "logits": logits.dtype}
        return nn.functional.cross_entropy(logits, y)

    def predict_global(self, x):
        self.seen_eval = x.dtype
        return super().predict_global(x)


HALF = {"64-true": torch.float64, "32-true": torch.float32, "16-true": torch.float16, "bf16-true": torch.bfloat16,
        "bf16-mixed": torch.bfloat16}


@pytest.mark.parametrize("precision", list(HALF))
def test_precision_reaches_parameters_inputs_and_activations(fed, precision):
    torch.manual_seed(0)
    m = Probe(**DIMS)
    initial = torch.cat([p.detach().flatten() for p in m.parameters()]).double()
    result = fit(m, fed, precision=precision)
    dtype = HALF[precision]
    params = torch.float32 if precision.endswith("mixed") else dtype  # mixed: float32 weights under autocast
    assert m.seen == {"input": dtype, "param": params, "logits": dtype}
    assert m.seen_eval == dtype, "evaluation batches are converted too"
    assert result.server.dtype == params
    assert {t.dtype for t in [*m.parameters(), *m.buffers()] if t.is_floating_point()} == {params}
    assert not torch.equal(result.server.double(), initial), "it trained"
    assert 0 <= result.metrics["global_acc"] <= 1


def test_a_resume_under_another_precision_is_refused_in_one_line(tmp_path, fit_argv, run_cli):
    assert run_cli(fit_argv("run", "--loop.rounds", "1"))[0] == 0
    (tmp_path / "run" / "summary.json").unlink()  # unfinished, with its round-1 checkpoint
    line = one_line_error(run_cli, fit_argv("run", "--fabric.precision", "bf16-true"))
    assert "fabric.precision" in line and "32-true" in line and "bf16-true" in line and "--run_dir" in line


# ---------------------------------------------------------------- a user's backbone
@pytest.mark.parametrize("cls, personal_bn", [(FedPer, []), (PFedMoE, ["local_expert.1.running_mean"]),
                                              (FedCoE, ["local.body.1.running_mean"])], ids=lambda p: getattr(p, "__name__", ""))
def test_a_user_backbone_keeps_every_methods_split(fed, cls, personal_bn):
    torch.manual_seed(0)
    m = cls(backbone=BN, **DIMS)
    result = fit(m, fed)
    shared, personal = set(m.layout["shared"]), set(m.layout["personal"])
    assert any(n.endswith("running_mean") for n in shared), "the shared body's statistics are shared"
    assert set(personal_bn) <= personal
    if cls is FedPer:
        assert personal == {"head_weight", "net.head.weight", "net.head.bias"}
    assert 0 <= result.metrics["personal_acc"] <= 1


class Headless(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, image_size: int):
        super().__init__()
        self.body = nn.Flatten()


class NoWidth(BNNet):
    def __init__(self, in_channels: int, num_classes: int, image_size: int):
        super().__init__(in_channels, num_classes, image_size)


@pytest.mark.parametrize("backbone, method, expected", [
    ("nosuchmodule.Net", "fedavg", "'nosuchmodule.Net' cannot be imported"),
    (f"{__name__}.Missing", "fedavg", f"'{__name__}.Missing' cannot be imported"),
    (f"{__name__}.Headless", "fedavg", "linear `head`"),
    (f"{__name__}.NoWidth", "pfedmoe", "keyword arguments in_channels, num_classes, image_size, width"),
    ("vgg", "fedavg", "unknown method.init_args.backbone 'vgg'"),
])
def test_a_bad_backbone_is_refused_in_one_line(fit_argv, run_cli, backbone, method, expected):
    line = one_line_error(run_cli, fit_argv("run", "--method", method, "--method.init_args.backbone", backbone))
    assert "method.init_args.backbone" in line and expected in line


# ---------------------------------------------------------------- rules the loop enforces (issue #25)
class ReadsServerState(FedAvg):
    """Declares a buffer server-only, then reads it in local training: clients never receive it."""

    server_only = ("secret",)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("secret", torch.zeros(()))

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + 0 * self.secret


class UnevenReports(FedAvg):
    """Reports a key only for some clients: several processes could not stack the reports."""

    def on_client_end(self, x, ctx):
        return {"odd": torch.ones(())} if len(x) % 2 else {}


def test_local_training_cannot_read_server_only_state(fed):
    with pytest.raises(MethodError, match="server-only state.*secret.*server_only"):
        fit(build(ReadsServerState), fed)
    m = build(ReadsServerState)  # the predictors (server side) see it
    assert m.predict_global(fed.prepare(fed.test_x[:2])).shape == (2, 10) and torch.equal(m.secret, torch.zeros(()))


def test_every_client_must_report_the_same_keys(fed):
    assert len({c.num_train % 2 for c in fed.clients}) == 2  # both kinds of client, so both kinds of report
    with pytest.raises(MethodError, match="on_client_end reported odd differently"):
        fit(build(UnevenReports), fed, rounds=3)
