"""A run directory: checkpoints and the final summary, always written atomically.

Layout of ``RUN_DIR``: ``config.yaml`` (the full config), ``metrics.csv`` (one row per round),
``checkpoint.pt`` (the latest checkpoint), ``summary.json`` (written once, when the run finishes;
its absence marks an unfinished run), plus method artefacts (e.g. FedCoE's ``routing.csv``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import torch

from fedcoe_bench.errors import RunError

# Keys that may differ between an interrupted run and its resumption.
VOLATILE_KEYS = {"run_dir", "resume", "overwrite", "debug", "logger", "loop.progress", "loop.rounds",
                 "loop.eval_every", "loop.checkpoint_every", "loop.channels_last", "config", "fabric"}


def is_volatile(key: str) -> bool:
    """A flattened config key that may change without changing what training computes."""
    return key in VOLATILE_KEYS or key.split(".")[0] in VOLATILE_KEYS


def config_hash(config: dict) -> str:
    flat = {k: v for k, v in flatten(config).items() if not is_volatile(k)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file, fsync, rename over ``path``: readers see the old or the new file, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class RunDir:
    """One run's directory. ``prepare`` refuses to overwrite a finished run unless ``overwrite``."""

    def __init__(self, path: str | os.PathLike, config: dict | None = None):
        self.path = Path(path)
        self.config_hash = config_hash(config or {})

    summary_path = property(lambda self: self.path / "summary.json")
    checkpoint_path = property(lambda self: self.path / "checkpoint.pt")

    def is_finished(self) -> bool:
        return self.summary_path.exists()

    def prepare(self, overwrite: bool = False) -> None:
        if self.is_finished() and not overwrite:
            raise RunError(f"{self.path} already holds a finished run; pass --overwrite to replace it or choose another --run_dir")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write_test"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise RunError(f"run directory {self.path} is not writable ({err.strerror}); choose another --run_dir") from None
        if overwrite:
            for name in ("summary.json", "checkpoint.pt", "metrics.csv"):
                (self.path / name).unlink(missing_ok=True)

    def load_checkpoint(self) -> dict | None:
        """The latest checkpoint, or None. A corrupt one or one from another config is refused."""
        if not self.checkpoint_path.exists():
            return None
        try:
            state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for damaged files
            raise RunError(
                f"checkpoint {self.checkpoint_path} is corrupt ({type(err).__name__}); delete it to start over "
                f"or pass --overwrite"
            ) from None
        if state.get("config_hash") != self.config_hash:
            raise RunError(
                f"checkpoint {self.checkpoint_path} was written by a different config; resume with the same "
                f"config, choose another --run_dir, or pass --overwrite"
            )
        return state

    def save_checkpoint(self, fabric, state: dict) -> None:
        if fabric.is_global_zero:
            buf = io.BytesIO()
            torch.save({**state, "config_hash": self.config_hash}, buf)
            atomic_write(self.checkpoint_path, buf.getvalue())
        fabric.barrier()

    def write_summary(self, summary: dict) -> None:
        atomic_write(self.summary_path, (json.dumps(summary, indent=2, default=str) + "\n").encode())
