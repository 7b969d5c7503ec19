"""Backbones as body + head, the split that FedPer-style methods share and keep."""

from __future__ import annotations

import importlib
import inspect

import torch
from torch import nn

from fedcoe_bench.errors import ConfigError


class Backbone(nn.Module):
    """``head(body(x))``: ``body`` maps images to ``feature_dim`` features, ``head`` is linear."""

    feature_dim: int

    def __init__(self, body: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.body = body
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class CNN(Backbone):
    """The CNN of McMahan et al. (2017): two 5x5 conv layers (32, 64 channels) each followed by 2x2
    max-pooling, a 512-unit fully connected layer and a linear head. Works for any channel count;
    the image side must be divisible by 4.

    Example:
        >>> CNN(in_channels=3, num_classes=10, image_size=32)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: int = 32):
        side = image_size // 4
        # In-place ReLUs: no second copy of the largest activations (1.2x-1.4x evaluation images/s on CPU).
        # Each ReLU after its pooling, not before: max and ReLU commute, so values and gradients are
        # bitwise those of conv-ReLU-pool, on a quarter of the elements (+1% training, +3% evaluation images/s on CPU).
        body = nn.Sequential(
            nn.Conv2d(in_channels, width, 5, padding=2), nn.MaxPool2d(2), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 5, padding=2), nn.MaxPool2d(2), nn.ReLU(inplace=True),
            nn.Flatten(), nn.Linear(2 * width * side * side, 512), nn.ReLU(inplace=True),
        )
        super().__init__(body, 512, num_classes)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(2, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(2, cout)
        self.skip = nn.Identity()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(2, cout))

    def forward(self, x):
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.skip(x))


class ResNet18(Backbone):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool; He et al., 2016).

    GroupNorm replaces BatchNorm, as is usual under non-IID federated training (Hsieh et al.,
    2020): batch statistics differ per client and running averages would have to be aggregated.
    With GroupNorm every piece of state is a parameter.

    Example:
        >>> ResNet18(in_channels=3, num_classes=100)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 100])
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, width: int = 64):
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.GroupNorm(2, width), nn.ReLU()]
        cin = width
        for i, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
            stride = 1 if i == 0 else 2
            layers += [_Block(cin, cout, stride), _Block(cout, cout, 1)]
            cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        super().__init__(nn.Sequential(*layers), cin, num_classes)


BACKBONES = {"cnn": CNN, "resnet18": ResNet18}


def build_backbone(name: str, in_channels: int, num_classes: int, image_size: int, **kwargs) -> nn.Module:
    """The backbone ``name``: ``cnn``, ``resnet18``, or the class path (``module.Class``) of a user's
    module built as ``Class(in_channels=..., num_classes=..., image_size=..., **kwargs)`` that has a
    ``body`` (images to features) and a linear ``head`` (features to logits), like :class:`Backbone`.
    Methods split it by those names (FedPer keeps the head personal), so both must exist. pFedMoE
    also passes ``width`` (its ``global_width``).

    Example:
        >>> build_backbone("fedcoe_bench.models.backbones.CNN", 1, 10, 12).head
        Linear(in_features=512, out_features=10, bias=True)
    """
    key = "method.init_args.backbone"
    cls = BACKBONES.get(name)
    if cls is None and "." not in name:
        raise ConfigError(f"unknown {key} '{name}'; choose one of {', '.join(BACKBONES)} or give a class path (module.Class)")
    if cls is None:
        module, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"{key} '{name}' cannot be imported ({err}); is its module on the Python path? "
                              f"run from its folder or set PYTHONPATH") from None
    args = {"in_channels": in_channels, "num_classes": num_classes, "image_size": image_size, **kwargs}
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise ConfigError(f"{key} '{name}' is not an nn.Module class; give a Backbone-like class (body + linear head)")
    try:
        inspect.signature(cls).bind(**args)
    except TypeError:
        raise ConfigError(f"{key} '{name}' must accept the keyword arguments {', '.join(args)}") from None
    net = cls(**args)
    if not isinstance(getattr(net, "body", None), nn.Module) or not isinstance(getattr(net, "head", None), nn.Linear):
        raise ConfigError(f"{key} '{name}' must have a `body` module and a linear `head` (nn.Linear), as "
                          f"fedcoe_bench.models.Backbone does")
    return net
