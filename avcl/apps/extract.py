"""Feature extraction: video files -> decode -> audio front-end -> encoder -> avcl's feature store.

``output="raw"`` runs no encoder: the store gets the decoded inputs themselves, ``video`` as uint8
frames (T, S, S, 3) (or (T, S, S) gray) and ``audio`` as a float16 filterbank (frames, bins),
for models that read raw clips (the CAV backbone of the pre-training recipes; preset ``cav``).

Decoding and the audio front-end run in worker processes (``workers``); the encoder runs in the
main process on batches. Rows are written to the store as soon as they are encoded, so an
interrupted extraction resumes where it stopped (the store is reopened and only its pending
rows are computed); the store is marked complete only when every row is written or failed.

A bad file (unreadable, not a video, truncated, no audio with ``missing_audio=skip``, missing
from the video folder) never stops the run: it is reported once, counted in the summary and
recorded as a failed row with its reason.
"""
from __future__ import annotations

import collections
import hashlib
import importlib.metadata as md
import multiprocessing
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import av
import numpy as np
import torch
from tqdm.auto import tqdm

from avcl.core.errors import AvclError
from avcl.core.io import file_sha256
from avcl.data.store import COMPRESSIONS, FAILED, create_store, open_store
from avcl.media.decode import OK, DecodeOptions, decode_clip
from avcl.media.frontend import AudioFrontend, audio_features
from avcl.media.manifests import ClipItem, ClipList
from avcl.models.encoders import AudioConv1d, FrameConv
from avcl.models.hf_encoders import HFEncoder


OUTPUTS = ("clip", "tokens", "snippets", "avcil", "raw")


@dataclass
class EncoderOptions:
    dim: int = 128  # feature width D of the built-in encoders
    seed: int = 0  # initialisation of the built-in encoders when no weights are given
    weights: str = ""  # checkpoint with "encoders.audio.*" / "encoders.video.*" (an avcl run's model) or empty
    video_model: str = ""  # --encoder hf: local VideoMAE directory (avcl/models/hf_encoders.py)
    audio_model: str = ""  # --encoder hf: local AST directory


@dataclass
class Preset:
    """Preprocessing settings: how clips are decoded and what the audio front-end computes."""
    decode: DecodeOptions
    audio: AudioFrontend
    note: str = ""


PRESETS: dict[str, Callable[[], Preset]] = {
    "builtin": lambda: Preset(DecodeOptions(frames=8, size=64, gray=True, sample_rate=16000),
                              AudioFrontend(num_bins=64, target_frames=1024),
                              "small grayscale frames and 64-bin fbank for avcl's built-in encoders"),
    "avdigits": lambda: Preset(DecodeOptions(frames=8, size=64, gray=True, sample_rate=16000),
                               AudioFrontend(num_bins=40, target_frames=100),
                               "AV-Digits clips of make-avdigits-videos: 8 gray frames of 64 px, 1 s of 40-bin fbank"),
    "avcil": lambda: Preset(DecodeOptions(frames=16, sampling="fps", fps=10, size=224, sample_rate=11430),
                            AudioFrontend(num_bins=128, target_frames=1024),
                            "AV-CIL's released features (its utils/extract_frames.py): 10 fps then 16 frames (8 fps for "
                            "Kinetics-Sounds / VGGSound100: decode.fps=8), 224 px RGB, audio at 11430 Hz, "
                            "128-bin Kaldi fbank, 1024 frames, no normalisation"),
    "avcil-corrected": lambda: Preset(DecodeOptions(frames=16, sampling="fps", fps=10, size=224, sample_rate=16000),
                                      AudioFrontend(num_bins=128, target_frames=1024,
                                                    norm_mean=-4.2677393, norm_std=4.5689974),
                                      "AV-CIL's frames, audio as AudioMAE was trained: 16 kHz and AudioSet "
                                      "normalisation (mean -4.268, std 4.569)"),
    # avcl's Kaldi fbank sees the waveform in the 16-bit range: CAV-MAE's values (torchaudio on a float
    # waveform) + 2 ln 32768 = 20.794 above Kaldi's floor, so its AudioSet mean -5.081 is 15.713 here
    "cav": lambda: Preset(DecodeOptions(frames=10, sampling="uniform", size=224, sample_rate=16000),
                          AudioFrontend(num_bins=128, frame_shift_ms=10.0, window="hanning", target_frames=1024),
                          "CAV-MAE / STELLA pre-training inputs (configs/backbone/cav.yaml), for --output raw: 10 RGB frames "
                          "uniform over the clip (about one per second of a 10 s clip), 224 px, 16 kHz mono, "
                          "128-bin Kaldi fbank (Hanning, 10 ms shift), 1024 frames, not normalised (the model "
                          "normalises with model.cav.audio_mean / audio_std)"),
}


