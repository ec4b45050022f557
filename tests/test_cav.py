"""The CAV-MAE backbone (avcl/models/cav.py), its AVM (avm.py), the shared ViT pieces (avcl/nn/vit.py),
the self-supervised losses (avcl/nn/losses.py) and the ImageNet MAE initialisation (mae_weights.py)."""
import re

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from avcl.config import ModelConfig, build_config
from avcl.core.errors import AvclError
from avcl.models import build_model
from avcl.models.avm import matching_pairs
from avcl.models.cav import CAVModel
from avcl.nn.losses import info_nce, normalized_patch_mse
from avcl.nn.vit import (SIZE_PRESETS, gather_tokens, patchify_2d, random_masking, resolve_size, sincos_2d,
                         split_selected, unpatchify_2d, visible_count)

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"width": 32, "depth": 1, "fusion_depth": 1, "heads": 2, "decoder_width": 32, "decoder_depth": 1,
         "decoder_heads": 2, "video_patch": 8, "audio_patch": [4, 8], "frames": 4}


def model_cfg(vit=None, cav=None):
    return OmegaConf.merge(OmegaConf.structured(ModelConfig),
                           {"name": "cav", "vit": {**SMALL, **(vit or {})},
                            "cav": {"mask_ratio_audio": 0.75, "mask_ratio_video": 0.75, **(cav or {})}})


def samples(n=6, frames=8, size=16, audio_frames=20, mel=16, rgb=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, frames, size, size, 3) if rgb else (n, frames, size, size)
    return {"video": torch.randint(0, 256, shape, dtype=torch.uint8, generator=g),
            "audio": torch.randn(n, audio_frames, mel, generator=g), "label": torch.arange(n)}


def make(vit=None, cav=None, **data):
    batch = samples(**data)
    torch.manual_seed(0)
    return CAVModel(model_cfg(vit, cav), batch), batch


def to_input(model, patches, like):
    """The prepared input holding ``patches`` (the inverse of model.patchify)."""
    b = like["audio"].shape[0]
    audio = unpatchify_2d(patches["audio"], model.audio_patch, model.audio_grid, 1)
    t, h, w = model.video_grid
    video = unpatchify_2d(patches["video"].reshape(b, t, h * w, -1), (model.video_patch,) * 2, (h, w), model.channels)
    return {"audio": audio, "video": video}


# ----- shared pieces -----------------------------------------------------------------------------------
def test_size_presets_and_overrides():
    base = resolve_size(model_cfg({"size": "base"}).vit)
    assert resolve_size(OmegaConf.create({"size": "base"})) == SIZE_PRESETS["base"]
    tiny = resolve_size(OmegaConf.create({"size": "tiny", "depth": 2}))
    assert (tiny.width, tiny.depth, tiny.fusion_depth, tiny.heads, tiny.decoder_width) == (192, 2, 1, 3, 128)
    assert (SIZE_PRESETS["base"].width, SIZE_PRESETS["base"].depth, SIZE_PRESETS["base"].fusion_depth) == (768, 10, 2)
    assert (base.width, base.depth, base.mlp_ratio) == (32, 1, 4.0)  # the fields given win over the preset
    with pytest.raises(AvclError, match="model.vit.size"):
        resolve_size(OmegaConf.create({"size": "huge"}))
    with pytest.raises(AvclError, match="model.vit.width=30 is not divisible by model.vit.heads=4"):
        resolve_size(OmegaConf.create({"size": "tiny", "width": 30, "heads": 4}))


def test_patchify_layout_and_inverse():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)  # (B, C, H, W)
    p = patchify_2d(x, (2, 3))
    assert p.shape == (2, 4, 18)
    # patch 1 = row 0, col 1 of the 2 x 2 grid; values in (pixel row, pixel col, channel) order
    assert p[0, 1, :3].tolist() == [x[0, 0, 0, 3].item(), x[0, 1, 0, 3].item(), x[0, 2, 0, 3].item()]
    assert p[0, 1, 3].item() == x[0, 0, 0, 4].item()
    assert torch.equal(unpatchify_2d(p, (2, 3), (2, 2), 3), x)


