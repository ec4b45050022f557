"""Layer ``parallel``: data-parallel training across processes (``torchrun --nproc-per-node N -m avcl run ...``).

Imports ``avcl.core`` only. One module per concern, every name re-exported here (``parallel.world()``):
``group`` (the process group, collectives, barrier), ``step`` (a step's slice, gathered rows), ``rng`` (per-rank
random streams), ``gradients`` (the gradient average), ``evaluation`` (sharded evaluation), ``replicas``
(checksums across ranks), ``testing`` (test hooks). Per-rank reservoirs live with the reservoir
(``avcl.memory.sharding``).

PyTorch's own engine (``torch.distributed``: gloo on CPU, NCCL on CUDA), detected from the
environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...). With
``WORLD_SIZE`` unset or 1 nothing here is used and a run is exactly the single-process one.

How a run with W processes equals one process with the same global batch (docs/scaling.md):

* Every rank holds the whole task in memory and draws the same permutation and replay picks
  from the same seeded RNG (``torch.randperm`` / ``torch.randint``, as one process does);
  rank r trains on its slice r of each global batch (``train.batch_size`` / W new rows, and
  ``train.replay_batch_size`` / W replayed rows). Equal slices, so the mean of the ranks'
  per-row-mean losses is the global batch's mean, and gradients are averaged by one bucketed
  all-reduce after backward (``average_gradients``): every replica takes the same step.
* A global batch whose size W does not divide (the epoch's last partial batch) is not cut:
  every rank computes the whole batch (``Step.sliced`` False), so each rank's gradient is the
  one-process gradient and their average too: exact, at the cost of one duplicated batch per epoch.
* Batch-level terms see the global batch: InfoNCE (CAV-MAE, AV-CIL's D-AVSC) gathers the rows
  of every rank with their gradient (``all_rows``), XKD's DINO centre is all-reduced (``mean_rows``).
* Replicas stay identical (same initial weights from the seed, same averaged step, same RNG),
  so exemplar selection (herding, random) gives the same result on every rank; ``check_replicas``
  compares a checksum of model and memory across ranks after every task.
* Evaluation is sharded (``eval_pass``): each rank computes a contiguous run of the batches one
  process makes, and the per-row results are gathered in row order, so the metrics are the
  one-process metrics, computed W times faster. AV-CIL's teacher cache is made the
  same way: each rank computes the teacher's outputs for its share of the step's rows.
* Rank 0 alone writes (``is_main``). A collective that fails (a rank died, or none answered
  within ``train.dist_timeout`` seconds) ends the run with one line naming the rank that stopped.
"""
from avcl.parallel.evaluation import eval_pass, eval_shares
from avcl.parallel.gradients import BUCKET, average_gradients
from avcl.parallel.group import (COLLECTIVE_WORDS, Dist, RankFailure, average, barrier, broadcast_flag, check_world,
                                 close, collective, current, failure_message, gather_objects, is_collective_error,
                                 is_main, launched, rank, setup, speaks, stopped_ranks, world)
from avcl.parallel.replicas import check_replicas, checksum
from avcl.parallel.rng import RankRandom, rank_random_state, seed_rank_random, set_rank_random_state, shared_random
from avcl.parallel.step import Step, all_rows, is_gathering, mean_rows, per_rank, shard_rows, slice_rows, step
from avcl.parallel.testing import test_stop


__all__ = ["all_rows", "average", "average_gradients", "barrier", "broadcast_flag", "BUCKET", "check_replicas",
           "check_world", "checksum", "close", "collective", "COLLECTIVE_WORDS", "current", "Dist", "eval_pass",
           "eval_shares", "failure_message", "gather_objects", "is_collective_error", "is_gathering", "is_main",
           "launched", "mean_rows", "per_rank", "rank", "rank_random_state", "RankFailure", "RankRandom",
           "seed_rank_random", "set_rank_random_state", "setup", "shard_rows", "shared_random",
           "slice_rows", "speaks", "Step", "step", "stopped_ranks", "test_stop", "world"]
