"""Streaming from the store (data.residency, avcl.data.stream) and mid-task checkpoints (train.checkpoint_every):
a streamed run gives the resident run's metrics, a run killed inside an epoch resumes to the same metrics, a store
larger than the resident limit is streamed with bounded memory, and bad stores and dead workers are one message."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, needs_data, run_cli

from avcl.core.errors import AvclError
from avcl.core.samples import LazyRows, batches, concat, gather, resident, select
from avcl.data.store import create_store
from avcl.data.stream import ResidencyOptions, StoreRows, StreamLoader, choose, spill


pytestmark = pytest.mark.usefixtures("one_thread")


def write_raw_store(path, n, frames=4, size=32, audio_frames=64, bins=16, classes=2, test_every=5, seed=0):
    """A raw store (uint8 RGB frames, float16 fbank) of ``n`` clips, ``classes`` labels, every ``test_every``-th
    clip a test clip, written 64 rows at a time; returns the arrays written when ``n`` <= 64 (else None)."""
    rng = np.random.default_rng(seed)
    labels = [i % classes for i in range(n)]
    splits = ["test" if i % test_every == 0 else "train" for i in range(n)]
    with create_store(path, [f"clip{i}" for i in range(n)],
                      {"video": ((frames, size, size, 3), "uint8"), "audio": ((audio_frames, bins), "float16")},
                      labels=labels, splits=splits, class_names=[f"class{c}" for c in range(classes)]) as writer:
        for start in range(0, n, 64):
            rows = list(range(start, min(n, start + 64)))
            video = rng.integers(0, 256, (len(rows), frames, size, size, 3), dtype=np.uint8)
            audio = rng.standard_normal((len(rows), audio_frames, bins)).astype(np.float16)
            writer.write(rows, {"video": video, "audio": audio})
        writer.finalize()
    return (video, audio) if n <= 64 else None


def test_store_rows_read_what_the_resident_tensor_holds(tmp_path):
    """select / concat keep the rows lazy, batches / gather / resident read exactly the resident rows, in order
    (repeated and unsorted rows too), converted to the in-memory dtype; ``shape`` answers as the tensor's."""
    video, audio = write_raw_store(tmp_path / "s.h5", 20)
    lazy = {"video": StoreRows.of(tmp_path / "s.h5", "features/video"),
            "audio": StoreRows.of(tmp_path / "s.h5", "features/audio", dtype=torch.float32),
            "label": torch.arange(20)}
    full = {"video": torch.from_numpy(video), "audio": torch.from_numpy(audio).float(), "label": torch.arange(20)}
    assert lazy["video"].shape == full["video"].shape and lazy["audio"].dtype == torch.float32
    part = select(lazy, torch.tensor([7, 3, 3, 19, 0]))
    assert isinstance(part["video"], LazyRows)
    for key in full:
        assert torch.equal(gather(part, torch.arange(5))[key], full[key][[7, 3, 3, 19, 0]])
    mask = torch.arange(20) % 3 == 0
    joined = concat([select(lazy, mask), part])  # one store: still lazy
    assert isinstance(joined["video"], LazyRows)
    want = concat([select(full, mask), select(full, torch.tensor([7, 3, 3, 19, 0]))])
    got = resident(joined)
    assert all(torch.equal(got[k], want[k]) for k in want)
    torch.manual_seed(3)
    streamed = list(batches(lazy, 6, shuffle=True))
    torch.manual_seed(3)
    for a, b in zip(streamed, batches(full, 6, shuffle=True), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in b)
    mixed = concat([lazy, full])  # a lazy part beside resident ones is read
    assert torch.is_tensor(mixed["video"]) and torch.equal(mixed["video"][20:], full["video"])


def test_spill_is_bit_identical_and_the_loader_reads_in_the_given_order(tmp_path):
    """A dataset built in memory written to a temporary store reads back bit-identical (float32, bfloat16, uint8);
    the StreamLoader's workers deliver the trainer's batches in the trainer's order, in the in-memory dtype."""
    g = torch.Generator().manual_seed(0)
    splits = {"train": {"audio": torch.randn(30, 5, 4, generator=g), "video": torch.randint(0, 255, (30, 2, 3, 3),
                        dtype=torch.uint8, generator=g), "bf": torch.randn(30, 3, generator=g).bfloat16(),
                        "label": torch.arange(30), "audio_mask": torch.ones(30, dtype=torch.bool)},
              "test": {"audio": torch.randn(4, 5, 4, generator=g), "video": torch.zeros(4, 2, 3, 3, dtype=torch.uint8),
                       "bf": torch.zeros(4, 3).bfloat16(), "label": torch.arange(4),
                       "audio_mask": torch.ones(4, dtype=torch.bool)}}
    out = spill(splits, str(tmp_path))
    assert isinstance(out["train"]["audio"], StoreRows) and torch.is_tensor(out["train"]["label"])
    assert torch.is_tensor(out["train"]["audio_mask"]) and list(out["train"]) == list(splits["train"])
    for split in splits:
        got = resident(out[split])
        assert all(torch.equal(got[k], splits[split][k]) and got[k].dtype == splits[split][k].dtype for k in got)
    order = torch.randperm(30, generator=g)
    rows = [order[s:s + 7] for s in range(0, 30, 7)]
    loader = StreamLoader(out["train"], torch.device("cpu"), workers=2, prefetch=2)
    for _ in range(2):  # persistent workers: a second epoch with the same loader
        got = list(loader.epoch(rows))
        assert len(got) == len(rows)
        for batch, r in zip(got, rows):
            want = select(splits["train"], r)
            assert all(torch.equal(batch[k], want[k]) and batch[k].dtype == want[k].dtype for k in want)


