#!/usr/bin/env bash
# The Studio (notebook 11, and 03 with its Studio cell) inside the colab-t4 envelope, on the lent GPU machine:
#   bash benchmarks/gpu_studio.sh            # or: bash benchmarks/gpu_studio.sh 8gb-card
# Installs the wheels carried in .whl/ (as gpu_course.sh), builds random-dev with fluxnb's own code, runs
# `python -m fluxnb.course --envelope` on 03 and 11 in fresh kernels. Results go to $OUT/<envelope>/:
# course-results.json, log.txt, and the executed 11_studio.ipynb (its decision, generation and stop cells).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FLUXNB_CACHE=/root/fluxnb-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
start=$(date +%s)
python3 -c "import fluxnb; print(fluxnb.build_random('dev'))" || exit 1
echo "random-dev built in $(( $(date +%s) - start )) s"
code=0
for envelope in "${@:-colab-t4}"; do
  rm -rf /tmp/studio-* "$FLUXNB_CACHE"/*-nf4-*  # a fresh VM: no earlier outputs or exports
  mkdir -p "$OUT/$envelope"
  FLUXNB_CHECKPOINT=random-dev timeout -k 10 "${STUDIO_TIMEOUT:-480}" python3 -m fluxnb.course "/tmp/studio-$envelope" \
    notebooks/03_generate.ipynb notebooks/11_studio.ipynb --envelope "$envelope" --timeout 400 2>&1 \
    | grep -v "Kernel is running over TCP" | tee "$OUT/$envelope/log.txt"
  code=$(( code | ${PIPESTATUS[0]} ))
  cp "/tmp/studio-$envelope/course-results.json" "/tmp/studio-$envelope/11_studio.ipynb" "$OUT/$envelope/" 2>/dev/null
done
exit $code
