"""XKD (spec Part B): the shared losses and schedules, the model's share modes and teachers, the method's
ablation switches, the probe protocol / init row, kill + resume, and ``avcl probe`` end to end."""
import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from avcl.config import build_config
from avcl.data import build_dataset
from avcl.engine import runner
from avcl.engine.runner import build_method, execute
from avcl.core.errors import AvclError
from avcl.models import build_model
from avcl.nn.distill import refine_weights, refined_pool
from avcl.nn.ema import cosine_momentum
from avcl.nn.losses import dino_cross_entropy, gaussian_mmd, update_center
from tests.conftest import run_cli

TINY = {
    "name": "xkd-tiny", "seed": 0, "methods": ["xkd"],
    "data": {"name": "synthetic", "num_classes": 4, "train_per_class": 8, "val_per_class": 2, "test_per_class": 4},
    "scenario": {"num_tasks": 1},
    "model": {"name": "xkd",
              "vit": {"size": "tiny", "width": 32, "depth": 1, "fusion_depth": 1, "heads": 2, "decoder_width": 32,
                      "decoder_depth": 1, "decoder_heads": 2, "video_patch": 8, "audio_patch": [8, 5], "frames": 4},
              "xkd": {"tubelet_frames": 2, "local_frames": 2, "local_size": 8, "local_audio_frames": 16,
                      "head_hidden": 32, "head_bottleneck": 16, "head_dim": 64, "audio_mean": 0.0, "audio_std": 1.0,
                      "video_mean": [0.5], "video_std": [0.25]}},
    "train": {"epochs": 1, "batch_size": 8, "replay_batch_size": 4, "lr": 0.001},
    "memory": {"size": 0},
    "eval": {"protocol": "probe"},
}
MEASURED = {"train_seconds", "task_seconds", "peak_memory_mib"}


def tiny_cfg(**sections):
    raw = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(TINY), OmegaConf.create(sections)))
    return build_config(raw)


@pytest.fixture(scope="module")
def data():
    cfg = tiny_cfg()
    return build_dataset(cfg.data, None, 0)


def tiny_model(data, seed=0, **xkd):
    cfg = tiny_cfg(model={"xkd": xkd})
    torch.manual_seed(seed)
    return build_model(cfg.model, data.train)


def trainable(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ----- shared losses and schedules -----------------------------------------------------------------
def test_dino_cross_entropy_with_centring_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    center = torch.randn(7, generator=g)
    ts, tt = 0.1, 0.04
    total, pairs = 0.0, 0
    for t in range(2):
        for s in range(3):
            for b in range(5):
                p_t = torch.exp((teacher[t, b] - center) / tt) / torch.exp((teacher[t, b] - center) / tt).sum()
                log_p_s = student[s, b] / ts - torch.logsumexp(student[s, b] / ts, dim=0)
                total += float(-(p_t * log_p_s).sum())
            pairs += 1
    want = total / (pairs * 5)
    got = dino_cross_entropy(student, teacher, center, ts, tt)
    assert got.item() == pytest.approx(want, rel=1e-5)
    # the centre matters: without it the loss differs
    assert dino_cross_entropy(student, teacher, torch.zeros(7), ts, tt).item() != pytest.approx(want, rel=1e-3)
    # a student equal to the (sharpened, centred) teacher scores lower than a random one
    aligned = ((teacher[:1] - center) * ts / tt).expand(3, -1, -1)
    assert dino_cross_entropy(aligned, teacher[:1], center, ts, tt) < dino_cross_entropy(student, teacher[:1], center, ts, tt)


def test_center_update_is_an_ema_of_the_teacher_batch_mean():
    center = torch.ones(4)
    teacher = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 1.0, 0.0]]])  # (1 view, 2 rows, 4)
    update_center(center, teacher, momentum=0.9)
    torch.testing.assert_close(center, 0.9 * torch.ones(4) + 0.1 * torch.tensor([2.0, 2.0, 2.0, 2.0]))


def test_cosine_momentum_schedule_endpoints_and_monotone():
    assert cosine_momentum(0, 100) == pytest.approx(0.997)
    assert cosine_momentum(100, 100) == pytest.approx(1.0)
    assert cosine_momentum(500, 100) == pytest.approx(1.0)  # clamped after the end
    assert cosine_momentum(50, 100) == pytest.approx((0.997 + 1.0) / 2)
    values = [cosine_momentum(s, 100, 0.99, 0.999) for s in range(101)]
    assert values[0] == pytest.approx(0.99) and all(a <= b for a, b in zip(values, values[1:]))


