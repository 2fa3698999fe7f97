#!/usr/bin/env bash
# FLUX.2 [klein] 4B's evidence (notebook 12) on one GPU, with the random-klein stand-in (its real shapes,
# random weights: memory and speed, not image quality), well under 9 minutes:
#   bash benchmarks/gpu_klein.sh rows     # the five klein-* rows, 4 steps at 1024x1024 and 512x768 -> $OUT/klein.json
#   bash benchmarks/gpu_klein.sh fit      # python -m fluxnb.fit --model klein (the T4 path) -> $OUT/fit-klein.json
#   bash benchmarks/gpu_klein.sh rows fit
#   bash benchmarks/gpu_klein.sh course-colab-t4 rows course-8gb-card fit   # notebook 12 in both envelopes too
# DEADLINE=N: seconds the whole script may run; each part's timeout is cut to what is left.
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
left() {  # seconds for the next part: its default, or less where DEADLINE leaves less
  local t=$1; [[ -n "${DEADLINE:-}" ]] && (( DEADLINE - SECONDS - 15 < t )) && t=$(( DEADLINE - SECONDS - 15 ))
  (( t < 10 )) && t=10; echo "$t"
}
for part in "$@"; do
  case "$part" in
    course-*)  # notebook 12 inside an envelope, as gpu_course.sh runs the others (random-dev -> random-klein)
      env=${part#course-}; mkdir -p "$OUT/$env-12"
      FLUXNB_CHECKPOINT=random-dev timeout -k 10 "$(left "${COURSE_TIMEOUT:-240}")" python3 -m fluxnb.course \
        "/tmp/course12-$env" notebooks/12_flux2_klein.ipynb --envelope "$env" --timeout 200 2>&1 \
        | grep -v "Kernel is running over TCP\|MissingIDFieldWarning\|_validate(nbdict" | tee "/tmp/course12-$env.log"
      code=$(( code | ${PIPESTATUS[0]} ))
      cp "/tmp/course12-$env/course-results.json" "$OUT/$env-12/" 2>/dev/null
      [[ "$env" == colab-t4 ]] && cp "/tmp/course12-$env.log" "$OUT/$env-12/log.txt" && python3 -c "import json, shutil, sys
r = json.load(open(sys.argv[1]))['notebooks'][0]; shutil.copy(r['executed'], sys.argv[2])" \
        "/tmp/course12-$env/course-results.json" "$OUT/$env-12/";;
    rows)  # five processes: load Qwen3, encode, free, load the transformer, 1 warm-up + 4 timed steps per size, decode
      timeout -k 10 "$(left "${ROWS_TIMEOUT:-420}")" python3 -m benchmarks run --checkpoint random-klein --recipes "$KLEIN" \
        --steps 4 --results "$OUT/klein.json" --no-docs --timeout 150 2>&1 | grep -v "%|" | tail -60 | tee "$OUT/klein-log.txt"
      code=$(( code | ${PIPESTATUS[0]} ));;
    fit)
      timeout -k 10 "$(left "${FIT_TIMEOUT:-240}")" python3 -m fluxnb.fit --model klein --checkpoint random-klein \
        --json "$OUT/fit-klein.json" 2>&1 | grep -v "%|" | tail -40
      code=$(( code | ${PIPESTATUS[0]} ));;
    *) echo "unknown part '$part': use course-<envelope>, rows and/or fit" >&2; exit 2;;
  esac
done
exit $code
