"""Pretrained HF transformers encoders for ``avcl extract --encoder hf`` (extra: ``pip install 'avcl[hf]'``).

Models load only from local directories (``save_pretrained`` layout: config.json + weights),
never from a hub (``local_files_only=True``):

* video: ``VideoMAEModel`` (AV-CIL uses ``MCG-NJU/videomae-base``: 16 RGB frames of 224 px ->
  ``last_hidden_state`` of 8 tubelets x 196 patches x 768, stored as video tokens (T', P, D));
  frames are scaled to [0, 1] and normalised with the directory's ``preprocessor_config.json``
  mean/std (ImageNet's when absent), as ``VideoMAEImageProcessor`` does for frames already
  resized and cropped by the decoder;
* audio: ``ASTModel`` on the Kaldi fbank (``audio.target_frames`` x ``audio.num_bins`` must
  match the model's ``max_length`` x ``num_mel_bins``) -> patch tokens (the two leading [CLS]
  / distillation tokens dropped) as audio tokens (L, D).

Select with ``--encoder hf encoder.video_model=DIR encoder.audio_model=DIR``; the preprocessing
comes from the preset (``avcil`` reproduces AV-CIL's, ``avcil-corrected`` uses 16 kHz and
AudioSet normalisation; see docs/extraction.md).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from avcl.core.errors import AvclError
from avcl.core.io import file_sha256


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
WEIGHT_FILES = ("*.safetensors", "*.bin")


def _load(model_cls, directory: str, what: str):
    path = Path(directory)
    if not (path / "config.json").is_file():
        raise AvclError(f"{what}: {path} is not a local HF model directory (no config.json); "
                        "download the model once and save it with save_pretrained")
    try:
        return model_cls.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
    except Exception as err:  # noqa: BLE001 -- any failure to load is a problem with the user's directory
        raise AvclError(f"{what}: cannot load {path} as {model_cls.__name__} ({err})") from None


class HFEncoder:
    """Frozen VideoMAE (video) and AST (audio) encoders from local directories."""

    def __init__(self, config):
        try:
            from transformers import ASTModel, VideoMAEModel  # optional extra (avcl[hf])
        except ImportError:
            raise AvclError("--encoder hf needs HF transformers: pip install 'avcl[hf]'") from None
        self.config = config
        opts, decode, audio = config.encoder_options, config.decode, config.audio
        self.modules, self.dirs = {}, {}
        if decode.video:
            if not opts.video_model:
                raise AvclError("--encoder hf: set encoder.video_model=DIR (a local VideoMAE model directory)")
            model = _load(VideoMAEModel, opts.video_model, "encoder.video_model")
            c = model.config
            if decode.gray or decode.frames != c.num_frames or decode.size != c.image_size:
                raise AvclError(f"{opts.video_model}: VideoMAE wants {c.num_frames} RGB frames of {c.image_size} px; "
                                f"set decode.frames={c.num_frames} decode.size={c.image_size} decode.gray=false")
            processor = Path(opts.video_model) / "preprocessor_config.json"
            stats = json.loads(processor.read_text()) if processor.is_file() else {}
            self.mean = torch.tensor(stats.get("image_mean", IMAGENET_MEAN)).view(1, 1, 3, 1, 1)
            self.std = torch.tensor(stats.get("image_std", IMAGENET_STD)).view(1, 1, 3, 1, 1)
            self.modules["video"], self.dirs["video"] = model, Path(opts.video_model)
        if decode.audio:
            if not opts.audio_model:
                raise AvclError("--encoder hf: set encoder.audio_model=DIR (a local AST model directory)")
            model = _load(ASTModel, opts.audio_model, "encoder.audio_model")
            c = model.config
            if audio.target_frames != c.max_length or audio.num_bins != c.num_mel_bins:
                raise AvclError(f"{opts.audio_model}: AST wants {c.max_length} x {c.num_mel_bins} fbank frames; "
                                f"set audio.target_frames={c.max_length} audio.num_bins={c.num_mel_bins}")
            self.modules["audio"], self.dirs["audio"] = model, Path(opts.audio_model)

    def weights_sha256(self) -> str:
        """One digest over the weight files of both directories (what produced the features)."""
        digest = hashlib.sha256()
        for name in sorted(self.dirs):
            for pattern in WEIGHT_FILES:
                for file in sorted(self.dirs[name].glob(pattern)):
                    digest.update(f"{name}/{file.name}".encode())
                    file_sha256(file, digest)
        return digest.hexdigest()

    @torch.no_grad()
    def tokens(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        out = {}
        if "video" in batch:
            model = self.modules["video"]
            frames = torch.from_numpy(batch["video"]).float().div_(255).permute(0, 1, 4, 2, 3)  # (B, T, 3, H, W)
            hidden = model(pixel_values=(frames - self.mean) / self.std).last_hidden_state
            c = model.config
            steps, patches = c.num_frames // c.tubelet_size, (c.image_size // c.patch_size) ** 2
            out["video"] = hidden.reshape(hidden.shape[0], steps, patches, hidden.shape[-1])
        if "audio" in batch:
            hidden = self.modules["audio"](input_values=torch.from_numpy(batch["audio"]).float()).last_hidden_state
            out["audio"] = hidden[:, 2:]  # drop AST's [CLS] and distillation tokens
        return out

    def token_shapes(self) -> dict[str, tuple[int, ...]]:
        decode, audio = self.config.decode, self.config.audio
        dummy = {}
        if "video" in self.modules:
            dummy["video"] = np.zeros((1, decode.frames, decode.size, decode.size, 3), np.uint8)
        if "audio" in self.modules:
            dummy["audio"] = np.zeros((1, audio.target_frames, audio.num_bins), np.float32)
        return {name: tuple(t.shape[1:]) for name, t in self.tokens(dummy).items()}
