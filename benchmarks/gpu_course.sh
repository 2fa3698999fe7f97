#!/usr/bin/env bash
# The course in a small machine's envelope, on the lent GPU machine (what issue 7's results came from):
#   bash benchmarks/gpu_course.sh colab-t4 8gb-card      # FIT=1 also runs `python -m fluxnb.fit`
#   NOTEBOOKS="notebooks/08_offloading.ipynb" bash benchmarks/gpu_course.sh colab-t4   # some notebooks only
# Installs the wheels carried in .whl/ (../shared/device/wheels.sh makes them), builds the random-dev
# stand-in with fluxnb's own code, then runs `python -m fluxnb.course --envelope` for each name.
# Results (course-results.json, log, any failed notebook) go to $OUT/<envelope>/.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FLUXNB_CACHE=/root/fluxnb-cache
python3 -m compileall -q -j 0 /tmp/site fluxnb >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
df -h / | tail -1
start=$(date +%s)
python3 -c "import fluxnb; print(fluxnb.build_random('dev'))" || exit 1
echo "random-dev built in $(( $(date +%s) - start )) s"
code=0
for envelope in "$@"; do
  rm -rf /tmp/course-* "$FLUXNB_CACHE"/*-nf4-*  # each envelope starts as a fresh VM would: no earlier outputs or exports
  mkdir -p "$OUT/$envelope"
  FLUXNB_CHECKPOINT=random-dev timeout -k 10 "${COURSE_TIMEOUT:-560}" python3 -m fluxnb.course "/tmp/course-$envelope" ${NOTEBOOKS:-} \
    --envelope "$envelope" --timeout 400 2>&1 | grep -v "Kernel is running over TCP" | tee "$OUT/$envelope/log.txt"
  code=$(( code | ${PIPESTATUS[0]} ))
  cp "/tmp/course-$envelope/course-results.json" "$OUT/$envelope/" 2>/dev/null
  python3 - "$envelope" <<'PY'
import json, shutil, sys, os
env = sys.argv[1]; res = json.load(open(f"/tmp/course-{env}/course-results.json"))
keep = os.environ.get("KEEP", "").split(",")  # executed notebooks to bring back even when they passed
for r in res["notebooks"]:
    if not r["passed"] or r["notebook"] in keep:
        shutil.copy(r["executed"], os.path.join(os.environ["OUT"], env))
PY
done
if [[ "${FIT:-0}" == 1 ]]; then
  timeout -k 10 300 python3 -m fluxnb.fit --checkpoint random-dev --json "$OUT/fit.json" 2>&1 | grep -v "%|" | tee "$OUT/fit.txt"
  code=$(( code | ${PIPESTATUS[0]} ))
fi
exit $code
