#!/usr/bin/env bash
# Issue 9's evidence, on the lent GPU machine, in one command:
#   bash benchmarks/gpu_offload.sh        # needs the wheels in .whl/ (diffusers, bitsandbytes, ...)
# Builds random-dev and its NF4 package (fluxnb's own code), encodes the prompt once with the NF4 T5,
# then measures every offloading recipe in its own process (python -m benchmarks run): resident NF4
# (the reference, whose latents the others are compared with), streamed NF4 (all blocks; as many
# resident as fit 7.6 GiB), the course's model offload, diffusers' group offload (bf16 and NF4, block
# and leaf level), and VAE tiling. Results: $OUT/offload-*.json and $OUT/offload-log.txt.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FLUXNB_CACHE=/root/fluxnb-cache
python3 -m compileall -q -j 0 /tmp/site fluxnb benchmarks >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
log=$OUT/offload-log.txt
start=$(date +%s)
python3 - <<'PY' 2>&1 | grep -v "%|" | tee -a "$log" || exit 1
import time, torch, fluxnb
t = time.time(); ck = str(fluxnb.build_random("dev")); print(f"random-dev built in {time.time() - t:.0f} s", flush=True)
t = time.time(); pq = fluxnb.prequantized_checkpoint("black-forest-labs/FLUX.1-dev", torch.bfloat16, choice="random-dev")
print(f"NF4 package exported in {time.time() - t:.0f} s: {pq}", flush=True)
path = fluxnb.encode_and_save(ck, "A cat holding a sign that says hello world", torch.bfloat16, "/root/bench-embeds", prequantized=pq)
print("EMBEDDINGS", path, flush=True)
PY
export FLUXNB_BENCH_EMBEDDINGS=$(ls /root/bench-embeds/*.safetensors | head -1) FLUXNB_BENCH_REFERENCE=/root/bench-ref
echo "setup took $(( $(date +%s) - start )) s" | tee -a "$log"
code=0
run() { timeout -k 10 "$1" python3 -m benchmarks run --no-docs --timeout "$2" "${@:3}" 2>&1 | grep -v "%|" | tee -a "$log"; code=$(( code | PIPESTATUS[0] )); }
run 170 80 --recipes nf4-resident,nf4-streamed,nf4-streamed-8gb --steps 4 --results "$OUT/offload-a.json"
run 60 50 --recipes vae-tiling --sizes 2048x2048,1024x1024 --results "$OUT/offload-c.json"
run 250 100 --recipes nf4-group-offload-block,nf4-group-offload-block-cpu,nf4-group-offload-leaf,nf4-model-offload-transformer,bf16-group-offload-block --sizes 1024x1024 --steps 3 --results "$OUT/offload-b.json"
echo "all took $(( $(date +%s) - start )) s" | tee -a "$log"
exit $code
