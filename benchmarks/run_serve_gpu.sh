#!/usr/bin/env bash
# Batching and serving on one H100 / H200, the single device command (carry .devcarry, made by devcarry.sh):
#
#     bash benchmarks/run_serve_gpu.sh          # TINY=1 DEVICE=cpu: the same steps with tiny weights (smoke test)
#
# CONC (default 1,4,16,64): the concurrencies bench_serve runs.
# 1. bench_batching.py (SKIP_BATCHING=1 leaves it out): N concurrent greedy answers through Batcher vs one at a time through model.stream, on
#    a random Vicuna-7B-shape model (bench_decode's), N = 1, 4, 16, 32;
# 2. make_paper_weights.py: Prov-GigaPath + a merged 7B in the official layouts, random, registered with
#    `wsi-llava models add` under a private WSI_LLAVA_HOME;
# 3. two 2,000-tissue-tile slides, and bench_serve.py against a real `wsi-llava serve` of that model:
#    1, 4, 16 and 64 concurrent SSE asks vs the same requests one at a time.
# SERVER_LOG_LEVEL=debug logs where each answer's time to first token goes (server.log).
# Writes under $OUT: batching_gpu.json, serve_gpu.json, summary.json (headline keys), server.log, run.log.
# File them here: copy the JSONs to benchmarks/results/ and merge summary.json's keys into results/summary.json.
set -o pipefail
: "${OUT:?set OUT to the folder for the results}"
t0=$SECONDS
TINY=${TINY:-}
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-/tmp/wsi_serve_gpu}
log() { echo "[+$((SECONDS - t0))s] $*" | tee -a "$OUT/run.log"; }
if ! . benchmarks/gpu_env.sh >"$OUT/env.log" 2>&1; then
    cat "$OUT/env.log"
    exit 1
fi
cat "$OUT/env.log"
[ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader
rm -rf "$WORK" && mkdir -p "$WORK/slides"
export WSI_LLAVA_HOME=$WORK/home WSI_LLAVA_CACHE=$WORK/cache

if [ -z "${SKIP_BATCHING:-}" ]; then
    log "bench_batching"
    bmodel=random-7b sizes=1,4,16,32
    [ -n "$TINY" ] && bmodel=random-tiny sizes=1,4
    timeout 240 python3 benchmarks/bench_batching.py --model "$bmodel" --device "$DEVICE" --sizes "$sizes" \
        --max-batch 32 --max-new-tokens 64 --out "$OUT/batching_gpu.json" 2>&1 | tee -a "$OUT/run.log"
    log "bench_batching rc $?"
fi

log "weights"
python3 benchmarks/make_paper_weights.py "$WORK/weights" ${TINY:+--tiny} --device "$DEVICE" \
    --parts gigapath,merged 2>&1 | tail -8 | tee -a "$OUT/run.log" || exit 1
wsi-llava models add paper7b --llava "$WORK/weights/wsi-llava-v1.5-7b" \
    --tile-encoder "$WORK/weights/prov-gigapath" 2>&1 | tee -a "$OUT/run.log" || exit 1
tiles=${TILES:-2000}
[ -n "$TINY" ] && tiles=48
python3 - "$WORK/slides" "$tiles" <<'PY' 2>&1 | tee -a "$OUT/run.log" || exit 1
import sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
from bench_paper_model_cli import write_slide

for i, name in enumerate(("a.tif", "b.tif")):
    print(write_slide(Path(sys.argv[1]) / name, int(sys.argv[2]), seed=i))
PY

log "bench_serve"
conc=${CONC:-1,4,16,64}
[ -n "$TINY" ] && conc=1,4
timeout $((${BUDGET_S:-560} - (SECONDS - t0))) python3 benchmarks/bench_serve.py --model paper7b \
    --device "$DEVICE" --slides-root "$WORK/slides" --concurrency "$conc" --max-batch 64 --max-new-tokens 64 \
    --cache "$WORK/cache" --server-log "$OUT/server.log" --out "$OUT/serve_gpu.json" \
    --summary "$OUT/summary.json" --server-log-level "${SERVER_LOG_LEVEL:-info}" 2>&1 | tee -a "$OUT/run.log"
rc=$?
log "bench_serve rc $rc"
exit $rc
