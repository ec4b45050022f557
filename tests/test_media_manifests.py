"""Dataset lists: manifests, class folders, AVE / VGGSound / Kinetics lists mapped onto local files."""
from pathlib import Path

import pytest

from avcl.core.errors import AvclError
from avcl.media.manifests import detect_kind, read_dataset
from tests.conftest import DATA_DIR, needs_data

META = Path(DATA_DIR or "/nonexistent") / "meta"


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_manifest_csv(tmp_path):
    (tmp_path / "m.csv").write_text("path,label,split,start,end\nclips/a.mp4,dog,train,,\n"
                                    "/abs/b.webm,cat,Test,1.5,3\n")
    data = read_dataset(tmp_path / "m.csv")
    assert data.kind == "manifest" and data.class_names == ["cat", "dog"] and data.label_index() == [1, 0]
    a, b = data.items
    assert a.path == str(tmp_path / "clips/a.mp4") and a.split == "train" and a.start is None
    assert b.path == "/abs/b.webm" and b.split == "test" and (b.start, b.end) == (1.5, 3.0)
    (tmp_path / "bad.csv").write_text("path,label,split\na.mp4,dog,holdout\n")
    with pytest.raises(AvclError, match="bad.csv:2: split must be"):
        read_dataset(tmp_path / "bad.csv")
    (tmp_path / "nolabel.csv").write_text("file,class\na.mp4,dog\n")
    with pytest.raises(AvclError, match="not a known dataset list"):
        read_dataset(tmp_path / "nolabel.csv")


def test_class_folders_with_and_without_split_level(tmp_path):
    for name in ("dog/1.mp4", "dog/sub/2.MKV", "cat/3.avi", "cat/readme.txt"):
        touch(tmp_path / "flat" / name)
    flat = read_dataset(tmp_path / "flat")
    assert flat.kind == "folders" and flat.class_names == ["cat", "dog"]
    assert sorted(i.id for i in flat.items) == ["cat/3.avi", "dog/1.mp4", "dog/sub/2.MKV"]
    for name in ("train/dog/1.mp4", "test/dog/2.mp4", "train/cat/3.mp4", "val/cat/4.mp4"):
        touch(tmp_path / "split" / name)
    split = read_dataset(tmp_path / "split")
    assert {(i.label, i.split) for i in split.items} == {("dog", "train"), ("dog", "test"), ("cat", "train"),
                                                          ("cat", "val")}
    (tmp_path / "empty").mkdir()
    with pytest.raises(AvclError, match="no videos found"):
        read_dataset(tmp_path / "empty")


def test_kinetics_csv_maps_usual_namings(tmp_path):
    videos = tmp_path / "videos"
    touch(videos / "abc_000010_000020.mp4")
    touch(videos / "playing drums" / "def.webm")  # whole video: the window is kept
    touch(videos / "ghi_5.mkv")
    (tmp_path / "k.csv").write_text("label,youtube_id,time_start,time_end,split\n"
                                    "dog,abc,10,20,train\nplaying drums,def,3,13,val\ncat,ghi,5,15,test\n"
                                    "cat,zzz,0,10,test\n")
    data = read_dataset(tmp_path / "k.csv", video_dir=videos)
    assert data.kind == "kinetics"
    abc, definition, ghi, zzz = data.items
    assert Path(abc.path).name == "abc_000010_000020.mp4" and abc.start is None and not abc.missing
    assert Path(definition.path).name == "def.webm" and (definition.start, definition.end) == (3.0, 13.0)
    assert Path(ghi.path).name == "ghi_5.mkv" and ghi.start is None
    assert zzz.missing and Path(zzz.path).name == "zzz_000000_000010.mp4"
    assert [i.id for i in data.missing] == ["zzz_000000_000010"]


@needs_data
def test_real_ave_annotations(tmp_path):
    touch(tmp_path / "RUhOCu3LNXM.mp4")
    data = read_dataset(META / "ave" / "Annotations.txt", video_dir=tmp_path)
    assert data.kind == "ave" and len(data.items) == 4143 and len(data.class_names) == 28
    first = data.items[0]
    assert (first.id, first.label, first.event, first.missing) == ("RUhOCu3LNXM", "Church bell", (0.0, 10.0), False)
    assert len(data.missing) == 4142 and len({i.id for i in data.items}) == 4143
    repeated = [i for i in data.items if "#" in i.id]  # 46 repeats: videos annotated with several categories
    assert len(repeated) == 46 and {i.id.rpartition("#")[2] for i in repeated} <= {"1", "2"}


@needs_data
def test_real_vggsound_test_csv(tmp_path):
    touch(tmp_path / "glLQrEijrKg_000300.mp4")
    touch(tmp_path / "LDoXsip0BEQ.mp4")  # a full video: the 10-second window is cut at decoding
    data = read_dataset(META / "vggsound" / "test.csv", video_dir=tmp_path)
    assert data.kind == "vggsound" and len(data.items) == 15446 and len(data.class_names) == 309
    assert {i.split for i in data.items} == {"test"}  # from the file name
    first, second = data.items[:2]
    assert (first.id, first.label, first.missing, first.start) == ("glLQrEijrKg_000300", "playing hammond organ",
                                                                    False, None)
    assert (second.label, second.start, second.end, second.missing) == ("parrot talking", 177.0, 187.0, False)
    assert "heart sounds, heartbeat" in data.class_names  # quoted labels with commas
    assert len(data.missing) == 15444
    assert detect_kind(META / "vggsound" / "test.csv") == "vggsound"