def test_mmd_of_identical_samples_is_zero_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=g)
    assert abs(gaussian_mmd(x, x.clone()).item()) < 1e-6
    values = [gaussian_mmd(x, x + shift).item() for shift in (0.05, 0.2, 1.0)]
    assert 0 < values[0] < values[1] < values[2]
    # the spec's kernel: sum over 7 gammas of exp(-gamma d^2); one pair by hand
    a, b = torch.zeros(1, 2), torch.tensor([[1.0, 1.0]])
    k = lambda d2: sum(math.exp(-gam * d2) for gam in (1e-3, 1e-2, 1e-1, 1, 10, 100, 1e3))  # noqa: E731
    assert gaussian_mmd(a, b).item() == pytest.approx(2 * k(0) - 2 * k(2.0), rel=1e-5)


def test_refinement_preserves_the_pooled_norm_and_reweights():
    g = torch.Generator().manual_seed(2)
    tokens = torch.randn(3, 10, 8, generator=g)
    attn_v = torch.rand(3, 2, 10, generator=g).softmax(-1)
    attn_a = torch.rand(3, 2, 6, generator=g).softmax(-1)
    plain = tokens.mean(dim=1)
    for mode in ("mean", "softmax"):
        weights = refine_weights(attn_v, attn_a, mode)
        pooled = refined_pool(tokens, weights)
        torch.testing.assert_close(pooled.norm(dim=1), plain.norm(dim=1))
        assert (pooled - plain).abs().max() > 1e-3  # the direction changed
    torch.testing.assert_close(refined_pool(tokens, refine_weights(attn_v, attn_a, "none")), plain)
    torch.testing.assert_close(refine_weights(attn_v, attn_a, "softmax").sum(1), torch.ones(3))
    # mode 'mean' by hand for row 0: attn_v * mean(attn_a) / mean(attn_v) per head, head mean
    want = (attn_v[0] * attn_a[0].mean(1, keepdim=True) / attn_v[0].mean(1, keepdim=True)).mean(0)
    torch.testing.assert_close(refine_weights(attn_v, attn_a, "mean")[0], want)


# ----- model ---------------------------------------------------------------------------------------
def test_share_modes_share_exactly_the_transformer_stack(data):
    models = {share: tiny_model(data, share=share) for share in ("none", "students", "all")}
    stack = trainable(models["none"].student["video"].blocks)
    assert stack > 0
    # MAS: one student stack; everything else (tokenizers, pos, CLS, LNs, heads, decoders) per modality
    assert models["students"].student["video"].blocks is models["students"].student["audio"].blocks
    assert trainable(models["none"]) - trainable(models["students"]) == stack
    assert trainable(models["students"]) == trainable(models["all"])
    for m in models.values():
        assert m.student["video"].patch_embed is not m.student["audio"].patch_embed
        assert m.student["video"].head is not m.student["audio"].head
    # teachers: modality-specific copies for XKD and MAS, one shared stack for MATS
    teacher_count = lambda m: sum(p.numel() for p in m.teacher.parameters())  # noqa: E731
    assert teacher_count(models["none"]) == teacher_count(models["students"])
    assert models["students"].teacher["video"].blocks is not models["students"].teacher["audio"].blocks
    assert models["all"].teacher["video"].blocks is models["all"].teacher["audio"].blocks
    assert teacher_count(models["none"]) - teacher_count(models["all"]) == stack


def test_teachers_get_no_gradient_and_follow_the_students_by_ema(data):
    model = tiny_model(data)
    batch = {k: v[:6] for k, v in data.train.items()}
    terms = model.loss_terms(model.views(batch), kd=True, da=True)
    (terms["rec"] + terms["kd"] + terms["da"]).backward()
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())
    assert model.student["video"].patch_embed.weight.grad is not None
    assert model.student["audio"].head.last_layer.weight.grad is not None
    assert terms["kd"] > 0 and terms["mmd_student"] > 0
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    before = model.teacher["video"].patch_embed.weight.clone()
    model.update_teachers(0.9)
    torch.testing.assert_close(model.teacher["video"].patch_embed.weight,
                               0.9 * before + 0.1 * model.student["video"].patch_embed.weight)


