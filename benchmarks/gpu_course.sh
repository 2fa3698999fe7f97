#!/usr/bin/env bash
# The course in a small machine's envelope, on the lent GPU machine (what issue 7's results came from):
#   bash benchmarks/gpu_course.sh colab-t4 8gb-card      # FIT=1 also runs `python -m fluxnb.fit`
#   NOTEBOOKS="notebooks/08_offloading.ipynb" bash benchmarks/gpu_course.sh colab-t4   # some notebooks only
#   TAG=part2 KEEP_EXPORTS=1 DEADLINE=570 NOTEBOOKS="..." bash benchmarks/gpu_course.sh 8gb-card  # a later part
# Installs the wheels carried in .whl/ (../shared/device/wheels.sh makes them), builds the random-dev
# stand-in with fluxnb's own code (reused when the machine still has it), then runs `python -m
# fluxnb.course --envelope` for each name. Results (course-results.json, log, any failed notebook, and
# the executed notebooks named in KEEP) go to $OUT/<envelope>[-TAG]/. KEEP_EXPORTS=1 keeps the NF4
# packages exported by an earlier part (each notebook's outputs still start empty, as on a fresh VM).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FLUXNB_CACHE=/root/fluxnb-cache
python3 -m compileall -q -j 0 /tmp/site fluxnb >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
df -h / | tail -1
start=$(date +%s)
python3 -c "import fluxnb; print(fluxnb.build_random('dev'))" || exit 1
echo "random-dev built (or found) in $(( $(date +%s) - start )) s; its weight files:"
find "$FLUXNB_CACHE/random-flux.1-dev" -name '*.safetensors' -printf '%s %P\n' | sort -k2
code=0
for envelope in "$@"; do
  rm -rf /tmp/course-*  # each envelope starts as a fresh VM would: no earlier outputs
  [[ "${KEEP_EXPORTS:-0}" == 1 ]] || rm -rf "$FLUXNB_CACHE"/*-nf4-*  # ... and no earlier exports
  name="$envelope${TAG:+-$TAG}"
  mkdir -p "$OUT/$name"
  limit=${COURSE_TIMEOUT:-560}
  [[ -n "${DEADLINE:-}" ]] && limit=$(( DEADLINE - SECONDS - 20 ))  # DEADLINE: seconds this script may run in all
  FLUXNB_CHECKPOINT=random-dev timeout -k 10 "$limit" python3 -m fluxnb.course "/tmp/course-$envelope" ${NOTEBOOKS:-} \
    --envelope "$envelope" --timeout 400 2>&1 | grep -v "Kernel is running over TCP\|MissingIDFieldWarning\|_validate(nbdict" | tee "$OUT/$name/log.txt"
  code=$(( code | ${PIPESTATUS[0]} ))
  cp "/tmp/course-$envelope/course-results.json" "$OUT/$name/" 2>/dev/null
  python3 - "$envelope" "$name" <<'PY'
import json, shutil, sys, os
env, name = sys.argv[1:]; res = json.load(open(f"/tmp/course-{env}/course-results.json"))
keep = os.environ.get("KEEP", "").split(",")  # executed notebooks to bring back even when they passed
etas = []  # every "... on a free Colab T4" estimate each notebook printed: the closing note adds them up
for r in res["notebooks"]:
    if not r["passed"] or r["notebook"] in keep:
        shutil.copy(r["executed"], os.path.join(os.environ["OUT"], name))
    if os.path.isfile(r["executed"]):
        for cell in json.load(open(r["executed"]))["cells"]:
            for out in cell.get("outputs", []):
                text = "".join(out.get("text", "")) if out.get("output_type") == "stream" else ""
                etas += [f'{r["notebook"]}\t{line}' for line in text.splitlines() if "on a free Colab T4" in line]
open(os.path.join(os.environ["OUT"], name, "etas.txt"), "w").write("\n".join(etas) + "\n")
PY
  df -h / | tail -1
done
if [[ "${FIT:-0}" == 1 ]]; then
  timeout -k 10 300 python3 -m fluxnb.fit --checkpoint random-dev --json "$OUT/fit.json" 2>&1 | grep -v "%|" | tee "$OUT/fit.txt"
  code=$(( code | ${PIPESTATUS[0]} ))
fi
exit $code
