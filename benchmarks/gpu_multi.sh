#!/usr/bin/env bash
# Notebook 10's evidence on two GPUs (device kind nvidia-h200-x2), each part well under 9 minutes:
#   bash benchmarks/gpu_multi.sh split      # split-bf16-2gpu (16 GiB caps), split-fp16-kaggle (14.74 GiB) -> $OUT/multi-split.json
#   bash benchmarks/gpu_multi.sh parallel   # cp-bf16-1gpu, cp-bf16-2gpu, two-pipelines-nf4             -> $OUT/multi-parallel.json
#   bash benchmarks/gpu_multi.sh notebook   # notebook 10 run plainly (no envelope: it needs both GPUs) -> $OUT/nb10/
# Installs the wheels carried in .whl/ (as gpu_course.sh), builds random-dev with fluxnb's own code first.
# NVLink multicast stays off (the lent machines' rule; fluxnb.multigpu.launch sets the same for torchrun).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FLUXNB_CACHE=/root/fluxnb-cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m compileall -q -j 0 /tmp/site fluxnb >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('GPUs:', torch.cuda.device_count())"
start=$(date +%s)
python3 -c "import fluxnb; print(fluxnb.build_random('dev'))" || exit 1
echo "random-dev ready in $(( $(date +%s) - start )) s"
code=0
for part in "$@"; do
  case "$part" in
    split|parallel)
      recipes=$([[ $part == split ]] && echo split-bf16-2gpu,split-fp16-kaggle || echo cp-bf16-1gpu,cp-bf16-2gpu,two-pipelines-nf4)
      timeout -k 10 "${ROWS_TIMEOUT:-440}" python3 -m benchmarks run --recipes "$recipes" --sizes 1024x1024 --steps 5 \
        --results "$OUT/multi-$part.json" --no-docs --timeout 200 2>&1 | grep -v "%|" | tail -80 | tee "$OUT/multi-$part-log.txt"
      code=$(( code | ${PIPESTATUS[0]} ));;
    notebook)
      rm -rf /tmp/course-10
      mkdir -p "$OUT/nb10"
      FLUXNB_CHECKPOINT=random-dev timeout -k 10 "${COURSE_TIMEOUT:-500}" python3 -m fluxnb.course /tmp/course-10 \
        --timeout 400 notebooks/10_multi_gpu.ipynb 2>&1 | grep -v "Kernel is running over TCP" | tee "$OUT/nb10/log.txt"
      code=$(( code | ${PIPESTATUS[0]} ))
      cp /tmp/course-10/course-results.json /tmp/course-10/10_multi_gpu.ipynb "$OUT/nb10/" 2>/dev/null;;
    *) echo "unknown part '$part': use split, parallel and/or notebook" >&2; exit 2;;
  esac
done
exit $code
