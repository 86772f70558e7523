#!/usr/bin/env bash
# Issue 7: cohort featurization, 1 GPU vs 2 GPUs (torchrun, dynamic slide claiming), on a 2-GPU machine.
# Run from the repository root with $OUT set, carrying .devcarry/whl (zarr, numcodecs, donfig,
# google-crc32c, pydantic, pluggy, click wheels):   bash benchmarks/run_cohort_gpu.sh
# Writes $OUT/cohort.json and $OUT/cohort.log; takes about 3-4 minutes (ViT-g, 40,740 tiles, 14 slides).
set -o pipefail
: "${OUT:?set OUT to the folder for cohort.json}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if ! python3 -c "import zarr, numcodecs, pydantic, pluggy, click" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .devcarry/whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD/core
fi
case ":${PYTHONPATH:-}:" in *":$PWD/core:"*) ;; *) export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/core ;; esac
python3 -c "import zarr, wsi_llava.cli, torch; print('zarr', zarr.__version__, 'torch', torch.__version__)" || exit 1
nvidia-smi -L
timeout 290 python3 benchmarks/bench_cohort.py --nproc 2 --out "$OUT/cohort.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/cohort.log" | tail -25
