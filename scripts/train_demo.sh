#!/usr/bin/env bash
# Re-create the shipped demo weights (core/wsi_llava/model/demo_weights/) from scratch:
#   synthetic training worlds -> feature pack (demo-vit tiles) -> stage 1 -> stage 2 -> stage 3 -> copy.
# Stage 1 runs fine on a CPU; stages 2 and 3 want a GPU (a few minutes on one H100).
# Usage: scripts/train_demo.sh [RUN_DIR]   (env: DEVICE=auto|cuda|cpu, NPROC=1|2|... GPUs for stage 3)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/demo}
DEVICE=${DEVICE:-auto}
NPROC=${NPROC:-1}
export HF_HUB_OFFLINE=1
mkdir -p "$RUN"
# Two training worlds; held-out evaluation worlds must use other seeds (the demo was checked on seed 777).
[ -f "$RUN/worlds/train_102/manifest.json" ] || wsi-llava synth "$RUN/worlds/train_102" --n-slides 70 --seed 102 --size 2048 --split train
[ -f "$RUN/worlds/train_101/manifest.json" ] || wsi-llava synth "$RUN/worlds/train_101" --n-slides 70 --seed 101 --size 2560 --split train
python -m wsi_llava.train prepare --bench "$RUN/worlds/train_102" --out "$RUN/pack_102.pt"
python -m wsi_llava.train prepare --bench "$RUN/worlds/train_101" --out "$RUN/pack_101.pt"
python -m wsi_llava.train stage1 --config configs/demo/stage1.yaml --out "$RUN/stage1" --device "$DEVICE"
python -m wsi_llava.train stage2 --config configs/demo/stage2.yaml --out "$RUN/stage2" --device "$DEVICE"
if [ "$NPROC" -gt 1 ]; then
  torchrun --nproc-per-node "$NPROC" -m wsi_llava.train stage3 --config configs/demo/stage3.yaml --out "$RUN/stage3"
else
  python -m wsi_llava.train stage3 --config configs/demo/stage3.yaml --out "$RUN/stage3" --device "$DEVICE"
fi
rm -rf core/wsi_llava/model/demo_weights
cp -r "$RUN/stage3/final" core/wsi_llava/model/demo_weights
echo "demo weights written to core/wsi_llava/model/demo_weights"
