"""The run config's schema: the sections of a run (train, memory, init, eval, log, tune), assembled with the
sections their owners declare (``data``: the dataset's options, ``scenario``: avcl.data.scenario, ``model``:
avcl.models, ``method_args.<method>``: each method's Hparams). Ranges and choices sit on the fields
(``avcl.core.options.option``); ``avcl.config.validate`` reads them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from avcl.core.options import option
from avcl.data.scenario import ScenarioConfig
from avcl.eval.protocols import PROTOCOLS
from avcl.models import ModelConfig


@dataclass
class TrainConfig:
    epochs: int = option(10, range=">=1")
    batch_size: int = option(64, range=">=1")
    replay_batch_size: int = 32  # memory samples added to each batch by replay methods
    # the optimizer step (avcl.engine.regime): adam | adamw (decoupled weight decay) | sgd
    optimizer: str = option("adam", choices=("adam", "adamw", "sgd"))
    lr: float = option(1e-3, range=">0")
    weight_decay: float = 0.0
    # parameters without weight decay: fnmatch patterns on parameter names; "1d": every tensor of at most one
    # dimension (biases, norms); the MAE / STELLA / XKD codes' set; [] decays every parameter (the AV-CIL code's)
    no_decay: List[str] = option(factory=lambda: ["1d", "*pos_embed*", "*cls_token*", "*cls_pos*", "*mask_token*",
                                                  "*modality_embed*"])
    layer_decay: float = option(1.0, range="(0,1]")  # layer-wise lr decay (MAE's); 1: none
    # {parameter-name pattern: lr factor}, the first matching pattern's (e.g. {"avm.*": 10}); {}: none
    lr_multipliers: Dict[str, float] = field(default_factory=dict)
    momentum: float = option(0.9, range="[0,1)")  # sgd only
    adam_eps: float = option(1e-8, range=">0")  # adam / adamw
    # lr per optimizer step: constant | cosine (to min_lr) | step (x gamma at each of milestones, in epochs);
    # each after a linear warm-up from 0 of warmup_epochs (or warmup_steps)
    schedule: str = option("constant", choices=("constant", "cosine", "step"))
    warmup_epochs: float = 0.0
    warmup_steps: int = 0
    min_lr: float = 0.0  # cosine: the lr it ends at
    milestones: List[float] = field(default_factory=list)  # step: the epochs at which the lr is multiplied by gamma
    gamma: float = option(0.1, range=">0")
    schedule_scope: str = option("task", choices=("task", "stream"))  # the curve spans each task | the whole stream
    clip_grad_norm: Optional[float] = option(None, range=">0")  # clip the global gradient norm to this; None: never
    clip_grad_per_param: Optional[float] = option(None, range=">0")  # clip each parameter's gradient norm (XKD's)
    # the parameters clipping applies to: fnmatch patterns of their names (XKD's code: ["student.*"]); []: all
    clip_grad_params: List[str] = field(default_factory=list)
    accumulate: int = option(1, range=">=1")  # micro-batches of batch_size per optimizer step
    # drop an epoch's partial last batch (kept when the epoch has no full batch); None: drop for pre-training
    # (label-free) methods, as their official loaders do, keep for classifiers
    drop_last: Optional[bool] = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # autocast dtype: bf16 | fp16 (with a GradScaler) | fp32 (none); None = bf16 on CUDA, fp32 elsewhere
    precision: Optional[str] = option(None, choices=("bf16", "fp16", "fp32"))
    # torch CPU threads per process; None: the cores not busy with other work, shared by the run's processes
    # (avcl.core.device.default_threads; the start-up line says what was chosen)
    num_threads: Optional[int] = option(None, range=">=1")
    # an epoch whose loss is not finite (NaN / inf): stop the method there (its row shows where it diverged)
    # | flag (train on; the row is marked). Either way the run exits 1 and the table says which term diverged
    on_nan: str = option("stop", choices=("stop", "flag"))
    # CPU runs on Linux/glibc: malloc keeps freed memory for reuse instead of mapping every large
    # activation fresh from the OS (avcl.core.device.keep_cpu_heap); false = leave malloc alone
    cpu_keep_heap: bool = True
    # which epoch's weights a task ends with: last | best_val (highest accuracy on the val data
    # of all seen classes, evaluated after every epoch; AV-CIL's official checkpoint selection)
    model_selection: str = option("last", choices=("last", "best_val"))
    adam_betas: List[float] = option(factory=lambda: [0.9, 0.999], range="[0,1)")  # two numbers
    # task: a fresh optimizer for every task | stream: one for the whole stream (the pre-training code's)
    optimizer_scope: str = option("task", choices=("task", "stream"))
    # false: a method's checkpoint.pt (needed only to resume it) is deleted once the method is complete;
    # true: every method keeps its final checkpoint (model, memory, optimizer) in the run directory
    keep_checkpoints: bool = False
    # <method>/model.pt: the final model's weights alone (what `avcl probe` and downstream use reads);
    # None: written for pre-training (label-free) models, whose encoder is the product, not for classifiers
    save_model: Optional[bool] = None
    # several processes (torchrun): seconds a collective may wait for the other ranks before the run
    # stops with an error (a rank that dies is usually seen at once: its connections close)
    dist_timeout: float = option(1800.0, range=">0")
    # mid-task checkpoints (<method>/step_checkpoint.pt, avcl.engine.runner): every this many optimizer steps
    # and/or this many minutes (0: only at the end of each task); a killed run resumes from the last one
    checkpoint_every: int = 0
    checkpoint_minutes: float = 0.0


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
    batch_size: Optional[int] = option(None, range=">=1")  # None: train.batch_size
    checkpoint: Optional[str] = None  # start from this model file instead (e.g. an earlier RUN/init/model.pt)
    row: bool = False  # without a stage: still evaluate the untrained model as the report's init row


@dataclass
class EvalConfig:
    # what is measured after every task: accuracy (class-incremental accuracy matrix) |
    # retrieval (audio<->video retrieval matrix, then a linear probe; avcl.eval.protocols) |
    # probe (linear probes of the frozen video, audio and audio+video features after the last task)
    protocol: str = option("accuracy", choices=tuple(PROTOCOLS))
    forgetting: str = option("standard", choices=("standard", "avcil"))  # standard | avcil (see avcl.eval.metrics)
    batch_size: int = option(256, range=">=1")
    retrieval_per_class: int = option(5, range=">=1")  # test clips per class in the fixed retrieval set
    recall_at: List[int] = option(factory=lambda: [1, 5, 10], range=">=1")
    probe: str = option("end", choices=("end", "every_task", "none"))  # linear probe of the frozen encoder: end | every_task | none
    probe_epochs: int = 15
    probe_warmup_epochs: int = 2
    probe_lr: float = option(5e-4, range=">0")
    probe_weight_decay: float = 5e-6
    probe_batch_size: int = option(64, range=">=1")
    # eval.protocol=probe and `avcl probe`: per-modality linear probes of the frozen features (scikit-learn)
    linear_classifier: str = option("logistic", choices=("logistic", "svm"))  # logistic | svm (LinearSVC)
    linear_c: float = 1.0  # inverse regularisation strength of the linear classifier
    # avcl: one feature per clip, standardised, eval.linear_classifier with eval.linear_c | official: XKD's SVM
    # protocol (avcl.eval.probe.linear_probes): L2-normalised, unstandardised features, LinearSVC on augmented
    # train views, C chosen on a validation split of the train clips, scores averaged over test views
    probe_protocol: str = option("avcl", choices=("avcl", "official"))
    # official: the C grid (XKD's configs/svm/esc50 and kinetics_sound; ucf101/hmdb51: 1e-3..1) and LinearSVC's
    # max_iter (all its svm configs)
    probe_svm_costs: List[float] = option(factory=lambda: [1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0], range=">0")
    probe_svm_iter: int = option(1000, range=">=1")
    # official: the share of each class's train clips held out to choose C (ours: the code chooses on test)
    probe_val_fraction: float = option(0.2, range="[0,1)")
    # official: augmented views per train clip (the code's train clips_per_video: ucf101/hmdb51 25,
    # kinetics_sound 20, esc50 100) and views averaged per test clip (test clips_per_video: 3; kinetics_sound 2)
    probe_train_views: int = option(25, range=">=1")
    probe_test_clips: int = option(3, range=">=1")
    # official: the train augmentation (XKD's configs/svm/*: vid_aug_kwargs, aud_aug_kwargs): crop area range,
    # flip and grey-scale probabilities, colour jitter (brightness, contrast, saturation, hue), volume jitter;
    # audio_power: the fbank's log(power^p) exponent (2 for power fbank), so a gain g is p ln g on the log-mel
    probe_crop_scale: List[float] = option(factory=lambda: [0.08, 1.0], range="(0,1]")
    probe_flip: float = option(0.5, range="[0,1]")
    probe_color_jitter: List[float] = option(factory=lambda: [0.4, 0.4, 0.4, 0.2], range=">=0")
    probe_gray: float = option(0.2, range="[0,1]")
    probe_volume_jitter: float = option(0.1, range="[0,1)")
    probe_audio_power: float = option(2.0, range=">0")


@dataclass
class LogConfig:
    """What a run reports besides metrics.json: <method>/epochs.csv and tasks.csv always."""
    progress_seconds: float = option(30.0, range=">0")  # without a terminal: a progress line at least this often, in seconds
    tensorboard: bool = False  # also TensorBoard event files in RUN/tensorboard/<method> (extra: avcl[tensorboard])


@dataclass
class TuneConfig:
    """``avcl tune`` (avcl/apps/tune/, docs/tuning.md): a hyperparameter search on validation data only.
    The space searched is the recipe's ``search.<method>`` mapping."""
    method: str = ""  # the method (or variant) searched; `avcl tune RECIPE method=NAME` sets it
    trials: int = option(20, range=">=1")  # finished trials the search stops at (a resumed search counts the earlier ones)
    # first_tasks: the objective is measured on the validation data of the first `tasks` tasks of the stream
    # (Chaudhry et al. 2019); all_tasks: on every task's validation split (the whole stream)
    protocol: str = option("first_tasks", choices=("first_tasks", "all_tasks"))
    tasks: int = option(2, range=">=1")  # first_tasks: how many of the stream's first tasks the objective is measured on
    # a number of the trial's <method>/metrics.json (computed on validation data); auto: the protocol's
    # headline: average_incremental_accuracy (accuracy), retrieval_average (retrieval: mean R@k over
    # both directions and eval.recall_at), probe_av_accuracy (probe)
    objective: str = "auto"
    direction: str = option("maximize", choices=("maximize", "minimize"))  # maximize | minimize (e.g. objective=forgetting)
    sampler_startup_trials: int = 10  # random trials before TPE models the space
    pruner: bool = True  # median pruner: a trial below the median of earlier trials after a task stops
    pruner_startup_trials: int = 5  # finished trials before any trial is pruned
    pruner_warmup_tasks: int = 0  # tasks a trial trains before it may be pruned
    # "": the study is DIR/study.db (SQLite); an Optuna RDB URL (postgresql://..., mysql://...) shares it between
    # machines, each running `avcl tune --resume DIR --join` on a shared DIR (docs/tuning.md)
    storage: str = ""


