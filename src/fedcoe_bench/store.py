"""Client-state stores: where each client's personal state lives between the rounds it trains in.

A store holds one flat vector per client (the method's personal parameters), in host memory or on
disk, never on the accelerator. The loop reads the states of a round's clients (:meth:`get`),
puts the trained ones back (:meth:`put`) and, with every checkpoint, makes what was put durable
(:meth:`flush`), which returns the store's *position*: what the checkpoint records so that
:meth:`restore` gives back exactly the states current at that checkpoint.

``disk`` keeps two versioned files per client, ``<id>.0`` and ``<id>.1``. The position names the
current version of every client put so far; a state put later goes to the *other* file, so the
files a durable checkpoint references are never written before the next checkpoint replaces it.
A process killed at any moment, even half-way through a file, therefore resumes from exactly
the states of its last checkpoint: writes of an unfinished round never leak into the resumed one.
Processes of one run share the directory: each writes the clients it trains, and
:meth:`DiskStore.mark_put` tells the others which clients have a new version (it is the file not
referenced by the last position, so every process knows its name).

Example:
    >>> import tempfile
    >>> store = open_store("disk", tempfile.mkdtemp(), numel=3)
    >>> store.put(7, torch.tensor([1.0, 2.0, 3.0]))
    >>> position = store.flush()
    >>> store.put(7, torch.zeros(3))  # an unfinished round: lost on restore
    >>> store.restore(position)
    >>> store.get(7), store.get(8)
    (tensor([1., 2., 3.]), None)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from fedcoe_bench.errors import ConfigError, RunError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# numpy has no bfloat16: its bits are read and written as int16
_NUMPY = {torch.float32: (np.float32, torch.float32), torch.bfloat16: (np.int16, torch.int16)}


class ClientStore:
    """The states of the clients, one flat vector each, kept off the accelerator.

    Args:
        dtype: ``float32`` or ``bfloat16``, the storage dtype (training casts back on load).
    """

    kind = ""

    def __init__(self, dtype: str = "float32"):
        self.dtype = DTYPES[dtype]

    def get(self, client: int) -> torch.Tensor | None:
        """The latest state put for ``client`` (a host tensor in the storage dtype, to be copied from,
        not written to), or None for a client never put."""
        raise NotImplementedError

    def put(self, client: int, state: torch.Tensor) -> None:
        """Store a copy of ``state`` (any device and dtype) as ``client``'s current state."""
        raise NotImplementedError

    def flush(self) -> dict:
        """Make every state put so far durable; returns the position a checkpoint records."""
        raise NotImplementedError

    def restore(self, position: dict) -> None:
        """Go back to the states current when ``flush`` returned ``position``."""
        if position["kind"] != self.kind or DTYPES[position["dtype"]] != self.dtype:
            raise RunError(f"the checkpoint's client states are a {position['kind']} store in {position['dtype']}; "
                           f"resume with --loop.client_store {position['kind']} --loop.client_state_dtype "
                           f"{position['dtype']}")

    def _dtype_name(self) -> str:
        return next(k for k, v in DTYPES.items() if v == self.dtype)

    def _host(self, state: torch.Tensor) -> torch.Tensor:
        return state.detach().to(device="cpu", dtype=self.dtype, copy=True)


class MemoryStore(ClientStore):
    """States in a dict in host RAM; a checkpoint holds every state put so far."""

    kind = "memory"

    def __init__(self, dtype: str = "float32"):
        super().__init__(dtype)
        self.states: dict[int, torch.Tensor] = {}

    def get(self, client: int) -> torch.Tensor | None:
        return self.states.get(client)

    def put(self, client: int, state: torch.Tensor) -> None:
        self.states[client] = self._host(state)

    def flush(self) -> dict:
        return {"kind": self.kind, "dtype": self._dtype_name(), "states": dict(self.states)}

    def restore(self, position: dict) -> None:
        super().restore(position)
        self.states = {int(k): v for k, v in position["states"].items()}


