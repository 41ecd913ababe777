#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go (CI has none): the gpu-marked tests, the whole test suite with
# CUDA visible (the gpu tests include context-parallel scoring over 2 GPUs with NCCL, skipped on one GPU), the
# tiny recipe end to end on the GPU, the 7B-shaped fine-tuning memory benchmark, and the layer-by-layer scoring
# of 7B-shaped layers at 256k, 1M and 2048k (about 10 minutes on one H100-class GPU).
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
# One 2048k candidate on one GPU: peak and time of 2 and 4 LLaMA2-7B-shaped layers (x 16 or x 8 for 32 layers'
# time; the peak does not grow with layers: one layer at a time, the residual stream is what stays).
part bench-scoring-7b-2 $PY scripts/bench_eval_memory.py --model llama2-7b-layer --layers 2 --device cuda \
  --dtype bfloat16 --lengths 256k,1m,2m --paths layerwise --no-timing --json "$OUT_DIR/bench_scoring_7b_2.json"
part bench-scoring-7b-4 $PY scripts/bench_eval_memory.py --model llama2-7b-layer --layers 4 --device cuda \
  --dtype bfloat16 --lengths 256k,1m --paths layerwise --no-timing --json "$OUT_DIR/bench_scoring_7b_4.json"
wait $suite || status=1
tail -n 3 "$OUT_DIR/suite.log"
exit $status