def test_sincos_and_masking_helpers():
    table = sincos_2d(8, 2, 3)
    assert table.shape == (6, 8)
    assert torch.allclose(table[0], torch.tensor([0., 0., 1., 1., 0., 0., 1., 1.]))
    # tokens of the same column share the first half (MAE: first half encodes the column)
    assert torch.equal(table[1, :4], table[4, :4]) and not torch.equal(table[1, 4:], table[4, 4:])
    keep, rest = random_masking(5, 10, 3)
    assert keep.shape == (5, 3) and rest.shape == (5, 7)
    assert torch.equal(torch.cat([keep, rest], 1).sort(1).values, torch.arange(10).expand(5, 10))
    assert len({tuple(r) for r in keep.tolist()}) > 1
    selected = torch.tensor([[1, 4, 7, 9], [0, 2, 3, 8]])
    vis, hid = split_selected(selected, 1)
    assert torch.equal(torch.cat([vis, hid], 1).sort(1).values, selected)
    x = torch.randn(2, 10, 3)
    assert torch.equal(gather_tokens(x, selected), torch.stack([x[0, [1, 4, 7, 9]], x[1, [0, 2, 3, 8]]]))
    assert torch.equal(gather_tokens(x[:1], selected), x[0][selected])
    assert visible_count(50, 0.8) == 10 and visible_count(64, 0.8) == 12


def test_info_nce_on_hand_made_embeddings():
    z = torch.eye(4) * 3
    assert float(info_nce(z, z, temperature=0.05)) < 1e-6  # aligned pairs, small tau: ~0
    shuffled = float(info_nce(z, z[[1, 2, 3, 0]], temperature=0.05))
    assert shuffled > 10
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    rows = info_nce(a, b, temperature=0.1, reduction="none")
    assert rows.shape == (5,) and torch.allclose(rows.mean(), info_nce(a, b, 0.1))
    an, bn = F.normalize(a, dim=1), F.normalize(b, dim=1)
    s = an @ bn.t() / 0.1
    expected = 0.5 * (-(s.log_softmax(1).diag()) - s.t().log_softmax(1).diag())
    assert torch.allclose(rows, expected, atol=1e-5)


def test_normalized_patch_mse():
    target = torch.tensor([[[1.0, 3.0], [2.0, 2.0]]])
    pred = torch.zeros(1, 2, 2)
    assert torch.allclose(normalized_patch_mse(pred, target, norm_pix=False), torch.tensor([(1 + 9 + 4 + 4) / 4]))
    # patch 1 -> (-1, 1) / sqrt(2) (unbiased variance 2): squared error 0.5; constant patch 2 -> 0
    normed = normalized_patch_mse(pred, target, norm_pix=True)
    assert torch.allclose(normed, torch.tensor([0.25]), atol=1e-5)
    masked = normalized_patch_mse(pred, target, norm_pix=False, mask=torch.tensor([[True, False]]))
    assert torch.allclose(masked, torch.tensor([5.0]))


