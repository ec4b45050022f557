"""Layer ``nn``: shared neural-network machinery, written once and imported by every model and method;
imports ``core`` and ``parallel`` (batch-level losses see every rank's rows).

* ``avcl.nn.vit``: ViT blocks (SDPA attention), sin-cos positional embeddings, patching, random
  masking, token gathering, the options and size presets of ``model.vit``.
* ``avcl.nn.losses``: self-supervised losses: normalised-pixel MAE loss, symmetric InfoNCE, DINO
  cross-entropy with centring, Gaussian-kernel MMD.
* ``avcl.nn.cl_losses``: continual-learning losses several methods share: logit distillation, task-wise
  KD, SS-IL's separated softmax, the embedding MSE of the replay baselines.
* ``avcl.nn.distill``: XKD's DINO head and teacher-feature refinement.
* ``avcl.nn.ema``: exponential moving averages of weights (EMA teachers), momentum schedules.
* ``avcl.nn.optim``: the virtual optimizer step (MIR, GMED).
"""
