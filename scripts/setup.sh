#!/usr/bin/env bash
# Create .venv with the CPU build of torch and nanodiffusion; `setup.sh dev` adds the test oracles.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
if [ "${1:-}" = dev ]; then
  .venv/bin/pip install -q -e '.[dev]'
  .venv/bin/pip install -q --no-deps k-diffusion clip-anytorch
else
  .venv/bin/pip install -q -e .
fi