# ----- the model -----------------------------------------------------------------------------------------
def test_shapes_of_the_public_api():
    model, batch = make()
    assert model.label_free and not hasattr(model, "head")
    x = model.prepare(batch, train=True)
    assert x["audio"].shape == (6, 1, 20, 16) and x["video"].shape == (6, 4, 1, 16, 16)
    assert x["audio"].dtype == x["video"].dtype == torch.float32
    assert model.num_tokens == {"audio": 10, "video": 16} and model.audio_grid == (5, 2)
    patches = model.patchify(x)
    assert patches["audio"].shape == (6, 10, 32) and patches["video"].shape == (6, 16, 64)
    h = model.encode_unimodal(x)
    assert h["audio"].shape == (6, 10, 32) and h["video"].shape == (6, 16, 32)
    ids = {"audio": torch.tensor([[0, 3, 9]] * 6), "video": torch.tensor([[1, 2]] * 6)}
    hs = model.encode_unimodal(x, ids)
    assert hs["audio"].shape == (6, 3, 32) and hs["video"].shape == (6, 2, 32)
    f = model.fuse(h)
    assert f["audio"].shape == (6, 10, 32) and f["video"].shape == (6, 16, 32)
    out = model.ssl_loss(x)
    assert set(out) == {"loss", "mae_audio", "mae_video", "contrastive", "z_audio", "z_video"}
    for key in ("loss", "mae_audio", "mae_video", "contrastive"):
        assert out[key].dim() == 0 and torch.isfinite(out[key]) and out[key] > 0
    assert out["z_audio"].shape == out["z_video"].shape == (6, 32)
    assert not torch.allclose(out["z_audio"].norm(dim=1), torch.ones(6))  # not normalised
    model.eval()
    emb = model.embed(batch)
    assert emb["audio"].shape == emb["video"].shape == (6, 32) and emb["joint"].shape == (6, 64)
    assert torch.allclose(emb["audio"].norm(dim=1), torch.ones(6), atol=1e-5)
    assert torch.equal(model(batch)["joint"], emb["joint"])
    masked = model.masked_embeddings(x)
    assert masked["audio"].shape == masked["video"].shape == (6, 32)


def test_registered_through_the_config():
    cfg = build_config({"model": {"name": "cav", "vit": SMALL}})
    model = build_model(cfg.model, samples())
    assert isinstance(model, CAVModel) and model.avm is not None


