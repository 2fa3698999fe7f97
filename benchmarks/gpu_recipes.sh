#!/usr/bin/env bash
# Every copy-paste recipe (recipes/*.py) once on the lent GPU machine, with the random-dev stand-in
# (FLUX.1-dev's shapes, random weights: the images are noise; this shows each recipe runs and what it
# holds, not image quality):
#   bash benchmarks/gpu_recipes.sh            # about 6-8 minutes on an H100; two_gpus needs 2 GPUs, else it records its skip
# Installs the wheels carried in .whl/ (as gpu_course.sh), builds random-dev with fluxnb's code, runs each
# recipe with a timeout, and provokes one real CUDA out-of-memory error inside fluxnb.oom_advice.
# Results in $OUT: recipes.jsonl (one line per recipe: its result line, or its exit code and last error),
# log.txt (everything), oom.txt (the out-of-memory message).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FLUXNB_CACHE=/root/fluxnb-cache
python3 -m compileall -q -j 0 /tmp/site fluxnb >/dev/null 2>&1
exec > >(grep --line-buffered -v "it/s\]\|s/it\]" | tee "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
start=$(date +%s)
python3 -c "import fluxnb; print(fluxnb.build_random('dev'))" || exit 1
echo "random-dev built in $(( $(date +%s) - start )) s"
# prequantized_from_hub reads an NF4 package: for random-dev, fluxnb exports one (bf16 on this GPU), here, untimed
python3 -c "import fluxnb, torch; print(fluxnb.prequantized_checkpoint('black-forest-labs/FLUX.1-dev', torch.bfloat16, choice='random-dev'))" || exit 1
echo "random-dev and its NF4 package ready after $(( $(date +%s) - start )) s"
: > "$OUT/recipes.jsonl"
code=0
# t4 first: its fp16 path is the one a free Colab user runs. 1024x1024 (the course's size), 4 steps.
for recipe in t4_staged_nf4_fp16 card_8gb_staged_nf4_bf16 prequantized_from_hub model_cpu_offload all_resident_bf16 two_gpus; do
  left=$(( 470 - ($(date +%s) - start) ))  # all of it within 9 minutes
  if (( left < 30 )); then
    echo "{\"recipe_script\": \"$recipe\", \"skipped\": \"out of time for this run\"}" >> "$OUT/recipes.jsonl"; code=1; continue
  fi
  size=1024; [[ $recipe == card_8gb_staged_nf4_bf16 ]] && size=768  # the 8 GB recipe's default size
  echo "=== $recipe (timeout $(( left < 150 ? left : 150 )) s)"
  t0=$(date +%s)
  timeout -k 5 $(( left < 150 ? left : 150 )) python3 "recipes/$recipe.py" --checkpoint random-dev --steps 4 \
    --height $size --width $size --seed 0 --out "/tmp/recipes/$recipe" > "/tmp/recipe-$recipe.out" 2>&1
  rc=$?
  cat "/tmp/recipe-$recipe.out"
  python3 - "$recipe" "$rc" "$(( $(date +%s) - t0 ))" <<'PY' >> "$OUT/recipes.jsonl"
import json, sys
recipe, rc, wall = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lines = open(f"/tmp/recipe-{recipe}.out").read().strip().splitlines() or [""]
row = {"recipe_script": recipe, "exit_code": rc, "wall_s": wall}
try:
    row.update(json.loads(lines[-1]))
except json.JSONDecodeError:
    row["last_lines"] = lines[-3:]
print(json.dumps(row))
PY
  if (( rc != 0 )) && ! { [[ $recipe == two_gpus ]] && (( $(nvidia-smi -L | wc -l) < 2 )); }; then code=1; fi
done
echo "=== a real CUDA out-of-memory error, answered by fluxnb.oom_advice"
timeout -k 5 60 python3 - <<'PY' 2>&1 | tee "$OUT/oom.txt"
import torch, fluxnb
free, total = torch.cuda.mem_get_info()
try:
    with fluxnb.oom_advice(1024, 1024, recipe="bf16-resident", vram_gib=14.74):  # as if on a T4
        hold = torch.empty(int(free * 0.9), dtype=torch.uint8, device="cuda")  # most of the GPU, then more
        more = torch.empty(int(free * 0.5), dtype=torch.uint8, device="cuda")
except fluxnb.NotEnoughVRAMError as error:
    print("NotEnoughVRAMError:", error)
    print("cause:", type(error.__cause__).__name__, str(error.__cause__).splitlines()[0])
else:
    raise SystemExit("no out-of-memory error was raised")
PY
code=$(( code | ${PIPESTATUS[0]} ))
echo "total $(( $(date +%s) - start )) s"
exit $code
