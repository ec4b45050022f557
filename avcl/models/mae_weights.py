"""ImageNet MAE initialisation of the CAV backbone (``model.vit.checkpoint``, as the FLAVA/STELLA code).

Sources: a torch file (``.pth``/``.pt``) holding a state dict in the timm / official MAE naming
(``blocks.N.attn.qkv.weight``, ``patch_embed.proj.weight``, ``decoder_blocks.N...``), under the key
"model" (as ``mae_pretrain_vit_base_full.pth``) or at the top level; or a directory saved by
transformers' ``ViTMAEModel`` / ``ViTMAEForPreTraining`` (``save_pretrained``), read with
``from_pretrained(dir, local_files_only=True)`` and renamed to the MAE naming.

Conversion (FLAVA's ``tools/adapt_imae_weights_to_vamae.py``):

* layers 0..depth-1 -> both modality branches (``blocks.audio.i``, ``blocks.video.i``); the next
  fusion_depth layers -> the fusion layers, their LNs also into the per-modality LN pairs; the
  final LN -> the joint and both per-modality final LNs;
* video patch embedding = the RGB kernel (gray frames: summed over the channels); audio patch
  embedding = the RGB kernel summed over the channels (needs ``vit.audio_patch`` = the checkpoint's
  square patch); biases copied;
* with a decoder in the checkpoint: decoder_embed, decoder blocks and decoder_norm as they are, the
  mask token into both modalities' mask tokens, the video prediction head = the image head (gray
  frames: the mean of the three channel rows of each pixel), the audio head = the first Pa rows of
  the image head (Pa = the audio patch size);
* positional embeddings (encoder and decoder) are copied (video: repeated over the frames) only where
  the token grid equals the checkpoint's; otherwise the sin-cos initialisation stays (said in the notes);
  the "inter" positional embeddings, modality embeddings and the AVM are never in the checkpoint;
  MAE's CLS token is not used (no CLS token in this backbone).

The checkpoint must have exactly depth + fusion_depth layers of the model's width and MLP width (and,
if present, a decoder of the model's decoder width and depth) and the model's video patch size,
otherwise AvclError names the file and the shapes. The number of heads is not stored in the weights:
it must match (ViT-B: 12) for the weights to mean the same.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from avcl.core.errors import AvclError


# transformers' ViTMAE per-layer names -> MAE/timm (both the 4.x and the 5.x naming)
_HF_LAYER = [
    (r"attention\.attention\.query\.", "attn.q."), (r"attention\.attention\.key\.", "attn.k."),
    (r"attention\.attention\.value\.", "attn.v."), (r"attention\.output\.dense\.", "attn.proj."),
    (r"attention\.q_proj\.", "attn.q."), (r"attention\.k_proj\.", "attn.k."), (r"attention\.v_proj\.", "attn.v."),
    (r"attention\.o_proj\.", "attn.proj."),
    (r"layernorm_before\.", "norm1."), (r"layernorm_after\.", "norm2."),
    (r"intermediate\.dense\.", "mlp.fc1."), (r"output\.dense\.", "mlp.fc2."),
    (r"mlp\.fc1\.", "mlp.fc1."), (r"mlp\.fc2\.", "mlp.fc2."),
]
_HF_TOP = {
    "embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
    "decoder.mask_token": "mask_token", "decoder.decoder_pos_embed": "decoder_pos_embed",
    "decoder.decoder_embed.weight": "decoder_embed.weight", "decoder.decoder_embed.bias": "decoder_embed.bias",
    "decoder.decoder_norm.weight": "decoder_norm.weight", "decoder.decoder_norm.bias": "decoder_norm.bias",
    "decoder.decoder_pred.weight": "decoder_pred.weight", "decoder.decoder_pred.bias": "decoder_pred.bias",
}
_HF_BLOCK = re.compile(r"^(?:encoder\.layer|layers|decoder\.decoder_layers)\.(\d+)\.(.*)$")


def hf_to_mae_names(state: dict) -> dict:
    """A transformers ViTMAE state dict renamed to the MAE naming (q/k/v fused into qkv)."""
    out, parts = {}, {}
    for key, value in state.items():
        key = key[len("vit."):] if key.startswith("vit.") else key
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
            continue
        match = _HF_BLOCK.match(key)
        if not match:
            continue
        prefix = "decoder_blocks" if key.startswith("decoder.") else "blocks"
        rest = match.group(2)
        for pattern, replacement in _HF_LAYER:
            if re.match(pattern, rest):
                rest = re.sub(pattern, replacement, rest, count=1)
                break
        name = f"{prefix}.{match.group(1)}.{rest}"
        qkv = re.match(r"^(.*)\.attn\.([qkv])\.(weight|bias)$", name)
        if qkv:
            parts.setdefault(f"{qkv.group(1)}.attn.qkv.{qkv.group(3)}", {})[qkv.group(2)] = value
        else:
            out[name] = value
    for name, qkv in parts.items():
        out[name] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    return out


def read_mae_state(path: str | Path) -> dict:
    """The checkpoint's tensors in the MAE naming."""
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AvclError(f"model.vit.checkpoint: {path} is a directory without config.json (expected a "
                            "transformers ViTMAEModel directory or a .pth file)")
        try:
            import transformers  # optional extra (avcl[hf]): only for an HF checkpoint directory
        except ImportError:
            raise AvclError(f"model.vit.checkpoint: reading {path} needs the transformers package") from None
        config = transformers.ViTMAEConfig.from_pretrained(str(path), local_files_only=True)
        cls = transformers.ViTMAEForPreTraining if "ViTMAEForPreTraining" in (config.architectures or []) \
            else transformers.ViTMAEModel
        model = cls.from_pretrained(str(path), local_files_only=True)
        return hf_to_mae_names({k: v.detach() for k, v in model.state_dict().items()})
    if not path.is_file():
        raise AvclError(f"model.vit.checkpoint: {path} not found")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise AvclError(f"model.vit.checkpoint: cannot read {path}: {err}") from None
    state = raw.get("model", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or "patch_embed.proj.weight" not in state:
        raise AvclError(f"model.vit.checkpoint: {path} holds no MAE state dict (expected a 'model' entry with "
                        "'patch_embed.proj.weight', 'blocks.N.attn.qkv.weight', ...)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _layers(state: dict, prefix: str) -> int:
    found = {int(m.group(1)) for k in state for m in [re.match(rf"^{prefix}\.(\d+)\.", k)] if m}
    return max(found) + 1 if found else 0


def _block_items(state: dict, prefix: str, index: int):
    head = f"{prefix}.{index}."
    return {k[len(head):]: v for k, v in state.items() if k.startswith(head)}


def convert_mae_state(state: dict, model, source: str) -> tuple[dict, list[str]]:
    """(a partial state dict of ``model``, notes on what was and was not copied)."""
    size = model.vit_size
    d, depth, fusion = size.width, size.depth, size.fusion_depth
    kernel = state["patch_embed.proj.weight"]  # (D, 3, p, p)
    layers = _layers(state, "blocks")
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0] if layers else None
    if kernel.dim() != 4 or kernel.shape[0] != d or layers != depth + fusion or hidden != int(d * size.mlp_ratio):
        raise AvclError(f"model.vit.checkpoint {source}: width {kernel.shape[0]}, {layers} layers, MLP width {hidden}; "
                        f"the model has width {d}, depth {depth} + fusion_depth {fusion} = {depth + fusion} layers, "
                        f"MLP width {int(d * size.mlp_ratio)} (set model.vit.size=base or the matching fields)")
    p = kernel.shape[-1]
    if kernel.shape[-2:] != (model.video_patch, model.video_patch):
        raise AvclError(f"model.vit.checkpoint {source}: patch embedding kernel {tuple(kernel.shape)} (patch {p}) "
                        f"but model.vit.video_patch={model.video_patch}")
    if tuple(model.audio_patch) != (p, p):
        raise AvclError(f"model.vit.checkpoint {source}: the audio patch embedding is the {p}x{p} image kernel "
                        f"summed over channels, but model.vit.audio_patch={list(model.audio_patch)}")
    out, notes = {}, []
    for i in range(depth + fusion):
        for name, value in _block_items(state, "blocks", i).items():
            if i < depth:
                out[f"blocks.audio.{i}.{name}"] = value
                out[f"blocks.video.{i}.{name}"] = value
            else:
                j = i - depth
                out[f"fusion_blocks.{j}.{name}"] = value
                norm = re.match(r"^(norm[12])\.(weight|bias)$", name)
                if norm:
                    for m in ("audio", "video"):
                        out[f"fusion_blocks.{j}.mode_norms.{m}.{norm.group(1)}.{norm.group(2)}"] = value
    for which in ("joint", "audio", "video"):
        for part in ("weight", "bias"):
            out[f"norm.{which}.{part}"] = state[f"norm.{part}"]
    video_kernel = kernel if model.channels == 3 else kernel.sum(dim=1, keepdim=True)
    out["patch_embed.video.weight"] = video_kernel.permute(0, 2, 3, 1).reshape(d, -1)
    out["patch_embed.audio.weight"] = kernel.sum(dim=1).reshape(d, -1)
    for m in ("audio", "video"):
        out[f"patch_embed.{m}.bias"] = state["patch_embed.proj.bias"]
    notes.append(f"copied {depth} layers to both modality branches, {fusion} to the fusion layers, the patch "
                 f"embedding (audio{' and gray video' if model.channels == 1 else ''}: summed over RGB)")
    notes += _positional(state.get("pos_embed"), model, "pos_embed", out)

    if "decoder_embed.weight" in state:
        dd, dec_layers = state["decoder_embed.weight"].shape[0], _layers(state, "decoder_blocks")
        if dd != size.decoder_width or dec_layers != size.decoder_depth:
            raise AvclError(f"model.vit.checkpoint {source}: decoder width {dd}, {dec_layers} layers; the model's "
                            f"decoder has width {size.decoder_width}, {size.decoder_depth} layers (set "
                            "model.vit.decoder_width/decoder_depth, or use an encoder-only checkpoint)")
        for i in range(dec_layers):
            for name, value in _block_items(state, "decoder_blocks", i).items():
                out[f"decoder_blocks.{i}.{name}"] = value
        for name in ("decoder_embed.weight", "decoder_embed.bias", "decoder_norm.weight", "decoder_norm.bias"):
            out[name] = state[name]
        for m in ("audio", "video"):
            out[f"mask_token.{m}"] = state["mask_token"]
        pred_w, pred_b = state["decoder_pred.weight"], state["decoder_pred.bias"]  # (p*p*3, dd) rows (r, c, ch)
        if model.channels == 3:
            out["decoder_pred.video.weight"], out["decoder_pred.video.bias"] = pred_w, pred_b
        else:
            out["decoder_pred.video.weight"] = pred_w.view(p * p, 3, dd).mean(dim=1)
            out["decoder_pred.video.bias"] = pred_b.view(p * p, 3).mean(dim=1)
        rows = model.audio_patch[0] * model.audio_patch[1]
        out["decoder_pred.audio.weight"], out["decoder_pred.audio.bias"] = pred_w[:rows], pred_b[:rows]
        gray = "; gray video: the mean over RGB" if model.channels == 1 else ""
        notes.append(f"copied the decoder ({dec_layers} layers), mask token, prediction heads (audio: the first "
                     f"{rows} rows of the image head{gray})")
        notes += _positional(state.get("decoder_pos_embed"), model, "decoder_pos_embed", out)
    else:
        notes.append("no decoder in the checkpoint: the decoder keeps its random initialisation")
    return out, notes


def _positional(table, model, name: str, out: dict) -> list[str]:
    """Copy a (1, [1 +] g*g, D) table where the video / audio token grid equals the checkpoint's g x g."""
    if table is None:
        return []
    n = table.shape[1]
    side = round((n - 1) ** 0.5)
    if side * side == n - 1:
        table = table[:, 1:]  # drop the CLS position
    else:
        side = round(n ** 0.5)
    if side * side != table.shape[1]:
        return [f"{name}: grid of {n} positions not understood, not copied"]
    notes = []
    frames, rows, cols = model.video_grid
    if (rows, cols) == (side, side):
        out[f"{name}.video"] = table.repeat(1, frames, 1)
        notes.append(f"{name}: video copied ({side}x{side} grid, repeated over {frames} frames)")
    else:
        notes.append(f"{name}: video not copied (grid {rows}x{cols} vs the checkpoint's {side}x{side}), sin-cos kept")
    if tuple(model.audio_grid) == (side, side):
        out[f"{name}.audio"] = table.clone()
        notes.append(f"{name}: audio copied ({side}x{side} grid)")
    else:
        notes.append(f"{name}: audio not copied (grid {model.audio_grid[0]}x{model.audio_grid[1]} vs the "
                     f"checkpoint's {side}x{side}), sin-cos kept")
    return notes


def load_mae_weights(model, path: str | Path, report=print) -> list[str]:
    """Load an ImageNet MAE checkpoint into a ``CAVModel``; returns (and reports) the conversion notes."""
    state = read_mae_state(path)
    converted, notes = convert_mae_state(state, model, str(path))
    own = model.state_dict()
    for key, value in converted.items():
        if key not in own or own[key].shape != value.shape:
            raise AvclError(f"model.vit.checkpoint {path}: '{key}' has shape {tuple(value.shape)}, the model's is "
                            f"{tuple(own[key].shape) if key in own else 'missing'}")
    model.load_state_dict(converted, strict=False)
    notes = [f"model.vit.checkpoint {path}: " + note for note in notes]
    for note in notes:
        report(note)
    return notes
