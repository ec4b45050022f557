"""Several processes (torchrun, gloo on the CPU): the same optimisation as one process with the same global
batch, gathered InfoNCE negatives and DINO centre, rank 0 alone writing, a dead rank ending the run in one line."""
import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, TINY, error_lines, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

# 2 tasks of 3 classes x 39 clips = 117 rows per task: global batches 20, 20, ..., 17, so the last one is
# not cut in two (every rank computes it whole) and all the others are; replay 16 = 2 x 8.
DDP_TINY = TINY + ["scenario.num_tasks=2", "data.train_per_class=39", "train.epochs=4", "train.batch_size=20",
                   "train.replay_batch_size=16", "train.num_threads=1", "train.save_model=true",
                   "eval.batch_size=16", "--quiet"]  # evaluation in 16-row batches: sharded across the ranks
AVCIL = ["model.name=avcil", "model.encoders=builtin", "model.visual_grid=[4,4]", "model.embed_dim=16",
         "model.feature_dim=32"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, nproc=2, env=None, timeout=240):
    """``torchrun --nproc-per-node N -m avcl ...`` on this machine (gloo on the CPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "avcl", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def matrix(run_dir, method):
    """The accuracy matrix's entries, row after row (row t: the tasks seen after task t)."""
    rows = json.loads((run_dir / method / "metrics.json").read_text())["accuracy_matrix"]
    return torch.tensor([value for row in rows for value in row], dtype=torch.float64)


@pytest.mark.parametrize("methods,extra", [("[finetune,er,icarl]", []), ("[avcil]", AVCIL),
                                           ("[er,icarl]", ["data.residency=stream", "data.workers=1"]),
                                           # 2 micro-batches of 10 per step, averaged across ranks once per step
                                           ("[finetune,er]", ["train.batch_size=10", "train.accumulate=2",
                                                              "train.schedule=cosine", "train.warmup_epochs=1"])],
                         ids=["finetune-er-icarl", "avcil", "streamed", "accumulated"])
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, methods, extra):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["synthetic", f"methods={methods}", *DDP_TINY, *extra]
    single = run_cli("run", *args, "--out", str(one))
    assert single.returncode == 0, single.stderr
    double = torchrun("run", *args, "--out", str(two))
    assert double.returncode == 0, double.stdout[-2000:] + double.stderr[-3000:]
    for method in methods.strip("[]").split(","):
        # Tolerance: the two runs add the same numbers in another order (two half-batch means averaged
        # by an all-reduce instead of one mean; gathered D-AVSC candidates), so float32 round-off
        # separates them. Measured (2 CPU cores, torch 2.13): finetune, er, icarl end within 5e-7 in
        # every weight with equal accuracy matrices; allowed 1e-4 on the weights and one test clip
        # (1/60) per accuracy. AV-CIL's steps agree as closely (one step of task 1: losses within
        # 3e-7, gradients within 3e-7; the unit test below), but its tau=0.05 contrastive terms under
        # Adam amplify the round-off about 10x per epoch on this tiny model: 5e-4 in the loss and 7e-3
        # in the weights after task 1, which moved 2 of 60 test clips. Allowed for it: 0.02 on the
        # weights and 3 clips (0.05) per accuracy.
        clips, weights = (3 / 60, 2e-2) if method == "avcil" else (1 / 60, 1e-4)
        torch.testing.assert_close(matrix(two, method), matrix(one, method), atol=clips + 1e-9, rtol=0)
        want = torch.load(one / method / "model.pt", weights_only=True)["model"]
        got = torch.load(two / method / "model.pt", weights_only=True)["model"]
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=weights, rtol=0, msg=f"{method} {key}")
    # rank 0 alone wrote: one event log with one run_start, saying 2 processes
    events = [json.loads(line) for line in (two / "events.jsonl").read_text().splitlines()]
    assert [e["processes"] for e in events if e["event"] == "run_start"] == [2]
    assert not list(two.rglob("*.tmp")) and not list(two.rglob(".*.tmp"))


