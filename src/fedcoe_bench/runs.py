"""A run directory: checkpoints and the final summary, always written atomically.

Layout of ``RUN_DIR``: ``config.yaml`` (the full config), ``metrics.csv`` (one row per round),
``checkpoint.pt`` (the latest checkpoint), ``clients/`` (the ``disk`` client-state store, whose
versions the checkpoint names), ``summary.json`` (written once, when the run finishes; its absence
marks an unfinished run), method artefacts (e.g. FedCoE's ``calibration.csv``), ``routing.csv`` for
methods with experts and, with W&B, ``wandb_run.json`` (the W&B run a resumed run continues), and
first of all the marker ``.fedbench-run``: only a directory holding it is a run directory, the only kind
fedbench writes into or ``--overwrite`` empties (:data:`WRITTEN`, nothing else).

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
import re
import shutil
import socket
import time
import uuid
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
# What only an evaluation reads, never training: ``fedbench eval`` may change them on a trained run.
EVALUATION_KEYS = ("loop.cold_start_steps", "loop.cold_start_lr")

MARKER = ".fedbench-run"  # JSON: run id, fedbench version, created time; what makes a directory a run
LOCK = ".fedbench.lock"  # host:pid of the process writing the run, or of the sweep about to start it (take_lock)
# Everything fedbench writes into a run directory (W&B's offline files included, which go there too), each
# also as the temporary file of an atomic write: all that --overwrite removes, so a user's file survives it.
WRITTEN = ("config.yaml", "metrics.csv", "checkpoint.pt", "summary.json", "diverged.txt", "clients.csv",
           "routing.csv", "calibration.csv", "wandb_run.json", "wandb", ".write_test")
# A finished run's small records: what a results page is rebuilt from (``fedbench records``), never its
# checkpoint or client states.
RECORDS = ("config.yaml", "summary.json", "metrics.csv", "clients.csv", "routing.csv", "calibration.csv", "diverged.txt")
STORE = "clients"  # the disk client-state store: files named <client>.<version>
STORE_FILE = re.compile(r"\d+\.\d+(\.tmp)?")
# What a run directory written before the marker existed holds; such a run may resume but not be emptied.
RUN_FILES = ("summary.json", "checkpoint.pt")


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
    """The value a config that does not name argument ``name`` of the class at ``class_path`` ran with: its
    default (searching its bases' ``__init__``, as ``**kwargs`` passes them on), or a sentinel equal to
    nothing when it has none or cannot be imported. A config written before an argument existed ran the
    code of its time; that equals the argument's default when, as this project's rule is, a new
    argument's default keeps the old behaviour, and otherwise the value the class names in
    ``predating`` (a new default that changes what a method computes).

    Example:
        >>> argument_default("fedcoe_bench.fedcoe.FedCoE", "balance_rate"), argument_default("fedcoe_bench.fedcoe.FedCoE", "lr")
        (0.0, 0.01)
        >>> argument_default("fedcoe_bench.fedcoe.FedCoE", "normalize_loss")  # default True, added later
        False
    """
    module, _, name_ = str(class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name_)
    except (ImportError, AttributeError, ValueError):
        return NO_DEFAULT
    if name in getattr(cls, "predating", {}):
        return cls.predating[name]
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
        # torch.save's zip writer, closing after a failed write, raises a RuntimeError over the OSError
        cause = next((e for e in _chain(err) if isinstance(e, OSError) and e.errno is not None), None)
        if cause is not None and (cause is not err or cause.filename is None):  # name the file, as torch does not
            raise OSError(cause.errno, cause.strerror, str(path)) from err
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _chain(err: BaseException):
    """``err`` and the exceptions it was raised from or while handling, innermost last."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


class RunDir:
    """One run's directory, for the run of ``config`` (the config as ``summary.json`` stores it).
    ``prepare`` refuses to overwrite a finished run unless asked; a checkpoint serves only a config
    that differs from its own in :data:`CHECKPOINT_NEUTRAL_KEYS`."""

    def __init__(self, path: str | os.PathLike, config: dict | None = None):
        self.path = Path(path)
        self.config = config or {}
        self.saved_round: int | None = None  # the round of the last checkpoint this process saved

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

    def prepare(self, overwrite: bool = False) -> bool:
        """Make the directory ready for this run, marker first; returns whether it was created here (so
        that a run refused afterwards can :meth:`discard` it). Refused: a directory that can never be a run
        (:func:`never_a_run`), a non-empty one without the marker, a finished run unless ``overwrite``,
        which removes only :data:`WRITTEN`."""
        never = never_a_run(self.path)
        if never:
            raise RunError(f"{self.path} is {never}, never a run directory; give a new --run_dir (e.g. runs/NAME)")
        created = not self.path.exists()
        others = self._entries() - {MARKER, LOCK}
        legacy = not (self.path / MARKER).exists() and bool(others) and any(name in others for name in RUN_FILES) \
            and {name.removesuffix(".tmp") for name in others} <= {*WRITTEN, STORE}
        if others and not (self.path / MARKER).exists() and not legacy:
            raise RunError(f"{self.path} is not empty and is not a fedbench run directory (it has no {MARKER}); "
                           f"give a new --run_dir")
        if self.is_finished() and not overwrite:
            raise RunError(f"{self.path} already holds a finished run; pass --overwrite to replace it or choose "
                           f"another --run_dir")
        if legacy and overwrite:
            raise RunError(f"{self.path} holds a run written by an older fedbench, which did not mark what it wrote; "
                           f"delete it by hand (rm -r {self.path}) or give a new --run_dir")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock()
            if overwrite:
                self._remove_written()
            if overwrite or not (self.path / MARKER).exists():  # a new run gets a new id; a resumed one keeps its own
                self._write_marker()
            probe = self.path / ".write_test"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            self.release()
            raise RunError(f"run directory {self.path} is not writable ({err.strerror}); choose another --run_dir") from None
        return created

    def lock(self) -> None:
        """Hold :data:`LOCK` while this process writes the run: a second fit into the same directory would
        interleave their checkpoints. A sweep's claim passes to the fit it started (its parent); several
        ranks of one fit are one writer, rank 0."""
        if any(os.environ.get(key, "0") != "0" for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")):
            return
        holder = take_lock(self.path / LOCK, heir_of=os.getppid())
        if holder is not None:
            raise RunError(f"{self.path} is being written by another fedbench process ({holder}); wait for it to "
                           f"finish or give another --run_dir (if that process is gone, delete {self.path / LOCK})")

    def release(self) -> None:
        release_lock(self.path / LOCK)

    def discard(self) -> None:
        """Undo a :meth:`prepare` that created the directory: remove what fedbench wrote, the marker and the
        directory if that leaves it empty."""
        self._remove_written()
        (self.path / MARKER).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.path.rmdir()

    def _entries(self) -> set[str]:
        return {p.name for p in self.path.iterdir()} if self.path.is_dir() else set()

    def _remove_written(self) -> None:
        for name in self._entries():
            entry = self.path / name
            if name.removesuffix(".tmp") in WRITTEN:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        store = self.path / STORE
        if store.is_dir() and not store.is_symlink():
            for entry in store.iterdir():
                if STORE_FILE.fullmatch(entry.name) and entry.is_file():
                    entry.unlink()
            with contextlib.suppress(OSError):
                store.rmdir()  # kept if it holds anything else

    def _write_marker(self) -> None:
        from fedcoe_bench import version

        marker = {"run_id": uuid.uuid4().hex, "fedbench": version(),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write(self.path / MARKER, (json.dumps(marker) + "\n").encode())

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
                torch.save({**state, "run_config": comparable(self.config, CHECKPOINT_NEUTRAL_KEYS),
                            "rounds": self.config.get("loop", {}).get("rounds")}, f)  # so a resume says it extends
        fabric.barrier()
        self.saved_round = state["round"]  # what an interrupted run keeps, for its message

    def write_summary(self, summary: dict) -> None:
        atomic_write(self.summary_path, (json.dumps(summary, indent=2, default=str) + "\n").encode())


def never_a_run(path: Path) -> str | None:
    """Why ``path`` can never be a run directory (what --overwrite empties), or None: the working
    directory, a home directory, the file system's root, a git checkout or a Python project."""
    path = path.expanduser().resolve()
    if path == Path.cwd().resolve():
        return "the current directory"
    if path == Path.home().resolve() or path.parent == Path("/home"):
        return "a home directory"
    if path == Path(path.anchor):
        return "the file system's root"
    if (path / ".git").exists():
        return "a git checkout (it holds .git)"
    if (path / "pyproject.toml").exists():
        return "a Python project (it holds pyproject.toml)"
    return None


def take_lock(path: Path, heir_of: int | None = None) -> str | None:
    """Take the lock file ``path`` for this process: it holds ``host:pid`` from the instant it exists
    (linked from a file written first). Returns None once this process holds it, else the
    ``host:pid`` of the process that does (one on another host counts as alive: there we cannot
    tell). A lock whose holder died on this host is taken over, and so is one held by the process
    ``heir_of`` (a sweep hands its claim to the fit it starts), each by one atomic replace."""
    me = f"{socket.gethostname()}:{os.getpid()}"
    mine = path.with_name(f"{path.name}.{os.getpid()}")
    mine.write_text(me)
    try:
        while True:
            try:
                os.link(mine, path)
                return None
            except FileExistsError:
                pass
            try:
                holder = path.read_text()
            except FileNotFoundError:  # its holder released it in between: try again
                continue
            if holder == me:
                return None
            host, _, pid = holder.partition(":")
            if host != socket.gethostname() or not pid.isdigit() or (int(pid) != heir_of and _alive(int(pid))):
                return holder
            os.replace(mine, path)
            return None
    finally:
        mine.unlink(missing_ok=True)


def release_lock(path: Path) -> None:
    """Remove the lock file ``path`` if this process holds it."""
    with contextlib.suppress(OSError):  # none there, or no directory to hold one
        if path.read_text() == f"{socket.gethostname()}:{os.getpid()}":
            path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        pass
    return True