def run_schema(dataset_options: type, method_hparams: dict[str, type]) -> type:
    """The run-config dataclass for one dataset and the registered methods."""
    method_args = dataclasses.make_dataclass(
        "MethodArgs",
        [(name, hp, field(default_factory=hp)) for name, hp in sorted(method_hparams.items())])
    return dataclasses.make_dataclass("RunConfig", [
        ("name", str, field(default="run")),
        ("description", str, field(default="")),
        ("seed", int, field(default=0)),
        # several seeds: one complete run per seed in RUN_DIR/seed-<s>/ (then `seed` is not used);
        # `avcl report RUN_DIR` gives mean ± std over them (avcl/apps/sweep.py)
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
        # (method_args.<method>.<key>) or dotted config keys (train.lr); avcl/apps/tune/
        ("search", Dict[str, Dict[str, Any]], field(default_factory=dict)),
        ("tune", TuneConfig, field(default_factory=TuneConfig)),
        # named variants of a method, usable in `methods` like a method: e.g. for an ablation
        # `had-no-ham: {method: had, ham: false}` (the other keys override method_args.<method>)
        ("variants", Dict[str, Dict[str, Any]], field(default_factory=dict)),
        # method -> metric -> ">=0.9" / "<=0.35": the numbers the recipe is expected to reach
        ("expected", Dict[str, Dict[str, str]], field(default_factory=dict)),
    ])
