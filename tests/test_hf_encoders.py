"""``avcl extract --encoder hf``: VideoMAE and AST from local directories (tiny random models, no hub)."""
import numpy as np
import pytest

import avcl.apps.extract as ex
from avcl.data.store import open_store
from avcl.core.errors import AvclError
from avcl.media.manifests import read_dataset
from tests.conftest import run_cli
from tests.test_extract import make_clips

transformers = pytest.importorskip("transformers", reason="HF encoders need the [hf] extra (in [test] too)")

FRAMES, SIZE, PATCH, TUBELET, DIM = 4, 32, 16, 2, 24
MEL, LENGTH = 32, 64


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    video = transformers.VideoMAEModel(transformers.VideoMAEConfig(
        image_size=SIZE, patch_size=PATCH, num_frames=FRAMES, tubelet_size=TUBELET, hidden_size=DIM,
        num_hidden_layers=1, num_attention_heads=2, intermediate_size=48))
    video.save_pretrained(root / "videomae")
    audio = transformers.ASTModel(transformers.ASTConfig(
        max_length=LENGTH, num_mel_bins=MEL, patch_size=16, frequency_stride=16, time_stride=16, hidden_size=DIM,
        num_hidden_layers=1, num_attention_heads=2, intermediate_size=48))
    audio.save_pretrained(root / "ast")
    return root


def settings(dirs):
    return [f"decode.frames={FRAMES}", f"decode.size={SIZE}", "decode.gray=false", f"audio.num_bins={MEL}",
            f"audio.target_frames={LENGTH}", f"encoder.video_model={dirs / 'videomae'}",
            f"encoder.audio_model={dirs / 'ast'}"]


def test_tokens_from_local_videomae_and_ast(model_dirs, tmp_path):
    manifest = make_clips(tmp_path / "clips", 4)
    config = ex.make_config("builtin", settings(model_dirs), encoder="hf", output="tokens", batch_size=2)
    summary = ex.extract(read_dataset(manifest), tmp_path / "hf.h5", config, report=lambda line: None)
    assert summary.written == 4
    store = open_store(tmp_path / "hf.h5")
    # video: (frames / tubelet) x (size / patch)^2 tokens; audio: AST's patch tokens without the 2 leading tokens
    assert store.fields["video"][0] == (FRAMES // TUBELET, (SIZE // PATCH) ** 2, DIM)
    assert store.fields["audio"][0] == ((LENGTH // 16) * (MEL // 16), DIM)
    assert len(store.manifest["weights_sha256"]) == 64
    video = store.load("video")
    assert float(video.std()) > 0
    again = ex.extract(read_dataset(manifest), tmp_path / "again.h5", config, report=lambda line: None)
    assert again.written == 4 and np.array_equal(open_store(tmp_path / "again.h5").load("video"), video)


def test_wrong_preprocessing_or_directory_is_a_clear_error(model_dirs, tmp_path):
    with pytest.raises(AvclError, match="decode.frames"):
        ex.ENCODERS["hf"](ex.make_config("builtin", settings(model_dirs)[1:] + ["decode.frames=8"], encoder="hf"))
    with pytest.raises(AvclError, match="config.json"):
        ex.ENCODERS["hf"](ex.make_config("builtin", ["decode.audio=false", "encoder.video_model=" + str(tmp_path)],
                                         encoder="hf"))
    manifest = make_clips(tmp_path / "clips", 1)
    result = run_cli("extract", str(manifest), "decode.audio=false", "--encoder", "hf", "--out", str(tmp_path / "x.h5"))
    assert result.returncode == 2 and "encoder.video_model" in result.stderr
