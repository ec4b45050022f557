#!/usr/bin/env bash
# The GPU checks of docs/scaling.md, in one command on a machine with CUDA (run from the repository root):
# the suite's GPU-marked tests, the three step benchmarks at the papers' sizes, and the default benchmark
# and the pre-training recipe with train.device=cuda (bf16 autocast). Logs go to $LOGS (default ./gpu-logs),
# run directories to $RUNS (default $LOGS).
#   AVCL_DATA_DIR=../shared/data bash benchmarks/gpu_checks.sh
#   ONLY="avdigits gpu_tests" bash benchmarks/gpu_checks.sh     # some checks only
# avcil_step runs at avcil/ave's geometry: VideoMAE 8 x 196 x 768 tokens, batch 256 + 128 replayed, bf16
set -u
LOGS=${LOGS:-gpu-logs}
RUNS=${RUNS:-$LOGS}
PY=${PYTHON:-python3}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 MPLBACKEND=${MPLBACKEND:-Agg}
step() {  # step NAME SECONDS COMMAND...: one check, its log, its exit status; a failure does not stop the rest
    local name=$1 seconds=$2; shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    echo "== $name: $*"
    local started=$SECONDS
    timeout "$seconds" "$@" > "$LOGS/$name.log" 2>&1
    local status=$?
    tail -n 4 "$LOGS/$name.log"
    echo "== $name: exit $status, $((SECONDS - started)) s"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
step gpu_tests 300 $PY -m pytest -m gpu tests/test_gpu.py -q -rs -s -p no:cacheprovider
step pretrain_step 150 $PY benchmarks/pretrain_step.py --device cuda --size base --geometry cav --batch 12 --steps 5
step xkd_step 150 $PY benchmarks/xkd_step.py --device cuda --recipe xkd/kinetics --geometry kinetics --batch 32 --steps 5
step avcil_step 420 $PY benchmarks/avcil_step.py --device cuda --grid 8 196 --dim 768 --batch 256 --replay-batch 128 --videos 1536 --classes 6
step avdigits 300 $PY -m avcl run avdigits train.device=cuda --out "$RUNS/run-avdigits"
step pretrain_avdigits 400 $PY -m avcl run pretrain/avdigits train.device=cuda --out "$RUNS/run-pretrain"