@pytest.mark.parametrize("mats_ema, power", [("twice", 2), ("once", 1)])
def test_mats_shared_teacher_blocks_get_two_updates_per_step(data, mats_ema, power):
    model = tiny_model(data, share="all", mats_ema=mats_ema)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    t_block = model.teacher["video"].blocks[0].mlp.fc1.weight
    s_block = model.student["video"].blocks[0].mlp.fc1.weight
    t_embed = model.teacher["video"].patch_embed.weight
    before_block, before_embed = t_block.clone(), t_embed.clone()
    model.update_teachers(0.9)
    m = 0.9 ** power
    torch.testing.assert_close(t_block, m * before_block + (1 - m) * s_block)
    # modality-specific parts get one update either way
    torch.testing.assert_close(t_embed, 0.9 * before_embed + 0.1 * model.student["video"].patch_embed.weight)


def test_center_moves_only_in_training_forwards(data):
    model = tiny_model(data)
    views = model.views({k: v[:4] for k, v in data.train.items()})
    model.eval()
    model.loss_terms(views)
    assert model.center_video.abs().max() == 0
    model.train()
    model.loss_terms(views)
    assert model.center_video.abs().max() > 0 and model.center_audio.abs().max() > 0


def test_refinement_and_teacher_view_switches_change_the_distillation(data):
    batch = {k: v[:6] for k, v in data.train.items()}
    values = {}
    for key, xkd in (("mean", {}), ("none", {"refine": "none"}), ("global", {"teacher_view": "global"})):
        model = tiny_model(data, seed=3, **xkd)
        torch.manual_seed(5)
        values[key] = model.loss_terms(model.views(batch))["kd"].item()
    assert values["mean"] != pytest.approx(values["none"], rel=1e-6)
    assert values["mean"] != pytest.approx(values["global"], rel=1e-6)


def test_local_views_are_interpolated_and_counted(data):
    model = tiny_model(data, local_views_video=3)
    views = model.views({k: v[:2] for k, v in data.train.items()})
    assert len(views["video"]) == 4 and len(views["audio"]) == 2
    assert views["video"][1].shape == (2, 2, 1, 8, 8) and views["audio"][1].shape == (2, 1, 16, 20)
    embed = model.embed({k: v[:2] for k, v in data.train.items()})
    assert embed["joint"].shape == (2, 64)


# ----- the model against the official code (pritamqu/XKD) -------------------------------------------
def test_decoders_have_no_final_norm_and_no_qkv_bias_as_the_code(data):
    names = [n for n, _ in tiny_model(data).decoder["video"].named_parameters()]
    assert "blocks.0.attn.qkv.weight" in names and "pred.weight" in names
    assert not any(n.startswith("norm.") for n in names)  # mask_model.py: decoder blocks -> out_proj
    assert "blocks.0.attn.qkv.bias" not in names  # vit2.py ViT_Backbone: qkv_bias=False
    names = [n for n, _ in tiny_model(data, decoder_norm=True, qkv_bias=True).decoder["audio"].named_parameters()]
    assert "norm.weight" in names and "blocks.0.attn.qkv.bias" in names


def test_encoder_and_decoder_linears_are_xavier_uniform(data):
    model = tiny_model(data)
    layers = [model.student["video"].blocks[0].mlp.fc1, model.student["audio"].blocks[1].attn.qkv,
              model.student["audio"].patch_embed, model.decoder["video"].embed, model.decoder["audio"].pred,
              model.decoder["video"].blocks[0].mlp.fc2]
    for layer in layers:
        fan_out, fan_in = layer.weight.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))  # U(-bound, bound): variance bound^2 / 3
        w = layer.weight.detach()
        assert w.abs().max() <= bound
        assert w.var().item() == pytest.approx(bound ** 2 / 3, rel=0.25)  # N(0, 0.02) would be 4e-4
        if layer.bias is not None:
            assert layer.bias.abs().max() == 0
    norm = model.student["video"].blocks[0].norm1
    assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and norm.bias.abs().max() == 0
    # the heads keep DINO's trunc. N(0, 0.02)
    assert model.student["video"].head.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.2)
    old = tiny_model(data, init="normal").decoder["video"].blocks[0].mlp.fc1.weight
    assert old.std().item() == pytest.approx(0.02, rel=0.2)


