#!/usr/bin/env bash
# Notebook 10's evidence on two GPUs (device kind nvidia-h200-x2), all of it inside one call:
#   bash benchmarks/gpu_multi.sh all        # = recipe parallel split notebook, in that order
#   bash benchmarks/gpu_multi.sh recipe     # recipes/two_gpus.py, 4 steps at 1024x1024    -> $OUT/recipes.jsonl (one line)
#   bash benchmarks/gpu_multi.sh parallel   # cp-bf16-1gpu, cp-bf16-2gpu, two-pipelines-nf4 -> $OUT/multi-parallel.json
#   bash benchmarks/gpu_multi.sh split      # split-bf16-2gpu (16 GiB caps), split-fp16-kaggle -> $OUT/multi-split.json
#   bash benchmarks/gpu_multi.sh notebook   # notebook 10 run plainly (no envelope: it needs both GPUs) -> $OUT/nb10/ (2 files)
#   bash benchmarks/gpu_multi.sh cp2048     # context parallel on 1 and 2 GPUs at 2048x2048, 3 steps: does it scale with tokens? (log)
#   bash benchmarks/gpu_multi.sh quant06    # notebook 06 in the colab-t4 envelope on GPU 0 alone (issue 8) -> $OUT/q06/ (2 files)
# Parts run in the order given. Every part is bounded by `timeout` and by one budget for the whole script
# (BUDGET_S, default 520 s from the start, random-dev build included): a part that would start with too
# little time left is skipped and says so, so the call ends inside the device's limit with what it measured.
# At most 8 files come back. NVLink multicast stays off (the lent machines' rule); fluxnb.multigpu.launch sets
# the same for its torchrun children, and stops torchrun and its ranks on a timeout.
set -uo pipefail
start=$(date +%s)
exec > >(grep --line-buffered -v "%|\|Kernel is running over TCP\|MissingIDFieldWarning\|_validate(nbdict" | tee "$OUT/log.txt") 2>&1  # one log
budget=${BUDGET_S:-520}
left() { echo $(( budget - ($(date +%s) - start) )); }
bound() { local l; l=$(left); echo $(( l < $1 ? l : $1 )); }  # a part's timeout: its own cap or what is left
parts=("$@"); [[ ${#parts[@]} -eq 0 || ${parts[0]} == all ]] && parts=(recipe parallel split notebook)
for part in "${parts[@]}"; do
  case "$part" in recipe|parallel|split|notebook|quant06|cp2048) ;; *) echo "unknown part '$part': use all, recipe, parallel, split, notebook, quant06 and/or cp2048" >&2; exit 2;; esac
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FLUXNB_CACHE=/root/fluxnb-cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m compileall -q -j 0 /tmp/site fluxnb >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('GPUs:', torch.cuda.device_count())"
timeout -k 10 "$(bound 200)" python3 -c "import fluxnb; print(fluxnb.build_random('dev'))" || exit 1
echo "random-dev ready after $(( $(date +%s) - start )) s"
code=0
for part in "${parts[@]}"; do
  cap=$(case $part in recipe) echo 120;; parallel) echo 240;; split) echo 160;; notebook) echo 420;; quant06) echo 170;; cp2048) echo 200;; esac)
  t=$(bound "$cap")
  if (( t < 45 )); then
    echo "=== $part: SKIPPED, $(left) s of the ${budget} s budget left"; code=1
    [[ $part == recipe ]] && echo '{"recipe_script": "two_gpus", "skipped": "out of time for this run"}' >> "$OUT/recipes.jsonl"
    continue
  fi
  echo "=== $part (timeout $t s, $(( $(date +%s) - start )) s since the start)"
  t0=$(date +%s)
  case "$part" in
    recipe)
      timeout -k 5 "$t" python3 recipes/two_gpus.py --checkpoint random-dev --steps 4 --height 1024 --width 1024 \
        --seed 0 --out /tmp/recipes/two_gpus > /tmp/recipe-two_gpus.out 2>&1
      rc=$?
      grep -v "%|" /tmp/recipe-two_gpus.out | tail -40
      python3 - "$rc" "$(( $(date +%s) - t0 ))" <<'PY' >> "$OUT/recipes.jsonl"
import json, sys
rc, wall = int(sys.argv[1]), int(sys.argv[2])
lines = open("/tmp/recipe-two_gpus.out").read().strip().splitlines() or [""]
row = {"recipe_script": "two_gpus", "exit_code": rc, "wall_s": wall}
try:
    row.update(json.loads(lines[-1]))
except json.JSONDecodeError:
    row["last_lines"] = lines[-3:]
print(json.dumps(row))
PY
      code=$(( code | rc ));;
    split|parallel)
      recipes=$([[ $part == split ]] && echo split-bf16-2gpu,split-fp16-kaggle || echo cp-bf16-1gpu,cp-bf16-2gpu,two-pipelines-nf4)
      timeout -k 10 "$t" python3 -m benchmarks run --recipes "$recipes" --sizes 1024x1024 --steps 5 \
        --results "$OUT/multi-$part.json" --no-docs --timeout 150 2>&1 | tail -80
      code=$(( code | ${PIPESTATUS[0]} ));;
    notebook)
      rm -rf /tmp/course-10
      mkdir -p "$OUT/nb10"
      FLUXNB_CHECKPOINT=random-dev timeout -k 10 "$t" python3 -m fluxnb.course /tmp/course-10 \
        notebooks/10_multi_gpu.ipynb --timeout $(( t - 20 < 400 ? t - 20 : 400 ))
      code=$(( code | $? ))
      cp /tmp/course-10/course-results.json /tmp/course-10/10_multi_gpu.ipynb "$OUT/nb10/" 2>/dev/null;;
    cp2048)  # four times the tokens of 1024x1024: the same launches as the cp rows, printed to the log
      timeout -k 10 "$t" python3 - <<'PY'
import tempfile
import fluxnb
from fluxnb import multigpu
checkpoint = str(fluxnb.build_random("dev"))
for n in (1, 2):
    with tempfile.TemporaryDirectory() as tmp:
        out = multigpu.launch("cp", n, checkpoint, f"{tmp}/out.json", "bf16", "none", 2048, 2048, 3, 0, timeout_s=150)
    print(f"cp-bf16 2048x2048 on {n} GPU(s): {out['s_per_step']:.4f} s/step, step_s {out['ranks'][0]['step_s']}, "
          f"peaks {out['per_gpu_peaks_gib']} GiB, latents finite {out['latents_finite']}", flush=True)
PY
      code=$(( code | $? ));;
    quant06)  # issue 8's notebook 06 as a fresh Colab T4 VM runs it, on one GPU (the other is idle meanwhile)
      rm -rf /tmp/course-06
      mkdir -p "$OUT/q06"
      CUDA_VISIBLE_DEVICES=0 FLUXNB_CHECKPOINT=random-dev timeout -k 10 "$t" python3 -m fluxnb.course /tmp/course-06 \
        notebooks/06_quantization_backends.ipynb --envelope colab-t4 --timeout $(( t - 20 < 400 ? t - 20 : 400 ))
      code=$(( code | $? ))
      cp /tmp/course-06/course-results.json /tmp/course-06/06_quantization_backends.ipynb "$OUT/q06/" 2>/dev/null;;
  esac
  echo "=== $part done in $(( $(date +%s) - t0 )) s"
done
echo "all parts done after $(( $(date +%s) - start )) s, exit $code"; sleep 2  # let the log flush
exit $code
