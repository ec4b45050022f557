"""Models: swappable encoders, fusion modules and growing classifier heads."""
from avcl.models.avnet import AVNet
from avcl.models.heads import IncrementalClassifier

__all__ = ["AVNet", "IncrementalClassifier"]