def test_two_nodes_through_a_rendezvous_equal_one_process(tmp_path):
    """The multi-node command of docs/scaling.md (one torchrun agent per node, c10d rendezvous), both agents
    on this machine with one process each: the run equals the one-process run."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["synthetic", "methods=[finetune,er]", *DDP_TINY]
    single = run_cli("run", *args, "--out", str(one))
    assert single.returncode == 0, single.stderr
    port = free_port()
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
                                "1", "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint",
                                f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", "-m", "avcl", "run", *args,
                                "--out", str(two)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}) for node in (0, 1)]
    outputs = [agent.communicate(timeout=240) for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], outputs
    for method in ("finetune", "er"):
        torch.testing.assert_close(matrix(two, method), matrix(one, method), atol=1 / 60 + 1e-9, rtol=0)
    events = [json.loads(line) for line in (two / "events.jsonl").read_text().splitlines()]
    assert [e["processes"] for e in events if e["event"] == "run_start"] == [2]


def test_batches_that_cannot_be_cut_evenly_are_refused_in_one_line(tmp_path):
    done = torchrun("run", "synthetic", "methods=[er]", *DDP_TINY, "train.batch_size=21", "--out",
                    str(tmp_path / "run"), timeout=120)
    assert done.returncode != 0
    lines = [line for line in error_lines(done.stderr) if line.startswith("avcl: error:")]
    assert lines == ["avcl: error: train.batch_size=21 is the global batch, cut in 2 equal slices (one per "
                     "process): make it a multiple of 2"], done.stderr
    assert not (tmp_path / "run").exists()


def test_a_rank_that_dies_ends_the_run_in_one_line_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = ["synthetic", "methods=[finetune,er]", *DDP_TINY, "train.dist_timeout=60", "--out", str(run_dir)]
    started = time.monotonic()
    # rank 1 exits at once (status 3) after epoch 2 of er's task 1, as a killed process would
    died = torchrun("run", *args, env={"AVCL_TEST_STOP_RANK": "1:er:1:2"}, timeout=180)
    assert died.returncode != 0
    assert time.monotonic() - started < 120, "a dead rank must not leave the others waiting"
    lines = [line for line in died.stderr.splitlines() if line.startswith("avcl: error:")]
    assert len(lines) == 1, died.stderr[-3000:]
    assert "rank 1 (pid" in lines[0] and "stopped" in lines[0] and f"avcl run --resume {run_dir}" in lines[0]
    assert json.loads((run_dir / "finetune" / "metrics.json").read_text())["complete"]
    assert json.loads((run_dir / "er" / "metrics.json").read_text())["tasks_done"] == 1

    resumed = run_cli("run", "--resume", str(run_dir))  # one process now: another number of processes
    assert resumed.returncode == 0, resumed.stderr
    metrics = json.loads((run_dir / "er" / "metrics.json").read_text())
    assert metrics["complete"] and metrics["tasks_done"] == 2


# ----- the pre-training stream's collectives, as a unit: 2 gloo processes ----------------------------

def _gathered_losses(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from types import SimpleNamespace

    from avcl import parallel as distributed
    from avcl.nn.losses import info_nce, update_center
    distributed.setup(SimpleNamespace(device="cpu", dist_timeout=60))
    try:
        torch.manual_seed(0)  # the same global batch and the same encoder on both ranks
        audio, video = torch.randn(8, 6), torch.randn(8, 6)
        encoder = torch.nn.Linear(6, 5)
        teacher = torch.randn(2, 8, 7)  # XKD's teacher logits: 2 views x 8 rows x 7 prototypes

        def loss_of(rows, gathered):
            encoder.zero_grad()
            step = distributed.Step(True, [4, 4]) if gathered else None
            with distributed.step(step) if gathered else contextlib.nullcontext():
                loss = info_nce(encoder(audio[rows]), encoder(video[rows]), 0.05)
            loss.backward()
            return loss.detach()

        full = loss_of(slice(None), gathered=False)  # one process, the whole global batch
        full_grad = encoder.weight.grad.clone()
        mine = slice(4 * rank, 4 * rank + 4)
        half = loss_of(mine, gathered=True)  # this rank's slice, negatives gathered from the other
        optimizer = torch.optim.SGD(encoder.parameters(), lr=0.1)
        distributed.average_gradients(optimizer)
        center_one = torch.zeros(7)
        update_center(center_one, teacher)
        center_two = torch.zeros(7)
        with distributed.step(distributed.Step(True, [4, 4])):
            update_center(center_two, teacher[:, mine])
        results[rank] = {"full": full, "mean": distributed.average(half), "full_grad": full_grad,
                         "grad": encoder.weight.grad.clone(), "center_one": center_one, "center_two": center_two,
                         **_avcil_step(rank), **_sharded_evaluation()}
    finally:
        distributed.close()


def _avcil_step(rank: int) -> dict:
    """AV-CIL's loss and gradients on one global batch of task 1 (20 new + 16 replayed rows): one process's
    vs the mean over 2 ranks of their slices (10 + 8 rows each, D-AVSC candidates gathered)."""
    from avcl.config import load_config
    from avcl.core.samples import concat, select
    from avcl import parallel as distributed
    from avcl.engine.runner import build_method, make_scenario
    from avcl.engine.trainer import flagged
    from test_avcil import AVCIL_SYNTH
    cfg = load_config("synthetic", AVCIL_SYNTH + ["methods=[avcil]", "scenario.num_tasks=2"])
    scenario = make_scenario(cfg)
    torch.manual_seed(0)
    method = build_method("avcil", cfg, scenario.tasks[0].train)
    method.before_task(scenario.tasks[0])
    method.after_task(scenario.tasks[0])
    method.before_task(scenario.tasks[1])
    with torch.no_grad():  # the frozen teacher's cache, as the trainer makes it
        data, replay = method.training_data(flagged(scenario.tasks[1].train, False),
                                            flagged(method.memory.samples, True))
    rows, picks = torch.randperm(len(data["label"]))[:20], torch.randint(len(replay["label"]), (16,))

    def step(batch, sliced):
        method.model.zero_grad()
        with distributed.step(distributed.Step(True, [10, 10])) if sliced else contextlib.nullcontext():
            terms = method.loss_terms(batch)
        sum(terms.values()).backward()
        return {k: v.detach() for k, v in terms.items()}

    full = step(concat([select(data, rows), select(replay, picks)]), sliced=False)
    full_grads = {n: p.grad.clone() for n, p in method.model.named_parameters() if p.grad is not None}
    half = step(concat([select(data, rows[10 * rank:10 * rank + 10]), select(replay, picks[8 * rank:8 * rank + 8])]),
                sliced=True)
    distributed.average_gradients(torch.optim.SGD(method.model.parameters(), lr=0.1))
    grads = {n: p.grad.clone() for n, p in method.model.named_parameters() if p.grad is not None}
    return {"avcil_full": full, "avcil_mean": {k: distributed.average(v) for k, v in half.items()},
            "avcil_full_grads": full_grads, "avcil_grads": grads}


def _sharded_evaluation() -> dict:
    """Evaluation passes over 70 rows in batches of 16 (5 batches): the rows this rank computed, and the
    gathered per-row results (correctness, embeddings) every rank ends with."""
    from avcl.eval.evaluator import correct_predictions
    from avcl.eval.probe import embed_all
    torch.manual_seed(1)  # the same data on both ranks
    data = {"x": torch.randn(70, 4), "label": torch.randint(0, 4, (70,))}
    computed = []

    def predict(batch):
        computed.append(batch["x"])
        return batch["x"]
    correct = correct_predictions(predict, data, 16, torch.device("cpu"), contextlib.nullcontext)
    embedded = embed_all(lambda batch: 2 * batch["x"], data, 16, torch.device("cpu"), contextlib.nullcontext)
    return {"eval_data": data, "eval_computed": torch.cat(computed), "eval_correct": correct,
            "eval_embedded": embedded}


def test_gathered_infonce_dino_centre_and_avcil_step_equal_one_process():
    import torch.multiprocessing as mp
    results = mp.Manager().dict()
    mp.spawn(_gathered_losses, args=(free_port(), results), nprocs=2, join=True)
    for rank in (0, 1):
        r = results[rank]
        # float32 sums in another order: equal to ~1e-6
        torch.testing.assert_close(r["mean"], r["full"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r["grad"], r["full_grad"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r["center_two"], r["center_one"], atol=1e-6, rtol=1e-6)
    assert torch.equal(results[0]["grad"], results[1]["grad"]), "every replica must take the same step"
    # AV-CIL (test_two_processes_...'s avcil tolerance): each term, and every parameter's gradient
    r = results[0]
    assert set(r["avcil_mean"]) == {"ss_ce", "tkd", "davsc_instance", "davsc_class", "vad_spatial", "vad_temporal"}
    torch.testing.assert_close(r["avcil_mean"], r["avcil_full"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r["avcil_grads"], r["avcil_full_grads"], atol=1e-6, rtol=1e-4)
    # sharded evaluation: rank 0 computed batches 0-1 (rows 0-31), rank 1 batches 2-4 (rows 32-69), the very
    # batches of one process; both end with every row's result, in row order
    x = results[0]["eval_data"]["x"]
    assert torch.equal(results[0]["eval_computed"], x[:32]) and torch.equal(results[1]["eval_computed"], x[32:])
    for rank in (0, 1):
        r = results[rank]
        assert torch.equal(r["eval_correct"], (x.argmax(1) == r["eval_data"]["label"]).float())
        assert torch.equal(r["eval_embedded"], 2 * x)


def test_pretraining_stream_in_two_processes_keeps_a_reservoir_per_rank(tmp_path):
    """The label-free stream end to end under torchrun (init stage, STELLA and every replay baseline, with their
    collectives inside the step: MIR's and GMED's all-reduced virtual gradient, CLS-ER's gathered softmax): the
    replicas agree after every task (the run checks it), and the checkpoint holds each rank's reservoir of
    memory.size / 2."""
    run_dir = tmp_path / "run"
    methods = ("er", "stella", "clser", "mir", "gmed", "lump", "derpp")
    done = torchrun("run", "pretrain/synthetic", f"methods=[{','.join(methods)}]", "train.num_threads=1",
                    "eval.batch_size=8", "train.keep_checkpoints=true", "--quiet", "--out", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    for method in methods:
        assert json.loads((run_dir / method / "metrics.json").read_text())["complete"]
        reservoirs = torch.load(run_dir / method / "checkpoint.pt", weights_only=True)["rank_memory"]
        assert [r["capacity"] for r in reservoirs] == [8, 8]  # memory.size=16 in pretrain/synthetic
    assert (run_dir / "init" / "model.pt").is_file()


# ----- the pre-training baselines' step, as a unit: 2 gloo processes against one -------------------------

BASELINES = {"er": {}, "derpp": {}, "lump": {}, "mir": {"search_factor": 2}, "gmed": {"grad_stride": 1e3},
             "clser": {"temperature": 0.5}}
# what one process runs to equal 2 (MIR's pools never span processes: 2 processes select as code_ranks=2)
ONE_PROCESS = {"mir": {"code_ranks": 2}}


class _Shards:
    """One process's reservoir as 2 ranks hold it: ``sample(k)`` is rank 0's ``sample(k / 2)`` then rank 1's, so
    the one-process step draws the very rows the two ranks draw, in rank order (the gathered order)."""

    def __init__(self, shards):
        self.shards = shards

    def __len__(self):
        return sum(len(s) for s in self.shards)

    def sample(self, k):
        parts = [s.sample(k // len(self.shards)) for s in self.shards]
        return (torch.cat([slots + 1000 * i for i, (slots, _) in enumerate(parts)]),
                {key: torch.cat([rows[key] for _, rows in parts]) for key in parts[0][1]})

    def add(self, rows):
        pass

    def write(self, slots, rows):
        pass


def _baseline_steps(rank: int, port: int, results) -> None:
    """Each baseline's loss and gradients on one global batch (8 current rows, replay 8): one process vs the
    mean over 2 ranks of their slices (4 rows each, each rank replaying from its own reservoir of 8 rows).
    Masks are made deterministic (the same hidden patches for every row) and the inputs are prepared
    without augmentation, so the two differ only by float round-off; the ranks' own random streams are on,
    as in a run."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from types import SimpleNamespace

    import avcl.models.cav as cav
    from avcl import parallel as distributed
    from avcl.memory.reservoir import ReservoirBuffer
    from test_ssl_baselines import cav_batch, make_method, tiny_cfg

    def fixed_masking(batch, length, keep, device=None, generator=None):
        order = torch.randperm(length, generator=torch.Generator().manual_seed(length)).to(device)
        return order[:keep].expand(batch, keep), order[keep:].expand(batch, length - keep)
    cav.random_masking = fixed_masking
    distributed.setup(SimpleNamespace(device="cpu", dist_timeout=60))
    distributed.seed_rank_random(0, 0, torch.device("cpu"))  # each rank its own stream inside a step, as a run
    try:
        cfg = tiny_cfg(train={"batch_size": 8, "replay_batch_size": 8})
        batch, stored = cav_batch(8, seed=1), cav_batch(16, seed=2)
        out = {}
        for name, hparams in BASELINES.items():
            def built(**extra):
                torch.manual_seed(0)
                method = make_method(name, cfg=cfg, **{**hparams, **extra})
                prepare = method.model.prepare
                method.model.prepare = lambda rows, train: prepare(rows, False)  # no augmentation draws
                if name == "clser":  # EMAs apart from the model, so that the matching softmax decides
                    g = torch.Generator().manual_seed(4)
                    with torch.no_grad():
                        for ema, scale in ((method.stable, 0.3), (method.plastic, 0.1)):
                            for p in ema.parameters():
                                p.add_(scale * torch.randn(p.shape, generator=g))
                return method

            def shard(r, method):
                memory = ReservoirBuffer(8, seed=10 + r)
                with torch.no_grad():
                    rows = method.model.prepare({k: v[8 * r:8 * r + 8] for k, v in stored.items()}, False)
                if name == "derpp":
                    rows.update(z_audio=torch.randn(8, 32, generator=torch.Generator().manual_seed(r)),
                                z_video=torch.randn(8, 32, generator=torch.Generator().manual_seed(r + 2)))
                memory.add(rows)
                return memory

            def step(method, rows, sliced):
                method.model.zero_grad(set_to_none=True)
                torch.manual_seed(3)  # the shared stream (LUMP's lambda)
                with distributed.step(distributed.Step(True, [4, 4])) if sliced else contextlib.nullcontext():
                    loss = method.training_loss(rows)
                loss.backward()
                if sliced:
                    distributed.average_gradients(method.optimizer)
                    loss = distributed.average(loss.detach())
                return loss.detach(), {n: p.grad.clone() for n, p in method.model.named_parameters()
                                       if p.grad is not None}

            one = built(**ONE_PROCESS.get(name, {}))
            one.memory = _Shards([shard(0, one), shard(1, one)])
            full = step(one, batch, sliced=False)
            two = built()
            two.memory = shard(rank, two)
            mine = type(batch)({k: v[4 * rank:4 * rank + 4] for k, v in batch.items()})
            out[name] = {"full": full, "two": step(two, mine, sliced=True)}
        results[rank] = out
    finally:
        distributed.close()


def test_pretraining_baselines_in_two_processes_equal_one_process():
    """ER, DER++, LUMP, MIR, GMED and CLS-ER: one step in 2 processes (each rank its slice and its own
    reservoir) gives the one-process loss and gradients on the same global batch and the same replayed rows
    (MIR: one process with code_ranks=2, its pools per rank). GMED's stride is large so that its edit size
    (the 1/W of its per-rank input gradients) shows in the loss; CLS-ER's EMAs are moved off the model so that
    its matching softmax (over the 8 replay rows, gathered) picks the targets. Before the fixes mir (8 of 8
    candidates kept per rank), lump (2 of 4 rows mixed, a lambda per rank), gmed (2x edits) and clser (a
    softmax over each rank's 4 rows) failed here."""
    import torch.multiprocessing as mp
    results = mp.Manager().dict()
    mp.spawn(_baseline_steps, args=(free_port(), results), nprocs=2, join=True)
    for name in BASELINES:
        for rank in (0, 1):
            (want_loss, want_grads), (loss, grads) = results[rank][name]["full"], results[rank][name]["two"]
            # float32 sums in another order, as the unit test above: ~1e-6
            torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5, msg=name)
            assert grads.keys() == want_grads.keys(), name
            for key in want_grads:
                torch.testing.assert_close(grads[key], want_grads[key], atol=1e-5, rtol=1e-4, msg=f"{name} {key}")
