"""Backbones (a body that maps images to features and a linear head) and mixture-of-experts parts."""

from fedcoe_bench.models.backbones import CNN, Backbone, ResNet18, build_backbone
from fedcoe_bench.models.moe import Experts, Gate, entropy, mixture

__all__ = ["CNN", "Backbone", "Experts", "Gate", "ResNet18", "build_backbone", "entropy", "mixture"]
