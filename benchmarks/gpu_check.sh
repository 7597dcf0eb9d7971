#!/usr/bin/env bash
# GPU checks of issue 10 (run on a CUDA machine with the project installed: `pip install -e ".[dev]"`):
#   1. the CUDA tests, 2. renderer backends on CUDA (sets the `auto` choice), 3. train step and estimation
#   benchmarks on CUDA, 4. a short scale run on the GPU, 5. 2-GPU DDP with torchrun when two GPUs are present.
# Everything it prints also goes to $OUT (default data/09_benchmarks/gpu). Usage: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-data/09_benchmarks/gpu}
mkdir -p "$OUT"
export DO_NOT_TRACK=1 OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1 TQDM_DISABLE=1
PY=${PYTHON:-python}
step() { echo; echo "=== $1"; }

step "device"
$PY -c "import torch, sys; ok = torch.cuda.is_available(); print('cuda', ok, torch.version.cuda, [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]); sys.exit(0 if ok else 2)" \
  || { echo "no CUDA device: nothing to check"; exit 2; }
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")

step "CUDA tests"
FACEDETAIL_DEVICE=cuda $PY -m pytest -q -k "cuda or ddp or torchrun" tests 2>&1 | tee "$OUT/cuda_tests.log"

step "renderer backends (fast vs pytorch3d) on CUDA"
$PY benchmarks/render.py --device cuda 2>&1 | tee "$OUT/render.log"

step "train step on CUDA (default and full-size settings)"
$PY benchmarks/train_step.py --device cuda --full-batch-size 16 2>&1 | tee "$OUT/train_step.log"

step "estimation stages on CUDA"
$PY benchmarks/estimation.py --device cuda --max-faces 64 2>&1 | tee "$OUT/estimation.log"

step "scale: preprocessing + 200 training steps on the GPU"
FACEDETAIL_DEVICE=cuda $PY benchmarks/scale.py --sizes 250 1000 --train-steps 200 --work "$OUT/scale" 2>&1 | tee "$OUT/scale.log"

if [ "$GPUS" -ge 2 ]; then
  step "2-GPU DDP (NCCL) with torchrun on the scale run's shards"
  (cd "$OUT/scale/project_1000" && FACEDETAIL_RAW_FACES="$OLDPWD/$OUT/scale/photos/n1000" \
     torchrun --nproc_per_node=2 -m facedetail.pipelines.train.torchrun -- --conf-source "$OLDPWD/conf" --params train.steps=200) \
     2>&1 | tee "$OUT/ddp.log"
else
  echo "one GPU: the 2-GPU DDP check is skipped"
fi
echo; echo "logs in $OUT"
