"""Weights & Biases logging for ``fedbench fit --logger wandb``, through Lightning's ``WandbLogger``.

What goes to W&B: the run's config (flattened to dotted keys, the same keys a sweep uses, e.g.
``data.alpha``, plus ``method`` as the short name), every round's metrics (``fabric.log_dict``:
train loss, timings, routing diagnostics, the accuracies), the final summary (accuracies, wall
time, clients, versions) and, where the run wrote them, ``routing.csv`` and ``clients.csv`` as
tables. ``WANDB_MODE=offline`` works without an account; W&B's files go to ``WANDB_DIR`` if set,
else into the run directory.

A resumed run continues its W&B run: ``wandb_run.json`` in the run directory keeps the W&B run id
and the last round W&B received, so the rounds the loop replays from the checkpoint (and the ones it
trains again after a kill) are not sent twice.

W&B never costs a run: :class:`SafeLogger` reports the first exception of any W&B call in one
line on stderr and ignores W&B from then on, while ``metrics.csv`` and ``summary.json`` are
written as always.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.fabric.loggers import Logger
from lightning.fabric.utilities import rank_zero_only

from fedcoe_bench.runs import atomic_write, flatten


def _short(class_path: Any) -> str:
    return str(class_path).rsplit(".", 1)[-1].lower()


def wandb_config(config: dict) -> dict:
    """The config as W&B sees it: dotted keys, ``method`` the short name (as in the sweep files)."""
    flat = flatten(config)
    flat["method"] = _short((config.get("method") or {}).get("class_path", "fedavg"))
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in flat.items()}


def run_name(config: dict) -> tuple[str, str]:
    """(run name, group): ``fedavg/mnist10k/dirichlet0.3/seed0`` and the same without the seed."""
    data = config.get("data") or {}
    source = data.get("source")
    dataset = _short(source.get("class_path") if isinstance(source, dict) else source)
    scheme = str(data.get("scheme", "")) + (str(data.get("alpha")) if data.get("scheme") == "dirichlet" else "")
    method = config.get("name") or _short((config.get("method") or {}).get("class_path", "fedavg"))
    group = f"{method}/{dataset}/{scheme}"
    return f"{group}/seed{config.get('seed')}", group


@dataclass
class WandbRun:
    """The W&B run of a run directory, kept in its ``wandb_run.json``: the id, and the last round
    (step) W&B received. A new one takes W&B's agent's id (``WANDB_RUN_ID``) or a fresh one."""

    path: Path
    id: str
    step: int = 0

    @classmethod
    def of(cls, run_dir: str | os.PathLike) -> WandbRun:
        path = Path(run_dir) / "wandb_run.json"
        try:
            stored = json.loads(path.read_text())
            return cls(path, str(stored["id"]), int(stored["step"]))
        except (OSError, ValueError, KeyError, TypeError):  # none yet, or cut short: a new W&B run
            return cls(path, os.environ.get("WANDB_RUN_ID") or secrets.token_hex(4))

    def logged(self, step: int) -> None:
        """Record that W&B received round ``step`` (written by rank 0 only)."""
        self.step = max(self.step, step)
        _write_json(self.path, {"id": self.id, "step": self.step})


@rank_zero_only
def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data).encode())


class SafeLogger(Logger):
    """Wraps a logger so that the first exception of any call is reported once (one line on stderr)
    and every later call is a no-op. ``make`` builds the wrapped logger (and may fail too). With
    ``run`` (the :class:`WandbRun` it logs to), rounds W&B already received are not sent again."""

    def __init__(self, make, what: str = "W&B", run: WandbRun | None = None):
        super().__init__()
        self.what = what
        self.failed = False
        self.run = run
        self.logger = self._guard("setting up", make)

    def _guard(self, action: str, fn, *args, **kwargs):
        if self.failed:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - whatever W&B raises, the run must go on
            self.failed = True
            msg = " ".join(str(err).split())[:300] or type(err).__name__
            print(f"fedbench: warning: {self.what} logging failed while {action} ({type(err).__name__}: {msg}); "
                  f"the run goes on without {self.what}, metrics.csv and summary.json are written as usual",
                  file=sys.stderr, flush=True)
            return None

    def _wrapped(self, action: str, method: str, *args, **kwargs):
        if self.logger is None:
            return None
        return self._guard(action, lambda: getattr(self.logger, method)(*args, **kwargs))

    @property
    def name(self) -> str | None:
        return self._guard("naming the run", lambda: self.logger.name) if self.logger is not None else None

    @property
    def version(self) -> str | None:
        return self._guard("naming the run", lambda: self.logger.version) if self.logger is not None else None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.run is not None and step is not None and step <= self.run.step:
            return  # a resumed run replays rounds its W&B run already holds
        self._wrapped("logging metrics", "log_metrics", metrics, step)
        if self.run is not None and step is not None and not self.failed:
            self.run.logged(step)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        self._wrapped("logging the config", "log_hyperparams", params, *args, **kwargs)

    def save(self) -> None:
        self._wrapped("saving", "save")

    def log_summary(self, summary: dict, run_dir: str | os.PathLike) -> None:
        """The final numbers into the W&B run summary; routing.csv / clients.csv as W&B tables."""
        if self.logger is not None:
            self._guard("logging the summary", self._log_summary, summary, Path(run_dir))

    def _log_summary(self, summary: dict, run_dir: Path) -> None:
        import wandb

        exp = self.logger.experiment
        flat = flatten({k: v for k, v in summary.items() if k != "config"})
        flat["name"] = (summary.get("config") or {}).get("name")
        exp.summary.update({k: v for k, v in flat.items() if v is None or isinstance(v, (int, float, str, bool))})
        tables = {}
        for key, filename in (("routing", "routing.csv"), ("client_accuracy", "clients.csv")):
            path = run_dir / filename
            if path.exists():
                with open(path, newline="") as f:
                    rows = list(csv.reader(f))
                if rows:
                    tables[key] = wandb.Table(columns=rows[0], data=[[_num(v) for v in r] for r in rows[1:]])
        if tables:
            exp.log({**tables, "trainer/global_step": summary.get("rounds")})

    def finalize(self, status: str) -> None:
        if self.logger is None:
            return
        self._wrapped("finishing", "finalize", status)
        exp = getattr(self.logger, "_experiment", None)
        if exp is not None and not self.failed:
            self._guard("finishing", exp.finish, exit_code=0 if status == "success" else 1)


def _num(v: str):
    if v == "":
        return None
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def wandb_logger(run_dir: str | os.PathLike, project: str, config: dict) -> list[Logger]:
    """The W&B logger of one run, wrapped in :class:`SafeLogger`: the W&B run the run directory names
    (see :class:`WandbRun`), resumed, or a new one. Under ``wandb agent`` the sweep's project
    (``WANDB_PROJECT``) wins over ``project``."""
    run = WandbRun.of(run_dir)

    def make():
        from lightning.pytorch.loggers import WandbLogger

        name, group = run_name(config)
        return WandbLogger(project=os.environ.get("WANDB_PROJECT") or project, name=name, group=group,
                           save_dir=os.environ.get("WANDB_DIR") or str(run_dir), config=wandb_config(config),
                           job_type="fit", id=run.id, resume="allow")

    return [SafeLogger(make, run=run)]