def test_patch_token_order_is_time_major_and_frame_major():
    model, batch = make()
    x = model.prepare(batch, train=False)
    t = torch.arange(20.0)[:, None].expand(20, 16)
    f = torch.arange(16.0)[None].expand(20, 16)
    x["audio"] = (t * 100 + f)[None, None].expand(6, 1, 20, 16).clone()
    p = model.patchify(x)["audio"][0]  # patch [4 time, 8 freq] on a (5, 2) grid
    token = 1 * 2 + 1  # time step 1, freq step 1
    assert p[token, 0].item() == 4 * 100 + 8 and p[token, 1].item() == 4 * 100 + 9 and p[token, 8].item() == 5 * 100 + 8
    x["video"] = torch.arange(4.0).view(1, 4, 1, 1, 1).expand(6, 4, 1, 16, 16).clone()
    pv = model.patchify(x)["video"][0]
    assert pv[:, 0].tolist() == [float(i // 4) for i in range(16)]  # 4 patches per frame, frame-major
    assert torch.equal(to_input(model, model.patchify(x), x)["video"], x["video"])


def test_prepare_eval_is_deterministic_and_train_is_augmented():
    model, batch = make(vit={"video_window": 4, "frames": 2}, cav={"audio_mean": 1.0, "audio_std": 2.0})
    video = torch.arange(8, dtype=torch.uint8).mul(10).view(1, 8, 1, 1).expand(6, 8, 16, 16).clone()
    batch = {**batch, "video": video}
    a, b = model.prepare(batch, train=False), model.prepare(batch, train=False)
    assert torch.equal(a["video"], b["video"]) and torch.equal(a["audio"], b["audio"])
    # centred 4-frame window of 8 = frames 2..5; two frames at the segment centres -> frames 3 and 5
    mean, std = 0.485, 0.229
    raw = a["video"][0, :, 0, 0, 0] * std + mean
    assert torch.allclose(raw * 255, torch.tensor([30.0, 50.0]), atol=1e-3)
    assert torch.allclose(a["audio"][:, 0], (batch["audio"] - 1.0) / 2.0)
    c, d = model.prepare(batch, train=True), model.prepare(batch, train=True)
    assert not torch.equal(c["audio"], d["audio"])
    starts = torch.round((c["video"][:, 0, 0, 0, 0] * std + mean) * 255 / 10) - 1  # first frame = start + 1
    assert set(starts.tolist()) <= {0.0, 1.0, 2.0, 3.0, 4.0}
    # audio: pad/cut to vit.audio_frames (zeros before normalisation)
    padded, _ = make(vit={"audio_frames": 24, "audio_patch": [4, 8]})
    out = padded.prepare(batch, train=False)["audio"]
    assert out.shape == (6, 1, 24, 16) and torch.all(out[:, 0, 20:] == 0)


def test_train_audio_is_a_circular_roll_plus_noise():
    model, batch = make(cav={"audio_noise": 0.0})
    clean = model.prepare(batch, train=False)["audio"][:, 0]
    rolled = model.prepare(batch, train=True)["audio"][:, 0]
    for row in range(6):  # each row equals torch.roll of its clean version by some shift
        assert any(torch.equal(torch.roll(clean[row], s, 0), rolled[row]) for s in range(20))
    noisy, _ = make(cav={"audio_noise": 0.1, "audio_roll": False})
    diff = noisy.prepare(batch, train=True)["audio"] - noisy.prepare(batch, train=False)["audio"]
    assert diff.min() >= 0 and diff.max() < 0.1 and diff.max() > 0


def test_multiscale_crop_keeps_size_and_scale_one_is_identity():
    model, batch = make(vit={"crop_scales": [1.0]})
    assert torch.allclose(model.prepare(batch, train=True)["video"], model.prepare(batch, train=False)["video"])
    cropped, _ = make(vit={"crop_scales": [0.5]})
    v = cropped.prepare(batch, train=True)["video"]
    assert v.shape == (6, 4, 1, 16, 16) and not torch.allclose(v, cropped.prepare(batch, train=False)["video"])
    # a horizontal ramp (value = 16 * column): a half-scale crop resized back halves the slope, stays inside
    ramp = torch.arange(16, dtype=torch.uint8).mul(16).view(1, 1, 1, 16).expand(6, 8, 16, 16).clone()
    column = (cropped.prepare({**batch, "video": ramp}, train=True)["video"] * 0.229 + 0.485) * 255 / 16
    assert torch.allclose(column.diff(dim=-1), torch.full_like(column[..., 1:], 0.5), atol=1e-3)
    assert column.min() >= -1e-3 and column.max() <= 15 + 1e-3
    assert torch.allclose(column[:, 0], column[:, 3])  # the same crop for every frame of a clip


def test_rgb_frames():
    model, batch = make(rgb=True)
    x = model.prepare(batch, train=False)
    assert x["video"].shape == (6, 4, 3, 16, 16) and model.patchify(x)["video"].shape == (6, 16, 8 * 8 * 3)
    white = {**batch, "video": torch.full_like(batch["video"], 255)}
    v = model.prepare(white, train=False)["video"][0, 0, :, 0, 0]
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(v, expected)
    out = model.ssl_loss(model.prepare(batch, train=True))
    assert torch.isfinite(out["loss"])


def test_bad_shapes_are_clear_errors():
    with pytest.raises(AvclError, match=r"model.vit.video_patch=5 does not divide the video frames 16x16"):
        make(vit={"video_patch": 5})
    with pytest.raises(AvclError, match=r"model.vit.audio_patch=\[3, 8\].*20 frames x 16 mel"):
        make(vit={"audio_patch": [3, 8]})
    with pytest.raises(AvclError, match="model.cav.mask_ratio_audio"):
        make(cav={"mask_ratio_audio": 0.99})
    with pytest.raises(AvclError, match="frames"):
        make(vit={"frames": 9})
    model, batch = make()
    with pytest.raises(AvclError, match="'video' rows"):
        model.prepare({**batch, "video": batch["video"][:, :, :8]}, train=False)


def test_mae_counts_only_hidden_selected_patches():
    model, batch = make()
    x = model.prepare(batch, train=False)
    selected = {"audio": torch.tensor([[0, 2, 4, 6, 8]] * 6), "video": torch.tensor([[1, 3, 5, 7, 9, 11, 13, 15]] * 6)}

    def run(inp):
        torch.manual_seed(3)
        return model.ssl_loss(inp, selected=selected, reduction="none")

    torch.manual_seed(3)
    visible, hidden = model.mask_tokens(6, selected)
    assert visible["audio"].shape == (6, 2) and hidden["audio"].shape == (6, 3)  # floor(.25 * 10) = 2 of 5
    assert visible["video"].shape == (6, 4) and hidden["video"].shape == (6, 4)
    base = run(x)
    patches = model.patchify(x)

    def perturbed(modality, token):
        p = {m: v.clone() for m, v in patches.items()}
        p[modality][0, token] += 5.0 * torch.randn_like(p[modality][0, token])
        return run(to_input(model, p, x))

    outside = perturbed("video", 0)  # token 0 is not selected: neither input nor target
    for key in ("loss", "mae_audio", "mae_video", "contrastive"):
        assert torch.equal(outside[key], base[key])
    target = perturbed("audio", int(hidden["audio"][0, 0]))  # a hidden selected patch: only its row's audio MAE
    assert not torch.isclose(target["mae_audio"][0], base["mae_audio"][0])
    assert torch.equal(target["mae_audio"][1:], base["mae_audio"][1:])
    assert torch.equal(target["contrastive"], base["contrastive"])
    assert torch.equal(target["mae_video"], base["mae_video"])
    seen = perturbed("video", int(visible["video"][0, 0]))  # a visible patch changes the encoder's input
    assert not torch.equal(seen["contrastive"], base["contrastive"])


def test_selected_path_decodes_only_the_selected_positions():
    model, batch = make()
    x = model.prepare(batch, train=True)
    lengths = []
    hook = model.decoder_blocks[0].register_forward_pre_hook(lambda mod, args: lengths.append(args[0].shape[1]))
    model.ssl_loss(x)
    selected = {"audio": torch.rand(6, 10).argsort(1)[:, :4], "video": torch.rand(6, 16).argsort(1)[:, :8]}
    model.ssl_loss(x, selected=selected)
    hook.remove()
    assert lengths == [10, 16, 4, 8]


def test_reduction_none_averages_to_the_mean():
    model, batch = make()
    x = model.prepare(batch, train=True)
    torch.manual_seed(5)
    mean = model.ssl_loss(x)
    torch.manual_seed(5)
    rows = model.ssl_loss(x, reduction="none")
    for key in ("loss", "mae_audio", "mae_video", "contrastive"):
        assert rows[key].shape == (6,)
        assert torch.allclose(rows[key].mean(), mean[key], atol=1e-6)
    assert torch.allclose(rows["loss"], rows["mae_audio"] + rows["mae_video"] + 0.1 * rows["contrastive"])
    # z: the per-modality pass outputs of the same masked input
    torch.manual_seed(5)
    visible, _ = model.mask_tokens(6)
    z = model.masked_embeddings(x, visible)
    assert torch.allclose(z["audio"], mean["z_audio"], atol=1e-6)
    assert torch.allclose(z["video"], mean["z_video"], atol=1e-6)


def test_avm_loss_trains_only_the_avm():
    model, batch = make()
    x = model.prepare(batch, train=True)
    loss = model.avm_loss(x)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    avm = {id(p) for p in model.avm.parameters()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in avm)
    assert all(p.grad is not None for p in model.avm.parameters())
    assert model.avm.match_logit(torch.randn(6, 10, 32), torch.randn(6, 16, 32)).shape == (6,)
    att = model.avm.attention_logits(torch.randn(6, 10, 32), torch.randn(6, 16, 32))
    assert att["q_a"].shape == att["k_a"].shape == (6, 2, 10, 16)
    assert att["q_v"].shape == att["k_v"].shape == (6, 2, 16, 16)


def test_avm_negatives_are_paired_before_the_fusion_pass():
    # STELLA's learn_multimodal_relationship pairs the unimodal codes first, then fuses each pair: reference
    # = every pair alone through the fusion layers, then the matching head
    model, batch = make()
    with torch.no_grad():  # at init the logits are ~0 and the joint attention nearly uniform: scaled up, the
        for p in model.avm.parameters():  # pairing shows in the loss (~0.5 % here; 3e-5 unscaled)
            p.mul_(30)
        for p in model.fusion_blocks.parameters():
            p.mul_(3)
    x = model.prepare(batch, train=False)
    torch.manual_seed(5)
    labels, index = matching_pairs(6)
    assert (index != torch.arange(6)).any()
    with torch.no_grad():
        h = model.encode_unimodal(x)
        logits = []
        for i in range(6):
            f = model.fuse({"audio": h["audio"][i:i + 1], "video": h["video"][index[i]:index[i] + 1]})
            logits.append(model.avm.match_logit(f["audio"], f["video"]))
        expected = float(F.binary_cross_entropy_with_logits(torch.cat(logits), labels))
        fused = model.fuse(h)
    for inputs in ({"x": x}, {"unimodal": h, "fused": fused}):  # the scoring pass's reuse gives the same
        torch.manual_seed(5)
        assert float(model.avm_loss(**inputs).detach()) == pytest.approx(expected, rel=1e-5)


def test_matching_pairs_are_a_half_derangement():
    for b in (3, 7, 32):
        labels, index = matching_pairs(b)
        negatives = (labels == 0).nonzero().flatten()
        assert len(negatives) == b - b // 2
        assert torch.equal(index[labels == 1], (labels == 1).nonzero().flatten())
        assert torch.all(index[negatives] != negatives)
        assert torch.equal(index[negatives].sort().values, negatives)  # videos permuted among the negatives
    labels, index = matching_pairs(2)
    assert torch.all(labels == 1) and torch.equal(index, torch.arange(2))


def test_a_few_adam_steps_lower_the_loss():
    model, batch = make()
    x = model.prepare(batch, train=False)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses, mae = [], []
    for _ in range(20):
        torch.manual_seed(0)  # the same masking every step
        out = model.ssl_loss(x)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
        mae.append((out["mae_audio"] + out["mae_video"]).item())
    assert losses[-1] < 0.85 * losses[0] and mae[-1] < 0.95 * mae[0]


# ----- ImageNet MAE initialisation ----------------------------------------------------------------------
transformers_missing = pytest.mark.skipif(
    __import__("importlib").util.find_spec("transformers") is None, reason="needs transformers")

MAE_VIT = {"width": 64, "depth": 2, "fusion_depth": 1, "heads": 2, "decoder_width": 32, "decoder_depth": 1,
           "decoder_heads": 2, "video_patch": 8, "audio_patch": [8, 8]}


def hf_weight(state, layer, part):
    """A weight of the HF layer ``layer`` whatever the transformers version's naming."""
    names = {"q": r"(attention\.attention\.query|attention\.q_proj)", "fc1": r"(intermediate\.dense|mlp\.fc1)",
             "norm1": "layernorm_before"}[part]
    pattern = re.compile(rf"^(vit\.)?(encoder\.layer|layers)\.{layer}\.{names}\.weight$")
    return next(v for k, v in state.items() if pattern.match(k))


@transformers_missing
@pytest.mark.parametrize("with_decoder", [False, True])
def test_hf_vitmae_directory(tmp_path, with_decoder):
    import transformers
    config = transformers.ViTMAEConfig(image_size=16, patch_size=8, hidden_size=64, num_hidden_layers=3,
                                       num_attention_heads=2, intermediate_size=256, decoder_hidden_size=32,
                                       decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                       decoder_intermediate_size=128)
    torch.manual_seed(1)
    hf = (transformers.ViTMAEForPreTraining if with_decoder else transformers.ViTMAEModel)(config).eval()
    hf.save_pretrained(tmp_path / "mae")
    state = hf.state_dict()
    model = CAVModel(model_cfg({**MAE_VIT, "checkpoint": str(tmp_path / "mae")}), samples(rgb=True, audio_frames=32))
    assert model.checkpoint_notes
    ours = model.state_dict()
    for i, (branch, j) in enumerate([("blocks.audio", 0), ("blocks.audio", 1), ("fusion_blocks", 0)]):
        qkv = ours[f"{branch}.{j}.attn.qkv.weight"]
        assert torch.equal(qkv[:64], hf_weight(state, i, "q"))
        assert torch.equal(ours[f"{branch}.{j}.mlp.fc1.weight"], hf_weight(state, i, "fc1"))
        assert torch.equal(ours[f"{branch}.{j}.norm1.weight"], hf_weight(state, i, "norm1"))
    assert torch.equal(ours["blocks.video.1.attn.qkv.weight"], ours["blocks.audio.1.attn.qkv.weight"])
    assert torch.equal(ours["fusion_blocks.0.mode_norms.video.norm1.weight"], hf_weight(state, 2, "norm1"))
    # the patch embedding computes what the HF convolution computes (RGB) / on 3 copies of the spectrogram
    embeddings = hf.vit.embeddings if with_decoder else hf.embeddings
    conv = embeddings.patch_embeddings.projection
    img = torch.randn(2, 3, 16, 16)
    expected = conv(img).flatten(2).transpose(1, 2)
    with torch.no_grad():
        got = model.patch_embed["video"](patchify_2d(img, (8, 8)))
        spec = torch.randn(2, 1, 16, 16)
        got_a = model.patch_embed["audio"](patchify_2d(spec, (8, 8)))
        expected_a = conv(spec.expand(2, 3, 16, 16)).flatten(2).transpose(1, 2)
    assert torch.allclose(got, expected, atol=1e-5) and torch.allclose(got_a, expected_a, atol=1e-5)
    # positional embeddings: the video grid (2x2) equals the checkpoint's and is copied; audio (4x2) is not
    pos = embeddings.position_embeddings[0, 1:]
    assert torch.equal(ours["pos_embed.video"][0, 4:8], pos)
    assert any("audio not copied" in n for n in model.checkpoint_notes)
    if with_decoder:
        pred = hf.decoder.decoder_pred.weight
        assert torch.equal(ours["decoder_pred.video.weight"], pred)
        assert torch.equal(ours["decoder_pred.audio.weight"], pred[:64])
        assert torch.equal(ours["mask_token.audio"], hf.decoder.mask_token)


@transformers_missing
def test_hf_names_of_transformers_4_and_5_convert_alike():
    import transformers
    from avcl.models.mae_weights import hf_to_mae_names
    config = transformers.ViTMAEConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64, decoder_hidden_size=8,
                                       decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                       decoder_intermediate_size=32)
    state = transformers.ViTMAEForPreTraining(config).state_dict()
    old_names = [("attention.q_proj.", "attention.attention.query."), ("attention.k_proj.", "attention.attention.key."),
                 ("attention.v_proj.", "attention.attention.value."), ("attention.o_proj.", "attention.output.dense."),
                 ("mlp.fc1.", "intermediate.dense."), ("mlp.fc2.", "output.dense."),
                 ("vit.layers.", "vit.encoder.layer.")]

    def rename(key):
        for a, b in old_names:
            key = key.replace(a, b)
        return key
    new, old = hf_to_mae_names(state), hf_to_mae_names({rename(k): v for k, v in state.items()})
    assert set(new) == set(old) and all(torch.equal(new[k], old[k]) for k in new)
    per_block = {k.split(".", 2)[2] for k in new if k.startswith("blocks.0.")}
    assert per_block == {"norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                         "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                         "mlp.fc2.weight", "mlp.fc2.bias"}
    assert new["blocks.1.attn.qkv.weight"].shape == (48, 16) and "decoder_blocks.0.attn.qkv.bias" in new
    assert {"patch_embed.proj.weight", "pos_embed", "norm.weight", "decoder_pred.weight", "mask_token"} <= set(new)


def mae_pth_state(width=64, layers=3, patch=8, decoder=True):
    """A synthetic state dict in the official MAE naming (random values)."""
    g = torch.Generator().manual_seed(2)
    rnd = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    state = {"cls_token": rnd(1, 1, width), "pos_embed": rnd(1, 5, width),
             "patch_embed.proj.weight": rnd(width, 3, patch, patch), "patch_embed.proj.bias": rnd(width),
             "norm.weight": rnd(width), "norm.bias": rnd(width)}

    def block(prefix, d):
        return {f"{prefix}.norm1.weight": rnd(d), f"{prefix}.norm1.bias": rnd(d),
                f"{prefix}.attn.qkv.weight": rnd(3 * d, d), f"{prefix}.attn.qkv.bias": rnd(3 * d),
                f"{prefix}.attn.proj.weight": rnd(d, d), f"{prefix}.attn.proj.bias": rnd(d),
                f"{prefix}.norm2.weight": rnd(d), f"{prefix}.norm2.bias": rnd(d),
                f"{prefix}.mlp.fc1.weight": rnd(4 * d, d), f"{prefix}.mlp.fc1.bias": rnd(4 * d),
                f"{prefix}.mlp.fc2.weight": rnd(d, 4 * d), f"{prefix}.mlp.fc2.bias": rnd(d)}
    for i in range(layers):
        state.update(block(f"blocks.{i}", width))
    if decoder:
        state.update({"decoder_embed.weight": rnd(32, width), "decoder_embed.bias": rnd(32),
                      "mask_token": rnd(1, 1, 32), "decoder_pos_embed": rnd(1, 5, 32),
                      "decoder_norm.weight": rnd(32), "decoder_norm.bias": rnd(32),
                      "decoder_pred.weight": rnd(patch * patch * 3, 32), "decoder_pred.bias": rnd(patch * patch * 3)})
        state.update(block("decoder_blocks.0", 32))
    return state


def test_mae_pth_checkpoint_gray_frames(tmp_path):
    state = mae_pth_state()
    torch.save({"model": state, "epoch": 799}, tmp_path / "mae.pth")
    model = CAVModel(model_cfg({**MAE_VIT, "checkpoint": str(tmp_path / "mae.pth")}), samples(audio_frames=32))
    ours = model.state_dict()
    for i, name in enumerate(["blocks.audio.0", "blocks.audio.1", "fusion_blocks.0"]):
        for part in ("attn.qkv.weight", "attn.proj.bias", "mlp.fc2.weight", "norm2.bias"):
            assert torch.equal(ours[f"{name}.{part}"], state[f"blocks.{i}.{part}"])
    assert torch.equal(ours["blocks.video.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
    for which in ("joint", "audio", "video"):
        assert torch.equal(ours[f"norm.{which}.weight"], state["norm.weight"])
    kernel = state["patch_embed.proj.weight"].sum(dim=1).reshape(64, -1)  # gray video and audio: summed over RGB
    assert torch.equal(ours["patch_embed.video.weight"], kernel)
    assert torch.equal(ours["patch_embed.audio.weight"], kernel)
    assert torch.equal(ours["decoder_blocks.0.attn.qkv.weight"], state["decoder_blocks.0.attn.qkv.weight"])
    assert torch.equal(ours["decoder_pred.audio.weight"], state["decoder_pred.weight"][:64])
    assert torch.allclose(ours["decoder_pred.video.weight"], state["decoder_pred.weight"].view(64, 3, 32).mean(1))
    assert torch.equal(ours["decoder_pos_embed.video"][0, :4], state["decoder_pos_embed"][0, 1:])
    assert torch.isfinite(model.ssl_loss(model.prepare(samples(audio_frames=32), train=True))["loss"])


def test_mae_checkpoint_size_mismatch_names_file_and_shapes(tmp_path):
    torch.save({"model": mae_pth_state(width=64)}, tmp_path / "wide.pth")
    with pytest.raises(AvclError, match=r"wide\.pth: width 64, 3 layers.*width 32, depth 2 \+ fusion_depth 1"):
        CAVModel(model_cfg({**MAE_VIT, "width": 32, "checkpoint": str(tmp_path / "wide.pth")}),
                 samples(audio_frames=32))
    torch.save({"model": mae_pth_state(layers=2)}, tmp_path / "shallow.pth")
    with pytest.raises(AvclError, match=r"shallow\.pth: width 64, 2 layers"):
        CAVModel(model_cfg({**MAE_VIT, "checkpoint": str(tmp_path / "shallow.pth")}), samples(audio_frames=32))
    with pytest.raises(AvclError, match="not found"):
        CAVModel(model_cfg({**MAE_VIT, "checkpoint": str(tmp_path / "missing.pth")}), samples(audio_frames=32))
