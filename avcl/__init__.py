"""avcl: continual learning of audio-visual video models.

The package's folders are its layers, lowest first (``LAYERS``); a module imports only its own layer and the
layers below it (tests/test_layers.py checks it):

    core      errors, samples, atomic files, seeding, devices, option rules: torch and the standard library only
    parallel  data-parallel training across processes (process group, step slices, gradients, evaluation)
    media     file formats: video decoding and encoding, audio front-ends, dataset lists
    data      datasets, feature stores, scenarios
    nn        shared blocks and losses (ViT, self-supervised and continual-learning losses, EMA, virtual steps)
    models    networks, each with its options
    memory    exemplar memory, reservoir, per-rank reservoirs
    methods   the Method contract and one file per method
    eval      measuring: protocols, metrics, retrieval, probes
    report    presenting a run directory: tables, HTML, plots
    config    the run configuration: schema, recipes, overrides, validate
    engine    one run: trainer, runner, run directory, checks, logs
    apps      programs built on the engine: seeds and --jobs, tune, extraction, AV-Digits videos
    cli       the avcl command, one module per subcommand
"""
__version__ = "0.1.0"

LAYERS = ("core", "parallel", "media", "data", "nn", "models", "memory", "methods", "eval", "report", "config",
          "engine", "apps", "cli")