def test_local_positional_tables_use_the_shifted_scale_factor(data):
    model = tiny_model(data)
    views = model.views({k: v[:2] for k, v in data.train.items()})
    for m, dims in (("video", 3), ("audio", 2)):
        enc = model.student[m]
        patches, grid = model.patchify(m, views[m][1])
        assert grid != enc.grid
        d = enc.pos_embed.shape[-1]
        table = enc.pos_embed.reshape(1, *enc.grid, d).permute(0, dims + 1, *range(1, dims + 1))
        if m == "video":  # vit_video.py: every axis by (n + 0.1) / N, trilinear
            scale = tuple((n + 0.1) / big for n, big in zip(grid, enc.grid))
            mode = "trilinear"
        else:  # vit_audio.py: time by (n + 0.1) / N, frequency by 1 (our grid is [time, freq]), bicubic
            scale = ((grid[0] + 0.1) / enc.grid[0], 1.0)
            mode = "bicubic"
        ref = torch.nn.functional.interpolate(table, scale_factor=scale, mode=mode, align_corners=False)
        ref = ref.permute(0, *range(2, dims + 2), 1).reshape(1, -1, d)
        by_size = torch.nn.functional.interpolate(table, size=grid, mode=mode, align_corners=False)
        assert not torch.allclose(ref, by_size.permute(0, *range(2, dims + 2), 1).reshape(1, -1, d))
        x = torch.cat([(enc.cls_token + enc.cls_pos).expand(2, -1, -1), enc.patch_embed(patches) + ref], dim=1)
        for block in enc.blocks:
            x = block(x)
        torch.testing.assert_close(enc(patches, grid)[0], enc.norm(x))


def test_softmax_refinement_is_per_head_as_the_code():
    g = torch.Generator().manual_seed(4)
    attn_v = torch.rand(2, 3, 5, generator=g).softmax(-1) * 4
    attn_a = torch.rand(2, 3, 7, generator=g).softmax(-1) * 4
    want = torch.zeros(2, 5)
    for b in range(2):  # xkd.py cross_modal_attn('softmax'): (a_v x a_a).mean(-2).softmax(-1); align_feats: head mean
        for h in range(3):
            scores = [float(attn_v[b, h, j]) * float(attn_a[b, h].mean()) for j in range(5)]
            exp = [math.exp(v) for v in scores]
            for j in range(5):
                want[b, j] += exp[j] / sum(exp) / 3
    torch.testing.assert_close(refine_weights(attn_v, attn_a, "softmax"), want)


def test_projection_head_shares_one_layernorm_across_its_hidden_layers(data):
    d, hidden, bottleneck, k = 32, 32, 16, 64  # TINY's width, head_hidden, head_bottleneck, head_dim
    linears = (d * hidden + hidden) + (hidden * hidden + hidden) + (hidden * bottleneck + bottleneck) + bottleneck * k
    head = tiny_model(data).student["video"].head
    assert head.mlp[1] is head.mlp[4]
    assert trainable(head) == linears + 2 * hidden  # projector.py: one norm, appended after both hidden layers
    assert trainable(tiny_model(data, head_shared_norm=False).student["video"].head) == linears + 4 * hidden


def test_visible_tokens_are_rounded_as_the_code(data, monkeypatch):
    from avcl.models import xkd as xkd_module
    from avcl.nn.vit import visible_count
    assert visible_count(392, 0.85, "round") == 59  # the recipe's 8 x 7 x 7 tubelets: round(58.8)
    assert visible_count(392, 0.85) == 58  # floor, STELLA's int(L * (1 - r)) (CAV keeps it)
    kept = []
    real = xkd_module.random_masking
    monkeypatch.setattr(xkd_module, "random_masking",
                        lambda b, n, keep, *a: kept.append((n, keep)) or real(b, n, keep, *a))
    for rounding in ("round", "floor"):
        model = tiny_model(data, mask_ratio_video=0.8, mask_ratio_audio=0.7, keep_rounding=rounding)
        model.loss_terms(model.views({k: v[:2] for k, v in data.train.items()}), kd=False, da=False)
    # 8 video tokens x 0.2 = 1.6, 16 audio tokens x 0.3 = 4.8
    assert kept == [(8, 2), (16, 5), (8, 1), (16, 4)]


def test_layernorm_eps_is_torchs_default_as_both_codes(data):
    from avcl.nn.vit import Block
    norms = [mod for mod in tiny_model(data).modules() if isinstance(mod, torch.nn.LayerNorm)]
    norms += [mod for mod in Block(8, 2, modes=("audio",)).modules() if isinstance(mod, torch.nn.LayerNorm)]
    assert len(norms) > 10 and all(mod.eps == 1e-5 for mod in norms)


