"""Who trains when, and with which random numbers: functions of the seed only, so that a run's
numbers do not depend on how its clients are spread over processes or batched together."""

from __future__ import annotations

import numpy as np


def client_seed(seed: int, rnd: int, client: int) -> int:
    """The RNG seed of one client's local training: a function of (seed, round, client) only, so
    results do not depend on which rank trains a client or in what order."""
    return int(np.random.SeedSequence([seed, rnd, client]).generate_state(1)[0])


def sample_clients(seed: int, rnd: int, num_clients: int, k: int) -> list[int]:
    """Positions of the clients sampled in round ``rnd`` (sorted; uniform without replacement)."""
    rng = np.random.default_rng([seed, rnd, 0x5A])
    return sorted(rng.choice(num_clients, k, replace=False).tolist())
