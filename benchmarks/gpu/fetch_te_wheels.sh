#!/usr/bin/env bash
# On the login/dev machine (internet or a package mirror): download what a GPU node without
# network needs to run the Transformer Engine path, into the git-ignored .wheels/ folder.
# The big transformer-engine-cu13 wheel is split into 58 MiB parts so each part fits one
# transfer of a size-limited channel; install_te.sh joins and checks them.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=.wheels
mkdir -p "$out"
platform=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platform[@]}" -d "$out" megatron-core==0.16.1 transformer-engine==2.20.2 \
  transformer-engine-cu13==2.20.2 pydantic pydantic-core annotated-types typing-inspection
pip download --no-deps --no-binary=:all: -d "$out" transformer_engine_torch==2.20.2
cd "$out"
core=$(ls transformer_engine_cu13-*.whl)
sha256sum "$core" > "$core.sha256"
split -b 58m -d "$core" "$core.part"
rm "$core"
ls -la
