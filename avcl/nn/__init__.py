"""Shared neural-network machinery, written once and imported by every model and method.

* ``avcl.nn.vit``: ViT blocks (SDPA attention), sin-cos positional embeddings, patching, random
  masking, token gathering, size presets of ``model.vit``.
* ``avcl.nn.losses``: normalised-pixel MAE loss, symmetric InfoNCE.
* ``avcl.nn.ema``: exponential moving averages of weights.
* ``avcl.nn.optim``: the virtual optimizer step (MIR, GMED).
"""
