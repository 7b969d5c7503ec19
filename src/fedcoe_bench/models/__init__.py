"""Backbones (a body that maps images to features and a linear head) and mixture-of-experts parts."""

from fedcoe_bench.models.backbones import CNN, Backbone, ResNet18, build_backbone
from fedcoe_bench.models.moe import Gate, mixture

__all__ = ["Backbone", "CNN", "ResNet18", "build_backbone", "Gate", "mixture"]
