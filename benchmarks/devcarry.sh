#!/usr/bin/env bash
# Wheels the lent GPU machine lacks, for benchmarks/gpu_env.sh: downloads them here (PyPI) into .devcarry/whl,
# for CPython 3.12 on x86-64 Linux (the device image's python3), at the versions scripts/constraints.txt pins.
# Name `.devcarry` in the device call's carry. torch, transformers, numpy and the other packages the image
# already has are left out: gpu_env.sh installs only wheels whose distribution is missing there or older.
#
#     bash benchmarks/devcarry.sh            # then: du -sh .devcarry (it travels with the tree, 64 MiB in all)
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS="pydantic pydantic_core annotated-types typing-inspection typing_extensions pluggy click tifffile zarr
numcodecs donfig google-crc32c filelock timm peft fastapi starlette annotated-doc uvicorn h11 anyio httpx
httpcore certifi idna gguf opentelemetry-api importlib_metadata zipp openslide-python
openslide-bin imagecodecs pydicom ${EXTRA_PKGS:-}"
mkdir -p .devcarry/whl
pins=()
for p in $PKGS; do
  pin=$(grep -i -m1 -E "^${p//[-_]/[-_]}==" scripts/constraints.txt) || { echo "devcarry: $p is not pinned in scripts/constraints.txt" >&2; exit 1; }
  pins+=("$pin")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .devcarry/whl "${pins[@]}"
ls .devcarry/whl | wc -l
du -sh .devcarry