@dataclass
class ExtractConfig:
    preset: str = "builtin"
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    audio: AudioFrontend = field(default_factory=AudioFrontend)
    encoder: str = "builtin"
    encoder_options: EncoderOptions = field(default_factory=EncoderOptions)
    # clip: (D,) per modality | tokens: audio (L, D), video (T, P, D) | snippets: (N, D) per modality |
    # avcil: audio (D,) and video (T, P, D), the layout of AV-CIL's features (model.name=avcil) |
    # raw: no encoder, the decoded inputs: video uint8 (T, S, S[, 3]), audio float16 fbank (frames, bins)
    output: str = "clip"
    snippets: int = 10  # N for output=snippets
    workers: int = 0  # decoding processes (0: decode in this process)
    batch_size: int = 16
    test_fraction: float = 0.2  # share of clips without a split put in "test" (stable hash of the id)
    compression: str = "none"  # none | lzf | gzip, per row chunk (docs/scaling.md: measured read speed and size)

    def check(self) -> None:
        self.decode.check()
        self.audio.check()
        if self.output not in OUTPUTS:
            raise AvclError(f"--output must be one of {list(OUTPUTS)}, got '{self.output}'")
        if self.snippets < 1 or self.workers < 0 or self.batch_size < 1 or not 0 <= self.test_fraction < 1:
            raise AvclError("need snippets >= 1, workers >= 0, batch_size >= 1 and 0 <= test_fraction < 1")
        if self.compression not in COMPRESSIONS:
            raise AvclError(f"--compression must be one of {list(COMPRESSIONS)}, got '{self.compression}'")
        if self.encoder not in ENCODERS:
            raise AvclError(f"unknown encoder '{self.encoder}' (available: {', '.join(ENCODERS)})")
        if self.output == "raw":
            if self.encoder_options.weights:
                raise AvclError("--output raw runs no encoder: drop --weights / encoder.weights")
            if self.decode.video and (self.decode.frames == 0 or self.decode.size == 0):
                raise AvclError("--output raw stores fixed-size frames: set decode.frames > 0 and decode.size > 0")
            if self.decode.audio and self.audio.target_frames == 0:
                raise AvclError("--output raw stores a fixed-size filterbank: set audio.target_frames > 0")


