"""What a method costs, next to what it scores: parameters, communication and the compute of a prediction.

Every run records these in ``summary.json`` (``cost``) and tables print them, so that a mixture of K
experts is seen next to the K times larger model it is, and a method that sends twice the bytes
(SCAFFOLD's control variates) is seen to.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from fedcoe_bench.method import ClientUpdate, FederatedMethod


def numel(method: FederatedMethod, kind: str, prefixes: tuple[str, ...] = ("",)) -> int:
    return sum(t.numel() for name, t in method.named_state(kind) if name.startswith(prefixes))


def report_bytes(updates: list[ClientUpdate]) -> int:
    """Bytes of one client's report (the same keys and shapes on every client)."""
    return sum(t.numel() * t.element_size() for t in updates[0].report.values()) if updates else 0


@torch.no_grad()
def prediction_flops(method: FederatedMethod, x: torch.Tensor) -> dict[str, int]:
    """Floating-point operations of one input's global and personal prediction (torch's own counter)."""
    out = {}
    for name in ("predict_global", "predict_personal"):
        counter = FlopCounterMode(display=False)
        with counter:
            getattr(method, name)(x[:1])
        out[f"{name.removeprefix('predict_')}_prediction_flops"] = counter.get_total_flops()
    return out


def method_cost(method: FederatedMethod, x: torch.Tensor, report: int) -> dict[str, int]:
    """The cost of ``method`` (flattened): parameters held by the server (shared and server-only) and by
    one client (shared and personal), bytes a client receives and sends per round (its shared state;
    sent, less what is ``received_only``, plus its ``report`` bytes), and the FLOPs of one prediction on
    an input shaped like ``x``'s rows.

    Example:
        >>> from fedcoe_bench.baselines import FedAvg
        >>> m = FedAvg(num_classes=10, in_channels=1, image_size=12)
        >>> m.flatten_parameters()
        >>> c = method_cost(m, torch.zeros(1, 1, 12, 12), report=0)
        >>> c["client_params"] == c["server_params"] == sum(p.numel() for p in m.parameters()), c["bytes_sent"] == 4 * c["client_params"]
        (True, True)
    """
    shared, element = numel(method, "shared"), method.flat["shared"].element_size()
    read = numel(method, "shared", method.received_only)  # no prefixes: nothing (str.startswith of an empty tuple)
    return {
        "server_params": shared + numel(method, "server"),
        "client_params": shared + numel(method, "personal"),
        "bytes_received": shared * element,
        "bytes_sent": (shared - read) * element + report,
        **prediction_flops(method, x),
    }
