"""Did the experts specialize? Routing profiles against the feature-shift clusters.

A mixture-of-experts method reports, for every client it trains, a label-free routing profile
(its mean gate weights over its local inputs; :meth:`~fedcoe_bench.method.FederatedMethod.routing_profiles`).
The simulator knows each client's cluster (it built the federation; no method sees it), so it can
ask whether a client's *top expert* (the argmax of its profile) follows its cluster: normalized
mutual information and purity, logged every round of a run with clusters, and the profiles with
their clusters in ``routing.csv``.
"""

from __future__ import annotations

import csv
import warnings

import torch
from torchmetrics.functional.clustering import normalized_mutual_info_score

from fedcoe_bench.data import Federation


class RoutingTable:
    """Mixin of a mixture-of-experts method (before :class:`~fedcoe_bench.method.FederatedMethod` in
    its bases): the server's table of each trained client's latest routing profile, served by
    ``routing_profiles`` and saved with the method's state. One small vector per client trained so
    far; the method calls :meth:`record_routing` in its ``aggregate``.

    Example:
        >>> class Table(RoutingTable, torch.nn.Module):
        ...     pass
        >>> t = Table()
        >>> t.record_routing(3, torch.tensor([0.25, 0.75]))
        >>> u = Table()
        >>> u.load_state_dict(t.state_dict())
        <All keys matched successfully>
        >>> u.routing_profiles()
        {3: tensor([0.2500, 0.7500])}
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.routing: dict[int, torch.Tensor] = {}  # client id -> its latest routing profile

    def record_routing(self, client: int, profile: torch.Tensor) -> None:
        self.routing[client] = profile.detach().cpu()

    def routing_profiles(self) -> dict[int, torch.Tensor]:
        return self.routing

    def get_extra_state(self) -> dict:
        return {"routing": dict(self.routing)}

    def set_extra_state(self, state: dict) -> None:
        self.routing = dict(state["routing"])


def expert_cluster_agreement(top_expert: torch.Tensor, cluster: torch.Tensor) -> dict[str, float]:
    """How well the top experts of N clients match their clusters.

    NMI (torchmetrics, arithmetic normalisation): :math:`I(E; C) / \\frac{1}{2}(H(E) + H(C))`,
    1 when experts and clusters are the same partition of the clients up to renaming, 0 when
    independent. Purity: :math:`\\frac{1}{N} \\sum_e \\max_c |\\{i: e_i = e, c_i = c\\}|`, the share of
    clients in the majority cluster of their top expert (1 when every expert serves one cluster,
    even if a cluster is split over several experts; 1/C for one expert serving all of C equal clusters).

    Example:
        >>> r = expert_cluster_agreement(torch.tensor([1, 1, 0, 0]), torch.tensor([0, 0, 1, 1]))
        >>> round(r["expert_cluster_nmi"], 4), r["expert_cluster_purity"]
        (1.0, 1.0)
    """
    top_expert, cluster = top_expert.long().cpu(), cluster.long().cpu()
    with warnings.catch_warnings():  # torch's note on sparse tensors, which torchmetrics builds internally
        warnings.filterwarnings("ignore", message="Sparse invariant checks")
        nmi = float(normalized_mutual_info_score(top_expert, cluster, average_method="arithmetic"))
    experts, clusters = int(top_expert.max()) + 1, int(cluster.max()) + 1
    joint = torch.bincount(top_expert * clusters + cluster, minlength=experts * clusters).view(experts, clusters)
    return {"expert_cluster_nmi": nmi, "expert_cluster_purity": float(joint.max(1).values.sum()) / len(cluster)}


def routing_diagnostics(profiles: dict[int, torch.Tensor], fed: Federation) -> dict[str, float]:
    """:func:`expert_cluster_agreement` over every client with a profile (its latest), for a
    federation with clusters; nothing otherwise."""
    if fed.num_clusters < 2 or not profiles:
        return {}
    ids = sorted(profiles)
    top = torch.stack([profiles[i].detach().float().cpu() for i in ids]).argmax(1)
    return expert_cluster_agreement(top, fed.clusters_of(ids))


def write_routing(profiles: dict[int, torch.Tensor], fed: Federation, path) -> None:
    """``routing.csv``: one row per client with a profile: client, cluster, expert_0 .. expert_{K-1}."""
    ids = sorted(profiles)
    clusters = fed.clusters_of(ids).tolist()
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        k = len(profiles[ids[0]]) if ids else 0
        out.writerow(["client", "cluster"] + [f"expert_{e}" for e in range(k)])
        for cid, cl in zip(ids, clusters):
            out.writerow([cid, cl] + [f"{v:.6f}" for v in profiles[cid].tolist()])