class DiskStore(ClientStore):
    """One file per client and version in ``directory``, read and written per client.

    Args:
        directory: where the files go (created; one run per directory).
        numel: length of every state.
        dtype: storage dtype.
    """

    kind = "disk"

    def __init__(self, directory: str | os.PathLike, numel: int, dtype: str = "float32"):
        super().__init__(dtype)
        self.dir, self.numel = Path(directory), numel
        self.dir.mkdir(parents=True, exist_ok=True)
        # client id -> the version the last position names (-1: none): kept as the position's own
        # array, so that a checkpoint costs a copy of one byte per client, not a walk over a dict
        self.versions = np.full(0, -1, dtype=np.int8)
        self.pending: dict[int, int] = {}  # client -> version put since (always the other one)
        self.unsynced: set[Path] = set()  # files this process wrote since the last flush

    def _path(self, client: int, version: int) -> Path:
        return self.dir / f"{client}.{version}"

    def _current(self, client: int) -> int | None:
        version = int(self.versions[client]) if client < len(self.versions) else -1
        return None if version < 0 else version

    def _next(self, client: int) -> int:
        current = self._current(client)
        return 0 if current is None else 1 - current  # a client never flushed starts at version 0

    def get(self, client: int) -> torch.Tensor | None:
        version = self.pending[client] if client in self.pending else self._current(client)
        if version is None:
            return None
        path = self._path(client, version)
        try:
            raw = np.fromfile(path, dtype=_NUMPY[self.dtype][0])
        except OSError as err:
            raise RunError(f"client state {path} cannot be read ({err.strerror}); the store directory must be the "
                           f"one the run wrote (on several nodes, a directory they share)") from None
        if raw.size != self.numel:
            raise RunError(f"client state {path} holds {raw.size} values, not {self.numel}; it was written by "
                           f"another run: give each run its own --loop.client_store_dir")
        return torch.from_numpy(raw).view(self.dtype)

    def put(self, client: int, state: torch.Tensor) -> None:
        version = self._next(client)
        path = self._path(client, version)
        data = self._host(state).view(_NUMPY[self.dtype][1]).numpy()
        with open(path, "wb") as f:
            data.tofile(f)
        self.pending[client] = version
        self.unsynced.add(path)

    def mark_put(self, clients) -> None:
        """Another process sharing this directory put the states of ``clients``: read them from now on."""
        for client in clients:
            self.pending[client] = self._next(client)

    def flush(self) -> dict:
        for path in self.unsynced:  # before the checkpoint that references them is renamed into place
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if self.unsynced:
            fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.unsynced.clear()
        if self.pending:
            top = max(self.pending) + 1
            if top > len(self.versions):
                self.versions = np.concatenate([self.versions, np.full(top - len(self.versions), -1, dtype=np.int8)])
            self.versions[list(self.pending)] = list(self.pending.values())
        self.pending.clear()
        # one byte per client id: its current version, -1 for a client never put
        return {"kind": self.kind, "dtype": self._dtype_name(), "numel": self.numel,
                "versions": torch.from_numpy(self.versions.copy())}

    def restore(self, position: dict) -> None:
        super().restore(position)
        self.versions = position["versions"].numpy().copy()
        self.pending.clear()
        self.unsynced.clear()

    def disk_bytes(self) -> int:
        """Bytes the store's files occupy on disk."""
        return sum(p.stat().st_blocks * 512 for p in self.dir.iterdir())


def open_store(kind: str, directory: str | os.PathLike | None = None, numel: int = 0, dtype: str = "float32",
               world_size: int = 1) -> ClientStore:
    """The store ``loop.client_store`` names. ``memory`` keeps each state in the process that put it,
    so several processes need ``disk`` (a directory they all reach) when there are states to keep."""
    if kind == "memory":
        if world_size > 1 and numel:
            raise ConfigError(f"loop.client_store=memory keeps a client's state in the process that trained it, but "
                              f"{world_size} processes train each client in turn; use --loop.client_store disk")
        return MemoryStore(dtype)
    return DiskStore(directory, numel, dtype)
