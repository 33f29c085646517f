#!/usr/bin/env bash
# Set up .venv with pie-driver-trtllm and its reference engine (CPU torch), idempotently.
#   ./install.sh          runtime + reference engine (enough for the demo)
#   ./install.sh --dev    also the test tools (pytest, hypothesis, ruff)
set -euo pipefail
cd "$(dirname "$0")"

die() { echo "install.sh: $*" >&2; exit 1; }

extras="reference"
for arg in "$@"; do
  case "$arg" in
    --dev) extras="reference,dev" ;;
    -h|--help) sed -n '2,4p' "$0"; exit 0 ;;
    *) die "unknown argument '$arg' (use --dev or nothing)" ;;
  esac
done

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PY="$candidate"; break; fi
  done
fi
[ -n "$PY" ] || die "no python3 found; install Python 3.11 or 3.12"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
  || die "$("$PY" -V 2>&1) is too old; Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)"

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $("$PY" -V 2>&1)"
  "$PY" -m venv .venv || die "could not create .venv (on Debian/Ubuntu: apt-get install python3-venv)"
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true

# torch 2.13.0 has a local CPU wheel for Python 3.11 on this project's machines; installing it first keeps
# pip from pulling a multi-GB CUDA build. Elsewhere: PyTorch's CPU index without an NVIDIA GPU, else pip's
# default (CUDA) torch. This is the long step, so pip shows its own progress here.
if ! "$VPY" -c 'import torch' >/dev/null 2>&1; then
  if ls /dev/nvidia[0-9]* >/dev/null 2>&1; then
    echo "==> installing torch (CUDA build: a few GB to download)"
    "$VPY" -m pip install --progress-bar on torch || die "torch install failed"
  else
    echo "==> installing torch (CPU build, about 200 MB; no NVIDIA GPU here)"
    if [ "$("$VPY" -c 'import sys; print(sys.version_info[:2] == (3, 11))')" = "True" ] \
        && "$VPY" -m pip install --progress-bar on torch==2.13.0+cpu; then
      :
    else
      "$VPY" -m pip install --progress-bar on torch --index-url https://download.pytorch.org/whl/cpu \
        || die "torch install failed"
    fi
  fi
fi

echo "==> installing pie-driver-trtllm[$extras]"
# setuptools boxes an informational note about editable installs on every run; it asks nothing of anyone.
PYTHONWARNINGS="ignore:Editable installation${PYTHONWARNINGS:+,$PYTHONWARNINGS}" \
  "$VPY" -m pip install -q -e ".[$extras]" || die "pip could not install .[$extras]; see the messages above"
"$VPY" -c 'import pie_driver_trtllm, torch, transformers, zmq, msgspec' || die "installed, but imports fail"
echo "==> ready: .venv/bin/pie-driver-trtllm --help"
