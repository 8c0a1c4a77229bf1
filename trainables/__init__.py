"""What one trial runs: backbones, the model around them, data and the training loop."""

from trainables.backbones import create_backbone, list_backbones, register_backbone
from trainables.weights import WeightsUnavailableError

__all__ = ["create_backbone", "list_backbones", "register_backbone", "WeightsUnavailableError"]
