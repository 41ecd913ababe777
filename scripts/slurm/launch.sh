#!/usr/bin/env bash
# Submit a recipe's stages as a chain of SLURM jobs: each job starts when the previous one succeeded
# (--dependency=afterok), and runs the same `longrope <stage>` command that `longrope run --dry-run` prints.
# search / readjust -> search.sbatch (torchrun, distributed evaluator); finetune -> finetune.sbatch
# (multi-node torchrun, FSDP2); eval / export -> eval.sbatch (one GPU). Complete stages are skipped, and
# a stage folder left incomplete is resumed, so rerunning this after a failure continues the pipeline.
#
#   $ scripts/slurm/launch.sh --dry-run recipes/llama2-7b-2m.yaml          # print the sbatch commands only
#   $ scripts/slurm/launch.sh --nodes 2 recipes/llama2-7b-2m.yaml model.name=/models/Llama-2-7b-hf
#   $ scripts/slurm/launch.sh --sbatch "--account=myproj --partition=gpu" recipes/mistral-7b-2m.yaml
#
# Options: --nodes N (fine-tuning nodes, default 2), --gpus-per-node G (default 8), --sbatch "ARGS" (added
# to every sbatch), --dry-run. Environment: LONGROPE (the CLI, default `longrope`), SBATCH (default `sbatch`).
# Needs bash >= 4.4 and a python3 on PATH (its shlex splits the printed commands).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DRY=0; NODES=2; GPUS=8; EXTRA_SBATCH=""; ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --nodes) NODES=$2; shift ;;
    --gpus-per-node) GPUS=$2; shift ;;
    --sbatch) EXTRA_SBATCH=$2; shift ;;
    -h|--help) sed -n '2,/^[^#]/{/^#/p}' "$0"; exit 0 ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done
if [ ${#ARGS[@]} -eq 0 ]; then echo "usage: $0 [--dry-run] [--nodes N] [--gpus-per-node G] RECIPE.yaml [KEY=VALUE]..." >&2; exit 2; fi
read -r -a LONGROPE_CMD <<< "${LONGROPE:-longrope}"
read -r -a SBATCH_CMD <<< "${SBATCH:-sbatch}"
read -r -a EXTRA <<< "$EXTRA_SBATCH"
PLAN=$("${LONGROPE_CMD[@]}" run "${ARGS[@]}" --dry-run)
# The dry run prints shell-quoted commands (Python's shlex.join); split them back with shlex, never `eval`,
# so a path holding $(...), backticks, ; or quotes is passed on literally, never run.
split_words() {  # one NUL-terminated word each, for mapfile -d ''
  python3 -c '
import shlex, sys
try:
    words = shlex.split(sys.argv[1])
except ValueError as err:
    sys.exit(f"{err}")
sys.stdout.write("".join(word + "\0" for word in words))' "$1"
}
previous=""; index=0
while IFS= read -r line; do
  case "$line" in "#"*|"") continue ;; esac
  words=()
  mapfile -d '' -t words < <(split_words "$line")
  if ! wait $! || [ ${#words[@]} -lt 2 ]; then echo "cannot parse the stage command: $line" >&2; exit 2; fi
  stage=${words[1]}; index=$((index + 1))
  case "$stage" in
    search|readjust) script=search.sbatch; opts=(--nodes 1 "--gpus-per-node=$GPUS" "--export=ALL,LONGROPE_STAGE=$stage,GPUS_PER_NODE=$GPUS") ;;
    finetune) script=finetune.sbatch; opts=(--nodes "$NODES" "--gpus-per-node=$GPUS" "--export=ALL,GPUS_PER_NODE=$GPUS") ;;
    eval|export) script=eval.sbatch; opts=("--export=ALL,LONGROPE_STAGE=$stage") ;;
    *) echo "unknown stage command $stage in: $line" >&2; exit 2 ;;
  esac
  dependency=()
  if [ -n "$previous" ]; then dependency=("--dependency=afterok:$previous"); fi
  submit=("${SBATCH_CMD[@]}" --parsable ${EXTRA[@]+"${EXTRA[@]}"} ${dependency[@]+"${dependency[@]}"} "${opts[@]}"
          "$HERE/$script" "${words[@]:2}")
  if [ "$DRY" = 1 ]; then
    printf '%q ' "${submit[@]}"; echo
    previous="\$JOB_$index"
  else
    previous=$("${submit[@]}")
    echo "submitted $stage as job $previous: ${words[*]}"
  fi
done <<< "$PLAN"
if [ "$index" -eq 0 ]; then echo "every stage is complete; nothing to submit"; fi
