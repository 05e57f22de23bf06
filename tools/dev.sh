#!/usr/bin/env bash
# Set up a virtual environment in .venv (once) and run the demo or the test suite.
#   bash tools/dev.sh demo [hydra overrides...]   a real tiny Megatron training run, 2 CPU ranks
#   bash tools/dev.sh test [pytest args...]       the whole test suite (starts a local Slurm)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=.venv

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "setting up $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
  fi
  # (Re)install when the venv is new or setup.cfg's dependencies changed since the last install.
  local stamp="$VENV/.installed-setup.cfg"
  if ! cmp -s setup.cfg "$stamp" \
     || ! "$VENV/bin/python" -c "import launch, megatron.core, torch, pytest" 2>/dev/null; then
    # torch first, pinned: a CPU build where one is on the local index, before megatron-core
    # could pull a multi-GB CUDA build through its own dependency on torch.
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -e ".[test]"
    cp setup.cfg "$stamp"
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  demo) setup; exec "$VENV/bin/python" -m launch "$@" ;;
  test) setup; exec "$VENV/bin/python" -m pytest "$@" ;;
  setup) setup ;;
  *) echo "usage: bash tools/dev.sh {demo|test|setup} [args...]" >&2; exit 2 ;;
esac
