#!/usr/bin/env bash
# Re-create the shipped demo weights (core/wsi_llava/model/demo_weights/) from scratch:
#   synthetic training worlds -> tile packs -> tile-text alignment (trains demo-vit) -> feature packs made
#   with the trained tile encoder -> stage 1 -> stage 2 -> stage 3 -> stage 3b (front-end questions) -> copy
#   -> training tile-feature statistics (behind the out-of-distribution warning).
# The tile stage and stages 2 and 3 want a GPU (a few minutes on one H100); the rest runs on a CPU.
# Usage: scripts/train_demo.sh [RUN_DIR]   (env: DEVICE=auto|cuda|cpu, NPROC=1|2|... GPUs for stage 3)
# The configs read runs/demo/...: with another RUN_DIR, edit the paths in configs/demo/*.yaml too.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/demo}
DEVICE=${DEVICE:-auto}
NPROC=${NPROC:-1}
export HF_HUB_OFFLINE=1
mkdir -p "$RUN"
# Two training worlds; held-out evaluation worlds must use other seeds (the demo was checked on seed 777).
for seed in 101 102; do
  # a world of generator 1 has the same pixels but no Preset_Questions: made again
  [ -f "$RUN/worlds/train_$seed/bench/Preset_Questions_train.json" ] ||
    wsi-llava synth "$RUN/worlds/train_$seed" --n-slides 100 --seed $seed --size 2560 --split train --overwrite
  [ -f "$RUN/tiles_$seed.pt" ] ||
    python -m wsi_llava.train prepare-tiles --bench "$RUN/worlds/train_$seed" --out "$RUN/tiles_$seed.pt" \
      --max-tiles-per-region 16
done
python -m wsi_llava.train tiles --config configs/demo/tiles.yaml --out "$RUN/tiles" --device "$DEVICE"
for seed in 101 102; do
  python -m wsi_llava.train prepare --bench "$RUN/worlds/train_$seed" --out "$RUN/pack_$seed.pt" \
    --weights "$RUN/tiles/final/tile_encoder.safetensors"
done
python -m wsi_llava.train stage1 --config configs/demo/stage1.yaml --out "$RUN/stage1" --device "$DEVICE"
python -m wsi_llava.train stage2 --config configs/demo/stage2.yaml --out "$RUN/stage2" --device "$DEVICE"
if [ "$NPROC" -gt 1 ]; then
  torchrun --nproc-per-node "$NPROC" -m wsi_llava.train stage3 --config configs/demo/stage3.yaml --out "$RUN/stage3"
else
  python -m wsi_llava.train stage3 --config configs/demo/stage3.yaml --out "$RUN/stage3" --device "$DEVICE"
fi
# stage 3b: the same model goes on with the front ends' questions (configs/demo/stage3_presets.yaml)
python -m wsi_llava.train stage3 --config configs/demo/stage3_presets.yaml --out "$RUN/stage3_presets" \
  --device "$DEVICE"
rm -rf core/wsi_llava/model/demo_weights
cp -r "$RUN/stage3_presets/final" core/wsi_llava/model/demo_weights
# Where the training tiles' features lie: answers on slides far from the synthetic world carry a warning.
python -m wsi_llava.train feature-stats --pack "$RUN/pack_101.pt" --pack "$RUN/pack_102.pt" \
  --checkpoint core/wsi_llava/model/demo_weights
echo "demo weights written to core/wsi_llava/model/demo_weights"