def test_residency_auto_streams_above_the_limit():
    opts = ResidencyOptions(resident_limit_gib=1.0)
    assert choose(opts, 2**30 - 1)[0] is False and choose(opts, 2**30 + 1)[0] is True
    assert "streamed" in choose(opts, 2**31)[1] and "1.00 GiB" in choose(opts, 2**31)[1]
    assert choose(ResidencyOptions(residency="stream"), 1)[0] is True
    assert choose(ResidencyOptions(residency="memory"), 2**50)[0] is False


class _Dies(LazyRows):
    """Rows whose reading kills the DataLoader worker process (as an out-of-memory kill would)."""
    row_shape, dtype = (2,), torch.float32

    def __len__(self):
        return 8

    def read(self, index=None, convert=True):
        if torch.utils.data.get_worker_info() is not None:
            os._exit(9)
        return torch.zeros(len(index), 2)

    def take(self, index):
        return self

    @classmethod
    def cat(cls, parts):
        return parts[0]


def test_a_dead_worker_is_one_error_not_a_hang(tmp_path):
    loader = StreamLoader({"x": _Dies(), "label": torch.arange(8)}, torch.device("cpu"), workers=1, prefetch=1)
    with pytest.raises(AvclError, match="data-loader worker stopped"):
        list(loader.epoch([np.arange(4), np.arange(4, 8)]))


def test_a_truncated_store_names_the_file_and_the_rows(tmp_path):
    path = tmp_path / "t.h5"
    write_raw_store(path, 40, size=64)
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)
    rows = StoreRows(path, "features/video", np.arange(40), (4, 64, 64, 3), "uint8", None)
    with pytest.raises(AvclError) as err:
        rows.read(np.arange(30, 40))
    assert str(path) in str(err.value) and "cannot read rows [30, 31" in str(err.value)


def _metrics(run_dir, method):
    """metrics.json without the wall-clock and memory numbers."""
    m = json.loads((run_dir / method / "metrics.json").read_text())
    return {k: v for k, v in m.items() if "seconds" not in k and "memory" not in k}


def _epochs(run_dir, method):
    """epochs.csv's task, epoch and loss columns."""
    return [",".join(line.split(",")[:3]) for line in (run_dir / method / "epochs.csv").read_text().splitlines()]