def test_volume_jitter_is_one_log_mel_offset_per_clip_as_a_waveform_gain(data):
    batch = {k: v[:6] for k, v in data.train.items()}
    for mode in ("waveform", "scale"):
        model = tiny_model(data, volume_mode=mode, volume_jitter=0.3, audio_std=2.0)
        plain = model.views(batch, train=False)["audio"][0]
        diff = model.views(batch, train=True)["audio"][0] - plain
        if mode == "scale":
            assert not torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff), atol=1e-4)
            continue
        # wave x g -> power spectrum x g^2 -> log-mel + 2 ln g -> normalised + 2 ln g / std, the same everywhere
        torch.testing.assert_close(diff, diff[:, :, :1, :1].expand_as(diff), atol=1e-5, rtol=0)
        offsets = diff[:, 0, 0, 0]
        assert offsets.min() >= 2 * math.log(0.7) / 2.0 - 1e-5 and offsets.max() <= 2 * math.log(1.3) / 2.0 + 1e-5
        assert offsets.std() > 0  # one gain per clip


def test_hsv_round_trip_matches_colorsys_and_hue_jitter_keeps_value_and_chroma():
    import colorsys
    from avcl.nn.augment import _hsv_to_rgb, _rgb_to_hsv, color_jitter
    g = torch.Generator().manual_seed(6)
    rgb = torch.rand(2, 3, 3, 4, 5, generator=g)
    hsv = _rgb_to_hsv(rgb)
    for idx in [(0, 0, 1, 2), (1, 2, 3, 4), (0, 1, 0, 0)]:
        b, t, y, x = idx
        want = colorsys.rgb_to_hsv(*[float(rgb[b, t, c, y, x]) for c in range(3)])
        got = [float(hsv[b, t, c, y, x]) for c in range(3)]
        assert got == pytest.approx(list(want), abs=1e-5)
    torch.testing.assert_close(_hsv_to_rgb(hsv), rgb, atol=1e-5, rtol=0)
    shifted = color_jitter(rgb, [0.0, 0.0, 0.0, 0.2])
    torch.testing.assert_close(shifted.max(dim=2).values, rgb.max(dim=2).values, atol=1e-5, rtol=0)
    torch.testing.assert_close(shifted.min(dim=2).values, rgb.min(dim=2).values, atol=1e-5, rtol=0)
    assert (shifted - rgb).abs().max() > 1e-2
    # brightness alone: one factor per clip in [0.6, 1.4] (no clamping below 1 / 1.4)
    dim = color_jitter(rgb * 0.7, [0.4, 0.0, 0.0, 0.0]) / (rgb * 0.7).clamp_min(1e-6)
    per_clip = dim.flatten(1)
    torch.testing.assert_close(per_clip, per_clip[:, :1].expand_as(per_clip), atol=1e-4, rtol=0)
    assert per_clip.min() >= 0.6 - 1e-5 and per_clip.max() <= 1.4 + 1e-5


def test_gray_and_blur_of_the_views_by_hand():
    from avcl.nn.augment import gaussian_blur, grayscale
    g = torch.Generator().manual_seed(7)
    rgb = torch.rand(1, 1, 3, 2, 2, generator=g)
    want = 0.299 * rgb[0, 0, 0] + 0.587 * rgb[0, 0, 1] + 0.114 * rgb[0, 0, 2]
    torch.testing.assert_close(grayscale(rgb)[0, 0, 0], want)
    delta = torch.zeros(2, 1, 1, 9, 9)
    delta[:, :, :, 4, 4] = 1.0
    sigma = torch.tensor([0.5, 1.5])
    out = gaussian_blur(delta, 5, sigma)
    for b in range(2):
        k = [math.exp(-0.5 * (x / float(sigma[b])) ** 2) for x in (-2, -1, 0, 1, 2)]
        k = [v / sum(k) for v in k]
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                assert float(out[b, 0, 0, 4 + dy, 4 + dx]) == pytest.approx(k[dy + 2] * k[dx + 2], abs=1e-6)
    assert out[0, 0, 0, 4, 4] > out[1, 0, 0, 4, 4]  # a larger sigma spreads more
    const = torch.full((2, 1, 1, 6, 6), 0.3)
    torch.testing.assert_close(gaussian_blur(const, 3, sigma), const)


def test_local_audio_crop_at_scale_one_is_an_integer_time_shift_into_the_zero_canvas(data):
    model = tiny_model(data, audio_freq_scale=[1.0, 1.0], audio_time_scale=[1.0, 1.0], local_volume_jitter=0.0)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(8, 16, 4, generator=g)  # (B, T, F)
    out = model._audio_crop(x)
    canvas, origin = int(16 * 1.5), (int(16 * 1.5) - 16) // 2  # the code: virtual canvas 1.5 x time, view centred
    shifts = set()
    for b in range(8):
        found = None
        for start in range(canvas - 16 + 1):  # crop columns [start, start + 16) of the canvas
            ref = torch.zeros(16, 4)
            for t in range(16):
                if 0 <= start + t - origin < 16:
                    ref[t] = x[b, start + t - origin]
            if torch.allclose(out[b], ref, atol=1e-5):
                found = start
        assert found is not None
        shifts.add(found)
    assert len(shifts) > 1
    views = tiny_model(data).views({k: v[:2] for k, v in data.train.items()})
    assert views["audio"][1].shape == (2, 1, 16, 20)


