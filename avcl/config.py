"""Typed run configuration: a recipe YAML merged with ``key=value`` overrides.

The schema is built from dataclasses: the common sections below, the options of the
selected dataset (``data``) and the hyperparameters each method declares next to its code
(``method_args.<method>``). OmegaConf checks names and types, so a typo or a wrong type
ends in one message naming the key.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from avcl.errors import AvclError

# The recipes: inside the package when installed (a wheel: avcl/recipes, see setup.py), else the
# source tree's top-level recipes/ folder (a checkout, an editable install).
REPO_RECIPES = next((path for path in (Path(__file__).resolve().parent / "recipes",
                                       Path(__file__).resolve().parent.parent / "recipes") if path.is_dir()),
                    Path(__file__).resolve().parent.parent / "recipes")


@dataclass
class ScenarioConfig:
    num_tasks: int = 5
    first_task_classes: int = 0  # classes in the first (base) task, the rest split over num_tasks-1; 0 = equal
    initial_classes: int = 0  # older name of first_task_classes (configs of earlier runs)
    class_order: Optional[List[int]] = None  # explicit order; None = see shuffle_classes
    shuffle_classes: bool = True  # None order: a permutation seeded by `seed`, else natural order
    # pre-training stream: fraction in [0, 1) of each task's training clips moved to other tasks
    # (blurry task boundaries; avcl/data/scenario.py). Online: train.epochs=1
    blurry: float = 0.0


@dataclass
class ViTConfig:
    """A ViT backbone: a size preset (tiny for CPUs, base = ViT-B as the papers), any field overridable."""
    size: str = "tiny"  # tiny | small | base
    width: Optional[int] = None  # None: the preset's value (and likewise below)
    depth: Optional[int] = None  # modality-specific layers per modality
    fusion_depth: Optional[int] = None  # shared layers after them
    heads: Optional[int] = None
    decoder_width: Optional[int] = None
    decoder_depth: Optional[int] = None
    decoder_heads: Optional[int] = None
    mlp_ratio: float = 4.0
    video_patch: int = 16  # side of the square per-frame patches, pixels
    audio_patch: List[int] = field(default_factory=lambda: [16, 16])  # [time frames, mel bins]
    frames: int = 4  # video frames per clip, sampled uniformly over the window
    video_window: Optional[int] = None  # consecutive frames the window spans; None: the whole clip
    crop_scales: List[float] = field(default_factory=lambda: [1.0, 0.875, 0.75])  # train-time crops
    audio_frames: Optional[int] = None  # fbank frames a clip is padded/cut to; None: as the data
    checkpoint: Optional[str] = None  # ImageNet MAE ViT-B weights: a .pth file or an HF ViTMAEModel dir


@dataclass
class CAVConfig:
    """The CAV-MAE objective as FLAVA/STELLA run it (specs A.2-A.4) and its input normalisation."""
    mask_ratio_audio: float = 0.8
    mask_ratio_video: float = 0.8
    norm_pix_loss: bool = True  # reconstruction targets normalised per patch
    mae_weight: float = 1.0  # per modality
    contrastive_weight: float = 0.1
    temperature: float = 0.05  # InfoNCE
    audio_mean: float = 0.0  # fbank normalisation (x - mean) / std; AudioSet-style fbank: -5.081, 4.4849
    audio_std: float = 1.0
    video_mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # per channel, on [0, 1]
    video_std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])  # (gray frames: first value)
    audio_noise: float = 0.1  # train-time: uniform noise of a random scale up to this, and
    audio_roll: bool = True  # a random circular time roll
    avm: bool = True  # build STELLA's AVM module (trained only by stella and the init stage)


@dataclass
class XKDConfig:
    """XKD (spec Part B; avcl/models/xkd.py): views, tokenizers, heads, teachers. Encoder and decoder sizes
    come from ``model.vit`` (encoder layers = vit.depth + vit.fusion_depth; base = ViT-B's 12)."""
    share: str = "none"  # none (XKD) | students (XKD-MAS: one student transformer) | all (XKD-MATS: teachers' too)
    refine: str = "mean"  # teacher feature refinement from the CLS attention: mean | softmax | none
    teacher_view: str = "local"  # local: the first local view, unmasked (the code) | global: the global view (paper figure)
    mats_ema: str = "twice"  # share=all: shared teacher blocks get one EMA update per modality (code, m^2) | once
    eval_encoder: str = "student"  # the backbone embed() (probes, retrieval) reads: student | teacher
    tubelet_frames: int = 4  # video tubelets: tubelet_frames x vit.video_patch x vit.video_patch
    mask_ratio_video: float = 0.85
    mask_ratio_audio: float = 0.8
    norm_pix_loss: bool = True
    qkv_bias: bool = False
    global_crop_scale: List[float] = field(default_factory=lambda: [0.2, 1.0])  # area fraction, resized back
    local_frames: int = 8  # local video view: consecutive frames (at the global view's frame stride)
    local_size: int = 96  # local video view side, pixels
    local_crop_scale: List[float] = field(default_factory=lambda: [0.08, 0.4])
    local_views_video: int = 1  # XKD 1, MAS/MATS 3
    local_views_audio: int = 1
    local_audio_frames: int = 112  # local audio view: fbank frames (a random window)
    flip: float = 0.5  # horizontal flip probability of every video view
    volume_jitter: float = 0.1  # audio gain U(1-j, 1+j) per clip on the normalised fbank: global view
    local_volume_jitter: float = 0.2  # and local views
    head_hidden: int = 2048  # DINO head: width -> hidden -> hidden -> bottleneck -> L2 -> head_dim
    head_bottleneck: int = 256
    head_dim: int = 8192
    student_temp: float = 0.1
    teacher_temp_video: float = 0.1  # final teacher temperatures (video teacher -> audio student) ...
    teacher_temp_audio: float = 0.07
    warmup_teacher_temp_video: float = 0.1  # ... reached linearly from these over teacher_temp_warmup
    warmup_teacher_temp_audio: float = 0.07
    teacher_temp_warmup: float = 0.0  # fraction of the training steps
    center_momentum: float = 0.9
    audio_mean: float = -5.369  # fbank normalisation (x - mean) / std (XKD's log-mel statistics)
    audio_std: float = 4.410
    video_mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # per channel, on [0, 1]
    video_std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class ModelConfig:
    name: str = "avnet"  # a key of avcl.models.MODELS
    modalities: List[str] = field(default_factory=lambda: ["audio", "video"])
    audio_encoder: str = "conv1d"
    video_encoder: str = "conv"
    fusion: str = "concat"  # concat | sum
    embed_dim: int = 64  # width of each encoder's tokens
    feature_dim: int = 128  # width of the fused feature fed to the classifier
    # model "had" only (avcl/models/had.py): raw clips are cut into this many snippets
    snippets: int = 4
    # model "avcil" only (avcl/models/avcil.py):
    visual_grid: List[int] = field(default_factory=lambda: [8, 196])  # [T, P] of the video tokens
    encoders: str = "none"  # none: inputs are features | builtin: raw clips through the encoders above
    attention_kernel: str = "fused"  # fused | reference (plain PyTorch ops, as the official code)
    # transformer models ("cav": avcl/models/cav.py): architecture, and the CAV-MAE objective
    vit: ViTConfig = field(default_factory=lambda: ViTConfig())
    cav: CAVConfig = field(default_factory=lambda: CAVConfig())
    xkd: XKDConfig = field(default_factory=lambda: XKDConfig())  # model "xkd" only


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    replay_batch_size: int = 32  # memory samples added to each batch by replay methods
    optimizer: str = "adam"  # adam | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    bf16: Optional[bool] = None  # bf16 autocast; None = on for CUDA, off elsewhere
    num_threads: Optional[int] = None  # torch CPU threads; None = torch's default
    # CPU runs on Linux/glibc: malloc keeps freed memory for reuse instead of mapping every large
    # activation fresh from the OS (avcl.engine.trainer.keep_cpu_heap); false = leave malloc alone
    cpu_keep_heap: bool = True
    # which epoch's weights a task ends with: last | best_val (highest accuracy on the val data
    # of all seen classes, evaluated after every epoch; AV-CIL's official checkpoint selection)
    model_selection: str = "last"
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    # task: a fresh optimizer for every task | stream: one for the whole stream (the pre-training code's)
    optimizer_scope: str = "task"
    # false: a method's checkpoint.pt (needed only to resume it) is deleted once the method is complete;
    # true: every method keeps its final checkpoint (model, memory, optimizer) in the run directory
    keep_checkpoints: bool = False
    # <method>/model.pt: the final model's weights alone (what `avcl probe` and downstream use reads);
    # None: written for pre-training (label-free) models, whose encoder is the product, not for classifiers
    save_model: Optional[bool] = None
    # several processes (torchrun): seconds a collective may wait for the other ranks before the run
    # stops with an error (a rank that dies is usually seen at once: its connections close)
    dist_timeout: float = 1800.0


@dataclass
class MemoryConfig:
    size: int = 200  # total budget: exemplars shared by all seen classes, or reservoir slots (label-free)


@dataclass
class InitConfig:
    """The stage before the stream (pre-training recipes): the model is trained once on clips kept
    out of the stream (the dataset's held-out split), checkpointed in RUN/init/, and every method
    starts from it; the report's ``init`` row evaluates it."""
    epochs: int = 0  # self-supervised epochs of the backbone; 0 and avm_epochs 0: no stage
    avm_epochs: int = 0  # then the AVM module alone (matching loss, backbone frozen), as STELLA's
    batch_size: Optional[int] = None  # None: train.batch_size
    checkpoint: Optional[str] = None  # start from this model file instead (e.g. an earlier RUN/init/model.pt)
    row: bool = False  # without a stage: still evaluate the untrained model as the report's init row


@dataclass
class EvalConfig:
    # what is measured after every task: accuracy (class-incremental accuracy matrix) |
    # retrieval (audio<->video retrieval matrix, then a linear probe; avcl.eval.protocols) |
    # probe (linear probes of the frozen video, audio and audio+video features after the last task)
    protocol: str = "accuracy"
    forgetting: str = "standard"  # standard | avcil (see avcl.eval.metrics)
    batch_size: int = 256
    retrieval_per_class: int = 5  # test clips per class in the fixed retrieval set
    recall_at: List[int] = field(default_factory=lambda: [1, 5, 10])
    probe: str = "end"  # linear probe of the frozen encoder: end | every_task | none
    probe_epochs: int = 15
    probe_warmup_epochs: int = 2
    probe_lr: float = 5e-4
    probe_weight_decay: float = 5e-6
    probe_batch_size: int = 64
    # eval.protocol=probe and `avcl probe`: per-modality linear probes of the frozen features (scikit-learn)
    linear_classifier: str = "logistic"  # logistic | svm (LinearSVC)
    linear_c: float = 1.0  # inverse regularisation strength of the linear classifier


@dataclass
class LogConfig:
    """What a run reports besides metrics.json: <method>/epochs.csv and tasks.csv always."""
    progress_seconds: float = 30.0  # without a terminal: a progress line at least this often, in seconds
    tensorboard: bool = False  # also TensorBoard event files in RUN/tensorboard/<method> (extra: avcl[tensorboard])


@dataclass
class TuneConfig:
    """``avcl tune`` (avcl/engine/tune.py, docs/tuning.md): a hyperparameter search on validation data only.
    The space searched is the recipe's ``search.<method>`` mapping."""
    method: str = ""  # the method (or variant) searched; `avcl tune RECIPE method=NAME` sets it
    trials: int = 20  # finished trials the search stops at (a resumed search counts the earlier ones)
    # first_tasks: the objective is measured on the validation data of the first `tasks` tasks of the stream
    # (Chaudhry et al. 2019); all_tasks: on every task's validation split (the whole stream)
    protocol: str = "first_tasks"
    tasks: int = 2  # first_tasks: how many of the stream's first tasks the objective is measured on
    # a number of the trial's <method>/metrics.json (computed on validation data); auto: the protocol's
    # headline: average_incremental_accuracy (accuracy), retrieval_average (retrieval: mean R@k over
    # both directions and eval.recall_at), probe_av_accuracy (probe)
    objective: str = "auto"
    direction: str = "maximize"  # maximize | minimize (e.g. objective=forgetting)
    sampler_startup_trials: int = 10  # random trials before TPE models the space
    pruner: bool = True  # median pruner: a trial below the median of earlier trials after a task stops
    pruner_startup_trials: int = 5  # finished trials before any trial is pruned
    pruner_warmup_tasks: int = 0  # tasks a trial trains before it may be pruned
    # "": the study is DIR/study.db (SQLite); an Optuna RDB URL (postgresql://..., mysql://...) shares it between
    # machines, each running `avcl tune --resume DIR --join` on a shared DIR (docs/tuning.md)
    storage: str = ""


def _schema(dataset_options: type, method_hparams: dict[str, type]) -> type:
    """The run-config dataclass for one dataset and the registered methods."""
    method_args = dataclasses.make_dataclass(
        "MethodArgs",
        [(name, hp, field(default_factory=hp)) for name, hp in sorted(method_hparams.items())])
    return dataclasses.make_dataclass("RunConfig", [
        ("name", str, field(default="run")),
        ("description", str, field(default="")),
        ("seed", int, field(default=0)),
        # several seeds: one complete run per seed in RUN_DIR/seed-<s>/ (then `seed` is not used);
        # `avcl report RUN_DIR` gives mean ± std over them (avcl/engine/sweep.py)
        ("seeds", List[int], field(default_factory=list)),
        ("methods", List[str], field(default_factory=lambda: ["finetune"])),
        ("data", dataset_options, field(default_factory=dataset_options)),
        ("scenario", ScenarioConfig, field(default_factory=ScenarioConfig)),
        ("model", ModelConfig, field(default_factory=ModelConfig)),
        ("train", TrainConfig, field(default_factory=TrainConfig)),
        ("memory", MemoryConfig, field(default_factory=MemoryConfig)),
        ("init", InitConfig, field(default_factory=InitConfig)),
        ("eval", EvalConfig, field(default_factory=EvalConfig)),
        ("log", LogConfig, field(default_factory=LogConfig)),
        ("method_args", method_args, field(default_factory=method_args)),
        # `avcl tune`: method (or variant) -> key -> spec, e.g. {low: 0.1, high: 10, log: true},
        # {low: 1, high: 5, int: true}, {choices: [a, b]}; keys: the method's hyperparameters
        # (method_args.<method>.<key>) or dotted config keys (train.lr); avcl/engine/tune.py
        ("search", Dict[str, Dict[str, Any]], field(default_factory=dict)),
        ("tune", TuneConfig, field(default_factory=TuneConfig)),
        # named variants of a method, usable in `methods` like a method: e.g. for an ablation
        # `had-no-ham: {method: had, ham: false}` (the other keys override method_args.<method>)
        ("variants", Dict[str, Dict[str, Any]], field(default_factory=dict)),
        # method -> metric -> ">=0.9" / "<=0.35": the numbers the recipe is expected to reach
        ("expected", Dict[str, Dict[str, str]], field(default_factory=dict)),
    ])


def recipes_dir() -> Path:
    return Path(os.environ.get("AVCL_RECIPES_DIR", REPO_RECIPES))


def list_recipes() -> dict[str, str]:
    """Recipe name -> description, for ``avcl list``."""
    found = {}
    root = recipes_dir()
    for path in sorted(root.rglob("*.yaml")):
        if path.name.startswith("_"):  # partial recipes, only used as `base:` of others
            continue
        raw = _read_yaml(path)
        found[path.relative_to(root).with_suffix("").as_posix()] = str(raw.get("description", ""))
    return found


def resolve_recipe(recipe: str) -> Path:
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise AvclError(f"recipe file not found: {path}")
        return path
    candidate = recipes_dir() / f"{recipe}.yaml"
    if not candidate.is_file():
        known = ", ".join(list_recipes()) or "none"
        raise AvclError(f"unknown recipe '{recipe}' (known: {known}; or give a path to a .yaml file)")
    return candidate


def _read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise AvclError(f"{path}: not valid YAML: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise AvclError(f"{path}: a recipe must be a mapping of keys to values")
    return raw


def _load_recipe_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The recipe with its ``base:`` chain merged underneath (a recipe may extend another)."""
    if path in seen:
        raise AvclError(f"{path}: 'base' recipes form a cycle")
    raw = _read_yaml(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_path = resolve_recipe(base) if not str(base).endswith((".yaml", ".yml")) \
        else (path.parent / base)
    merged = OmegaConf.merge(_load_recipe_tree(base_path, seen + (path,)), raw)
    return OmegaConf.to_container(merged)


def parse_overrides(overrides: list[str]) -> DictConfig:
    """``key=value`` items, later ones winning; ``key=@FILE`` sets ``key`` to the YAML mapping in FILE
    (e.g. ``method_args.had=@tune/best.yaml``, what `avcl tune` writes)."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise AvclError(f"bad override '{item}': expected key=value, e.g. train.epochs=3")
    out = OmegaConf.create()
    plain: list[str] = []  # runs of plain items are parsed together (one dotlist)
    try:
        for item in list(overrides) + [None]:
            if item is not None and not item.split("=", 1)[1].startswith("@"):
                plain.append(item)
                continue
            if plain:
                out = OmegaConf.merge(out, OmegaConf.from_dotlist(plain))
                plain = []
            if item is not None:
                key, value = item.split("=", 1)
                OmegaConf.update(out, key, override_file(item, Path(value[1:])), merge=True)
    except OmegaConfBaseException as err:
        raise AvclError(f"bad override: {err}") from None
    except yaml.YAMLError as err:  # a value that is not YAML, e.g. an unclosed {...}
        raise AvclError(f"bad override: a value is not valid YAML ({str(err).splitlines()[0]}): "
                        f"{' '.join(plain)}") from None
    return out


def override_file(item: str, path: Path) -> dict:
    """The YAML mapping a ``key=@FILE`` override names (AvclError naming the override otherwise)."""
    if not path.is_file():
        raise AvclError(f"bad override '{item}': {path} is a directory, not a YAML file" if path.is_dir()
                        else f"bad override '{item}': file {path} not found")
    try:
        value = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise AvclError(f"bad override '{item}': {path} is not valid YAML ({str(err).splitlines()[0]})") from None
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise AvclError(f"bad override '{item}': {path} must hold a mapping of keys to values, "
                        f"got {type(value).__name__}")
    return value


def build_config(raw: dict | DictConfig, overrides: list[str] = ()) -> DictConfig:
    """Validate ``raw`` (+ overrides) against the schema; returns a read-only DictConfig."""
    from avcl.data import dataset_options
    from avcl.methods import method_hparams

    cli = parse_overrides(list(overrides))
    for source in (raw, cli):  # `methods=finetune` / `methods=finetune,er`: a name or a comma list is a list
        if isinstance(source.get("methods"), str):
            source["methods"] = [m.strip() for m in source["methods"].split(",") if m.strip()]
    data_name = OmegaConf.select(cli, "data.name") or OmegaConf.select(
        OmegaConf.create(raw), "data.name") or "avdigits"
    schema = OmegaConf.structured(_schema(dataset_options(data_name), method_hparams()))
    try:
        cfg = OmegaConf.merge(schema, raw, cli)
    except OmegaConfBaseException as err:
        raise AvclError(config_error_message(err)) from None
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def load_saved_config(path: Path) -> DictConfig:
    """A run directory's ``config.yaml`` (what ``--resume`` reads back), refused with one message naming
    the file when it is empty, not YAML, not a mapping, or cut short: a saved config is the whole resolved
    config, so every section is there and the file ends with a newline."""
    text = path.read_text()
    if not text.strip():
        raise AvclError(f"{path} is empty: it should hold the run's resolved config (nothing was changed)")
    if not text.endswith("\n"):
        raise AvclError(f"{path} is truncated (its last line is cut short): restore it or start a new run; "
                        "nothing was changed")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None) or "parse error"
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise AvclError(f"{path} is not valid YAML ({where}{problem}); nothing was changed") from None
    if not isinstance(raw, dict):
        raise AvclError(f"{path} holds {'a list' if isinstance(raw, list) else type(raw).__name__}, not the run's "
                        "config (a mapping of keys to values); nothing was changed")
    sections = [f.name for f in dataclasses.fields(_schema(object, {}))]
    later = ("search", "tune")  # sections added after runs were saved without them (their defaults apply)
    missing = [name for name in sections if name not in raw and name not in later]
    if missing:
        raise AvclError(f"{path} is truncated (no {', '.join(missing)} section): restore it or start a new run; "
                        "nothing was changed")
    return build_config(raw)


def load_config(recipe: str | None, overrides: list[str] = ()) -> DictConfig:
    raw = _load_recipe_tree(resolve_recipe(recipe or "avdigits"))
    return build_config(raw, overrides)


def config_error_message(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = str(getattr(err, "msg", None) or err).splitlines()[0]
    return f"bad config: {msg}" + (f" (key '{key}')" if key else "")


def validate(cfg: DictConfig) -> None:
    """Checks the schema's types cannot express: names that must exist, ranges, choices."""
    from avcl.methods import METHODS

    for name in cfg.variants:
        method_hparams_for(cfg, name)  # checks the variant's base method, keys and types
    unknown = [m for m in cfg.methods if m not in METHODS and m not in cfg.variants]
    if unknown:
        raise AvclError(f"unknown method(s) {unknown} in 'methods' (known: {', '.join(sorted(METHODS))}; "
                        "or define a variant under 'variants')")
    if not cfg.methods:
        raise AvclError("'methods' is empty: name at least one method")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise AvclError(f"bad config: 'seeds' lists a seed twice: {list(cfg.seeds)}")
    from avcl.models import MODELS
    for name in cfg.methods:  # a method tied to one model (AV-CIL, HAD, STELLA, XKD), refused before anything runs
        cls, _, model_cfg = method_hparams_for(cfg, name)
        trained_by = getattr(MODELS.get(model_cfg.name), "trained_by", None)  # a model tied to its method (XKD)
        if trained_by and cls.name not in trained_by:
            raise AvclError(f"model.name={model_cfg.name} is trained by method {' or '.join(trained_by)} only "
                            f"(got '{name}' in methods): {MODELS[model_cfg.name].trained_by_why}")
        if cls.requires_model and model_cfg.name != cls.requires_model:
            raise AvclError(f"method '{name}' needs model.name={cls.requires_model}, got model.name={model_cfg.name} "
                            f"(in the recipe, or for one row: variants: {{my-{name}: {{method: {cls.name}, "
                            f"model: {{name: {cls.requires_model}}}}}}})")
    _choice("model.fusion", cfg.model.fusion, ("concat", "sum"))
    _choice("train.optimizer", cfg.train.optimizer, ("adam", "sgd"))
    _choice("eval.forgetting", cfg.eval.forgetting, ("standard", "avcil"))
    _choice("eval.protocol", cfg.eval.protocol, ("accuracy", "retrieval", "probe"))
    _choice("eval.linear_classifier", cfg.eval.linear_classifier, ("logistic", "svm"))
    _choice("eval.probe", cfg.eval.probe, ("end", "every_task", "none"))
    _choice("train.optimizer_scope", cfg.train.optimizer_scope, ("task", "stream"))
    _choice("model.vit.size", cfg.model.vit.size, ("tiny", "small", "base"))
    if len(cfg.train.adam_betas) != 2 or not all(0 <= b < 1 for b in cfg.train.adam_betas):
        raise AvclError(f"bad config: 'train.adam_betas' must be two numbers in [0, 1), got {list(cfg.train.adam_betas)}")
    for key in ("init.epochs", "init.avm_epochs", "eval.probe_epochs", "eval.probe_warmup_epochs"):
        if OmegaConf.select(cfg, key) < 0:
            raise AvclError(f"bad config: '{key}' must be >= 0")
    bad = [m for m in cfg.model.modalities if m not in ("audio", "video")]
    if bad or not cfg.model.modalities:
        raise AvclError(f"bad config: model.modalities must be a non-empty subset of [audio, video], got {list(cfg.model.modalities)}")
    for key in ("scenario.num_tasks", "train.epochs", "train.batch_size", "eval.batch_size", "eval.probe_batch_size",
                "eval.retrieval_per_class"):
        if OmegaConf.select(cfg, key) < 1:
            raise AvclError(f"bad config: '{key}' must be >= 1")
    if cfg.memory.size < 0:
        raise AvclError("bad config: 'memory.size' must be >= 0")
    check_values(OmegaConf.to_container(cfg, resolve=True))
    _choice("train.model_selection", cfg.train.model_selection, ("last", "best_val"))
    _choice("tune.protocol", cfg.tune.protocol, ("first_tasks", "all_tasks"))
    _choice("tune.direction", cfg.tune.direction, ("maximize", "minimize"))
    device = cfg.train.device
    if not (device in ("auto", "cpu", "cuda", "mps") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise AvclError(f"bad config: 'train.device' must be auto, cpu, cuda, cuda:N or mps, got '{device}'")
    if cfg.eval.probe != "none" and cfg.eval.probe_warmup_epochs > cfg.eval.probe_epochs:
        raise AvclError(f"bad config: 'eval.probe_warmup_epochs' ({cfg.eval.probe_warmup_epochs}) must be <= "
                        f"'eval.probe_epochs' ({cfg.eval.probe_epochs})")


# The range of every number in a config, by dotted key (fnmatch patterns, the first match wins; each
# element of a list of numbers is checked). Numbers not listed must be >= 0 (sizes, weights, counts);
# "any" allows every finite number. NaN and infinity are refused everywhere.
RANGES = {
    "seed": ">=0", "seeds": ">=0",
    "scenario.num_tasks": ">=1", "scenario.class_order": ">=0",
    "model.embed_dim": ">=1", "model.feature_dim": ">=1", "model.snippets": ">=1", "model.visual_grid": ">=1",
    "model.vit.mlp_ratio": ">0", "model.vit.crop_scales": "(0,1]", "model.vit.fusion_depth": ">=0", "model.vit.*": ">=1",
    "model.*.mask_ratio_*": "[0,1)", "model.cav.temperature": ">0", "model.*.*_std": ">0",
    "model.*.*_mean": "any",
    "train.epochs": ">=1", "train.batch_size": ">=1", "train.lr": ">0", "train.momentum": "[0,1)",
    "train.num_threads": ">=1", "train.adam_betas": "[0,1)", "train.dist_timeout": ">0",
    "init.batch_size": ">=1", "log.progress_seconds": ">0", "tune.trials": ">=1", "tune.tasks": ">=1",
    "eval.batch_size": ">=1", "eval.retrieval_per_class": ">=1", "eval.recall_at": ">=1", "eval.probe_lr": ">0",
    "eval.probe_batch_size": ">=1",
    # methods (method_args.<method>.<key>, and variants.<variant>.<key>)
    "method_args.*.lr": ">0", "method_args.*.epochs": ">=1", "*temperature": ">0", "*.tau": ">0", "*.scale": ">0",
    "*.mixup_alpha": ">0", "*_model_alpha": "[0,1]", "*_freq": "[0,1]", "*_ratio": "[0,1)", "*.gamma": "[0,1]",
    "*.edit_decay": "[0,1]", "*.vad_lambda": "[0,1]", "*.ham_strength": "[0,1]",
    "*.proxies_per_class": ">=1", "*.kmeans_iters": ">=1", "*.fisher_batch_size": ">=1", "*.search_factor": ">=1",
    "*.audio_chunk": ">=1",
    # datasets (data.<key>)
    "data.*_fraction": "[0,1)", "data.num_classes": ">=1", "data.train_per_class": ">=1",
    "data.test_per_class": ">=1", "data.classes_per_task": ">=1", "data.clip_seconds": ">0",
    "data.frame_shift_ms": ">0", "data.mel_bins": ">=1", "data.frames": ">=1", "data.frame_size": ">=1",
    "data.digit_size": ">=1", "data.audio_frames": ">=1",
}
_RULES = {
    ">0": lambda v: v > 0, ">=0": lambda v: v >= 0, ">=1": lambda v: v >= 1, "any": lambda v: True,
    "[0,1]": lambda v: 0 <= v <= 1, "[0,1)": lambda v: 0 <= v < 1, "(0,1]": lambda v: 0 < v <= 1,
}
_WORDS = {">0": "> 0", ">=0": ">= 0", ">=1": ">= 1", "[0,1]": "in [0, 1]", "[0,1)": "in [0, 1)",
          "(0,1]": "in (0, 1]"}


def range_of(key: str) -> str:
    """The rule ``RANGES`` gives the dotted ``key`` (">=0" when none matches)."""
    import fnmatch
    return next((rule for pattern, rule in RANGES.items() if fnmatch.fnmatchcase(key, pattern)), ">=0")


def check_values(tree: Any, prefix: str = "") -> None:
    """Every number of a config (sub)tree within its range (``RANGES``); raises one AvclError naming the key."""
    import math
    if isinstance(tree, dict):
        # variants: checked merged, in method_hparams_for; search: bounds, checked as the configs they make (tune)
        skip = ("expected", "variants", "search") if not prefix else ()
        for key, value in tree.items():
            if key not in skip:
                check_values(value, f"{prefix}.{key}" if prefix else str(key))
        return
    values = tree if isinstance(tree, list) else [tree]
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not numbers:
        return
    rule = range_of(prefix)
    bad = [v for v in numbers if not math.isfinite(v) or not _RULES[rule](v)]
    if bad:
        got = tree
        need = "a finite number" if rule == "any" else _WORDS[rule]
        raise AvclError(f"bad config: '{prefix}' must be {need}{' (each value)' if isinstance(tree, list) else ''}, "
                        f"got {got}")


def method_hparams_for(cfg: DictConfig, name: str):
    """(method class, its Hparams, the model config) for a method or a variant of ``cfg.variants``.

    A variant's keys override ``method_args.<method>``; its optional ``model:`` mapping
    overrides ``model`` for that entry alone (e.g. a single-modality row in the same table).
    """
    from avcl.methods import METHODS

    overrides, model_overrides = {}, {}
    base = name
    if name in cfg.variants:
        overrides = dict(OmegaConf.to_container(cfg.variants[name]))
        base = overrides.pop("method", None)
        model_overrides = overrides.pop("model", None) or {}
        if base not in METHODS:
            raise AvclError(f"variants.{name}.method must name a method (known: {', '.join(sorted(METHODS))}), "
                            f"got {base!r}")
    cls = METHODS[base]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls.Hparams), cfg.method_args[base], overrides)
        model_cfg = OmegaConf.merge(cfg.model, model_overrides)
    except OmegaConfBaseException as err:
        raise AvclError(f"variants.{name}: {config_error_message(err)}") from None
    if name in cfg.variants:
        try:
            check_values(OmegaConf.to_container(merged), f"method_args.{base}")
            check_values(OmegaConf.to_container(model_cfg), "model")
        except AvclError as err:
            raise AvclError(f"variants.{name}: {err}") from None
    return cls, cls.Hparams(**OmegaConf.to_container(merged)), model_cfg


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise AvclError(f"bad config: '{key}' must be one of {list(choices)}, got '{value}'")


def save_config(cfg: DictConfig, path: Path) -> None:
    from avcl.engine.checkpoint import atomic_write_text
    atomic_write_text(path, OmegaConf.to_yaml(cfg))
