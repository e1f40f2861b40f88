#!/usr/bin/env bash
# Create .venv with everything the project and its tests need, at CI's exact versions (constraints.txt), and each
# transformers release of the compatibility matrix (requirements-compat.txt) in its own folder .tf<version>.
# Idempotent: what is already installed stays. mamba-ssm is optional and not installed here (see README).
#
#   bash scripts/install.sh               # .venv and the matrix (what CI runs)
#   bash scripts/install.sh --no-matrix   # .venv only: tests/test_compat.py then skips the matrix's rows, saying so
set -Eeuo pipefail
cd "$(dirname "$0")/.."
matrix=yes
case "${1:-}" in
  "") ;;
  --no-matrix) matrix=no ;;
  *) echo "usage: bash scripts/install.sh [--no-matrix]" >&2; exit 2 ;;
esac
step="starting"
trap 'echo "install.sh: FAILED while $step (the messages above say why); run it again to resume" >&2' ERR
PYTHON=${PYTHON:-python3}
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
NO_MATRIX_MARK=.venv/no-compat-matrix  # read by tests/test_compat.py: the matrix was left out on purpose

step="creating .venv with $PYTHON"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
step="installing requirements-test.txt into .venv (pinned by constraints.txt)"
"${PIP[@]}" -r requirements-test.txt -c constraints.txt
step="installing this repository's tools into .venv (pip install -e .)"
"${PIP[@]}" --no-deps -e .

matrix_summary="compatibility matrix left out (--no-matrix)"
if [ "$matrix" = yes ]; then
  rm -f "$NO_MATRIX_MARK"
  # Each folder is put in front of .venv (PYTHONPATH) and holds only what its line needs that .venv lacks at the
  # same version: pip resolves the line on its own (the rest pinned by constraints.txt, without the main
  # environment's pins of transformers, huggingface_hub and tokenizers), then installs just the difference,
  # --no-deps. (A plain `pip install --target` copies every dependency, and its conflict check reads .venv's
  # packages: datasets, used by the main environment's fine-tuning only, needs a newer huggingface_hub than the
  # 4.x lines have, which pip reported as an ERROR although no row imports datasets.)
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  grep -v -i -E '^(transformers|huggingface[-_]hub|tokenizers)==' constraints.txt > "$work/constraints.txt"
  versions=()
  while read -r -a line; do
    version=${line[0]#transformers==}
    versions+=("$version")
    # A folder is rebuilt when its line or the constraints change, so no stale package outlives a bump.
    stamp="${line[*]} $(sha256sum < "$work/constraints.txt")"
    [ "$(cat ".tf$version/.installed" 2>/dev/null)" = "$stamp" ] && continue
    step="resolving ${line[*]} for .tf$version"
    rm -rf ".tf$version"
    "${PIP[@]}" --dry-run --ignore-installed --report "$work/report.json" "${line[@]}" -c "$work/constraints.txt"
    .venv/bin/python - "$work/report.json" > "$work/missing.txt" <<'EOF'
import json, re, sys
from importlib.metadata import distributions
def key(name, version):
    return re.sub(r"[-_.]+", "-", name).lower(), version
installed = {key(d.metadata["Name"], d.version) for d in distributions()}
for item in json.load(open(sys.argv[1]))["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if key(name, version) not in installed:
        print(f"{name}=={version}")
EOF
    step="installing .tf$version ($(paste -sd ' ' "$work/missing.txt"))"
    "${PIP[@]}" --no-deps --target ".tf$version" -r "$work/missing.txt"
    echo "$stamp" > ".tf$version/.installed"
  done < <(grep -v -E '^\s*(#|$)' requirements-compat.txt)
  matrix_summary="compatibility matrix: transformers ${versions[*]} in .tf<version> ($(du -shc .tf* | tail -1 | cut -f1))"
else
  touch "$NO_MATRIX_MARK"
fi

step="reading what was installed"
main=$(.venv/bin/python -c 'import sys, torch, transformers, timm
print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, timm {timm.__version__}")')
echo "install.sh: installed .venv ($main; $(du -sh .venv | cut -f1)); $matrix_summary"
