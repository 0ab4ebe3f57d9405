#!/usr/bin/env bash
# Download the wheels the GPU host lacks (it has no network) for python 3.12 manylinux x86_64 into wheels/
# (gitignored), with every dependency, so that on the GPU host, from the repository root, one command suffices:
#
#   pip install --no-index --find-links wheels grain tensorboardX && python -m bench.accelerator --write
#
# Run here (where PyPI is reachable) before copying the tree over: bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m pip download --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d wheels grain tensorboardX
ls wheels