def raw_fields(config: ExtractConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """The store fields of ``--output raw``: name -> (per-clip shape, dtype)."""
    decode, audio = config.decode, config.audio
    fields = {}
    if decode.video:
        fields["video"] = ((decode.frames, decode.size, decode.size) + (() if decode.gray else (3,)), "uint8")
    if decode.audio:
        fields["audio"] = ((audio.target_frames, audio.num_bins), "float16")
    return fields


def make_config(preset: str = "builtin", overrides: list[str] | None = None, **top) -> ExtractConfig:
    """A config from a preset, ``section.key=value`` overrides (sections: decode, audio, encoder)
    and top-level keyword values."""
    if preset not in PRESETS:
        raise AvclError(f"unknown preset '{preset}' (available: {', '.join(PRESETS)})")
    chosen = PRESETS[preset]()
    config = ExtractConfig(preset=preset, decode=chosen.decode, audio=chosen.audio)
    config = replace(config, **{k: v for k, v in top.items() if v is not None})
    sections = {"decode": config.decode, "audio": config.audio, "encoder": config.encoder_options}
    for text in overrides or []:
        key, sep, value = text.partition("=")
        section, _, name = key.partition(".")
        if not sep or section not in sections:
            raise AvclError(f"override '{text}' must be decode.KEY=VALUE, audio.KEY=VALUE or encoder.KEY=VALUE")
        target = sections[section]
        types = {f.name: f.type for f in fields(target)}
        if name not in types:
            raise AvclError(f"unknown key '{key}' (known: {', '.join(f'{section}.{n}' for n in types)})")
        setattr(target, name, _parse(value, getattr(target, name), key))
    config.check()
    return config


def _parse(text: str, current, key: str):
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        return type(current)(text)
    except ValueError:
        raise AvclError(f"{key}: cannot read '{text}' as {type(current).__name__}") from None


# ---------------------------------------------------------------- workers: decode + front-end

def prepare(job: tuple[int, str, float | None, float | None], decode: DecodeOptions,
            frontend: AudioFrontend) -> dict:
    """Decode one clip and compute its audio features (runs in a worker process)."""
    row, path, start, end = job
    clip = decode_clip(path, decode, start, end)
    out = {"row": row, "path": path, "status": clip.status, "reason": clip.reason}
    if clip.ok:
        out["video"] = clip.video
        out["audio_present"] = clip.audio_present
        if clip.audio is not None:
            out["audio"] = audio_features(clip.audio, decode.sample_rate, frontend)
    return out


def _prepared(jobs: list, config: ExtractConfig):
    """Yield ``prepare`` results in order, decoding up to ``4 * workers`` clips ahead."""
    if config.workers == 0:
        for job in jobs:
            yield prepare(job, config.decode, config.audio)
        return
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(config.workers, mp_context=context) as pool:
        ahead = collections.deque()
        for job in jobs:
            ahead.append(pool.submit(prepare, job, config.decode, config.audio))
            if len(ahead) >= 4 * config.workers:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


# ---------------------------------------------------------------- encoders

class BuiltinEncoder:
    """avcl's small encoders (AudioConv1d on fbank, FrameConv on grayscale frames), frozen."""

    def __init__(self, config: ExtractConfig):
        self.config = config
        opts, decode = config.encoder_options, config.decode
        if decode.audio and config.audio.target_frames == 0:
            raise AvclError("the built-in encoder needs fixed-size audio: set audio.target_frames > 0")
        if decode.video and (decode.frames == 0 or decode.size == 0):
            raise AvclError("the built-in encoder needs fixed-size video: decode.frames > 0 and decode.size > 0")
        torch.manual_seed(opts.seed)
        self.modules = {}
        if decode.audio:
            self.modules["audio"] = AudioConv1d((config.audio.target_frames, config.audio.num_bins), opts.dim)
        if decode.video:
            self.modules["video"] = FrameConv((decode.frames, decode.size, decode.size), opts.dim)
        if opts.weights:
            self._load(Path(opts.weights))
        for module in self.modules.values():
            module.eval().requires_grad_(False)

    def _load(self, path: Path) -> None:
        if not path.is_file():
            raise AvclError(f"encoder weights not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 -- any unreadable checkpoint is the user's file
            raise AvclError(f"{path}: not a readable PyTorch checkpoint ({err})") from None
        state = state.get("model", state) if isinstance(state, dict) else state
        for name, module in self.modules.items():
            prefix = f"encoders.{name}."
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not sub:
                raise AvclError(f"{path}: no '{prefix}*' weights (not a checkpoint of an avcl model "
                                f"with a {name} encoder)")
            try:
                module.load_state_dict(sub)
            except RuntimeError as err:
                detail = str(err).strip().splitlines()[-1].strip()  # e.g. "size mismatch for net.0.weight: ..."
                raise AvclError(f"{path}: {name} encoder weights do not fit encoder.dim="
                                f"{self.config.encoder_options.dim} and the preprocessing ({detail})") from None

    def weights_sha256(self) -> str:
        if self.config.encoder_options.weights:
            return file_sha256(self.config.encoder_options.weights)
        digest = hashlib.sha256()
        for name in sorted(self.modules):
            for key, tensor in sorted(self.modules[name].state_dict().items()):
                digest.update(f"{name}.{key}".encode())
                digest.update(tensor.numpy().tobytes())
        return digest.hexdigest()

    @torch.no_grad()
    def tokens(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """audio (B, L, D) and video (B, T, P, D) tokens."""
        out = {}
        if "audio" in batch:
            out["audio"] = self.modules["audio"](torch.from_numpy(batch["audio"]))
        if "video" in batch:
            video = torch.from_numpy(batch["video"])
            if video.ndim == 5:  # RGB -> luma (ITU-R BT.601), the built-in FrameConv sees one channel
                video = (video.float() @ torch.tensor([0.299, 0.587, 0.114])).round().to(torch.uint8)
            out["video"] = self.modules["video"](video)
        return out

    def token_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample token shapes, found by encoding zeros."""
        decode, audio = self.config.decode, self.config.audio
        dummy = {}
        if "audio" in self.modules:
            dummy["audio"] = np.zeros((1, audio.target_frames, audio.num_bins), np.float32)
        if "video" in self.modules:
            dummy["video"] = np.zeros((1, decode.frames, decode.size, decode.size), np.uint8)
        return {name: tuple(t.shape[1:]) for name, t in self.tokens(dummy).items()}


def _hf_encoder(config):
    return HFEncoder(config)


ENCODERS = {"builtin": BuiltinEncoder, "hf": _hf_encoder}


def modality_output(output: str, modality: str) -> str:
    """clip, tokens or snippets: what ``output`` stores for ``modality``."""
    if output == "avcil":
        return "clip" if modality == "audio" else "tokens"
    return output


def pool_tokens(tokens: torch.Tensor, modality: str, output: str, snippets: int) -> torch.Tensor:
    """Per-sample features from tokens: the clip vector, the tokens, or N snippet vectors."""
    output = modality_output(output, modality)
    if output == "tokens":
        return tokens
    if modality == "video":
        tokens = tokens.mean(dim=2)  # (B, T, D): pool space
    if output == "clip":
        return tokens.mean(dim=1)
    return torch.nn.functional.adaptive_avg_pool1d(tokens.transpose(1, 2), snippets).transpose(1, 2)


# ---------------------------------------------------------------- the extraction

def library_versions() -> dict[str, str]:

    versions = {"torch": torch.__version__, "numpy": np.__version__, "av": av.__version__,
                "ffmpeg": ".".join(map(str, av.library_versions.get("libavcodec", ()))) + " (libavcodec)"}
    for dist in ("avcl", "kaldi-native-fbank", "h5py"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = "unknown"
    return versions


def _split_of(item: ClipItem, test_fraction: float) -> str:
    if item.split:
        return item.split
    return "test" if zlib.crc32(item.id.encode()) % 10000 < test_fraction * 10000 else "train"


@dataclass
class Summary:
    total: int
    written: int
    failed: int
    computed: int  # rows computed by this run (the rest were done by an earlier, interrupted run)
    reasons: dict[str, int]

    def line(self, out: Path) -> str:
        text = f"{out}: {self.written} of {self.total} clips written, {self.failed} failed"
        if self.reasons:
            text += " (" + "; ".join(f"{n} x {r}" for r, n in sorted(self.reasons.items(), key=lambda x: -x[1])) + ")"
        return text + f"; {self.computed} computed by this run"


def _reason_kind(reason: str) -> str:
    """The reason without its details (for the summary's counts)."""
    return reason.split(":")[0]


def extract(dataset: ClipList, out, config: ExtractConfig, report: Callable[[str], None] = print) -> Summary:
    """Extract features of every clip of ``dataset`` into the store at ``out`` (resuming it)."""
    config.check()
    out = Path(out)
    raw = config.output == "raw"
    encoder = None if raw else ENCODERS[config.encoder](config)
    if raw:
        fields = raw_fields(config)
    else:
        fields = {}
        for name, shape in encoder.token_shapes().items():
            dim = shape[-1]
            fields[name] = ({"tokens": shape, "clip": (dim,), "snippets": (config.snippets, dim)}[
                modality_output(config.output, name)], "float16")
    shapes = {name: shape for name, (shape, _) in fields.items()}
    settings = {"preset": config.preset, "decode": asdict(config.decode), "audio_frontend": asdict(config.audio),
                "encoder": None if raw else config.encoder,
                "encoder_options": None if raw else asdict(config.encoder_options),
                "output": config.output, "snippets": config.snippets if config.output == "snippets" else None,
                "test_fraction": config.test_fraction}
    reasons = collections.Counter()  # failure reason -> count, over this run and the interrupted ones
    if out.exists():
        previous = open_store(out)
        if not previous.complete and previous.manifest.get("settings") != settings:
            raise AvclError(f"{out}: an unfinished extraction with other settings; delete it or use the same "
                            "settings to resume it")
        reasons.update(_reason_kind(previous.errors.get(row, "")) for row in np.flatnonzero(previous.status == FAILED))
    items = dataset.items
    manifest = {"settings": settings,
                "dataset": {"source": dataset.source, "kind": dataset.kind, "clips": len(items),
                            "missing_files": len(dataset.missing)},
                "fields": {name: list(shape) for name, shape in shapes.items()}}
    writer = create_store(out, [item.id for item in items], fields=fields,
                          labels=dataset.label_index(), splits=[_split_of(i, config.test_fraction) for i in items],
                          class_names=dataset.class_names, manifest=manifest, compression=config.compression)
    with writer:
        pending = writer.pending()
        computed = 0

        def fail(row: int, reason: str) -> None:
            nonlocal computed
            report(f"bad file {items[row].path}: {reason}")
            writer.fail(row, reason)
            reasons[_reason_kind(reason)] += 1
            computed += 1

        jobs = []
        for row in pending:
            item = items[row]
            if item.missing:
                fail(row, "file not found")
            else:
                jobs.append((int(row), item.path, item.start, item.end))
        batch: list[dict] = []

        def flush() -> None:
            nonlocal computed
            if not batch:
                return
            inputs = {}
            if "video" in shapes:
                inputs["video"] = np.stack([b["video"] for b in batch])
            if "audio" in shapes:
                inputs["audio"] = np.stack([b["audio"] for b in batch])
            if raw:
                values = {name: value.astype(fields[name][1]) for name, value in inputs.items()}
            else:
                tokens = encoder.tokens(inputs)
                values = {name: pool_tokens(t, name, config.output, config.snippets).numpy()
                          for name, t in tokens.items()}
            masks = {}
            if "audio" in values:
                present = np.array([b["audio_present"] for b in batch])
                values["audio"][~present] = 0.0  # no audio track: zeros, masked out
                masks["audio"] = present
            writer.write([b["row"] for b in batch], values, masks=masks)
            computed += len(batch)
            batch.clear()

        with tqdm(total=len(items), initial=len(items) - len(jobs), desc="avcl extract", unit="clip",
                  disable=None) as bar:
            for result in _prepared(jobs, config):
                if result["status"] != OK:
                    fail(result["row"], result["reason"])
                else:
                    batch.append(result)
                    if len(batch) >= config.batch_size:
                        flush()
                bar.update(1)
            flush()
        failed = sum(reasons.values())
        summary = Summary(total=len(items), written=len(items) - failed, failed=failed, computed=computed,
                          reasons=dict(reasons))
        # The weights' hash and library versions: once, by the run that completes the store.
        writer.finalize({"summary": asdict(summary), "weights_sha256": None if raw else encoder.weights_sha256(),
                         "versions": library_versions()})
    return summary
