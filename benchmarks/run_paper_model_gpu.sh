#!/usr/bin/env bash
# The paper model through the CLI on one H100 / H200, the single device command (carry .devcarry):
#
#     bash benchmarks/run_paper_model_gpu.sh
#
# Sources benchmarks/gpu_env.sh (carried wheels, PYTHONPATH, a `wsi-llava` command), then runs
# bench_paper_model_cli.py: full-size random weights in the official layouts generated on the GPU, a
# 20,000-tissue-tile slide with 20 QuPath annotations, and `wsi-llava models add / check / ask / describe`
# in fresh processes. Writes under $OUT: paper_model_cli.json (rewritten after every stage, so a run cut
# short keeps what it measured), summary.json (the headline keys), commands.log (every command's output),
# bench.log. Takes about 5-7 minutes; BUDGET_S (default 470) stops starting stages past it, and the
# whole script stays under 9 minutes. File the result here with:
#     python benchmarks/bench_paper_model_cli.py --from-json FILES_AT/paper_model_cli.json
set -o pipefail
: "${OUT:?set OUT to the folder for paper_model_cli.json}"
t0=$SECONDS
if ! . benchmarks/gpu_env.sh >"$OUT/env.log" 2>&1; then
    cat "$OUT/env.log"
    exit 1
fi
cat "$OUT/env.log"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader
df -h /tmp | tail -1
budget=$((${BUDGET_S:-470} - (SECONDS - t0)))
timeout --kill-after=5 $((budget + 25)) python3 benchmarks/bench_paper_model_cli.py \
    --workdir "${WORKDIR:-/tmp/wsi_llava_paper_cli}" --out "$OUT/paper_model_cli.json" \
    --summary "$OUT/summary.json" --budget-s "$budget" "$@" 2>&1 | tee "$OUT/bench.log"
rc=$?
echo "run_paper_model_gpu.sh: rc $rc after $((SECONDS - t0)) s"
exit $rc