@pytest.mark.parametrize("recipe,methods,kill,extra", [
    pytest.param("pretrain/avdigits", "[er,stella]", "stella:1:0:9", ["eval.probe=none"], marks=needs_data),
    pytest.param("xkd/avdigits", "[xkd]", "xkd:0:0:22", [], marks=needs_data),
    # supervised: before_task's frozen copy (LwF, iCaRL) and an exemplar memory herded from a streamed task
    ("synthetic", "[lwf,icarl]", "icarl:1:2:3", ["data.train_per_class=20", "data.num_classes=6",
                                                  "scenario.num_tasks=3", "train.epochs=3", "train.batch_size=8"]),
], ids=["stella", "xkd", "lwf-icarl"])
def test_streamed_equals_resident_and_a_kill_inside_an_epoch_resumes_to_it(tmp_path, recipe, methods, kill, extra):
    """Resident, streamed (with step checkpoints every 4 steps) and streamed-killed-inside-an-epoch-then-resumed
    runs of the same recipe give identical metrics and per-epoch losses (the killed run trains only the method
    it kills: methods are independent)."""
    args = [recipe, "train.epochs=1", "init.epochs=0", "init.avm_epochs=0", "init.row=false",
            "train.num_threads=1", "--quiet", *extra]
    stream = ["data.residency=stream", "data.workers=1", "train.checkpoint_every=4"]
    runs = {name: tmp_path / name for name in ("resident", "streamed", "killed")}
    method = kill.split(":")[0]
    done = run_cli("run", *args, f"methods={methods}", "data.residency=memory", "--out", str(runs["resident"]),
                   timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    done = run_cli("run", *args, f"methods={methods}", *stream, "--out", str(runs["streamed"]), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    died = run_cli("run", *args, f"methods=[{method}]", *stream, "--out", str(runs["killed"]),
                   env={"AVCL_TEST_STOP": kill}, timeout=600)
    assert died.returncode == 3, died.stderr[-3000:]
    step_file = runs["killed"] / method / "step_checkpoint.pt"
    assert step_file.is_file()
    state = torch.load(step_file, weights_only=True)
    task, epoch, step = (int(x) for x in kill.split(":")[1:])
    # the last checkpoint (every 4 steps of the task) lies before the kill: the resumed run trains steps again
    assert state["task"] == task and (state["epoch"], state["step"]) < (epoch, step), (state["epoch"], state["step"])
    resumed = run_cli("run", "--resume", str(runs["killed"]), "--quiet", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    events = [json.loads(line) for line in (runs["killed"] / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "method_resume" and e.get("step") == state["step"] for e in events)
    for name in methods.strip("[]").split(","):
        want = _metrics(runs["resident"], name)
        assert _metrics(runs["streamed"], name) == want, name
        assert _epochs(runs["streamed"], name) == _epochs(runs["resident"], name)
    assert _metrics(runs["killed"], method) == _metrics(runs["resident"], method)
    assert _epochs(runs["killed"], method) == _epochs(runs["resident"], method)
    assert not (runs["killed"] / method / "step_checkpoint.pt").exists()  # the task's end removed it


def test_a_store_above_the_resident_limit_streams_with_bounded_memory(tmp_path):
    """A raw store several times the resident limit trains streamed (the run says so) and the run's peak RSS
    stays far below the store's size: the clips are never all in memory."""
    import yaml

    from avcl.config import recipes_dir
    store = tmp_path / "raw.h5"
    # many bytes per clip, little compute per step: the model samples 4 of 48 frames, in 56-px patches
    n = 256
    write_raw_store(store, n, frames=48, size=224, audio_frames=256, bins=128, classes=4, test_every=5)
    store_mib = store.stat().st_size / 2**20  # ~ 1.8 GiB: 7.2 MB of frames + 64 KB of fbank per clip
    recipe = yaml.safe_load((recipes_dir() / "pretrain/features.yaml").read_text())
    recipe.update(data={"name": "features", "store": str(store), "residency": "auto", "resident_limit_gib": 0.1,
                        "workers": 1, "prefetch": 2},
                  scenario={"num_tasks": 2}, methods=["er"], memory={"size": 16})
    recipe["train"].update(epochs=1, batch_size=4, replay_batch_size=4, num_threads=1, cpu_keep_heap=False)
    recipe["model"]["vit"].update(video_patch=56, audio_patch=[32, 32], frames=4)
    recipe["eval"].update(probe="none", batch_size=4, retrieval_per_class=3, recall_at=[1, 5])
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    # VmHWM: this process's peak RSS (ru_maxrss would carry the forking pytest process's peak across exec)
    code = ("import sys; from avcl.cli import main; rc = main(sys.argv[1:]); "
            "print([line for line in open('/proc/self/status') if line.startswith('VmHWM')][0], file=sys.stderr); "
            "sys.exit(rc)")
    import subprocess
    done = subprocess.run([sys.executable, "-c", code, "run", str(tmp_path / "recipe.yaml"), "--out",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "streamed:" in done.stderr and "> the resident limit 0.10 GiB" in done.stderr, done.stderr[-2000:]
    peak_mib = int(done.stderr.split("VmHWM:")[1].split()[0]) / 1024
    assert json.loads((tmp_path / "run" / "er" / "metrics.json").read_text())["complete"]
    # resident, the clips alone would be the whole store (1.8 GiB) on top of the ~300 MiB of torch and the model
    assert peak_mib < 0.5 * store_mib, (peak_mib, store_mib)


def test_a_full_disk_at_extraction_names_the_store_and_the_row(tmp_path, monkeypatch):
    """A write that fails (ENOSPC) is one AvclError naming the store, the row and its id; the rows written before
    stay written, so the extraction resumes there."""
    path = tmp_path / "s.h5"
    writer = create_store(path, ["a", "b", "c"], {"video": ((2,), "uint8")})
    writer.write([0], {"video": np.ones((1, 2), dtype=np.uint8)})

    class Full:
        def __getitem__(self, name):
            return self

        def __setitem__(self, rows, values):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "h5", Full())
    with pytest.raises(AvclError) as err:
        writer.write([2, 1], {"video": np.ones((2, 2), dtype=np.uint8)})
    assert str(path) in str(err.value) and "row 1 ('b' and 1 more)" in str(err.value)
    assert "No space left" in str(err.value)
    monkeypatch.undo()
    assert writer.done.tolist() == [True, False, False]
    writer.close()
