"""FedAvg: Communication-Efficient Learning of Deep Networks from Decentralized Data (McMahan et al., AISTATS 2017)."""

from fedcoe_bench.method import FederatedMethod


class FedAvg(FederatedMethod):
    """Federated averaging. Every parameter is shared; each sampled client runs local SGD from the
    server model and the server takes the sample-weighted mean

    .. math:: w^{t+1} = \\sum_{i \\in S_t} \\frac{n_i}{\\sum_{j \\in S_t} n_j} w_i^{t+1}.

    Personalized and cold-start predictions are the global model's.

    Example:
        >>> import torch
        >>> m = FedAvg(num_classes=10, in_channels=1, image_size=28)
        >>> p = m.predict_global(torch.zeros(2, 1, 28, 28))
        >>> p.shape, bool(torch.allclose(p.sum(1), torch.ones(2)))
        (torch.Size([2, 10]), True)
    """

    batchable = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.net = self.make_backbone()
