#!/usr/bin/env bash
# Notebook 09's evidence on one GPU (device kind nvidia-h100-x1), each part well under 9 minutes:
#   bash benchmarks/gpu_faster.sh rows       # step-caching rows, 28 steps at 1024x1024 -> $OUT/faster.json
#   bash benchmarks/gpu_faster.sh notebook   # notebooks 09 and 10 inside the colab-t4 envelope -> $OUT/colab-t4/
#                                            # (10's two-GPU cells skip there, as on Colab; its section 1 runs)
#   bash benchmarks/gpu_faster.sh rows notebook   # both, if the machine is warm (random-dev already built)
# The compile rows (staged-nf4-compile, staged-nf4-compile-full) are committed already in results/h100.json.
# Installs the wheels carried in .whl/ (as gpu_course.sh), builds random-dev with fluxnb's own code first.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FLUXNB_CACHE=/root/fluxnb-cache
python3 -m compileall -q -j 0 /tmp/site fluxnb >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
start=$(date +%s)
python3 -c "import fluxnb; print(fluxnb.build_random('dev'))" || exit 1
echo "random-dev ready in $(( $(date +%s) - start )) s"
CACHES=staged-nf4-steps,staged-nf4-cache-first-block,staged-nf4-cache-magcache,staged-nf4-cache-taylorseer,staged-nf4-cache-pab,staged-nf4-cache-fastercache
code=0
for part in "$@"; do
  case "$part" in
    rows)  # six processes of ~50 s: load, encode, 1 warm-up step, 28 timed steps, decode
      timeout -k 10 "${ROWS_TIMEOUT:-420}" python3 -m benchmarks run --recipes "$CACHES" --sizes 1024x1024 --steps 28 \
        --results "$OUT/faster.json" --no-docs --timeout 110 2>&1 | grep -v "%|" | tail -60 | tee "$OUT/faster-log.txt"
      code=$(( code | ${PIPESTATUS[0]} ));;
    notebook)  # regional + dynamic + whole-model compile (117 s on an H100 before) and the caches, in fp16 at 14.74 GiB
      rm -rf /tmp/course-09 "$FLUXNB_CACHE"/*-nf4-*
      mkdir -p "$OUT/colab-t4"
      FLUXNB_CHECKPOINT=random-dev timeout -k 10 "${COURSE_TIMEOUT:-520}" python3 -m fluxnb.course /tmp/course-09 \
        notebooks/09_faster.ipynb notebooks/10_multi_gpu.ipynb --envelope colab-t4 --timeout 400 2>&1 \
        | grep -v "Kernel is running over TCP" | tee "$OUT/colab-t4/log.txt"
      code=$(( code | ${PIPESTATUS[0]} ))
      cp /tmp/course-09/course-results.json "$OUT/colab-t4/" 2>/dev/null
      cp /tmp/course-09/09_faster.ipynb /tmp/course-09/10_multi_gpu.ipynb "$OUT/colab-t4/" 2>/dev/null;;  # executed: outputs = measurements
    *) echo "unknown part '$part': use rows and/or notebook" >&2; exit 2;;
  esac
done
exit $code
