#!/usr/bin/env bash
# Create a virtual environment and install engram into it.
#
#   bash scripts/setup.sh          # the project and what the pipeline needs
#   bash scripts/setup.sh --test   # also what the test suite needs (the test extra)
#   ENGRAM_EXTRAS=hf,tensorboard bash scripts/setup.sh   # optional extras (hf: datasets/hub inputs)
#
# The venv is ./.venv (override with ENGRAM_VENV=DIR). PyTorch is chosen for the machine before
# the project is installed, so that pip never pulls a multi-GB CUDA build onto a CPU machine:
#   1. a torch already in the venv is kept;
#   2. a local wheel of torch==$ENGRAM_TORCH_VERSION (pip's find-links) is used when there is one;
#   3. with an NVIDIA driver (nvidia-smi), the default PyPI build, which bundles CUDA;
#   4. otherwise the CPU-only build from PyTorch's CPU index.
# ENGRAM_TORCH_INDEX=URL forces an index (e.g. https://download.pytorch.org/whl/cu128).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${ENGRAM_VENV:-.venv}"
TORCH_VERSION="${ENGRAM_TORCH_VERSION:-2.13.0}"
EXTRAS="${ENGRAM_EXTRAS:-}"
[[ "${1:-}" == "--test" ]] && EXTRAS="test${EXTRAS:+,$EXTRAS}"
EXTRA="${EXTRAS:+[$EXTRAS]}"

[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

if "$PY" -c "import torch" 2>/dev/null; then
    echo "setup: keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)')" >&2
elif [[ -n "${ENGRAM_TORCH_INDEX:-}" ]]; then
    "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url "$ENGRAM_TORCH_INDEX"
elif "${PIP[@]}" install --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
    echo "setup: torch $TORCH_VERSION from a local wheel" >&2
elif command -v nvidia-smi >/dev/null 2>&1; then
    "${PIP[@]}" install "torch==$TORCH_VERSION"
else
    "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
fi

# Gate pictures label Chinese tokens: without a CJK font they show boxes (inspect-gates warns).
# Best effort, main job only: as root on Debian/Ubuntu, install a small one if none is present.
if [[ "${1:-}" != "--test" && "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1 \
        && ! (command -v fc-list >/dev/null 2>&1 && fc-list :lang=zh 2>/dev/null | grep -q .); then
    (apt-get update -qq && apt-get install -y -qq fonts-wqy-microhei) >/dev/null 2>&1 \
        && echo "setup: installed a CJK font (fonts-wqy-microhei)" >&2 || echo "setup: no CJK font installed (optional)" >&2
fi

# pip's exit status decides (a dependency that does not install stops the setup here, loudly);
# only its noise about the venv location is filtered out of what it printed.
if ! "${PIP[@]}" install -e ".$EXTRA" > "$VENV/pip-install.log" 2>&1; then
    grep -v "^WARNING: Location" "$VENV/pip-install.log" >&2
    echo "setup: installing engram$EXTRA failed (pip's output above, also in $VENV/pip-install.log)" >&2
    exit 1
fi
grep -v "^WARNING: Location" "$VENV/pip-install.log" >&2 || true
"$PY" -c "import engram_cli, torch; print(f'setup: engram {engram_cli.__version__} with torch {torch.__version__} in $VENV')" >&2
