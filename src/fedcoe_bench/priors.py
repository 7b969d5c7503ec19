"""Label priors: a client's label distribution differs from the pooled one, and predictions can be
reweighted for it (Saerens, Latinne & Decaestecker, 2002). The evaluator's adapter columns use these
for every method alike (``personal_lp_acc``, ``cold_start_lp_acc``)."""

from __future__ import annotations

import torch


def em_label_prior(probs: torch.Tensor, train_prior: torch.Tensor, iters: int = 50, tol: float = 1e-6,
                   group: torch.Tensor | None = None) -> torch.Tensor:
    """Estimate a new client's label prior from unlabeled posteriors (Saerens, Latinne & Decaestecker, 2002).

    EM on :math:`\\pi`: E-step :math:`p'(y|x) \\propto p(y|x)\\, \\pi_y / \\pi^{train}_y`;
    M-step :math:`\\pi_y = \\frac{1}{n} \\sum_x p'(y|x)`; stops when no entry moves by ``tol``.

    With ``group`` (a client index per row, ``0..G-1``, every client present) the EMs of G clients
    run side by side, each stopping on its own, and the result is ``[G, classes]``: one tensor
    program per iteration for all clients instead of a Python loop over them.

    Example:
        >>> p = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4]])
        >>> em_label_prior(p, torch.tensor([0.5, 0.5]))[0] > p[:, 0].mean()
        tensor(True)
        >>> both = em_label_prior(torch.cat([p, p.flip(1)]), torch.tensor([0.5, 0.5]), group=torch.tensor([0, 0, 0, 1, 1, 1]))
        >>> torch.allclose(both[1], both[0].flip(0))
        True
    """
    count = None if group is None else torch.bincount(group)[:, None].to(probs.dtype)
    prior = train_prior.expand(1 if count is None else len(count), -1).clone()
    done = torch.zeros(len(prior), dtype=torch.bool, device=probs.device)
    for _ in range(iters):
        if count is None:  # one client: the plain mean, as the single-client EM always computed it
            new = prior_adjust(probs, prior, train_prior).mean(0, keepdim=True)
        else:
            new = torch.zeros_like(prior).index_add_(0, group, prior_adjust(probs, prior[group], train_prior)) / count
        converged = (new - prior).abs().amax(1) < tol
        prior = torch.where(done[:, None], prior, new)  # a client that converged keeps its estimate
        done |= converged
        if bool(done.all()):
            break
    return prior[0] if group is None else prior


def prior_adjust(probs: torch.Tensor, prior: torch.Tensor, train_prior: torch.Tensor) -> torch.Tensor:
    """:math:`p'(y|x) \\propto p(y|x)\\, \\pi_y / \\pi^{train}_y`, renormalised per row (``prior``: one
    prior, or one per row)."""
    p = probs * (prior / train_prior.clamp_min(1e-12))
    return p / p.sum(1, keepdim=True).clamp_min(1e-12)