@pytest.mark.parametrize("xkd, vit, message", [
    ({"local_frames": 8}, {}, "longer than the clips"),
    ({"local_size": 32}, {}, "local_size=32"),
    ({}, {"video_patch": 5}, "video_patch=5 does not divide"),
    ({"tubelet_frames": 3}, {}, "tubelet_frames=3 does not divide"),
    ({}, {"audio_patch": [7, 5]}, "audio_patch=[7, 5]"),
    ({"share": "both"}, {}, "model.xkd.share"),
])
def test_bad_geometry_is_one_clear_message(data, xkd, vit, message):
    cfg = tiny_cfg(model={"xkd": xkd, "vit": vit})
    with pytest.raises(AvclError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_model(cfg.model, data.train)


# ----- method --------------------------------------------------------------------------------------
def method_loss(data, variant: dict, seed=0):
    cfg = tiny_cfg(methods=["v"], variants={"v": {"method": "xkd", **variant}})
    torch.manual_seed(seed)
    method = build_method("v", cfg, data.train)
    from avcl.data.scenario import Task
    method.before_task(Task(0, [0, 1, 2, 3], data.train, data.val, data.test))
    torch.manual_seed(seed + 1)
    loss = method.training_loss({k: v[:6] for k, v in data.train.items() if k != "label"})
    return method, loss


def test_ablation_weights_change_the_loss_and_skip_the_teachers(data):
    full, loss_full = method_loss(data, {})
    mae, loss_mae = method_loss(data, {"kd_weight": 0.0, "da_weight": 0.0})
    assert set(mae.last_terms) == {"mae_video", "mae_audio", "rec"}  # no teacher pass at all
    torch.testing.assert_close(loss_mae, mae.last_terms["rec"])
    t = full.last_terms
    torch.testing.assert_close(loss_full, (5 * t["rec"] + t["kd"] + t["da"]) / 7)
    kd_only, _ = method_loss(data, {"da_weight": 0.0})
    assert "kd" in kd_only.last_terms and "da" not in kd_only.last_terms
    assert loss_full.item() != pytest.approx(loss_mae.item(), rel=1e-3)


def test_ema_schedule_of_the_method_runs_over_the_stream(data):
    method, loss = method_loss(data, {})
    assert method.total_steps == 4  # 1 epoch x ceil(32 clips / batch 8) x 1 task
    assert method.step == 1 and method.ema_pending
    teacher = method.model.teacher["video"].patch_embed.weight.clone()
    student = method.model.student["video"].patch_embed.weight
    with torch.no_grad():
        student.add_(1.0)  # as if the optimizer had stepped
    method.settle_teachers()  # the update owed by step 0: momentum_at(0) = 0.997
    assert not method.ema_pending
    torch.testing.assert_close(method.model.teacher["video"].patch_embed.weight, 0.997 * teacher + 0.003 * student)
    assert method.momentum_at(method.total_steps) == pytest.approx(1.0)
    # a 3-task stream plans its schedule over every task
    cfg = tiny_cfg(scenario={"num_tasks": 3})
    streamed = build_method("xkd", cfg, data.train)
    from avcl.data.scenario import Task
    streamed.before_task(Task(0, [0, 1], data.train, data.val, data.test))
    assert streamed.total_steps == 3 * 4


def test_xkd_refuses_other_models(data):
    with pytest.raises(AvclError, match="model.name=xkd"):  # when the config is loaded, before any run
        tiny_cfg(model={"name": "cav"})
    cfg = tiny_cfg(methods=["finetune"], model={"name": "cav"})  # and a method built on another model
    with pytest.raises(AvclError, match="model.name=xkd"):
        build_method("xkd", cfg, data.train)


# ----- runs: probe protocol, init row, kill + resume, avcl probe --------------------------------------
STREAM = dict(methods=["xkd", "xkd-replay"], variants={"xkd-replay": {"method": "xkd", "replay": True}},
              scenario={"num_tasks": 2}, memory={"size": 8}, init={"row": True}, train={"epochs": 2})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("xkd-ref")
    cfg = tiny_cfg(**STREAM)  # defaults: checkpoints deleted, final weights in <method>/model.pt
    from avcl.config import save_config
    save_config(cfg, run_dir / "config.yaml")  # as `avcl run` does
    return run_dir, cfg, execute(cfg, run_dir, show_progress=False)


def test_probe_protocol_writes_the_three_accuracies_and_an_init_row(reference):
    run_dir, _, results = reference
    for name in ("xkd", "xkd-replay"):
        m = results[name]
        for key in ("probe_video_accuracy", "probe_audio_accuracy", "probe_av_accuracy", "train_seconds",
                    "peak_memory_mib"):
            assert m[key] is not None, (name, key)
        assert 0 <= m["probe_av_accuracy"] <= 1 and m["complete"]
    init = json.loads((run_dir / "init" / "metrics.json").read_text())
    assert init["train_seconds"] == 0.0 and 0 <= init["probe_video_accuracy"] <= 1
    assert not (run_dir / "init" / "model.pt").exists()  # nothing trained
    from avcl.report.tables import report
    text = report(run_dir)
    assert "video probe" in text and "| init" in text


class Killed(Exception):
    pass


def test_loss_terms_reach_epochs_csv(reference):
    """XKD's terms (MAE reconstruction, cross-modal KD, domain alignment) are logged per epoch, and their
    epoch means recombine into the epoch's loss with the method's weights: (5 rec + 1 kd + 1 da) / 7."""
    import csv
    run_dir, _, _ = reference
    rows = list(csv.DictReader(open(run_dir / "xkd" / "epochs.csv")))
    assert len(rows) == 4  # 2 tasks x 2 epochs
    for row in rows:
        rec, kd, da = (float(row[f"loss/{key}"]) for key in ("rec", "kd", "da"))
        assert kd != 0 and da != 0
        assert float(row["loss"]) == pytest.approx((5 * rec + kd + da) / 7, rel=1e-5)


def test_killed_run_resumes_to_the_same_metrics(reference, tmp_path, monkeypatch):
    _, cfg, want = reference
    log_call = runner.EventLog.__call__
    killed = set()

    def kill_in_task_2(self, event, **fields):
        log_call(self, event, **fields)
        if event == "task_start" and fields["task"] == 1 and fields["method"] not in killed:
            killed.add(fields["method"])
            raise Killed
    monkeypatch.setattr(runner.EventLog, "__call__", kill_in_task_2)
    for _ in range(2):
        with pytest.raises(Killed):
            execute(cfg, tmp_path, show_progress=False)
    got = execute(cfg, tmp_path, show_progress=False)
    for name in ("xkd", "xkd-replay"):
        strip = lambda m: {k: v for k, v in m.items() if k not in MEASURED}  # noqa: E731
        assert strip(got[name]) == strip(want[name]), name


def test_probe_command_end_to_end_on_a_tiny_store(reference, tmp_path):
    import numpy as np

    from avcl.data.store import create_store
    run_dir, cfg, _ = reference
    # a pre-training model's final weights are kept by default (train.save_model), its checkpoint is not
    assert (run_dir / "xkd" / "model.pt").is_file() and not (run_dir / "xkd" / "checkpoint.pt").exists()
    ds = build_dataset(cfg.data, None, 0)
    rows = {"train": ds.train, "test": ds.test}
    audio = np.concatenate([rows[s]["audio"].numpy() for s in rows]).astype(np.float16)
    video = np.concatenate([rows[s]["video"].numpy() for s in rows])
    labels = np.concatenate([rows[s]["label"].numpy() for s in rows])
    splits = [s for s in rows for _ in range(len(rows[s]["label"]))]
    n = len(labels)
    store = tmp_path / "raw.h5"
    fields = {"audio": (audio.shape[1:], "float16"), "video": (video.shape[1:], "uint8")}
    with create_store(store, [f"clip{i}" for i in range(n)], fields, labels=labels.tolist(), splits=splits,
                      class_names=[f"c{i}" for i in range(4)]) as writer:
        writer.write(list(range(n)), {"audio": audio, "video": video})
        writer.finalize()
    result = run_cli("probe", str(run_dir / "xkd"), str(store), "data.val_fraction=0")
    assert result.returncode == 0, result.stderr
    last = dict(item.split("=") for item in result.stdout.strip().splitlines()[-1].split())
    assert set(last) == {"probe_video_accuracy", "probe_audio_accuracy", "probe_av_accuracy"}
    assert all(0 <= float(v) <= 1 for v in last.values())
    # the same clips through the run's own protocol give the same numbers (same rows, same classifier)
    same = run_cli("probe", str(run_dir / "xkd"), "synthetic", "data.num_classes=4", "data.train_per_class=8",
                   "data.val_per_class=2", "data.test_per_class=4")
    assert same.returncode == 0, same.stderr
    want = json.loads((run_dir / "xkd" / "metrics.json").read_text())
    got = dict(item.split("=") for item in same.stdout.strip().splitlines()[-1].split())
    assert float(got["probe_av_accuracy"]) == pytest.approx(want["probe_av_accuracy"], abs=1e-4)

    # bad input: a store without labels; a checkpoint of another size; not a run directory
    unlabelled = tmp_path / "unlabelled.h5"
    with create_store(unlabelled, [f"clip{i}" for i in range(n)], fields, splits=splits,
                      class_names=["c0"]) as writer:
        writer.write(list(range(n)), {"audio": audio, "video": video})
        writer.finalize()
    for args, message in (([str(run_dir / "xkd"), str(unlabelled)], "labelled"),
                          ([str(run_dir / "xkd"), "synthetic", "data.frame_size=32"], "does not match the model"),
                          ([str(tmp_path), "synthetic"], "not a method directory")):
        bad = run_cli("probe", *args)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


@pytest.mark.parametrize("recipe", ["xkd/avdigits", "xkd/kinetics", "xkd/stream"])
def test_recipes_build_every_row(recipe):
    from avcl.config import load_config, method_hparams_for
    cfg = load_config(recipe)
    shapes = {"xkd/kinetics": ((32, 112, 112, 3), 448, 80)}.get(recipe, ((8, 32, 32), 98, 40))
    example = {"video": torch.zeros((2,) + shapes[0], dtype=torch.uint8), "audio": torch.zeros(2, shapes[1], shapes[2]),
               "label": torch.zeros(2, dtype=torch.long)}
    if recipe == "xkd/kinetics":  # ViT-B: check the geometry, do not build it
        _, _, model_cfg = method_hparams_for(cfg, "xkd")
        assert model_cfg.vit.size == "base" and model_cfg.xkd.head_dim == 8192
        return
    for name in cfg.methods:
        cls, hp, model_cfg = method_hparams_for(cfg, name)
        model = build_model(model_cfg, example)
        if model_cfg.name == "xkd":
            assert model.xkd.share == {"xkd-mas": "students", "xkd-mats": "all"}.get(name, "none")


@pytest.mark.parametrize("recipe", ["xkd/kinetics", "xkd/avdigits"])
def test_the_recipes_optimizer_step_is_the_official_codes(recipe, data):
    """Issue 21 item 10: AdamW (0.9, 0.95), wd 0.3 off 1-D tensors, warm-up then cosine to 0, per-parameter
    clipping of the students only, fp16 + scaler, the partial batch dropped (main_xkd.py, optimizers/__init__.py)."""
    from avcl.config import load_config
    from avcl.engine.regime import Regime, drops_last, lr_factor, precision_of
    train = OmegaConf.to_container(load_config(recipe).train)
    cfg = tiny_cfg(train=train)
    method = build_method("xkd", cfg, data.train)
    regime = Regime.build(method, cfg.train, torch.device("cpu"))
    opt = regime.optimizer
    assert type(opt) is torch.optim.AdamW and opt.defaults["betas"] == (0.9, 0.95)
    trainable = [(n, p) for n, p in method.named_parameters() if p.requires_grad]
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert {n: decay_of[id(p)] for n, p in trainable} == {n: (0.0 if p.ndim <= 1 else 0.3) for n, p in trainable}
    clipped = {id(p) for p in regime.params}
    assert {n for n, p in trainable if id(p) in clipped} == {n for n, _ in trainable if n.startswith("student.")}
    assert any(n.startswith("decoder.") for n, _ in trainable)  # the decoders exist and are not clipped
    cfg = cfg.train
    assert cfg.clip_grad_per_param == 0.3 and drops_last(cfg, method)
    if recipe == "xkd/kinetics":  # the CPU recipe keeps fp32 (said in it)
        assert precision_of(cfg, torch.device("cuda")) == "fp16"
    epochs, warmup = cfg.epochs, cfg.warmup_epochs
    assert lr_factor(warmup / 2, cfg, epochs, warmup, cfg.lr) == pytest.approx(0.5)
    assert lr_factor(warmup, cfg, epochs, warmup, cfg.lr) == pytest.approx(1.0)
    assert lr_factor((warmup + epochs) / 2, cfg, epochs, warmup, cfg.lr) == pytest.approx(0.5)
    assert lr_factor(epochs, cfg, epochs, warmup, cfg.lr) == pytest.approx(0.0, abs=1e-12)
