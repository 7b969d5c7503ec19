"""FedCoE: federated coordinated dual-level mixture of experts (Dai et al., 2026, arXiv 2605.21264).

Only the paper's abstract is available to us. What it states: several independent global experts
on the server, one shared gating network that models client-expert correlation during
aggregation, a dual-level (global + local) mixture for personalization, and an adaptive path
that lets new clients use the global expert pool without local training. Everything more
specific below is *inferred* and is a switch (see the class's Args and the ablation configs in
benchmarks/sweeps/fedcoe_variants/).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from fedcoe_bench.errors import ConfigError
from fedcoe_bench.method import ClientContext, ClientUpdate, FederatedMethod, RoundContext, weighted_mean
from fedcoe_bench.models import Gate, entropy, mixture
from fedcoe_bench.routing import RoutingTable


class FedCoE(RoutingTable, FederatedMethod):
    """Coordinated dual-level mixture of experts.

    Server: experts :math:`E_1..E_K` and one gate :math:`G(x) \\in \\Delta^K` (shared).
    Client i: a local expert :math:`L_i` and a fusion gate :math:`h_i(x) \\in [0,1]` (personal).

    .. math::
        p_{glob}(y|x) = \\sum_k G(x)_k\\, \\mathrm{softmax}(E_k(x))_y \\qquad
        p_i(y|x) = h_i(x)\\, p_{glob}(y|x) + (1 - h_i(x))\\, \\mathrm{softmax}(L_i(x))_y

    *Paper*: "multiple independent global expert models", "a shared gating network that dynamically
    models client-expert correlations during aggregation", "dual-level", "new clients immediately
    leverage the global expert pool without local training". Everything else is inferred, a switch.

    **Who trains which expert** (``assignment``, inferred). ``gate``: every input trains every
    expert, weighted by :math:`G(x)`. ``hard`` / ``soft``: assignment by fit, as clustered and
    mixture FL get specialization (IFCA, Ghosh et al., 2020; FedEM, Marfoq et al., 2021). A client
    scores each expert on its local training data, :math:`\\bar\\ell_{ik}` the mean loss, and takes
    the assignment

    .. math:: a_i = \\mathrm{onehot}\\big(\\arg\\min_k\\, \\bar\\ell_{ik} + b_k\\big) \\;(\\texttt{hard}), \\quad
              a_{ik} \\propto e^{-(\\bar\\ell_{ik} + b_k)} \\;(\\texttt{soft}), \\quad
              a_{ik} \\propto e^{-s\\,(\\log \\bar\\ell_{ik} + b_k)} = \\bar\\ell_{ik}^{-s} e^{-s b_k} \\;(\\texttt{relative});

    ``relative`` compares experts by their loss *ratio* (``sharpness`` :math:`s`): ``soft``'s
    temperature of one nat flattens the assignment as every expert improves (a gap of a tenth of a
    nat decides at a loss of 0.2, not under a temperature of 1), so structure found mid-training
    fades; a ratio keeps its weight as the losses shrink, while at initialization, when every ratio
    is near 1, every expert still trains on every client. Its local objective and its personal
    prediction (it keeps :math:`a_i`, as IFCA's client keeps the model it chose) mix the experts by
    :math:`a_i` instead of :math:`G(x)`, and the gate learns to predict the assignment from inputs
    alone, :math:`\\lambda_{route}\\, CE(G(x), a_i)` (or the posterior below), so that new clients still
    route without labels.
    Every input of a client shares one target, so under label skew the gate can learn a client's
    labels along with its domain; ``route_class_balanced`` weighs each input by
    :math:`n_i / (C_i\\, n_i(y))`, :math:`C_i` the classes the client holds, so that each of them
    teaches the gate alike. ``route_target: posterior`` gives each input a target of its own, the
    posterior of each expert given its label, :math:`q_k(x, y) \\propto a_{ik}\\, p_k(y|x)` (a
    mixture of experts' E-step, Jordan and Jacobs, 1994): the server routes each image alone, so
    the gate should learn which expert classifies an image, not only which fits its client's data
    as a whole. The client reports :math:`a_i` (K label-derived scalars, like IFCA's
    cluster id or FedEM's weights). Balance belongs to the assignment, across clients,
    as a capacity: an expert whose load :math:`u_k = \\sum_i n_i a_{ik} / \\sum_i n_i` exceeds
    ``capacity`` times its share :math:`1/K` becomes dearer to choose,
    :math:`b_k \\leftarrow \\max(0,\\, b_k + \\gamma\\,(K u_k - \\texttt{capacity}))` (``assignment_balance``
    :math:`\\gamma`), and the bias falls back to 0 once it is under it. So an early lead cannot take
    every client, while fewer clusters than experts leave experts unused rather than split (a
    symmetric rule, :math:`b_k + \\gamma (K u_k - 1)`, forces every expert into use: its loads and
    NMI oscillated on the rotation clusters). The bias only chooses experts, it never enters a
    prediction.

    **Splitting a locked-in expert** (``split``, inferred). An assignment by fit locks in what it
    has: an expert that falls behind early fits no client better than a trained expert of another
    cluster, so no client ever picks it again, while two clusters share one expert. The capacity
    pushes clients off a loaded expert, not towards the deserted one. So the server splits, as k-means
    splits a codeword (Linde, Buzo and Gray, 1980) and clustered FL bipartitions a cluster by its
    clients' update directions (Sattler et al., 2020): when an expert k holds more than ``capacity``
    times its share :math:`1/K` of the clients in R (the mean of R's rows) while another expert j
    holds less than ``1 / capacity`` times its share (R is up to date only for the clients sampled
    lately: an expert being deserted still has stale rows), the round's clients whose assignment's
    largest weight is k are cut in two by the sign of their unit update directions' first principal
    component; k becomes the larger side's weighted average and j the other side's, the gate's
    output for j starts as k's with half of k's mass (:math:`\\log \\tfrac12` off both logits), j's
    assignment bias as k's, and in R the rows of j's side swap their weights of k and j. The clients
    choose again by fit when they are next sampled; no expert is split again until every client
    could have been (N / m rounds for N training clients, m a round), since until then R still
    holds the rows from before the split.

    **One model first, then its clusters** (``warmup_rounds`` :math:`W`, inferred). Two clusters that
    share an expert early stay together under an assignment by fit, whatever K, and a split needs an
    expert to be deserted first. So the experts start as one model (copies of expert 0) that every
    client trains alone, FedAvg, for W rounds: shared features first, as federated learning with
    hierarchical clustering does (Briggs et al., 2020). At round W the server cuts the round's clients
    into K clusters by k-means of their unit update directions of the model's body (clustered FL's
    cosine similarity, Sattler et al., 2020; a feature shift moves the features, a label skew mostly the
    head), and expert k's body becomes the average of cluster k's bodies, its head the average of
    every head (a cluster holds a few clients, whose label skew would otherwise decide what the new
    expert fits): K specialists of one round, each ahead on its cluster, which the assignment by fit
    then keeps (the lock-in, now working for the clusters). The gate learns only after round W, when
    there is something to route, and a client keeps no assignment from the warm-up (expert 0 names
    no cluster): until it trains again, the gate routes its personal prediction.

    **Local objective.** With :math:`w(x)` the training mixture weights (:math:`G(x)` or :math:`a_i`),

    .. math:: CE(p_i, y) + \\lambda_{glob} CE(p_{glob}, y) + \\lambda_{exp} \\sum_k \\mathrm{sg}(w(x)_k)\\,
              CE(E_k(x), y) + \\lambda_{bal}\\, \\mathrm{balance}(G) \\,[\\texttt{gate}]
              + \\lambda_{route}\\, CE(G(x), a_i \\text{ or } q(x, y)) \\,[\\text{by fit}] ,

    where (``normalize_loss``) the gradient that reaches the global level through the first three
    terms is divided by :math:`d = 1 + \\lambda_{glob} + \\lambda_{exp}`: the experts' gradient
    multipliers sum to at most one, as a single model's, while the local expert and the fusion gate,
    which only the first term trains, keep a single model's whole step. The same ``lr`` is then the
    same step size as every other method's, for the shared experts and the personal model alike.
    The balance term is Switch's :math:`K \\sum_k f_k P_k` (Fedus et al., 2022).

    **Coordinated aggregation** (inferred): each client reports its routing profile
    :math:`r_i = \\mathrm{mean}_{x \\in D_i} G(x)` (``gate``) or its assignment :math:`a_i`; the
    server keeps R (rows :math:`r_i`, ``routing.csv``) and sets :math:`E_k \\leftarrow \\sum_i n_i
    (\\epsilon + r_{ik}) E_k^i / \\sum_i n_i (\\epsilon + r_{ik})` (unchanged when no client uses k);
    the gate by FedAvg. ``balance_rate`` :math:`\\gamma'` (``gate`` only) moves a routing bias inside
    :math:`G` against the load measured by R (DeepSeek-V3's auxiliary-loss-free balancing).

    **Cold start** (inferred; no labels, no gradient steps): one pass of G over the new client's
    unlabeled inputs gives :math:`r_j`; routing becomes :math:`\\pi_j(x)_k \\propto G(x)_k\\,
    r_{jk}^{\\beta}`, with :math:`\\beta = 1 - H(r_j)/\\log K` (``adaptive``), a number, or
    ``calibrated``: every sampled training client scores the cold-start predictor on up to
    ``calibration_samples`` of its local validation split for each beta of ``beta_grid`` before
    training, and new clients are served the beta of best mean score (an average over rounds with
    decay ``calibration_decay``). No label-prior correction is served: that is the
    ``cold_start_lp_acc`` column, the same for every method.

    Results of each switch: ``benchmarks/results/mnist10k_ablation.md``,
    ``benchmarks/results/mnist10k_tuning.md`` and, on the rotation clusters (``split``,
    ``route_target``, ``warmup_rounds``), ``benchmarks/results/mnist10k_shift.md``.

    Args:
        num_experts: K.
        top_m: sparse routing, keep the m largest gate weights (0: dense).
        lambda_glob, lambda_bal, lambda_expert, lambda_route: loss weights above.
        route_class_balanced: the route term's class weights above.
        route_target: the route term's target, ``assignment`` or ``posterior`` (above).
        expert_loss_routed: weight each expert's own loss by its (fixed) mixture weight; false: 1/K.
        normalize_loss: divide the global level's gradient by :math:`1 + \\lambda_{glob} + \\lambda_{exp}` (above).
        assignment: ``gate``, ``hard``, ``soft`` or ``relative`` (above; the default chosen on
            validation, see the results pages).
        sharpness: :math:`s` of ``relative``.
        assignment_balance: :math:`\\gamma` of the assignment's bias (every assignment by fit).
        capacity: the multiple of its share :math:`1/K` of the clients an expert may take before its
            bias grows (Switch Transformer's capacity factor, Fedus et al., 2022).
        split: split an overloaded expert into a deserted one (above; an assignment by fit and the shared gate only).
        warmup_rounds: W above (0: the experts are independent from the start; an assignment by fit only,
            not with ``split``).
        coordinated: routing-weighted expert aggregation; false: plain n-weighted averaging.
        coordination_eps: the epsilon above (0 is the literal rule).
        shared_gate: one gate aggregated on the server; false: a personal gate per client (the server
            then routes through the initial gate).
        local_level: the local expert and fusion gate; false: personal = global mixture.
        local_warm_start: a client's local expert starts as its most-used global expert.
        local_prior: the global level of the personal mixture is reweighted by the client's own
            add-one-smoothed label frequencies, :math:`p_{glob}(y|x)\\, \\hat\\pi_i(y) / u(y)`.
        cold_start_prior: apply the routing prior for new clients; false: G alone.
        beta: ``adaptive``, ``calibrated`` or a number.
        calibration_decay: the decay above, in (0, 1]; 1 weighs every round alike.
        balance_rate: :math:`\\gamma'` above (0: off; needs ``shared_gate`` and ``assignment: gate``).

    Example:
        >>> m = FedCoE(num_experts=3, num_classes=4, in_channels=1, image_size=8)
        >>> x = torch.randn(5, 1, 8, 8)
        >>> [bool(torch.allclose(p.sum(1), torch.ones(5))) for p in (m.predict_global(x), m.predict_personal(x))]
        [True, True]
    """

    personal = ("local.", "fusion.", "local_ready", "label_counts")
    server_only = ("calibration",)
    received_only = ("assign_bias", "gate.route_bias")  # the server sets both from the load it measures
    # What a config written before normalize_loss and assignment existed ran with (their defaults change
    # what is trained): such a run is not the run of a config that leaves them at their defaults
    # (fedcoe_bench.runs.argument_default).
    predating = {"normalize_loss": False, "assignment": "gate"}
    serving = ("cold_start_prior", "beta")  # training never reads them (the self-scores are always collected)
    beta_grid = (0.0, 0.5, 1.0, 2.0, "adaptive")
    # Scores are averaged over every sampled client and round, so a few validation samples per client
    # suffice; 128 cost 17% of a training round (benchmarks/perf/RESULTS.md), 32 cost about 5%.
    calibration_samples = 32

    def __init__(self, num_experts: int = 4, top_m: int = 0, lambda_glob: float = 1.0, lambda_bal: float = 0.01,
                 lambda_expert: float = 4.0, lambda_route: float = 1.0, route_class_balanced: bool = False,
                 route_target: str = "assignment",
                 expert_loss_routed: bool = True, normalize_loss: bool = True, assignment: str = "soft",
                 sharpness: float = 4.0, assignment_balance: float = 0.1, capacity: float = 2.0, split: bool = False,
                 warmup_rounds: int = 0,
                 coordinated: bool = True, coordination_eps: float = 0.0,
                 shared_gate: bool = True, local_level: bool = True, local_warm_start: bool = True,
                 local_prior: bool = True, cold_start_prior: bool = True, beta: float | str = "calibrated",
                 calibration_decay: float = 1.0, balance_rate: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if not (isinstance(beta, (int, float)) or beta in ("adaptive", "calibrated")):
            raise ConfigError(f"method.init_args.beta must be a number, 'adaptive' or 'calibrated' (got {beta!r})")
        if assignment not in ("gate", "hard", "soft", "relative"):
            raise ConfigError(f"method.init_args.assignment must be gate, hard, soft or relative (got {assignment!r})")
        if route_target not in ("assignment", "posterior"):
            raise ConfigError(f"method.init_args.route_target must be assignment or posterior (got {route_target!r})")
        if sharpness <= 0:
            raise ConfigError(f"method.init_args.sharpness must be > 0 (got {sharpness}); it multiplies log loss ratios")
        if not 0 < calibration_decay <= 1:
            raise ConfigError(f"method.init_args.calibration_decay must be in (0, 1] (got {calibration_decay}); "
                              f"1 averages every round alike")
        if balance_rate < 0 or (balance_rate and not (shared_gate and assignment == "gate")):
            raise ConfigError(f"method.init_args.balance_rate must be >= 0 and needs shared_gate: true and assignment: "
                              f"gate (got {balance_rate}); with an assignment by fit, balance with assignment_balance")
        if assignment_balance < 0:
            raise ConfigError(f"method.init_args.assignment_balance must be >= 0 (got {assignment_balance})")
        if split and (assignment == "gate" or not shared_gate):
            raise ConfigError("method.init_args.split must be false with assignment: gate or shared_gate: false (it "
                              "splits the clients assigned to an expert and the shared gate's output); use assignment "
                              "hard, soft or relative with the shared gate")
        if warmup_rounds < 0 or (warmup_rounds and (assignment == "gate" or not coordinated)):
            raise ConfigError(f"method.init_args.warmup_rounds must be >= 0 and needs an assignment by fit (hard, soft "
                              f"or relative) with coordinated: true (got {warmup_rounds}); it assigns clients to experts")
        if warmup_rounds and split:  # in the warm-up every client is on expert 0, which split would read as overload
            raise ConfigError("method.init_args.warmup_rounds must be 0 with split: true (two ways to separate "
                              "clusters; set one of them)")
        if capacity < 1:
            raise ConfigError(f"method.init_args.capacity must be >= 1, a multiple of an expert's share 1/K "
                              f"(got {capacity}); below 1 every expert would be over it")
        self.calibration_decay, self.balance_rate = calibration_decay, balance_rate
        self.num_experts, self.lambda_glob, self.lambda_bal, self.lambda_expert = num_experts, lambda_glob, lambda_bal, lambda_expert
        self.lambda_route, self.route_class_balanced, self.route_target = lambda_route, route_class_balanced, route_target
        self.normalize_loss = normalize_loss
        self.assignment, self.assignment_balance, self.capacity = assignment, assignment_balance, capacity
        self.sharpness, self.split, self.warmup_rounds = sharpness, split, warmup_rounds
        self.coordinated, self.coordination_eps, self.local_level = coordinated, coordination_eps, local_level
        self.local_warm_start, self.cold_start_prior, self.beta = local_warm_start, cold_start_prior, beta
        self.local_prior, self.expert_loss_routed = local_prior, expert_loss_routed
        self.experts = self.make_experts(num_experts)
        for expert in self.experts[1:] if warmup_rounds else ():  # one model until the warm-up ends
            expert.load_state_dict(self.experts[0].state_dict())
        self.gate = Gate(self.in_channels, num_experts, top_m=top_m, route_bias=balance_rate > 0)
        if not shared_gate:
            self.personal = self.personal + ("gate.",)
        if assignment != "gate":  # shared: the server sets it, clients read it to choose experts
            self.register_buffer("assign_bias", torch.zeros(num_experts))
            # personal: the client's latest a_i, which its personal prediction mixes the experts by
            self.register_buffer("client_assignment", torch.zeros(num_experts))
            self.personal = self.personal + ("client_assignment",)
        if local_level:
            self.local = self.make_backbone()
            self.fusion = Gate(self.in_channels, 2)  # h(x) = its first softmax output
            self.register_buffer("local_ready", torch.zeros(1))
            self.register_buffer("label_counts", torch.zeros(self.num_classes))
        if split:  # server-only: the round of the last split
            self.register_buffer("last_split", torch.zeros(1))
            self.server_only = self.server_only + ("last_split",)
        # server-side statistics, filled by aggregate() from client reports (never sent to clients)
        self.register_buffer("calibration", torch.zeros(2, len(self.beta_grid)))  # [decayed sum, weight] x beta
        self._calibration: torch.Tensor | None = None  # this client's self-scores, from its validation split
        self._assignment: torch.Tensor | None = None  # this client's a_i (an assignment by fit)
        self._warm = False  # this client trains in the warm-up (expert 0 alone)
        self._class_weight: torch.Tensor | None = None  # the route term's weight of each label at this client

    # ------------------------------------------------------------------ the two levels
    def log_global(self, x: torch.Tensor, log_w: torch.Tensor | None = None, logits: torch.Tensor | None = None):
        log_w = self.gate.log_weights(x) if log_w is None else log_w
        return mixture(log_w, self.experts(x) if logits is None else logits)

    def log_personal(self, x: torch.Tensor, log_glob: torch.Tensor) -> torch.Tensor:
        if not self.local_level:
            return log_glob
        if self.local_prior:
            log_prior = (self.label_counts + 1).log() - (self.label_counts + 1).sum().log()
            log_glob = (log_glob + log_prior + math.log(self.num_classes)).log_softmax(-1)
        log_h = self.fusion.log_weights(x)  # [B, 2]: log h, log (1 - h)
        return torch.logsumexp(torch.stack([log_h[:, :1] + log_glob, log_h[:, 1:] + self.local(x).log_softmax(-1)]), 0)

    def training_step(self, batch, batch_idx):
        x, y = batch
        log_g = self.gate.log_weights(x)
        logits = self.experts(x)
        # the training mixture: the gate's weights, or the client's assignment for every input
        log_w = log_g if self._assignment is None else _log_weights(self._assignment, len(x))
        log_glob = mixture(log_w, logits)
        # normalized: the global level's three terms are divided by d, so that the experts' gradient
        # multipliers sum to at most one; the local level, a model of its own, keeps its whole step
        d = (1 + self.lambda_glob if self.local_level else 1) + self.lambda_expert if self.normalize_loss else 1
        loss = F.nll_loss(self.log_personal(x, scale_grad(log_glob, 1 / d)), y)
        if self.local_level:  # without the local level the first term already is the global mixture
            loss = loss + self.lambda_glob / d * F.nll_loss(log_glob, y)
        if self.lambda_expert:
            ce = F.cross_entropy(logits.flatten(0, 1), y.repeat(self.num_experts), reduction="none")
            w = log_w.exp().detach() if self.expert_loss_routed else torch.full_like(log_w, 1 / self.num_experts)
            loss = loss + self.lambda_expert / d * (w.t().flatten() * ce).sum() / len(y)
        if self._warm:  # the experts are one model: there is nothing to route yet
            return loss
        if self._assignment is not None:  # the gate learns to route as the assignment does, from inputs alone
            target = self._assignment
            if self.route_target == "posterior":  # each input's own: which expert explains its label
                log_p = -F.cross_entropy(logits.flatten(0, 1), y.repeat(self.num_experts), reduction="none")
                target = (self._assignment.log() + log_p.view(self.num_experts, -1).t()).softmax(1).detach()
            fit = (log_g * target).sum(1)
            weight = 1.0 if self._class_weight is None else self._class_weight[y]
            return loss - self.lambda_route * (weight * fit).mean()
        if self.lambda_bal:
            g = log_g.exp()
            frac = F.one_hot(g.argmax(1), self.num_experts).float().mean(0)
            loss = loss + self.lambda_bal * self.num_experts * (frac * g.mean(0)).sum()
        return loss

    @torch.no_grad()
    def assign(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """This client's assignment :math:`a_i` from each expert's mean loss on its data (class docstring)."""
        loss = torch.stack([F.cross_entropy(expert(x), y) for expert in self.experts])
        if self.assignment == "gate":  # no assignment trains; the best fit, for diagnostics
            return F.one_hot(loss.argmin(), self.num_experts).to(loss)
        if self.assignment == "relative":
            return (-self.sharpness * (loss.clamp_min(1e-8).log() + self.assign_bias)).softmax(0)
        loss = loss + self.assign_bias
        if self.assignment == "hard":
            return F.one_hot(loss.argmin(), self.num_experts).to(loss)
        return (-loss).softmax(0)

    # ------------------------------------------------------------------ client side
    @torch.no_grad()
    def on_client_start(self, x: torch.Tensor, y: torch.Tensor, ctx: ClientContext) -> None:
        self._calibration = None  # a client reports its own scores or none
        # a new client fine-tunes after ctx.round rounds have ended, a training client within round ctx.round
        self._warm = ctx.round + ctx.finetune <= self.warmup_rounds
        if self.assignment == "gate":
            self._assignment = None
        elif self._warm:  # the experts are one model, expert 0
            self._assignment = F.one_hot(torch.tensor(0, device=x.device), self.num_experts).to(x.dtype)
        else:
            self._assignment = self.assign(x, y)
        counts = torch.bincount(y, minlength=self.num_classes)
        self._class_weight = None
        if self.route_class_balanced and self._assignment is not None:  # mean 1 over the client's inputs
            self._class_weight = len(y) / ((counts > 0).sum() * counts.clamp_min(1)).to(x.dtype)
        if self._assignment is not None and not self._warm:  # a warm-up client keeps none: the gate routes it
            self.client_assignment.copy_(self._assignment)
        if self.local_level:
            self.label_counts.copy_(counts)
        if self.local_level and self.local_warm_start and not self.local_ready.item():
            k = int((self.gate(x).mean(0) if self._assignment is None else self._assignment).argmax())
            self.local.load_state_dict(self.experts[k].state_dict())  # in place: buffers too, views kept
            self.local_ready.fill_(1.0)

    @torch.no_grad()
    def on_client_validation(self, x: torch.Tensor, y: torch.Tensor, ctx: ClientContext) -> None:
        """Pretend to be a new client: score every cold-start setting (server model) on up to
        ``calibration_samples`` of the validation split; under every beta, so that beta changes
        predictions only (``fedbench eval`` can switch it). Only the scores are reported."""
        x, y = x[: self.calibration_samples], y[: self.calibration_samples]
        self._calibration = self._self_score(x, y) if len(y) else None

    @torch.no_grad()
    def on_client_end(self, x: torch.Tensor, ctx: ClientContext) -> dict[str, torch.Tensor]:
        w = self.gate(x)
        report = {"routing": w.mean(0), "gate_entropy": entropy(w).mean()}
        if self._assignment is not None:
            report["assignment"] = self._assignment
        if self.local_level:
            report["fusion_h"] = self.fusion(x)[:, 0].mean()
        # Every client reports the same keys (ranks stack them); a client without validation data, weight 0.
        scores = self._calibration
        report["calibration"] = torch.zeros(len(self.beta_grid), device=x.device) if scores is None else scores
        report["calibration_weight"] = torch.tensor(float(scores is not None), device=x.device)
        return report

    def _self_score(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Accuracy of every beta's cold-start prediction on this client's data: [betas]."""
        log_w, logits = self.gate.log_weights(x), self.experts(x)
        r = log_w.exp().mean(0)
        return torch.stack([(mixture(self._routing_prior(log_w, r, beta), logits).argmax(1) == y).float().mean()
                            for beta in self.beta_grid])

    @torch.no_grad()
    def cold_start_diagnostics(self, unlabeled, x, y) -> dict[str, float]:
        """``cold_start_gate_assignment_agreement``: does the gate, from the new client's unlabeled
        inputs, route it to the expert its labelled data would assign it (``gate``: the best fit)?"""
        return {"gate_assignment_agreement": float(self.gate(unlabeled).mean(0).argmax() == self.assign(x, y).argmax())}

    # ------------------------------------------------------------------ server side
    def aggregate(self, server: torch.Tensor, updates: list[ClientUpdate],
                  ctx: RoundContext) -> tuple[torch.Tensor, dict[str, float]]:
        """The coordinated aggregation above. Logs gate entropy, expert usage (R's column sums), the mean
        fusion weight and, when the cold-start setting is calibrated, the setting served after this
        round: ``cold_start_beta_index`` (its position in ``beta_grid``, the last being ``adaptive``),
        ``cold_start_label_prior`` (0/1) and ``cold_start_self_score`` (its calibrated score)."""
        n = torch.tensor([u.weight for u in updates], dtype=server.dtype, device=server.device)
        new = weighted_mean([u.shared for u in updates], n, server)  # gate (and everything else) by FedAvg
        gate_profiles = torch.stack([u.report["routing"] for u in updates]).to(server.dtype)
        assigned = self.assignment != "gate"
        profiles = torch.stack([u.report["assignment"] for u in updates]).to(server.dtype) if assigned else gate_profiles
        warm = ctx.round <= self.warmup_rounds
        if warm:
            profiles = self.warm_up(new, server, updates, profiles, n, ctx)
        for u, r in zip(updates, profiles):
            self.record_routing(u.client, r)  # R: client id -> routing profile r_i (or assignment a_i)
        for k in range(self.num_experts) if not warm else ():
            span = self.span(f"experts.{k}.")
            w = n * (self.coordination_eps + profiles[:, k]) if self.coordinated else n
            new[span] = weighted_mean([u.shared[span] for u in updates], w, server[span])
        load = (n[:, None] * profiles).sum(0) / n.sum()
        if self.balance_rate:  # clients never change the bias: the server sets it from R
            bias = self.span("gate.route_bias")
            new[bias] = server[bias] - self.balance_rate * (self.num_experts * load - 1)
        if assigned and ctx.round >= self.warmup_rounds:  # an expert over its capacity becomes dearer to choose
            bias = self.span("assign_bias")
            new[bias] = (server[bias] + self.assignment_balance * (self.num_experts * load - self.capacity)).clamp_min(0)
        split = self.split_experts(new, server, updates, profiles, ctx) if self.split else None
        has = "calibration" in updates[0].report
        weights = torch.stack([u.report["calibration_weight"] for u in updates]).to(self.calibration) if has else None
        if has and weights.sum() > 0:  # the mean over the clients that scored a validation split
            scores = torch.stack([u.report["calibration"] for u in updates]).to(self.calibration)
            round_mean = (weights[:, None] * scores).sum(0) / weights.sum()
            self.calibration.mul_(self.calibration_decay)  # the sum and its weight alike
            self.calibration[0] += round_mean
            self.calibration[1] += 1
        scalars = {
            "gate_entropy": float(torch.stack([u.report["gate_entropy"] for u in updates]).mean()),
            **{f"expert_usage_{k}": float(v) for k, v in enumerate(profiles.sum(0))},
            **self._served_diagnostics(),
        }
        if self.local_level:
            scalars["fusion_h"] = float(torch.stack([u.report["fusion_h"] for u in updates]).mean())
        if self.split:
            scalars["expert_split"] = float(split is not None)
        if assigned:  # does the gate route each client, from its inputs alone, where its assignment sends it?
            scalars["gate_assignment_agreement"] = float((gate_profiles.argmax(1) == profiles.argmax(1)).double().mean())
        return new, scalars

    @torch.no_grad()
    def warm_up(self, new: torch.Tensor, server: torch.Tensor, updates: list[ClientUpdate], profiles: torch.Tensor,
                n: torch.Tensor, ctx: RoundContext) -> torch.Tensor:
        """A warm-up round (class docstring, ``warmup_rounds``): writes every expert into ``new`` as the
        average of the clients' expert 0, before the last warm-up round over all of them, at it over the
        clients of one cluster each; returns the assignments for R: the clients' own, then the clusters."""
        one = self.span("experts.0.")  # ``new`` holds every client's expert 0 averaged (FedAvg of all)
        if ctx.round < self.warmup_rounds:
            for k in range(1, self.num_experts):
                new[self.span(f"experts.{k}.")] = new[one]
            return profiles
        # the body's update directions: a feature shift moves the features, a label skew mostly the head
        body = self.span("experts.0.body.")
        moves = F.normalize(torch.stack([u.shared[body] - server[body] for u in updates]).float(), dim=1)
        labels = kmeans(moves.cpu(), self.num_experts, seed=ctx.round).to(server.device)  # its generator is on the CPU
        clusters = F.one_hot(labels, self.num_experts).to(server.dtype)
        # each expert's body from its cluster, the head from every client (already in ``new``): a cluster
        # of a few label-skewed clients would bias it to their labels
        head = new[self.span("experts.0.head.")].clone()
        models = [u.shared[one] for u in updates]
        for k in range(self.num_experts):
            new[self.span(f"experts.{k}.")] = weighted_mean(models, n * clusters[:, k], server[one])
            new[self.span(f"experts.{k}.head.")] = head
        return clusters

    @torch.no_grad()
    def split_experts(self, new: torch.Tensor, server: torch.Tensor, updates: list[ClientUpdate],
                      profiles: torch.Tensor, ctx: RoundContext) -> tuple[int, int] | None:
        """Split an overloaded expert into a deserted one (class docstring, ``split``): writes both experts,
        the gate's output row and the assignment bias into ``new``, moves the assignment of the clients
        that went to the copy in R, and returns ``(overloaded, deserted)``; None when nothing is split."""
        if ctx.round - self.last_split < ctx.num_clients / ctx.clients:  # R is not yet refreshed since the last
            return None
        share = self.num_experts * torch.stack(list(self.routing.values())).float().mean(0)
        k, j = int(share.argmax()), int(share.argmin())
        mine = [i for i, r in enumerate(profiles) if int(r.argmax()) == k]
        if share[k] <= self.capacity or share[j] >= 1 / self.capacity or len(mine) < 2:
            return None
        span = self.span(f"experts.{k}.")
        moves = torch.stack([updates[i].shared[span] - server[span] for i in mine]).float()  # eigh: no half precision
        moves = F.normalize(moves, dim=1)
        moves = moves - moves.mean(0)  # the first principal component of the update directions (CFL's cosines)
        side = torch.linalg.eigh(moves @ moves.t()).eigenvectors[:, -1] > 0
        w = torch.tensor([updates[i].weight for i in mine], dtype=server.dtype, device=server.device) * profiles[mine, k]
        if side.all() or not side.any():
            return None
        if (w * side).sum() > (w * ~side).sum():  # the larger side stays on k
            side = ~side
        models = [updates[i].shared[span] for i in mine]
        new[span] = weighted_mean(models, w * ~side, server[span])
        new[self.span(f"experts.{j}.")] = weighted_mean(models, w * side, server[span])
        last = len(self.gate.net) - 1  # the copy starts with half of k's gate mass: log 1/2 off both logits
        weight, bias = (self.view_like(new, f"gate.net.{last}.{p}") for p in ("weight", "bias"))
        weight[j] = weight[k]
        bias[k] -= math.log(2)
        bias[j] = bias[k]
        self.view_like(new, "assign_bias")[j] = self.view_like(new, "assign_bias")[k]
        for i in (i for i, s in zip(mine, side) if s):
            r = self.routing[updates[i].client].clone()
            r[[j, k]] = r[[k, j]]
            self.record_routing(updates[i].client, r)
        self.last_split.fill_(ctx.round)
        return k, j

    def start_finetune(self) -> tuple[str, ...]:
        """A new client fine-tunes its local level (local expert, warm-started by
        :meth:`on_client_start`, and fusion gate); without one, the gate."""
        return ("local.", "fusion.") if self.local_level else ("gate.",)

    def _served_diagnostics(self) -> dict[str, float]:
        if not (self.cold_start_prior and self.beta == "calibrated") or self.calibration[1].max() == 0:
            return {}
        b = self.beta_grid.index(self.cold_start_setting())
        return {"cold_start_beta_index": float(b), "cold_start_self_score": float(self.self_scores()[b])}

    def save_artifacts(self, run_dir) -> None:
        """The calibrated self-score of every cold-start setting as ``calibration.csv`` (``weight``:
        the decayed number of rounds behind it), the setting served to new clients marked. (R, the
        client-expert correlation matrix, is :meth:`routing_profiles`, which the run writes as
        ``routing.csv``.)"""
        scores, count = self.self_scores(), self.calibration[1]
        served = self.cold_start_setting() if self.cold_start_prior else None
        with open(Path(run_dir) / "calibration.csv", "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["beta", "mean_self_accuracy", "weight", "served"])
            for b, beta in enumerate(self.beta_grid):
                weight = float(count[b])
                mean = f"{float(scores[b]):.6f}" if weight else "nan"
                out.writerow([beta, mean, f"{weight:.4f}", int(beta == served)])

    # ------------------------------------------------------------------ predictors
    @torch.no_grad()
    def predict_global(self, x):
        return self.log_global(x).exp()

    @torch.no_grad()
    def predict_personal(self, x):
        return self.log_personal(x, self.log_global(x, self._personal_weights(x))).exp()

    def _personal_weights(self, x: torch.Tensor) -> torch.Tensor | None:
        """A client that has an assignment mixes the experts by it, as it trained (IFCA's client
        predicts with the model it chose); otherwise (``gate``, a client never assigned) the gate routes."""
        if self.assignment == "gate" or not self.client_assignment.any():
            return None
        return _log_weights(self.client_assignment, len(x))

    def _routing_prior(self, log_w: torch.Tensor, r: torch.Tensor, beta) -> torch.Tensor:
        """log pi(x) with pi(x)_k proportional to G(x)_k r_k^beta."""
        if beta == "adaptive":
            beta = 1.0 - float(entropy(r)) / math.log(self.num_experts) if self.num_experts > 1 else 0.0
        return (log_w + beta * r.clamp_min(1e-12).log()).log_softmax(1)

    def cold_start_setting(self) -> float | str:
        """The beta served to new clients."""
        if self.beta != "calibrated":
            return self.beta
        if self.calibration[1].max() == 0:
            return "adaptive"
        return self.beta_grid[int(self.self_scores().argmax())]

    def self_scores(self) -> torch.Tensor:
        """The calibrated self-score of each beta, ``[betas]``; 0 where nothing was reported."""
        total, count = self.calibration
        return total / count.clamp_min(1)

    @torch.no_grad()
    def predict_cold_start(self, x, unlabeled):
        if not self.cold_start_prior:
            return self.predict_global(x)
        r = self.gate(unlabeled).mean(0)
        log_w = self._routing_prior(self.gate.log_weights(x), r, self.cold_start_setting())
        return mixture(log_w, self.experts(x)).exp()


def _log_weights(assignment: torch.Tensor, n: int) -> torch.Tensor:
    """One client's assignment :math:`a_i` as the ``[n, K]`` log mixture weights of each of its inputs."""
    return assignment.clamp_min(0).log().expand(n, -1)


def kmeans(x: torch.Tensor, k: int, seed: int = 0, restarts: int = 10, iterations: int = 100) -> torch.Tensor:
    """Lloyd's k-means of the rows of ``x`` with k-means++ seeding (Arthur and Vassilvitskii, 2007), the
    best of ``restarts`` by inertia; the cluster of each row, ``[n]`` (fewer than k clusters when n < k).
    Seeded by ``seed`` alone, so that it draws nothing from the run's random streams.

    Example:
        >>> a, b, c, d = kmeans(torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.0, 5.1]]), 2).tolist()
        >>> a == b != c == d
        True
    """
    g = torch.Generator().manual_seed(seed)
    best, best_inertia = None, math.inf
    for _ in range(restarts):
        centers = x[torch.randint(len(x), (1,), generator=g)]
        while len(centers) < min(k, len(x)):
            d = torch.cdist(x, centers).min(1).values.square()
            if d.sum() == 0:  # fewer distinct rows than clusters
                break
            centers = torch.cat([centers, x[torch.multinomial(d, 1, generator=g)]])
        for _ in range(iterations):
            labels = torch.cdist(x, centers).argmin(1)
            moved = torch.stack([x[labels == c].mean(0) if (labels == c).any() else centers[c] for c in range(len(centers))])
            if torch.equal(moved, centers):
                break
            centers = moved
        inertia = float((x - centers[labels]).square().sum())
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best


def scale_grad(t: torch.Tensor, c: float) -> torch.Tensor:
    """``t`` in the forward pass, ``c`` times its gradient in the backward pass.

    Example:
        >>> x = torch.ones(2, requires_grad=True)
        >>> scale_grad(x * 3, 0.5).sum().backward()
        >>> x.grad
        tensor([1.5000, 1.5000])
    """
    return t if c == 1 else t * c + (t * (1 - c)).detach()
