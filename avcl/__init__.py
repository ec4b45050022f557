"""avcl: continual learning of audio-visual video models."""
__version__ = "0.1.0"
