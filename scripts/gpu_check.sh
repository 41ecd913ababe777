#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go (CI has none): the gpu-marked tests, the whole test suite with
# CUDA visible, the tiny recipe end to end on the GPU, and the 7B-shaped fine-tuning memory benchmark.
# Run it in a checkout where torch (CUDA build) and longrope are installed (`make install TORCH_SPEC=`).
#
#   $ scripts/gpu_check.sh                 # logs and results in runs/gpu-check/
#   $ scripts/gpu_check.sh /tmp/gpu-check  # elsewhere
#
# Exit status: non-zero when any part failed; each part's log says which.
set -uo pipefail
OUT_DIR=${1:-runs/gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export OMP_WAIT_POLICY=PASSIVE TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
status=0
part() {  # part NAME COMMAND...: run, log to OUT_DIR/NAME.log, report the time and exit status
  local name=$1; shift
  local start=$SECONDS
  "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - start)) s ($OUT_DIR/$name.log)"
  [ $rc -eq 0 ] || status=1
  return $rc
}

{ nvidia-smi -L; $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'cuda', torch.cuda.is_available())"; } > "$OUT_DIR/env.log" 2>&1
cat "$OUT_DIR/env.log"

# The whole suite runs on the CPU cores beside the GPU parts (it needs little of the GPU).
part suite $PY -m pytest -m "" -q -p no:cacheprovider &
suite=$!
part gpu-tests $PY -m pytest -m gpu -q -p no:cacheprovider
part tiny-recipe $PY -m longrope_cli run recipes/tiny.yaml model.device=cuda --out "$OUT_DIR/tiny"
part bench-memory $PY scripts/bench_finetune_memory.py --json "$OUT_DIR/bench_finetune_memory.json"
wait $suite || status=1
tail -n 3 "$OUT_DIR/suite.log"
exit $status
