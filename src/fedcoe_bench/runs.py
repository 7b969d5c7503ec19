"""A run directory: checkpoints and the final summary, always written atomically.

Layout of ``RUN_DIR``: ``config.yaml`` (the full config), ``metrics.csv`` (one row per round),
``checkpoint.pt`` (the latest checkpoint), ``clients/`` (the ``disk`` client-state store, whose
versions the checkpoint names), ``summary.json`` (written once, when the run finishes; its absence
marks an unfinished run), method artefacts (e.g. FedCoE's ``calibration.csv``), ``routing.csv`` for
methods with experts and, with W&B, ``wandb_run.json`` (the W&B run a resumed run continues).

Which config keys may differ between two runs that count as the same is defined once, here:
:data:`NEUTRAL_KEYS` for a finished run (``fedbench sweep`` skips it), those plus
:data:`SCHEDULE_KEYS` for a checkpoint (resume, ``fedbench eval``).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import shutil
from pathlib import Path

from fedcoe_bench.errors import RunError
from fedcoe_bench.registry import current_path

# Keys that change neither what a run computes nor what it reports: where it is written, logged and
# cached, how it is shown, how often it is checkpointed, and the devices and memory format it runs in
# (results equal up to float rounding). ``fabric.precision`` is not one of them: it changes the numbers.
NEUTRAL_KEYS = ("config", "run_dir", "resume", "overwrite", "debug", "logger", "wandb_project", "loop.progress",
                "loop.checkpoint_every", "loop.eval_batch_size", "data.cache_dir", "data.source.init_args.root",
                "data.source.init_args.download", "fabric.accelerator", "fabric.devices", "fabric.strategy",
                "fabric.num_nodes", "loop.channels_last")
# How far a run goes and when it is measured, not what a round computes: the state after round t is the
# same for any of their values, so a checkpoint serves them all (a resume may extend a run, eval serves a
# finished one) while a finished run serves only its own.
SCHEDULE_KEYS = ("loop.rounds", "loop.eval_every")
CHECKPOINT_NEUTRAL_KEYS = NEUTRAL_KEYS + SCHEDULE_KEYS

# Files only a run directory holds; ``--overwrite`` empties a directory only if it holds one of them.
RUN_FILES = ("config.yaml", "summary.json", "checkpoint.pt")
LOCK = ".sweep.lock"  # a sweep process's claim on the directory (see fedcoe_bench.sweep.claim), kept by --overwrite


def comparable(config: dict, neutral: tuple[str, ...] = NEUTRAL_KEYS) -> dict:
    """The flattened config without the keys under ``neutral``: what two runs must share to count as one.

    Example:
        >>> comparable({"seed": 1, "run_dir": "a", "fabric": {"devices": 2, "precision": "32-true"}})
        {'seed': 1, 'fabric.precision': '32-true'}
    """
    flat = flatten(json.loads(json.dumps(config, default=str)))  # tuples and paths as a summary.json holds them
    if "method.class_path" in flat:  # a run recorded before the built-in methods moved is the same run
        flat["method.class_path"] = current_path(flat["method.class_path"])
    return {k: v for k, v in flat.items() if not any(k == n or k.startswith(n + ".") for n in neutral)}


def config_diff(there: dict, here: dict, neutral: tuple[str, ...] = NEUTRAL_KEYS) -> list[str]:
    """``key: X there, Y here`` for each key outside ``neutral`` where two configs differ, sorted by key.

    Example:
        >>> config_diff({"seed": 0, "logger": "csv"}, {"seed": 1, "logger": "wandb"})
        ['seed: 0 there, 1 here']
    """
    a, b = comparable(there, neutral), comparable(here, neutral)
    for one, other in ((a, b), (b, a)):  # a method argument one config predates counts at its default
        path = other.get("method.class_path")
        for k in other.keys() - one.keys():
            if k.startswith(INIT_ARGS) and path == one.get("method.class_path") and other[k] == argument_default(path, k[len(INIT_ARGS):]):
                one[k] = other[k]
    return [f"{k}: {a.get(k)!r} there, {b.get(k)!r} here" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


INIT_ARGS = "method.init_args."
NO_DEFAULT = object()


def argument_default(class_path: str, name: str):
    """The default of argument ``name`` of the class at ``class_path`` (searching its bases' ``__init__``,
    as ``**kwargs`` passes them on), or a sentinel equal to nothing when it has none or cannot be
    imported. A config written before an argument existed ran the code of its time; that equals the
    argument's default when, as this project's rule is, a new argument's default keeps the old behaviour.

    Example:
        >>> argument_default("fedcoe_bench.fedcoe.FedCoE", "balance_rate"), argument_default("fedcoe_bench.fedcoe.FedCoE", "lr")
        (0.0, 0.01)
    """
    module, _, name_ = str(class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name_)
    except (ImportError, AttributeError, ValueError):
        return NO_DEFAULT
    for klass in inspect.getmro(cls):
        param = inspect.signature(klass.__init__).parameters.get(name) if "__init__" in vars(klass) else None
        if param is not None and param.default is not inspect.Parameter.empty:
            return param.default
    return NO_DEFAULT


def shown(diff: list[str], limit: int = 3) -> str:
    """The first ``limit`` differences of :func:`config_diff`, for a one-line message."""
    return ", ".join(diff[:limit]) + (", ..." if len(diff) > limit else "")


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
    with atomic_open(path) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_open(path: Path):
    """A binary file to write ``path`` through: a temporary file, fsynced and renamed over ``path`` on
    success, so that readers see the old or the new file, never half, and nothing is buffered in memory."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)  # a full disk must not keep a half checkpoint's worth of space
        # name the file where the writer did not (torch.save's does not)
        if isinstance(err, OSError) and err.errno is not None and err.filename is None:
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class RunDir:
    """One run's directory, for the run of ``config`` (the config as ``summary.json`` stores it).
    ``prepare`` refuses to overwrite a finished run unless asked; a checkpoint serves only a config
    that differs from its own in :data:`CHECKPOINT_NEUTRAL_KEYS`."""

    def __init__(self, path: str | os.PathLike, config: dict | None = None):
        self.path = Path(path)
        self.config = config or {}

    summary_path = property(lambda self: self.path / "summary.json")
    checkpoint_path = property(lambda self: self.path / "checkpoint.pt")
    diverged_path = property(lambda self: self.path / "diverged.txt")  # the error of a run stopped by a non-finite loss

    def is_finished(self) -> bool:
        return self.summary_path.exists()

    def divergence(self) -> str | None:
        """The error of an unfinished run stopped by a non-finite loss, else None."""
        if self.is_finished() or not self.diverged_path.exists():
            return None
        return self.diverged_path.read_text().strip()

    def prepare(self, overwrite: bool = False) -> None:
        """Make the directory ready for this run. With ``overwrite`` it is emptied first (a sweep's lock
        aside), which only a directory that holds a run (one of :data:`RUN_FILES`) or nothing allows."""
        if self.is_finished() and not overwrite:
            raise RunError(f"{self.path} already holds a finished run; pass --overwrite to replace it or choose another --run_dir")
        old = [p for p in self.path.iterdir() if p.name != LOCK] if overwrite and self.path.is_dir() else []
        if old and not any((self.path / name).exists() for name in RUN_FILES):
            raise RunError(f"--overwrite empties a run directory, and {self.path} holds no run (none of "
                           f"{', '.join(RUN_FILES)}); choose another --run_dir")
        try:
            for entry in old:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write_test"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise RunError(f"run directory {self.path} is not writable ({err.strerror}); choose another --run_dir") from None

    def load_checkpoint(self) -> dict | None:
        """The latest checkpoint, or None. A corrupt one or one from another config is refused."""
        import torch

        if not self.checkpoint_path.exists():
            return None
        try:
            state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for damaged files
            raise RunError(
                f"checkpoint {self.checkpoint_path} is corrupt ({type(err).__name__}); delete it to start over "
                f"or pass --overwrite"
            ) from None
        if "run_config" not in state:
            raise RunError(f"checkpoint {self.checkpoint_path} was written by an older fedbench that did not store "
                           f"its config; pass --overwrite to start over or choose another --run_dir")
        diff = config_diff(state["run_config"], self.config, CHECKPOINT_NEUTRAL_KEYS)
        if diff:
            raise RunError(
                f"checkpoint {self.checkpoint_path} was written by a different config ({shown(diff)}); resume with "
                f"the same config, choose another --run_dir, or pass --overwrite"
            )
        return state

    def save_checkpoint(self, fabric, state: dict) -> None:
        if fabric.is_global_zero:
            import torch

            with atomic_open(self.checkpoint_path) as f:
                torch.save({**state, "run_config": comparable(self.config, CHECKPOINT_NEUTRAL_KEYS)}, f)
        fabric.barrier()

    def write_summary(self, summary: dict) -> None:
        atomic_write(self.summary_path, (json.dumps(summary, indent=2, default=str) + "\n").encode())
