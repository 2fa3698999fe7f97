#!/usr/bin/env bash
# Issue 8's quantization rows on the lent GPU machine, in two groups that each fit one 10-minute call:
#   bash benchmarks/gpu_quant.sh A     # bf16 reference, bitsandbytes (int8, NF4, FP4, NF4+DQ), fp8 layerwise, torchao int8
#   bash benchmarks/gpu_quant.sh B     # bf16 reference, torchao fp8, GGUF Q8_0/Q4_0, quanto int8, SDNQ int8, quanto fp8
#   bash benchmarks/gpu_quant.sh N     # notebooks 05-07 in the colab-t4 envelope (python -m fluxnb.course --envelope)
# Each benchmark group starts with `quant-bf16`, whose output at fixed inputs is the reference the group's other rows
# are compared with (relative error), so every number of a group comes from one command on one machine.
# Installs the wheels carried in .whl/ (diffusers, bitsandbytes, ... plus torchao, optimum-quanto, gguf,
# torchmetrics, lightning-utilities, sdnq, ninja), builds random-dev with fluxnb's code, then runs
# `python -m benchmarks run` with 2 timed steps per size (after a 1-step warm-up) to stay within ~9 minutes.
# Results: $OUT/quant-<group>.json (+ .md) and $OUT/quant-<group>.log. Then, on the lead's machine:
#   python -m benchmarks merge benchmarks/results/h100.json quant-A.json quant-B.json --out benchmarks/results/h100.json
# which regenerates the tables (and fluxnb/results/quant-h100.md, which notebooks 05-07 print).
set -uo pipefail
group=${1:-A}
case "$group" in
  A) names="bf16,bnb-int8,bnb-nf4,bnb-fp4,bnb-nf4-dq,fp8-layerwise,torchao-int8wo" ;;
  B) names="bf16,torchao-fp8,gguf-q8_0,gguf-q4_0,quanto-int8,sdnq-int8,quanto-fp8" ;;  # quanto-fp8 last: it may JIT-compile a CUDA kernel
  N) names="" ;;
  *) echo "usage: bash benchmarks/gpu_quant.sh A|B|N" >&2; exit 2 ;;
esac
recipes=$(echo "$names" | sed 's/\([^,]*\)/quant-\1/g')
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FLUXNB_CACHE=/root/fluxnb-cache
python3 -m compileall -q -j 0 /tmp/site fluxnb benchmarks >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader
python3 -c "import fluxnb.quantization as q; print(q.backends_table())"
start=$(date +%s)
python3 -c "import fluxnb; print(fluxnb.build_random('dev'))" || exit 1
echo "random-dev built in $(( $(date +%s) - start )) s"
mkdir -p "$OUT"
if [[ "$group" == N ]]; then  # the notebooks, as a fresh Colab T4 VM would run them (fp16, 15 GiB VRAM, 12 GiB RAM)
  rm -rf /tmp/course-quant
  FLUXNB_CHECKPOINT=random-dev timeout -k 10 "${COURSE_TIMEOUT:-540}" python3 -m fluxnb.course /tmp/course-quant \
    notebooks/05_bitsandbytes_options.ipynb notebooks/06_quantization_backends.ipynb notebooks/07_spot_the_quantized.ipynb \
    --envelope "${ENVELOPE:-colab-t4}" --timeout 400 2>&1 | grep -v "Kernel is running over TCP" | tee "$OUT/course-quant.log"
  code=${PIPESTATUS[0]}
  cp /tmp/course-quant/course-results.json "$OUT/course-quant.json" 2>/dev/null
  cp /tmp/course-quant/0[5-7]_*.ipynb "$OUT/" 2>/dev/null  # executed notebooks: their tables are the evidence
  exit $code
fi
timeout -k 10 "${QUANT_TIMEOUT:-480}" python3 -m benchmarks run --recipes "$recipes" --steps "${STEPS:-2}" \
  --timeout 200 --sample-interval 0.05 --results "$OUT/quant-$group.json" --no-docs 2>&1 \
  | grep -v "Kernel is running over TCP" | tee "$OUT/quant-$group.log"
code=${PIPESTATUS[0]}
echo "group $group finished in $(( $(date +%s) - start )) s (exit $code)"
exit $code
