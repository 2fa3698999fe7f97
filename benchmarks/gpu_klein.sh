#!/usr/bin/env bash
# FLUX.2 [klein] 4B's evidence (notebook 12) on one GPU, with the random-klein stand-in (its real shapes,
# random weights: memory and speed, not image quality), well under 9 minutes:
#   bash benchmarks/gpu_klein.sh rows     # the five klein-* rows, 4 steps at 1024x1024 and 512x768 -> $OUT/klein.json
#   bash benchmarks/gpu_klein.sh fit      # python -m fluxnb.fit --model klein (the T4 path) -> $OUT/fit-klein.json
#   bash benchmarks/gpu_klein.sh rows fit
# Merge klein.json into results/<gpu>.json (python -m benchmarks merge) and run `python -m benchmarks report`:
# the rows get their own table in docs/results.md, and fluxnb/results/recipes.json gives the planner its
# klein times (fluxnb.planner.eta(..., model="klein")).
# Installs the wheels carried in .whl/ (as gpu_course.sh), builds random-klein with fluxnb's own code first.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FLUXNB_CACHE=/root/fluxnb-cache
python3 -m compileall -q -j 0 /tmp/site fluxnb >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
start=$(date +%s)
python3 -c "import fluxnb; print(fluxnb.build_random('klein'))" || exit 1
echo "random-klein ready in $(( $(date +%s) - start )) s"
KLEIN=klein-fp16-encoder4bit,klein-fp16,klein-bf16,klein-nf4,klein-nf4-encoder4bit  # the T4 path first
code=0
for part in "$@"; do
  case "$part" in
    rows)  # five processes: load Qwen3, encode, free, load the transformer, 1 warm-up + 4 timed steps per size, decode
      timeout -k 10 "${ROWS_TIMEOUT:-420}" python3 -m benchmarks run --checkpoint random-klein --recipes "$KLEIN" \
        --steps 4 --results "$OUT/klein.json" --no-docs --timeout 150 2>&1 | grep -v "%|" | tail -60 | tee "$OUT/klein-log.txt"
      code=$(( code | ${PIPESTATUS[0]} ));;
    fit)
      timeout -k 10 "${FIT_TIMEOUT:-240}" python3 -m fluxnb.fit --model klein --checkpoint random-klein \
        --json "$OUT/fit-klein.json" 2>&1 | grep -v "%|" | tee "$OUT/fit-klein-log.txt"
      code=$(( code | ${PIPESTATUS[0]} ));;
    *) echo "unknown part '$part': use rows and/or fit" >&2; exit 2;;
  esac
done
exit $code
