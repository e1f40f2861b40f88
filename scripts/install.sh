#!/usr/bin/env bash
# Create .venv with everything the project and its tests need, at CI's exact versions (constraints.txt), and each
# transformers release of the compatibility matrix (requirements-compat.txt) in its own folder .tf<version>.
# Idempotent: what is already installed stays. mamba-ssm is optional and not installed here (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
"${PIP[@]}" -r requirements-test.txt -c constraints.txt
"${PIP[@]}" --no-deps -e .  # mambavision_tools and the converter
# The matrix's folders take transformers, huggingface_hub and tokenizers from their line, the rest from
# constraints.txt (without the main environment's pins of those three).
matrix_constraints=$(mktemp)
trap 'rm -f "$matrix_constraints"' EXIT
grep -v -i -E '^(transformers|huggingface[-_]hub|tokenizers)==' constraints.txt > "$matrix_constraints"
# A folder is rebuilt when its line or the constraints change: pip --target copies shared packages (numpy, ...)
# into it, which shadow .venv's under PYTHONPATH, so stale copies must not outlive a bump.
grep -v -E '^\s*(#|$)' requirements-compat.txt | while read -r -a line; do
  version=${line[0]#transformers==}
  stamp="${line[*]} $(sha256sum < "$matrix_constraints")"
  if [ "$(cat ".tf$version/.installed" 2>/dev/null)" != "$stamp" ]; then
    rm -rf ".tf$version"
    "${PIP[@]}" --target ".tf$version" "${line[@]}" -c "$matrix_constraints"
    echo "$stamp" > ".tf$version/.installed"
  fi
done
