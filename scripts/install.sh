#!/usr/bin/env bash
# Create .venv with everything the project and its tests need (idempotent), plus transformers 4.57 in
# .tf457 for the compatibility test. mamba-ssm is optional and not installed here (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-test.txt
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .  # mambavision_tools and the converter
if [ ! -d .tf457/transformers ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --target .tf457 "transformers==4.57.6" "huggingface_hub<1.0"
fi
