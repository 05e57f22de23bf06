#!/usr/bin/env bash
# On the GPU node (Python 3.12, torch 2.11+cu130, nvcc 13): install megatron-core and
# Transformer Engine 2.20.2 from .wheels/ into TARGET (default /tmp/site) without network.
# Verified recipe: pip --no-index --no-deps --target, then build transformer_engine_torch
# from its sdist into the SAME target (about 133 s with 16 cores).
#   bash benchmarks/gpu/install_te.sh [TARGET]; export PYTHONPATH=TARGET
set -euo pipefail
cd "$(dirname "$0")/../.."
target=${1:-/tmp/site}
wheels=.wheels
core_parts=("$wheels"/transformer_engine_cu13-*.whl.part*)
if [ -e "${core_parts[0]}" ]; then
  core=${core_parts[0]%.part*}
  cat "${core_parts[@]}" > "$core"
  (cd "$wheels" && sha256sum -c "$(basename "$core").sha256")
fi
python3 -m pip install -q --no-index --no-deps --no-compile --target "$target" "$wheels"/*.whl
MAX_JOBS=${MAX_JOBS:-16} python3 -m pip install -q --no-index --no-deps --no-build-isolation \
  --target "$target" "$wheels"/transformer_engine_torch-2.20.2.tar.gz
PYTHONPATH=$target python3 -c "import transformer_engine.pytorch as te, megatron.core; print('TE', te.__version__ if hasattr(te, '__version__') else 'ok', 'megatron-core', megatron.core.__version__)"
